"""Sensors that print lines of text: framing, parsing, and the serial source that runs them.

Three layers, each testable alone:

* :class:`LineFramer` (pure, bytes in, text lines out) splits on the delimiter with a buffer that
  never holds more than ``max_line_bytes``; overlong lines, binary garbage (undecodable bytes,
  control characters) and partial frames are discarded and counted by reason.
* :class:`LineParser` (pure) turns one line into measurements: a regex with named groups,
  ``key=value`` pairs or CSV columns, with scale/offset per field and an optional NMEA ``*hh``
  checksum. It raises :class:`LineParseError` (a ValueError) with a reason.
* :class:`AsciiLineSource` runs both on a :class:`~drivers.serial_port.PortSupervisor` port and
  emits a ``Reading`` per valid line, plus a ``gap`` event when nothing valid arrived for
  ``gap_after_s`` (and ``gap_ended`` when lines come back).
"""

from __future__ import annotations

import asyncio
import codecs
import errno
import re
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from drivers.serial_port import PortLostError, PortSupervisor, SerialSettings
from gateway.errors import EventValidationError
from gateway.types import (
    Emit,
    Event,
    Measurement,
    Reading,
    ReportError,
    Severity,
    utc_now,
)

# Control characters that never belong in a text line (tab is a separator some sensors use;
# CR is stripped from line ends before this check, so a CR left inside a line is garbage).
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
# A decimal number as sensors print it. Stricter than float(): no "nan", "inf", "1_000", hex.
_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")
_NMEA_TAIL = re.compile(r"\*([0-9A-Fa-f]{2})$")

# Reasons a framer discards bytes (counter keys).
OVERLONG = "overlong"
GARBAGE = "garbage"
PARTIAL = "partial"


def check_encoding(encoding: str) -> str:
    """The codec's canonical name if it can frame lines byte-wise (ASCII-compatible).

    Raises ValueError otherwise (UTF-16 puts NUL bytes inside every character).
    """
    try:
        info = codecs.lookup(encoding)
    except LookupError as exc:
        raise ValueError(f"unknown encoding {encoding!r}") from exc
    try:
        ascii_compatible = "azAZ09=,*$\n\r\t".encode(info.name) == b"azAZ09=,*$\n\r\t"
    except (UnicodeError, LookupError):
        ascii_compatible = False
    if not ascii_compatible:
        raise ValueError(
            f"encoding {encoding!r} is not ASCII-compatible (use ascii, latin-1, utf-8)"
        )
    return info.name


class LineFramer:
    """Splits a byte stream into text lines with a bounded buffer.

    ``feed(data)`` returns the complete lines (decoded, surrounding whitespace and CR stripped,
    empty lines skipped). What it drops is counted in ``discarded`` by reason:

    * ``overlong``: more than ``max_line_bytes`` without a delimiter. The bytes are dropped as
      they arrive and everything up to the next delimiter is skipped; the buffer never grows
      past ``max_line_bytes``.
    * ``garbage``: a line that does not decode in ``encoding`` or holds control characters
      (noise, a wrong baud rate, a sensor booting).
    * ``partial``: a fragment dropped by :meth:`drop_partial` (the port closed mid-line, or the
      rest of the line never came within the read timeout).
    """

    def __init__(self, delimiter: str = "\n", encoding: str = "ascii", max_line_bytes: int = 512):
        if not delimiter:
            raise ValueError("the delimiter must not be empty")
        self._encoding = check_encoding(encoding)
        self._delimiter = delimiter.encode(self._encoding)
        if max_line_bytes < 1:
            raise ValueError("max_line_bytes must be at least 1")
        self.max_line_bytes = max_line_bytes
        self._buffer = b""
        self._skipping = False
        self.discarded: Counter[str] = Counter()
        self.dropped = 0  # sum of discarded
        self.recent: set[str] = set()  # reasons of the discards of the last feed()
        self.frames = 0  # delimited frames seen (valid lines and discarded ones, not empty)
        self.lines = 0  # lines returned
        self.bytes = 0

    @property
    def pending(self) -> int:
        """Bytes of an unfinished line held in the buffer."""
        return 0 if self._skipping else len(self._buffer)

    @property
    def buffered(self) -> int:
        """Bytes held (an unfinished line, or the tail kept to find a split delimiter)."""
        return len(self._buffer)

    def feed(self, data: bytes) -> list[str]:
        """Add received bytes; return the lines they complete."""
        self.bytes += len(data)
        if self.recent:
            self.recent = set()
        delimiter = self._delimiter
        keep = len(delimiter) - 1
        buffer = self._buffer + data
        lines: list[str] = []
        if self._skipping:
            end = buffer.find(delimiter)
            if end < 0:
                # Only what could be the start of a delimiter split across reads.
                self._buffer = buffer[-keep:] if keep else b""
                return lines
            self._skipping = False
            buffer = buffer[end + len(delimiter) :]
        parts = buffer.split(delimiter)
        rest = parts.pop()
        for part in parts:
            if len(part) > self.max_line_bytes:
                self.frames += 1
                self._discard(OVERLONG)
                continue
            line = self._decode(part)
            if line:
                lines.append(line)
        if len(rest) > self.max_line_bytes:
            # Counted now, once, though its end is still to come: the buffer stays bounded.
            self.frames += 1
            self._discard(OVERLONG)
            self._skipping = True
            rest = rest[-keep:] if keep else b""
        self._buffer = rest
        self.lines += len(lines)
        return lines

    def _decode(self, part: bytes) -> str | None:
        try:
            text = part.decode(self._encoding)
        except UnicodeDecodeError:
            self.frames += 1
            self._discard(GARBAGE)
            return None
        text = text.strip(" \t\r")
        if not text:
            return None
        self.frames += 1
        if _CONTROL.search(text):
            self._discard(GARBAGE)
            return None
        return text

    def _discard(self, reason: str) -> None:
        self.discarded[reason] += 1
        self.dropped += 1
        self.recent.add(reason)

    def drop_partial(self) -> bool:
        """Discard an unfinished line (counted as ``partial``); True if there was one."""
        had = bool(self._buffer) and not self._skipping
        if had:
            self._discard(PARTIAL)
        self._buffer = b""
        self._skipping = False
        return had


class LineParseError(ValueError):
    """A line that yields no reading; ``reason`` is its counter key (no_match, not_a_number...)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class FieldSpec:
    """One field of a line → one measurement: ``value * scale + offset``."""

    key: str
    name: str
    unit: str | None = None
    scale: float = 1.0
    offset: float = 0.0


def nmea_checksum(body: str) -> int:
    """XOR of the characters' codes (NMEA 0183: between '$' and '*')."""
    value = 0
    for char in body.encode("latin-1", "replace"):
        value ^= char
    return value


def _shorten(line: str) -> str:
    return repr(line if len(line) <= 60 else line[:57] + "...")


class LineParser:
    """One text line → measurements, from a regex, key=value pairs or CSV columns.

    A field whose value is absent or empty is left out and the reading is flagged ``incomplete``
    (a broken wind vane should not discard the temperature); a line with none of the fields is
    an error. Values must be plain decimal numbers.
    """

    def __init__(
        self,
        fields: Sequence[FieldSpec],
        *,
        format: str = "regex",
        pattern: str | None = None,
        separator: str = ",",
        key_separator: str = "=",
        checksum: str = "none",
    ) -> None:
        if not fields:
            raise ValueError("at least one field is needed")
        if format not in ("regex", "keyvalue", "csv"):
            raise ValueError(f"unknown format {format!r}")
        if checksum not in ("none", "nmea"):
            raise ValueError(f"unknown checksum {checksum!r}")
        self._fields = tuple(fields)
        self._format = format
        self._separator = separator
        self._key_separator = key_separator
        self._checksum = checksum
        self._regex: re.Pattern[str] | None = None
        self._columns: tuple[int, ...] = ()
        if format == "regex":
            if not pattern:
                raise ValueError("the regex format needs a pattern")
            self._regex = re.compile(pattern)
            missing = [f.key for f in fields if f.key not in self._regex.groupindex]
            if missing:
                raise ValueError(f"fields without a named group in the pattern: {missing}")
        elif format == "csv":
            try:
                self._columns = tuple(int(f.key) for f in fields)
            except ValueError as exc:
                raise ValueError("csv field keys are 0-based column numbers") from exc
            if min(self._columns) < 0:
                raise ValueError("csv field keys are 0-based column numbers")

    def parse(self, line: str) -> tuple[Measurement, ...]:
        """The measurements of a line; raises LineParseError naming the reason."""
        return self.parse_detailed(line)[0]

    def parse_detailed(self, line: str) -> tuple[tuple[Measurement, ...], tuple[str, ...]]:
        """The measurements of a line and the keys of the fields it lacked."""
        text = line.strip()
        if self._checksum == "nmea":
            text = self._verify_nmea(text)
        raw = self._raw_values(text)
        values: list[Measurement] = []
        missing: list[str] = []
        for spec, found in zip(self._fields, raw, strict=True):
            if found is None or not found.strip():
                missing.append(spec.key)
                continue
            number = found.strip()
            if not _NUMBER.fullmatch(number):
                raise LineParseError(
                    "not_a_number", f"{spec.key}: not a number (got: {_shorten(number)})"
                )
            value = float(number) * spec.scale + spec.offset
            try:
                values.append(Measurement(spec.name, value, spec.unit))
            except EventValidationError as exc:
                raise LineParseError("bad_value", f"{spec.key}: {exc}") from exc
        if not values:
            raise LineParseError("no_values", f"none of the fields found in {_shorten(line)}")
        return tuple(values), tuple(missing)

    def _verify_nmea(self, text: str) -> str:
        match = _NMEA_TAIL.search(text)
        if match is None:
            raise LineParseError("checksum_missing", f"no *hh checksum in {_shorten(text)}")
        payload = text[: match.start()]
        # NMEA sentences start with '$' (or '!' for encapsulated ones), outside the checksum.
        body = payload[1:] if payload[:1] in ("$", "!") else payload
        expected = int(match.group(1), 16)
        actual = nmea_checksum(body)
        if actual != expected:
            raise LineParseError(
                "checksum_mismatch",
                f"checksum {expected:02X} but the line sums to {actual:02X} in {_shorten(text)}",
            )
        return payload

    def _raw_values(self, text: str) -> list[str | None]:
        if self._regex is not None:
            match = self._regex.search(text)
            if match is None:
                raise LineParseError("no_match", f"pattern does not match {_shorten(text)}")
            return [match.group(f.key) for f in self._fields]
        parts = text.split(self._separator)
        if self._format == "csv":
            return [parts[i] if i < len(parts) else None for i in self._columns]
        pairs: dict[str, str] = {}
        for part in parts:
            key, sep, value = part.partition(self._key_separator)
            if sep:
                pairs[key.strip()] = value
        if not pairs:
            raise LineParseError(
                "no_match", f"no key{self._key_separator}value in {_shorten(text)}"
            )
        return [pairs.get(f.key) for f in self._fields]


@dataclass(frozen=True, slots=True)
class Framing:
    """How a byte stream is cut into lines (see LineFramer)."""

    delimiter: str = "\n"
    encoding: str = "ascii"
    max_line_bytes: int = 512


# A reason is logged (report_error) at its first occurrence and then at most once per this
# interval with the count in between: a wrong baud rate yields hundreds of garbage lines a
# second, which must be visible in the log without flooding the journal.
_REPORT_EVERY_S = 60.0


class AsciiLineSource:
    """A sensor that prints lines of text on a serial port.

    Emits a Reading (source=name, device=device, ts=arrival in UTC) per valid line; discarded
    bytes and rejected lines are counted by reason in :attr:`counters`. With ``gap_after_s``, a
    ``gap`` event (warning) when no valid line arrived for that long, once per gap, and a
    ``gap_ended`` event with the gap's length when lines come back. ``max_lines`` ends the source
    after that many lines (valid or not): the demo uses it to finish.
    """

    def __init__(
        self,
        name: str,
        device: str,
        settings: SerialSettings,
        framing: Framing,
        parser: LineParser,
        *,
        gap_after_s: float | None = None,
        max_lines: int | None = None,
    ) -> None:
        self.name = name
        self.device = device or name
        self.port = PortSupervisor(name, self.device, settings)
        self._settings = settings
        self._framing = framing
        # Checked here, at build time: a bad encoding is a config error, not a runtime one.
        self._framer = LineFramer(framing.delimiter, framing.encoding, framing.max_line_bytes)
        self._parser = parser
        self._gap_after_s = gap_after_s
        self._max_lines = max_lines
        self._counts: Counter[str] = Counter()
        self._framer_totals: Counter[str] = Counter()
        self.readings = 0
        self.last_valid: float | None = None  # time.monotonic() of the last valid line
        self._valid = asyncio.Event()
        self._reported: dict[str, tuple[float, int]] = {}
        self.in_gap = False

    @property
    def counters(self) -> Mapping[str, int]:
        """Readings, bytes, lines and every discard/reject reason (cumulative over re-opens)."""
        framer = self._framer
        totals = Counter(self._framer_totals)
        totals.update(framer.discarded)
        totals.update(self._counts)
        totals["readings"] = self.readings
        totals["bytes"] = self._framer_totals["bytes"] + framer.bytes
        totals["lines"] = self._framer_totals["lines"] + framer.frames
        return dict(totals)

    async def run(self, emit: Emit, report_error: ReportError) -> None:
        """Read lines until cancelled (or ``max_lines`` lines were seen)."""
        started = time.monotonic()

        async def session(reader: asyncio.StreamReader, _writer: asyncio.StreamWriter) -> None:
            await self._session(reader, emit, report_error)

        async with asyncio.TaskGroup() as tg:
            watcher = None
            if self._gap_after_s is not None:
                watcher = tg.create_task(
                    self._watch_gaps(emit, started, self._gap_after_s), name=f"{self.name}:gaps"
                )
            await self.port.run(session, emit, report_error)
            if watcher is not None:
                watcher.cancel()

    def _frames_seen(self) -> int:
        return self._framer_totals["lines"] + self._framer.frames

    async def _session(
        self, reader: asyncio.StreamReader, emit: Emit, report_error: ReportError
    ) -> None:
        framer = self._framer
        timeout_s = self._settings.read_timeout_s
        try:
            while True:
                try:
                    # The read timeout applies while a line is half received: the rest of a line
                    # arrives within milliseconds, so a fragment older than this is a lost line.
                    async with asyncio.timeout(timeout_s if framer.pending else None):
                        data = await reader.read(65536)
                except TimeoutError:
                    if framer.drop_partial():
                        self._report(report_error, "partial", "an unfinished line timed out")
                    continue
                if not data:
                    # The transport ends a stream with an error, never with EOF; should one come,
                    # it is a lost port (re-opened), not a loop reading nothing forever.
                    raise PortLostError(errno.EIO, "end of stream")
                dropped = framer.dropped
                lines = framer.feed(data)
                if framer.dropped != dropped:
                    for reason in sorted(framer.recent):
                        self._report(report_error, reason, self._discard_detail(reason))
                if lines and await self._lines(lines, emit, report_error):
                    return
                if self._max_lines is not None and self._frames_seen() >= self._max_lines:
                    return
        finally:
            # A new port session starts with an empty buffer; what was half received is lost.
            if framer.drop_partial():
                self._report(report_error, "partial", "the port closed in the middle of a line")
            self._fold_framer()

    def _fold_framer(self) -> None:
        framer = self._framer
        self._framer_totals.update(framer.discarded)
        self._framer_totals["bytes"] += framer.bytes
        self._framer_totals["lines"] += framer.frames
        self._framer = LineFramer(
            self._framing.delimiter, self._framing.encoding, self._framing.max_line_bytes
        )

    async def _lines(self, lines: list[str], emit: Emit, report_error: ReportError) -> bool:
        """Emit the readings of some lines; True once max_lines is reached."""
        ts = utc_now()
        for line in lines:
            try:
                values, missing = self._parser.parse_detailed(line)
            except LineParseError as exc:
                self._counts[exc.reason] += 1
                self._report(report_error, exc.reason, str(exc))
                continue
            reading = Reading(
                source=self.name,
                device=self.device,
                ts=ts,
                values=values,
                quality=("incomplete",) if missing else (),
            )
            self.last_valid = time.monotonic()
            self._valid.set()
            try:
                await emit(reading)
            except asyncio.CancelledError:
                # Stopped while the pipeline was full (block policy): this line was read but
                # never accepted. A serial port cannot take it back; it is counted, not hidden.
                self._counts["unsent_at_stop"] += 1
                raise
            self.readings += 1  # accepted by the pipeline
        # Counted by frame, so a line the framer dropped counts too (after the parsed ones).
        return self._max_lines is not None and self._frames_seen() >= self._max_lines

    def _discard_detail(self, reason: str) -> str:
        limit = self._framing.max_line_bytes
        return {
            "overlong": f"a line longer than {limit} bytes was dropped (wrong delimiter?)",
            "garbage": "binary garbage dropped (wrong baud rate or noise on the line?)",
            "partial": "an unfinished line was dropped",
        }.get(reason, reason)

    def _report(self, report_error: ReportError, reason: str, detail: str) -> None:
        now = time.monotonic()
        last = self._reported.get(reason)
        if last is None:
            self._reported[reason] = (now, 0)
            report_error(reason, f"{self.port.settings.port}: {detail}")
            return
        at, suppressed = last
        if now - at < _REPORT_EVERY_S:
            self._reported[reason] = (at, suppressed + 1)
            return
        self._reported[reason] = (now, 0)
        more = f" (and {suppressed} more since the last report)" if suppressed else ""
        report_error(reason, f"{self.port.settings.port}: {detail}{more}")

    async def _watch_gaps(self, emit: Emit, started: float, gap_after_s: float) -> None:
        while True:
            last = self.last_valid if self.last_valid is not None else started
            remaining = last + gap_after_s - time.monotonic()
            if remaining > 0:
                await asyncio.sleep(remaining)
                continue
            self._valid.clear()
            self.in_gap = True
            silent = round(time.monotonic() - last, 1)
            await emit(self._gap_event("gap", Severity.WARNING, silent))
            await self._valid.wait()
            self.in_gap = False
            assert self.last_valid is not None  # set with _valid
            await emit(
                self._gap_event("gap_ended", Severity.INFO, round(self.last_valid - last, 1))
            )

    def _gap_event(self, kind: str, severity: Severity, seconds: float) -> Event:
        return Event(
            kind=kind,
            device=self.device,
            ts=utc_now(),
            severity=severity,
            values=(
                Measurement("silent_for" if kind == "gap" else "gap_length", seconds, "s"),
                Measurement("port", self.port.settings.port[:256]),
            ),
        )
