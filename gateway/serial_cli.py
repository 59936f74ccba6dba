"""``edge-gateway serial probe PORT``: the first thing a technician runs on site.

Opens the port (exclusively, as the gateway would), prints every line that arrives for a few
seconds with its length in bytes (non-printable bytes escaped), and, with ``--source NAME -c
CONFIG``, what the configured ``serial_ascii`` source would make of each line (its measurements,
or why it would reject it). Ends with a summary and a hint when nothing, or only noise, arrived.

Exit status: 0 when the port could be read (even if nothing arrived: that is a finding); 1 when
the port cannot be opened (missing, permission, busy, not a tty) or fails while probing, with a
one-line message that names the fix; 78 for a config that does not load; 2 for usage errors.

With ``--modbus --ids 1-10`` the probe scans Modbus RTU slave ids instead of listening
(:func:`run_modbus_scan`, on ``drivers.modbus.scan``) and prints which ones answered.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TextIO

from drivers.ascii_lines import LineParseError, LineParser
from drivers.serial_port import PortProblemError, SerialSettings, open_port, port_problem
from gateway.app import line_parser
from gateway.config import DEFAULT_CONFIG_PATH, SerialAsciiSourceConfig, load_config
from gateway.errors import ConfigError

__all__ = ["add_serial_parser", "cmd_probe", "parse_ids", "run_modbus_scan"]

EXIT_OK = 0
EXIT_PORT = 1
EXIT_USAGE = 2
EXIT_CONFIG = 78

# A probe shows lines; without a delimiter for this long, the bytes are shown as one chunk so
# that a wrong delimiter or a binary protocol is visible instead of silently buffered.
_MAX_SHOWN_LINE = 1024


@dataclass(slots=True)
class ProbeResult:
    """What arrived during a probe."""

    lines: int = 0
    bytes: int = 0
    decoded: int = 0
    rejected: dict[str, int] = field(default_factory=dict)
    unprintable_lines: int = 0


def _escape(raw: bytes) -> str:
    # Control characters and bytes above 0x7e shown as \xNN: noise must not drive the terminal.
    return "".join(chr(b) if 0x20 <= b < 0x7F and b != 0x5C else f"\\x{b:02x}" for b in raw)


def _show_measurements(parser: LineParser, text: str) -> tuple[str, str | None]:
    try:
        values, missing = parser.parse_detailed(text)
    except LineParseError as exc:
        return f"rejected ({exc.reason}): {exc}", exc.reason
    shown = ", ".join(
        f"{m.name}={m.value:g}{' ' + m.unit if m.unit else ''}"
        if isinstance(m.value, float)
        else f"{m.name}={m.value}"
        for m in values
    )
    if missing:
        shown += f"  (missing: {', '.join(missing)})"
    return shown, None


async def probe(
    settings: SerialSettings,
    seconds: float,
    out: TextIO,
    *,
    delimiter: bytes = b"\n",
    encoding: str = "ascii",
    parser: LineParser | None = None,
) -> ProbeResult:
    """Read the port for ``seconds`` and print what arrives; raises PortProblemError."""
    result = ProbeResult()
    reader, writer = await open_port(settings)
    started = time.monotonic()
    buffer = b""
    framing = f"{settings.baud} {settings.bytesize}{settings.parity}{settings.stopbits}"
    out.write(f"listening on {settings.port} at {framing} for {seconds:g} s (Ctrl-C stops)\n")
    out.flush()

    def show(raw: bytes, note: str = "") -> None:
        result.lines += 1
        stamp = time.monotonic() - started
        printable = all(0x20 <= b < 0x7F or b in (0x09, 0x0A, 0x0D) for b in raw)
        if not printable:
            result.unprintable_lines += 1
        out.write(f"+{stamp:6.2f}s {len(raw):5d} B  {_escape(raw)}{note}\n")
        if parser is not None:
            try:
                text = raw.decode(encoding).strip(" \t\r")
            except UnicodeDecodeError:
                text = ""
            if text:
                shown, reason = _show_measurements(parser, text)
                if reason is None:
                    result.decoded += 1
                else:
                    result.rejected[reason] = result.rejected.get(reason, 0) + 1
                out.write(f"{'':21}-> {shown}\n")
        out.flush()

    try:
        deadline = started + seconds
        while (remaining := deadline - time.monotonic()) > 0:
            try:
                async with asyncio.timeout(remaining):
                    data = await reader.read(65536)
            except TimeoutError:
                break
            result.bytes += len(data)
            buffer += data
            *lines, buffer = buffer.split(delimiter)
            for line in lines:
                show(line + delimiter)
            if len(buffer) > _MAX_SHOWN_LINE:
                show(buffer, f"  (no delimiter {delimiter!r} in {len(buffer)} bytes)")
                buffer = b""
        if buffer:
            show(buffer, "  (unfinished line)")
    finally:
        writer.close()
    return result


def _summary(result: ProbeResult, settings: SerialSettings, seconds: float, out: TextIO) -> None:
    framing = f"{settings.baud} {settings.bytesize}{settings.parity}{settings.stopbits}"
    out.write(
        f"{result.lines} line(s), {result.bytes} byte(s) in {seconds:g} s on {settings.port} "
        f"at {framing}"
    )
    if result.decoded or result.rejected:
        rejected = sum(result.rejected.values())
        out.write(f"; {result.decoded} decoded, {rejected} rejected")
    out.write("\n")
    if result.bytes == 0:
        out.write(
            "hint: nothing arrived. Is the sensor powered and sending on its own (some answer "
            "only when polled)? TX/RX swapped? RS-485 A/B swapped?\n"
        )
    elif result.unprintable_lines * 2 > result.lines:
        out.write(
            "hint: mostly non-text bytes: wrong baud rate or framing (try --baud 4800, 19200, "
            "38400, 115200), or a binary protocol such as Modbus RTU.\n"
        )
    elif result.lines == 1 and result.bytes > _MAX_SHOWN_LINE:
        out.write("hint: no line delimiter: check --delimiter (e.g. '\\r').\n")


def _source_config(config: Path, name: str) -> SerialAsciiSourceConfig:
    cfg = load_config(config)
    for source in cfg.sources:
        if source.name == name:
            if not isinstance(source, SerialAsciiSourceConfig):
                raise ConfigError(
                    str(config), [f"sources: {name!r} is a {source.type} source, not serial_ascii"]
                )
            return source
    names = ", ".join(s.name for s in cfg.sources if isinstance(s, SerialAsciiSourceConfig))
    raise ConfigError(
        str(config),
        [f"sources: no serial_ascii source named {name!r} (configured: {names or 'none'})"],
    )


def _fail(message: str, err: TextIO) -> int:
    err.write(f"edge-gateway serial probe: {message}\n")
    return EXIT_PORT


def _available_ports() -> str:
    by_id = Path("/dev/serial/by-id")
    try:
        names = sorted(p.name for p in by_id.iterdir())
    except OSError:
        return "no /dev/serial/by-id/ (no USB serial adapter plugged in?)"
    return "plugged in: " + ", ".join(str(by_id / n) for n in names) if names else "none plugged in"


def cmd_probe(args: argparse.Namespace) -> int:
    """``serial probe``: returns the exit status."""
    out: TextIO = sys.stdout
    err: TextIO = sys.stderr
    settings = SerialSettings(port=args.port)
    delimiter = args.delimiter
    encoding = "ascii"
    parser: LineParser | None = None
    if args.source is not None:
        try:
            source = _source_config(args.config, args.source)
        except ConfigError as exc:
            for problem in exc.problems:
                err.write(f"{exc.source}: {problem}\n")
            return EXIT_CONFIG
        settings = replace(
            settings,
            baud=source.baud,
            bytesize=source.bytesize,
            parity=source.parity,
            stopbits=source.stopbits,
        )
        delimiter = delimiter if delimiter is not None else source.delimiter
        encoding = source.encoding
        parser = line_parser(source)
    overrides: dict[str, Any] = {
        key: value
        for key, value in (
            ("baud", args.baud),
            ("bytesize", args.bytesize),
            ("parity", args.parity),
            ("stopbits", args.stopbits),
        )
        if value is not None
    }
    settings = replace(settings, **overrides)
    before = port_problem(settings.port)
    if before is not None:
        hint = f" [{_available_ports()}]" if before.kind == "missing" else ""
        return _fail(f"{before}{hint}", err)
    if getattr(args, "modbus", False):
        return asyncio.run(run_modbus_scan(settings, args.ids, args.timeout, out))
    delimiter_bytes = (delimiter if delimiter is not None else "\n").encode(encoding)
    try:
        result = asyncio.run(
            probe(
                settings,
                args.seconds,
                out,
                delimiter=delimiter_bytes,
                encoding=encoding,
                parser=parser,
            )
        )
    except PortProblemError as exc:
        hint = (
            " (the gateway itself? `systemctl stop edge-gateway` while probing)"
            if exc.kind == "busy"
            else ""
        )
        return _fail(f"{exc}{hint}", err)
    except OSError as exc:
        return _fail(f"serial port {settings.port} failed while probing: {exc}", err)
    except KeyboardInterrupt:
        return 130
    _summary(result, settings, args.seconds, out)
    return EXIT_OK


# -- Modbus scan hook ------------------------------------------------------------------------------


def parse_ids(text: str) -> list[int]:
    """Modbus slave ids from ``1-10,12``; raises argparse.ArgumentTypeError."""
    ids: set[int] = set()
    for part in text.split(","):
        first, sep, last = part.strip().partition("-")
        try:
            low = int(first)
            high = int(last) if sep else low
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an id or range: {part!r}") from None
        if not 1 <= low <= high <= 247:
            raise argparse.ArgumentTypeError(f"ids are 1 to 247, low-high (got: {part!r})")
        ids.update(range(low, high + 1))
    return sorted(ids)


async def run_modbus_scan(
    settings: SerialSettings, ids: list[int], timeout_s: float, out: TextIO
) -> int:
    """``serial probe PORT --modbus --ids ...``: which slave ids answer (exit 0 either way)."""
    # Imported when scanning only: the Modbus driver (pymodbus) is not needed to probe lines.
    modbus = importlib.import_module("drivers.modbus")
    try:
        answered: list[int] = await modbus.scan(settings, ids, timeout_s)
    except PortProblemError as exc:
        return _fail(str(exc), sys.stderr)
    framing = f"{settings.baud} {settings.bytesize}{settings.parity}{settings.stopbits}"
    out.write(f"Modbus RTU scan of {len(ids)} id(s) on {settings.port} at {framing}:\n")
    if answered:
        out.write(f"answered: {', '.join(str(i) for i in answered)}\n")
    else:
        out.write(
            "no answer: check baud/parity (many meters default to 9600 8E1 or 19200 8E1), "
            "A/B wiring and termination\n"
        )
    return EXIT_OK


def add_serial_parser(sub: Any) -> None:
    """Register ``serial probe`` on the main parser's sub-commands."""
    serial_cmd = sub.add_parser("serial", help="serial sensors: probe a port on site")
    serial_sub = serial_cmd.add_subparsers(dest="serial_command", required=True, metavar="COMMAND")
    probe_cmd = serial_sub.add_parser(
        "probe",
        help="open a port and show what arrives for a few seconds",
        description=(
            "Open PORT exclusively and print every line that arrives for --seconds, with its "
            "length in bytes. With --source NAME (a serial_ascii source of -c CONFIG), also "
            "show what that source would decode or reject. Exit 1 when the port cannot be "
            "opened (the message names the fix)."
        ),
    )
    probe_cmd.add_argument("port", metavar="PORT", help="e.g. /dev/serial/by-id/usb-FTDI_...")
    probe_cmd.add_argument("--baud", type=int, default=None, help="default 9600 or the source's")
    probe_cmd.add_argument("--bytesize", type=int, choices=(7, 8), default=None)
    probe_cmd.add_argument("--parity", choices=("N", "E", "O"), default=None)
    probe_cmd.add_argument("--stopbits", type=int, choices=(1, 2), default=None)
    probe_cmd.add_argument("--seconds", type=float, default=5.0, help="how long to listen")
    probe_cmd.add_argument(
        "--delimiter", default=None, help="line end (default newline or the source's)"
    )
    probe_cmd.add_argument("--source", metavar="NAME", help="decode with this serial_ascii source")
    probe_cmd.add_argument("-c", "--config", type=Path, default=DEFAULT_CONFIG_PATH)
    probe_cmd.add_argument(
        "--modbus", action="store_true", help="scan Modbus RTU slave ids instead of listening"
    )
    probe_cmd.add_argument(
        "--ids", type=parse_ids, default=list(range(1, 11)), help="ids to scan, e.g. 1-10,20"
    )
    probe_cmd.add_argument(
        "--timeout", type=float, default=0.5, help="seconds to wait for each id's answer"
    )
    probe_cmd.set_defaults(func=cmd_probe)
