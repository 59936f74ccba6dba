"""SDI-12 sensors through a transparent serial adapter: the protocol codec and a polling source.

References are to *SDI-12, A Serial-Digital Interface Standard for Microprocessor-Based Sensors*,
version 1.4 (SDI-12 Support Group): §4.1 byte frame, §4.4 commands and responses, §7 timing.

The adapter assumption
----------------------
SDI-12 is a single-wire 1200-baud bus whose data recorder must wake sensors with a break (the line
held spacing for at least 12 ms, then at least 8.33 ms of marking) and must see the first response
character within 15 ms of its command's last stop bit (§7). A Linux process cannot keep those
times through a USB serial stack, so this driver assumes an adapter that speaks the SDI-12 command
text on its serial side (the "SDI-12 to USB" converters sold for data loggers): it sends the break,
keeps the bus timing, and passes the sensor's response back as a line of text. What is left to the
gateway, and done here:

- the command sequence of a measurement: ``aM!`` → ``atttn`` → wait ``ttt`` seconds or for the
  service request ``a<CR><LF>`` → ``aD0!``, ``aD1!``, … until the ``n`` announced values arrived
  (§4.4, Start Measurement and Send Data commands);
- the retry rule of §7 (re-send a command that got no valid response, at least 16.67 ms after
  the previous one, at least three times), with a response window of ``read_timeout_s`` instead
  of 15 ms: the adapter adds its own break, the 1200-baud transmission of the command and of up
  to ~80 response characters (~0.7 s), and USB latency;
- holding the bus for the whole ``aM!`` sequence: a command to any other sensor before the data
  is collected would make the adapter send a break, which aborts the measurement (§4.4, Start
  Measurement); so sensors on one port are polled strictly one after another.

Some adapters echo the command before the response (a single-wire bus reads back what it sends):
a leading copy of the command is removed from each line, which is safe because no response
contains ``!``. For a plain level shifter that does not make the break itself, ``wake_break=True``
has the gateway set the break condition for 12 ms before a command when the bus was idle longer
than 87 ms (§7: after 100 ms of marking the sensors may sleep again), with the caveat above on
how well Linux keeps those times.

Nothing in the codec half does I/O; :class:`Sdi12Source` is the only part that touches a port,
through :class:`drivers.serial_port.PortSupervisor`.
"""

from __future__ import annotations

import asyncio
import errno
import re
import string
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar

import structlog

from drivers.serial_port import PortLostError, PortSupervisor, SerialSettings
from gateway.errors import EventValidationError
from gateway.types import Emit, Event, Measurement, Reading, ReportError, Severity

log = structlog.get_logger(__name__)

__all__ = [
    "ADDRESSES",
    "DataAnswer",
    "Identification",
    "MeasurementAnswer",
    "Sdi12CrcError",
    "Sdi12ParseError",
    "Sdi12Sensor",
    "Sdi12Source",
    "Sdi12Value",
    "acknowledge",
    "address_query",
    "crc16",
    "crc_chars",
    "format_data",
    "format_value",
    "identify",
    "parse_address",
    "parse_data",
    "parse_identification",
    "parse_measurement",
    "send_data",
    "start_concurrent",
    "start_measurement",
]

# ------------------------------------------------------------------------------------------------
# Protocol: pure functions, no I/O
# ------------------------------------------------------------------------------------------------

# §4.4: '0'-'9' are the standard addresses; 'A'-'Z' and 'a'-'z' the extended ones.
ADDRESSES = frozenset(string.digits + string.ascii_letters)

# §4.4, Send Data: a value is a sign, up to seven digits and an optional decimal point ("pd.d").
_MAX_VALUE_DIGITS = 7
_VALUE_RE = re.compile(r"[+-][0-9.]+")
# §4.4, Send Identification: ll (version) + 8 vendor + 6 model + 3 sensor version characters.
_ID_FIXED = 2 + 8 + 6 + 3


class Sdi12ParseError(ValueError):
    """A response that does not have the form its command calls for; the message says why."""


class Sdi12CrcError(Sdi12ParseError):
    """A response whose CRC does not match its content (§4.4, the ``C`` command variants)."""


def _address(address: str) -> str:
    if len(address) != 1 or address not in ADDRESSES:
        raise ValueError(f"an SDI-12 address is one of 0-9, A-Z, a-z (got: {address!r})")
    return address


def address_query() -> bytes:
    """``?!``: the address of the only sensor on the bus (§4.4, Address Query)."""
    return b"?!"


def acknowledge(address: str) -> bytes:
    """``a!``: is sensor ``a`` there (§4.4, Acknowledge Active)."""
    return f"{_address(address)}!".encode("ascii")


def identify(address: str) -> bytes:
    """``aI!``: vendor, model, version, serial (§4.4, Send Identification)."""
    return f"{_address(address)}I!".encode("ascii")


def _indexed(address: str, letter: str, index: int, *, crc: bool) -> bytes:
    if not 0 <= index <= 9:
        raise ValueError(f"a measurement index is 0..9 (got: {index})")
    suffix = "" if index == 0 else str(index)
    return f"{_address(address)}{letter}{'C' if crc else ''}{suffix}!".encode("ascii")


def start_measurement(address: str, index: int = 0, *, crc: bool = False) -> bytes:
    """``aM!``, ``aM1!``..``aM9!``; with ``crc`` ``aMC!``.. (§4.4, Start Measurement)."""
    return _indexed(address, "M", index, crc=crc)


def start_concurrent(address: str, index: int = 0, *, crc: bool = False) -> bytes:
    """``aC!``, ``aC1!``..``aC9!``, ``aCC!``.. (§4.4, Start Concurrent Measurement)."""
    return _indexed(address, "C", index, crc=crc)


def send_data(address: str, index: int) -> bytes:
    """``aD0!``..``aD9!`` (§4.4, Send Data)."""
    if not 0 <= index <= 9:
        raise ValueError(f"a send-data index is 0..9 (got: {index})")
    return f"{_address(address)}D{index}!".encode("ascii")


def crc16(data: bytes) -> int:
    """The SDI-12 CRC: CRC-16 with polynomial 0xA001 (reflected 0x8005), initial value 0."""
    crc = 0
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0xA001 if crc & 1 else crc >> 1
    return crc


def crc_chars(data: bytes) -> str:
    """The CRC of ``data`` as the three printable characters SDI-12 appends to a response.

    Each carries six bits of the CRC, most significant first, OR'ed with 0x40 (§4.4, CRC).
    """
    crc = crc16(data)
    return "".join(chr(0x40 | ((crc >> shift) & 0x3F)) for shift in (12, 6, 0))


def _text(line: bytes) -> str:
    """One response line as text, without its <CR><LF>; raises Sdi12ParseError."""
    if line.endswith(b"\r\n"):
        line = line[:-2]
    try:
        text = line.decode("ascii")
    except UnicodeDecodeError as exc:
        raise Sdi12ParseError(f"not ASCII: byte 0x{line[exc.start]:02x} at {exc.start}") from exc
    if not text:
        raise Sdi12ParseError("empty response")
    # DEL (0x7f) is allowed: it is one of the 64 characters a CRC is encoded with (0x40-0x7f).
    bad = next((c for c in text if c < " "), None)
    if bad is not None:
        raise Sdi12ParseError(f"control character {bad!r} at {text.index(bad)}")
    return text


def _check_from(text: str, address: str | None) -> str:
    got = text[0]
    if got not in ADDRESSES:
        raise Sdi12ParseError(f"{got!r} is not an SDI-12 address")
    if address is not None and got != address:
        raise Sdi12ParseError(f"answer from address {got!r}, expected {address!r}")
    return got


def parse_address(line: bytes, address: str | None = None) -> str:
    """The address in ``a<CR><LF>``: the answer to ``?!`` and ``a!``, and a service request."""
    text = _text(line)
    if len(text) != 1:
        raise Sdi12ParseError(f"expected a lone address, got {len(text)} characters")
    return _check_from(text, address)


@dataclass(frozen=True, slots=True)
class MeasurementAnswer:
    """``atttn`` / ``atttnn``: data is ready in ``ready_s`` seconds and holds ``count`` values."""

    address: str
    ready_s: int
    count: int


def parse_measurement(
    line: bytes, address: str | None = None, *, concurrent: bool = False
) -> MeasurementAnswer:
    """Parse the answer to ``aM!`` (``atttn``) or, with ``concurrent``, ``aC!`` (``atttnn``).

    §4.4, Start Measurement: ttt is 000-999 seconds, n is 0-9 values (0: no data this time);
    Start Concurrent Measurement: nn is 00-99.
    """
    text = _text(line)
    digits = 5 if concurrent else 4
    if len(text) != 1 + digits:
        raise Sdi12ParseError(
            f"expected a{'t' * 3}{'n' * (digits - 3)} ({1 + digits} characters), "
            f"got {len(text)} characters"
        )
    got = _check_from(text, address)
    body = text[1:]
    if not (body.isascii() and body.isdigit()):
        raise Sdi12ParseError(f"time and count must be digits (got: {body!r})")
    return MeasurementAnswer(got, int(body[:3]), int(body[3:]))


@dataclass(frozen=True, slots=True)
class Identification:
    """The answer to ``aI!`` (§4.4, Send Identification)."""

    address: str
    sdi12_version: str  # "1.4" from "14"
    vendor: str
    model: str
    sensor_version: str
    extra: str  # optional: serial number or other sensor information, at most 13 characters


def parse_identification(line: bytes, address: str | None = None) -> Identification:
    """Parse ``allccccccccmmmmmmvvvxxx..xx``; trailing blanks of the fixed fields are dropped."""
    text = _text(line)
    if len(text) < 1 + _ID_FIXED:
        raise Sdi12ParseError(
            f"identification is at least {1 + _ID_FIXED} characters (got: {len(text)})"
        )
    got = _check_from(text, address)
    version = text[1:3]
    if not (version.isascii() and version.isdigit()):
        raise Sdi12ParseError(f"SDI-12 version must be two digits (got: {version!r})")
    # Sensors in the field send longer serial fields than the 13 characters of §4.4; accept them.
    return Identification(
        address=got,
        sdi12_version=f"{version[0]}.{version[1]}",
        vendor=text[3:11].strip(),
        model=text[11:17].strip(),
        sensor_version=text[17:20].strip(),
        extra=text[20:].strip(),
    )


@dataclass(frozen=True, slots=True)
class DataAnswer:
    """The values of one ``aDn!`` answer (possibly none: the sensor has no more)."""

    address: str
    values: tuple[float, ...]


def _value(token: str) -> float:
    digits = sum(c.isdigit() for c in token)
    if token.count(".") > 1 or digits == 0:
        raise Sdi12ParseError(f"malformed value {token!r}")
    if digits > _MAX_VALUE_DIGITS:
        raise Sdi12ParseError(f"value {token!r} has more than {_MAX_VALUE_DIGITS} digits")
    return float(token)


def parse_data(line: bytes, address: str | None = None, *, crc: bool = False) -> DataAnswer:
    """Parse ``a<values><CR><LF>`` (or ``a<values><CRC><CR><LF>`` after ``aMC!``).

    Values follow §4.4, Send Data: each starts with its sign, so ``+1.23-4.5+6`` is three values.
    The 35/75-character limits on the values part are not enforced: what a sensor sends beyond
    them is still well-formed data.
    """
    text = _text(line)
    got = _check_from(text, address)
    body = text[1:]
    if crc:
        if len(body) < 3:
            raise Sdi12ParseError("too short for a CRC")
        body, sent = body[:-3], body[-3:]
        expected = crc_chars(text[:-3].encode("ascii"))
        if sent != expected:
            raise Sdi12CrcError(f"CRC {sent!r} does not match the content ({expected!r})")
    if not body:
        return DataAnswer(got, ())
    tokens = _VALUE_RE.findall(body)
    if "".join(tokens) != body:
        raise Sdi12ParseError(f"values must be sign-prefixed numbers (got: {body[:40]!r})")
    return DataAnswer(got, tuple(_value(t) for t in tokens))


def format_value(value: float, decimals: int) -> str:
    """One value as SDI-12 sends it (``+12.34``); raises ValueError past seven digits."""
    if decimals < 0:
        raise ValueError(f"decimals must be >= 0 (got: {decimals})")
    text = f"{value:+.{decimals}f}"
    if text[1:].replace(".", "").isdigit() and sum(c.isdigit() for c in text) <= _MAX_VALUE_DIGITS:
        return text
    raise ValueError(f"{value!r} with {decimals} decimals does not fit SDI-12's seven digits")


def format_data(address: str, values: Sequence[tuple[float, int]], *, crc: bool = False) -> bytes:
    """A send-data answer line for ``(value, decimals)`` pairs, with <CR><LF> (for peers/tests)."""
    text = _address(address) + "".join(format_value(v, d) for v, d in values)
    if crc:
        text += crc_chars(text.encode("ascii"))
    return f"{text}\r\n".encode("ascii")


# ------------------------------------------------------------------------------------------------
# The polling source
# ------------------------------------------------------------------------------------------------

# §7: a retry may follow a command no sooner than 16.67 ms after it.
_RETRY_GAP_S = 0.017
# §7: the break lasts at least 12 ms, then at least 8.33 ms of marking before the command; a new
# break is due when the line has been idle more than 87 ms (sensors may sleep after 100 ms).
_BREAK_S = 0.012
_MARKING_S = 0.0085
_BREAK_AFTER_IDLE_S = 0.087
# The longest valid response: a + 75 value characters (aC!/aR!) + 3 CRC + <CR><LF> = 81; an
# identification is at most 35 (longer serials seen in the field still fit). Longer is noise.
_MAX_LINE = 128
# Lines waiting to be read: a few strays (late answers, echoes); beyond that the oldest go.
_LINE_QUEUE = 16
_DATA_COMMANDS = 10  # aD0! .. aD9!

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Sdi12Value:
    """One value of a sensor's answer → one measurement (value x scale + offset)."""

    index: int  # 0-based position among the values collected with aD0!, aD1!, ...
    name: str
    unit: str | None = None
    scale: float = 1.0
    offset: float = 0.0

    def __post_init__(self) -> None:
        if self.index < 0:
            raise ValueError(f"value index must be >= 0 (got: {self.index})")
        try:
            Measurement(self.name, 0.0, self.unit)
        except EventValidationError as exc:
            raise ValueError(str(exc)) from exc


@dataclass(frozen=True, slots=True)
class Sdi12Sensor:
    """One sensor on the bus: its address, device id, poll interval and the values it reports.

    ``measurement`` picks ``aM!`` (0) or an additional measurement ``aM1!``..``aM9!``; ``crc``
    uses the ``aMC!`` variant, whose data answers carry a CRC.
    """

    address: str
    device: str
    poll_interval_s: float
    values: tuple[Sdi12Value, ...]
    measurement: int = 0
    crc: bool = False

    def __post_init__(self) -> None:
        _address(self.address)
        if not self.device or len(self.device) > 256:
            raise ValueError(f"device must be 1..256 characters (got: {self.device!r})")
        if not self.poll_interval_s > 0:
            raise ValueError(f"poll_interval_s must be > 0 (got: {self.poll_interval_s})")
        if not self.values:
            raise ValueError(f"sensor {self.device} has no values")
        if not 0 <= self.measurement <= 9:
            raise ValueError(f"measurement is 0..9 (got: {self.measurement})")


_SENSOR_COUNTERS = (
    "polls",  # measurement sequences started
    "readings",  # ... that produced a reading
    "failures",  # ... that did not
    "timeouts",  # commands that got no line within the response window
    "retries",  # commands sent again
    "parse_errors",  # lines that were not the expected answer (CRC errors included)
    "crc_errors",
)
_BUS_COUNTERS = (
    "stray_lines",  # lines nobody waited for (late answers, echoes, noise between polls)
    "overlong_lines",  # more than _MAX_LINE bytes without a newline: noise, discarded
    "dropped_lines",  # lines pushed out of the full queue
)


@dataclass(slots=True)
class _SensorState:
    sensor: Sdi12Sensor
    counters: dict[str, int] = field(default_factory=lambda: dict.fromkeys(_SENSOR_COUNTERS, 0))
    silent_since: float | None = None  # time.time() of the device_silent event
    identity: Identification | None = None
    identify_tried: bool = False  # per port session: one aI! after the first good measurement
    warned_missing: bool = False
    last_failure: str | None = None

    def count(self, what: str, n: int = 1) -> None:
        self.counters[what] += n


class _PollFailedError(Exception):
    """A measurement sequence that produced no reading; ``reason`` is a short snake_case key."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


class _Bus:
    """One open port: a receive pump that splits lines into a bounded queue, and commands."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        counters: dict[str, int],
        *,
        wake_break: bool,
    ) -> None:
        self._reader = reader
        self._writer = writer
        self._counters = counters
        self._wake_break = wake_break
        self._lines: asyncio.Queue[bytes] = asyncio.Queue(_LINE_QUEUE)
        self._partial = bytearray()
        self._skipping = False
        self._loop = asyncio.get_running_loop()
        self._last_activity = float("-inf")

    async def pump(self) -> None:
        """Read until the port fails; a port that merely closes counts as lost too."""
        while True:
            chunk = await self._reader.read(256)
            if not chunk:
                raise PortLostError(errno.EIO, "the port closed")
            self._last_activity = self._loop.time()
            self._feed(chunk)

    def _feed(self, chunk: bytes) -> None:
        *complete, rest = chunk.split(b"\n")
        for piece in complete:
            if self._skipping:
                self._skipping = False  # the end of an overlong line: resynchronised
            elif len(self._partial) + len(piece) > _MAX_LINE:
                self._counters["overlong_lines"] += 1
            else:
                self._push(bytes(self._partial + piece))
            self._partial.clear()
        if self._skipping:
            return
        self._partial += rest
        if len(self._partial) > _MAX_LINE:
            self._counters["overlong_lines"] += 1
            self._partial.clear()
            self._skipping = True

    def _push(self, line: bytes) -> None:
        # A UART reads a break as NUL bytes; CR belongs to the line end.
        line = line.strip(b"\x00").removesuffix(b"\r").strip(b"\x00")
        if not line:
            return
        if self._lines.full():
            self._lines.get_nowait()
            self._counters["dropped_lines"] += 1
        self._lines.put_nowait(line)

    def discard(self) -> None:
        """Drop lines nobody asked for (before a command: they cannot be its answer)."""
        while not self._lines.empty():
            self._lines.get_nowait()
            self._counters["stray_lines"] += 1

    async def line(self, deadline: float) -> bytes | None:
        """The next line, or None when the deadline (loop time) passes first."""
        try:
            async with asyncio.timeout_at(deadline):
                return await self._lines.get()
        except TimeoutError:
            return None

    async def send(self, command: bytes) -> None:
        if self._wake_break and self._loop.time() - self._last_activity > _BREAK_AFTER_IDLE_S:
            port: Any = self._writer.transport.get_extra_info("serial")
            if port is not None:
                port.break_condition = True
                await asyncio.sleep(_BREAK_S)
                port.break_condition = False
                await asyncio.sleep(_MARKING_S)
        self._writer.write(command)
        await self._writer.drain()
        self._last_activity = self._loop.time()


def _port_error(group: BaseExceptionGroup[BaseException]) -> OSError | None:
    """The OSError that ended a session's task group (what the supervisor classifies), if any."""
    for exc in group.exceptions:
        found = _port_error(exc) if isinstance(exc, BaseExceptionGroup) else exc
        if isinstance(found, OSError):
            return found
    return None


class Sdi12Source:
    """Polls SDI-12 sensors on one port, each on its own interval, and emits their readings.

    A sensor that gives no valid answer through all retries yields one ``device_silent`` event
    (warning) and then gets a single attempt per poll, so a dead sensor costs the bus one
    response window per interval; its first good answer yields ``device_back``. Port loss and
    recovery are the supervisor's (``serial_lost`` / ``serial_restored``).
    """

    def __init__(
        self,
        name: str,
        settings: SerialSettings,
        sensors: Sequence[Sdi12Sensor],
        retries: int,
        *,
        wake_break: bool = False,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not sensors:
            raise ValueError(f"SDI-12 source {name} has no sensors")
        if retries < 0:
            raise ValueError(f"retries must be >= 0 (got: {retries})")
        keys = [(s.address, s.measurement) for s in sensors]
        if len(set(keys)) != len(keys):
            raise ValueError(f"SDI-12 source {name}: two sensors use one address and measurement")
        devices = [s.device for s in sensors]
        if len(set(devices)) != len(devices):
            raise ValueError(f"SDI-12 source {name}: device ids must be unique")
        self.name = name
        self.port = PortSupervisor(name, name, settings)
        self._settings = settings
        self._sensors = [_SensorState(s) for s in sensors]
        self._retries = retries
        self._wake_break = wake_break
        self._clock = clock
        self._bus_counters = dict.fromkeys(_BUS_COUNTERS, 0)

    # -- health ----------------------------------------------------------------------------------

    @property
    def counters(self) -> Mapping[str, int]:
        """Totals over the sensors and the bus (the stats message's flat counters)."""
        totals = dict(self._bus_counters)
        for key in _SENSOR_COUNTERS:
            totals[key] = sum(st.counters[key] for st in self._sensors)
        totals["silent_sensors"] = sum(st.silent_since is not None for st in self._sensors)
        return totals

    def stats(self) -> dict[str, Any]:
        """Per-sensor counters and state, the bus counters and the port's health."""
        sensors: dict[str, Any] = {}
        for st in self._sensors:
            identity = st.identity
            sensors[st.sensor.device] = {
                "address": st.sensor.address,
                **st.counters,
                "silent": st.silent_since is not None,
                "last_failure": st.last_failure,
                "identity": None
                if identity is None
                else {
                    "sdi12_version": identity.sdi12_version,
                    "vendor": identity.vendor,
                    "model": identity.model,
                    "version": identity.sensor_version,
                    "extra": identity.extra,
                },
            }
        return {"port": self.port.summary(), "bus": dict(self._bus_counters), "sensors": sensors}

    # -- running ---------------------------------------------------------------------------------

    async def run(self, emit: Emit, report_error: ReportError) -> None:
        async def session(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await self._session(reader, writer, emit, report_error)

        await self.port.run(session, emit, report_error)

    async def _session(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        emit: Emit,
        report_error: ReportError,
    ) -> None:
        bus = _Bus(reader, writer, self._bus_counters, wake_break=self._wake_break)
        for st in self._sensors:
            # A re-plugged adapter may sit in front of a replaced sensor: ask again.
            st.identify_tried = False
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(bus.pump(), name=f"{self.name}-sdi12-receive")
                await self._schedule(bus, emit, report_error)
        except BaseExceptionGroup as group:
            # The supervisor handles a failed port (an OSError); anything else is a bug.
            lost = _port_error(group)
            if lost is None:
                raise
            raise lost from group

    async def _schedule(self, bus: _Bus, emit: Emit, report_error: ReportError) -> None:
        """Poll the sensor that is due next, forever; one sequence at a time owns the bus."""
        loop = asyncio.get_running_loop()
        due = dict.fromkeys(range(len(self._sensors)), loop.time())
        while True:
            index = min(due, key=due.__getitem__)
            delay = due[index] - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            st = self._sensors[index]
            await self._poll(st, bus, emit, report_error)
            # Anchored to the schedule, not to when the poll ended, so the interval does not
            # drift; a poll that overran its interval is followed by the next at once, not by
            # a burst of the missed ones.
            due[index] = max(due[index] + st.sensor.poll_interval_s, loop.time())

    async def _poll(
        self, st: _SensorState, bus: _Bus, emit: Emit, report_error: ReportError
    ) -> None:
        sensor = st.sensor
        st.count("polls")
        # A sensor already known to be silent gets one attempt: it must not eat the bus time of
        # the others with the full retry ladder every interval.
        attempts = 1 if st.silent_since is not None else 1 + self._retries
        try:
            values = await self._measure(st, bus, attempts, report_error)
        except _PollFailedError as failure:
            st.count("failures")
            st.last_failure = f"{failure.reason}: {failure}"
            if st.silent_since is None:
                st.silent_since = self._clock()
                log.warning(
                    "sdi12_device_silent",
                    source=self.name,
                    device=sensor.device,
                    address=sensor.address,
                    reason=failure.reason,
                    detail=str(failure),
                )
                await emit(
                    self._event(
                        "device_silent",
                        st,
                        Severity.WARNING,
                        Measurement("reason", failure.reason),
                        Measurement("detail", str(failure)[:256]),
                        Measurement("attempts", attempts),
                    )
                )
            return
        ts = datetime.fromtimestamp(self._clock(), UTC)
        if st.silent_since is not None:
            silent_for = round(self._clock() - st.silent_since, 1)
            st.silent_since = None
            log.info(
                "sdi12_device_back", source=self.name, device=sensor.device, after_s=silent_for
            )
            await emit(
                self._event(
                    "device_back", st, Severity.INFO, Measurement("silent_for", silent_for, "s")
                )
            )
        st.count("readings")
        st.last_failure = None
        await emit(self._reading(st, values, ts, report_error))
        if not st.identify_tried:
            st.identify_tried = True
            await self._identify(st, bus)

    async def _measure(
        self, st: _SensorState, bus: _Bus, attempts: int, report_error: ReportError
    ) -> tuple[float, ...]:
        """aM! → wait → aD0!.. until the announced number of values arrived."""
        sensor = st.sensor
        address = sensor.address
        answer = await self._command(
            st,
            bus,
            start_measurement(address, sensor.measurement, crc=sensor.crc),
            lambda line: parse_measurement(line, address),
            attempts=attempts,
            report_error=report_error,
        )
        if answer.count == 0:
            # §4.4, Start Measurement: n = 0 means the sensor cannot measure now.
            raise _PollFailedError("no_values", "the sensor announced 0 values")
        if answer.ready_s > 0:
            await self._wait_ready(bus, address, answer.ready_s)
        values: list[float] = []
        for index in range(_DATA_COMMANDS):
            if len(values) >= answer.count:
                break
            data = await self._command(
                st,
                bus,
                send_data(address, index),
                lambda line: parse_data(line, address, crc=sensor.crc),
                attempts=attempts,
                report_error=report_error,
            )
            if not data.values:
                # §4.4, Send Data: an answer without values means there are no more.
                break
            values.extend(data.values)
        if len(values) != answer.count:
            raise _PollFailedError(
                "incomplete", f"announced {answer.count} values, received {len(values)}"
            )
        return tuple(values)

    async def _wait_ready(self, bus: _Bus, address: str, ready_s: int) -> None:
        """Until the service request ``a<CR><LF>`` or ``ttt`` seconds, whichever comes first.

        §4.4, Start Measurement: the sensor sends the service request when its data is ready
        early; without one, the data is ready after ttt seconds.
        """
        deadline = asyncio.get_running_loop().time() + ready_s
        while (line := await bus.line(deadline)) is not None:
            if line == address.encode("ascii"):
                return
            self._bus_counters["stray_lines"] += 1

    async def _command(
        self,
        st: _SensorState,
        bus: _Bus,
        command: bytes,
        parse: Callable[[bytes], T],
        *,
        attempts: int,
        report_error: ReportError,
    ) -> T:
        """Send ``command`` until a line parses, at most ``attempts`` times (§7, retries).

        A lone address is held back until the window closes: it is both a service request and
        an empty data answer (§4.4), and a late service request (after a retried ``aM!``) must
        not pass for "no more values" when the real answer follows it.
        """
        loop = asyncio.get_running_loop()
        lone_address = st.sensor.address.encode("ascii")
        malformed: str | None = None
        for attempt in range(attempts):
            if attempt:
                st.count("retries")
                await asyncio.sleep(_RETRY_GAP_S)
            bus.discard()
            await bus.send(command)
            deadline = loop.time() + self._settings.read_timeout_s
            held: bytes | None = None
            while True:
                line = await bus.line(deadline)
                if line is None:
                    if held is None:
                        st.count("timeouts")
                        break
                    line, held = held, None
                else:
                    # An echoing adapter returns the command first (on its own line or not).
                    line = line.removeprefix(command)
                    if not line:
                        continue
                    if line == lone_address:
                        if held is not None:
                            self._bus_counters["stray_lines"] += 1
                        held = line
                        continue
                    if held is not None:
                        self._bus_counters["stray_lines"] += 1
                        held = None
                try:
                    return parse(line)
                except Sdi12ParseError as exc:
                    st.count("parse_errors")
                    if isinstance(exc, Sdi12CrcError):
                        st.count("crc_errors")
                    malformed = f"{command.decode('ascii')} answered {line[:48]!r}: {exc}"
                    report_error("sdi12_malformed_answer", f"{st.sensor.device}: {malformed}")
                    break
        if malformed is not None:
            raise _PollFailedError("malformed_answer", malformed)
        raise _PollFailedError(
            "no_answer",
            f"no answer to {command.decode('ascii')} within "
            f"{self._settings.read_timeout_s} s, {attempts} attempt(s)",
        )

    async def _identify(self, st: _SensorState, bus: _Bus) -> None:
        """One ``aI!`` per port session, for the stats (which sensor is really on the bus)."""
        address = st.sensor.address

        def ignore(kind: str, detail: str) -> None:
            log.info(
                "sdi12_identify_failed", source=self.name, device=st.sensor.device, detail=detail
            )

        try:
            identity = await self._command(
                st,
                bus,
                identify(address),
                lambda line: parse_identification(line, address),
                attempts=1,
                report_error=ignore,
            )
        except _PollFailedError:
            return
        st.identity = identity
        log.info(
            "sdi12_sensor_identified",
            source=self.name,
            device=st.sensor.device,
            address=address,
            vendor=identity.vendor,
            model=identity.model,
            version=identity.sensor_version,
            extra=identity.extra,
        )

    def _reading(
        self, st: _SensorState, values: tuple[float, ...], ts: datetime, report_error: ReportError
    ) -> Reading:
        sensor = st.sensor
        measurements = []
        missing = []
        for spec in sensor.values:
            if spec.index >= len(values):
                missing.append(spec.name)
                continue
            raw = values[spec.index]
            value = (
                raw if (spec.scale, spec.offset) == (1.0, 0.0) else raw * spec.scale + spec.offset
            )
            measurements.append(Measurement(spec.name, value, spec.unit))
        if missing and not st.warned_missing:
            st.warned_missing = True
            report_error(
                "sdi12_missing_values",
                f"{sensor.device}: the sensor sends {len(values)} values; no value for "
                f"{', '.join(missing)} (check the configured indices)",
            )
        return Reading(
            source=self.name,
            device=sensor.device,
            ts=ts,
            values=tuple(measurements),
            quality=("missing_values",) if missing else (),
        )

    def _event(
        self, kind: str, st: _SensorState, severity: Severity, *values: Measurement
    ) -> Event:
        return Event(
            kind=kind,
            device=st.sensor.device,
            ts=datetime.fromtimestamp(self._clock(), UTC),
            severity=severity,
            values=(Measurement("address", st.sensor.address), *values),
        )
