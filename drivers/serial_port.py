"""One serial port, kept open: opening, classifying faults, hot-plug recovery, health events.

pyserial has no hot re-open: when a USB adapter is pulled, reads fail and the port object is
dead. :class:`PortSupervisor` closes it, reports ``serial_lost``, re-opens with jittered capped
backoff (by the configured path, so a ``/dev/serial/by-id/...`` link finds the adapter again under
another ttyUSB number) and reports ``serial_restored``. Open failures are classified (missing,
permission, busy, not a tty, blocked by the unit's device policy) into messages that name the
port, the user and the fix.

pyserial opens and configures the port (termios, exclusive lock); the asyncio side is a small
transport of our own (:class:`PortTransport`) instead of pyserial-asyncio(-fast), because that
one closes ports from a background task in a module-global set and through the default executor:
the port may still be open (and its lock held) when the next open runs, a failed write is logged
with a traceback through the loop's exception handler, and each read costs two ``select`` calls.
Ours reads with one ``os.read`` per readiness callback, closes synchronously, and hands every
failure to the stream as an exception.

Serial sources that want their port in the stats message expose ``name``, ``port`` (a
:class:`PortSupervisor`) and ``counters`` (see :class:`SerialSource`).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import grp
import os
import pwd
import random
import stat
import termios
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import serial
import structlog

from gateway.types import Emit, Event, Measurement, ReportError, Severity, utc_now

log = structlog.get_logger(__name__)

Session = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]

# Bytes taken from the kernel per readiness callback. A pty or USB adapter rarely holds more than
# 4 KiB; a larger read costs nothing and lets a burst arrive in one callback.
_READ_SIZE = 65536
# A session that stayed open this long was a working port: the next loss starts the backoff at
# reopen_min_s again. A port that fails right after every open (a flapping adapter, a tty that
# hangs up at once) keeps doubling its wait instead of flooding the outbox with lost/restored.
_STABLE_AFTER_S = 10.0


@dataclass(frozen=True, slots=True)
class SerialSettings:
    """How to open a port (from the source's config)."""

    port: str
    baud: int = 9600
    bytesize: int = 8
    parity: str = "N"
    stopbits: int = 1
    read_timeout_s: float = 1.0
    reopen_min_s: float = 0.5
    reopen_max_s: float = 5.0


class PortProblemError(OSError):
    """A port that cannot be opened or used.

    ``kind`` is one of missing, permission, busy, not_a_tty, device_policy, io, lost.
    """

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind

    def __str__(self) -> str:
        return str(self.args[0])


class PortLostError(OSError):
    """The port failed while open (unplugged adapter, hang-up, I/O error)."""


def _user() -> str:
    # The effective user, not $USER/$LOGNAME (getpass): sudo, runuser and services set those
    # differently, and the message must name the account the kernel checked.
    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return str(os.geteuid())


def port_problem(port: str) -> PortProblemError | None:
    """What is wrong with a port before opening it (None: it looks usable).

    Used by ``check-config``, the probe, and to turn open errors into messages a technician can
    act on. It looks at the path only; a port that passes can still be busy.
    """
    try:
        st = Path(port).stat()
    except FileNotFoundError:
        hint = (
            "unplugged, or the adapter has another id? `ls -l /dev/serial/by-id/`"
            if "/by-id/" in port or "/by-path/" in port
            else "unplugged? prefer a /dev/serial/by-id/... path: `ls -l /dev/serial/by-id/`"
        )
        return PortProblemError("missing", f"serial port {port} does not exist ({hint})")
    except PermissionError:
        # A directory on the way (not the device itself) is not searchable by this user.
        return PortProblemError(
            "permission",
            f"permission denied on serial port {port} for user {_user()}: a directory in the "
            f"path is not searchable (use the /dev/serial/by-id/... path)",
        )
    except NotADirectoryError:
        return PortProblemError("missing", f"serial port {port} does not exist")
    if not stat.S_ISCHR(st.st_mode):
        what = "a directory" if stat.S_ISDIR(st.st_mode) else "not a character device"
        return PortProblemError("not_a_tty", f"{port} is not a serial device ({what})")
    if not os.access(port, os.R_OK | os.W_OK):
        return _permission(port, st.st_gid)
    return None


def _permission(port: str, gid: int) -> PortProblemError:
    user = _user()
    try:
        group = grp.getgrgid(gid).gr_name
    except KeyError:
        group = str(gid)
    if group == "root":
        fix = (
            f"the device belongs to group root: add a udev rule giving it group dialout "
            f'(GROUP="dialout", MODE="0660") and make sure {user} is in dialout'
        )
    else:
        fix = (
            f"add {user} to the '{group}' group (`usermod -aG {group} {user}`; the systemd "
            f"unit has SupplementaryGroups=dialout) and restart the gateway"
        )
    return PortProblemError(
        "permission", f"permission denied on serial port {port} for user {user}: {fix}"
    )


def classify(port: str, exc: BaseException) -> PortProblemError:
    """Turn an open/read failure into a PortProblemError with an actionable message."""
    if isinstance(exc, PortProblemError):
        return exc
    problem = port_problem(port)
    if problem is not None:
        return problem
    code = getattr(exc, "errno", None)
    text = str(exc)
    if code in (errno.EBUSY, errno.EAGAIN) or "exclusively lock" in text or "busy" in text.lower():
        return PortProblemError(
            "busy",
            f"serial port {port} is busy: another program has it open "
            f"(`fuser -v {port}`; stop it, or a second gateway source on the same port)",
        )
    if code == errno.ENOTTY or "Inappropriate ioctl" in text:
        return PortProblemError("not_a_tty", f"{port} is not a serial device: {text}")
    if code == errno.EPERM or "Operation not permitted" in text:
        # The file mode allows access (port_problem said so), yet open() is refused: the
        # cgroup device policy of the unit (DevicePolicy=closed + DeviceAllow=).
        return PortProblemError(
            "device_policy",
            f"serial port {port}: access blocked by the service's device policy; add "
            f"`DeviceAllow=char-<driver> rw` for it (see /proc/devices) in a drop-in "
            f"(`systemctl edit edge-gateway`)",
        )
    if isinstance(exc, PortLostError):
        return PortProblemError("lost", f"serial port {port}: {text}")
    return PortProblemError("io", f"serial port {port}: {text}")


_PARITY = {"N": serial.PARITY_NONE, "E": serial.PARITY_EVEN, "O": serial.PARITY_ODD}


def _open_serial(settings: SerialSettings) -> serial.Serial:
    """Open and configure the port (blocking; runs in a thread: USB adapters can take a while)."""
    port = serial.Serial(
        port=settings.port,
        baudrate=settings.baud,
        bytesize=settings.bytesize,
        parity=_PARITY.get(settings.parity, settings.parity),
        stopbits=settings.stopbits,
        timeout=0,
        write_timeout=0,
        # flock: a second program on the same RS-485 bus corrupts both sides' frames.
        exclusive=True,
    )
    try:
        # TIOCEXCL as well (root is exempt): flock only stops programs that also flock, while a
        # technician's `screen /dev/ttyUSB0` does not, and would silently steal half the bytes.
        fcntl.ioctl(port.fileno(), termios.TIOCEXCL)
    except OSError:
        port.close()
        raise
    return port


def _close_serial(port: serial.Serial) -> None:
    # Unsent output is dropped: the session is over, and on a dead USB adapter close() would
    # otherwise wait up to the driver's closing_wait (30 s) for it to drain.
    with contextlib.suppress(OSError, serial.SerialException, termios.error):
        termios.tcflush(port.fileno(), termios.TCOFLUSH)
    with contextlib.suppress(OSError, serial.SerialException, termios.error):
        fcntl.ioctl(port.fileno(), termios.TIOCNXCL)
    with contextlib.suppress(OSError, serial.SerialException):
        port.close()


class PortTransport(asyncio.Transport):
    """An asyncio transport over an open pyserial port (POSIX, non-blocking fd).

    Failures close the port at once and reach the protocol as ``connection_lost(exc)``, which a
    StreamReader raises from its next read. ``get_extra_info("serial")`` gives the pyserial object
    (modem lines, break condition).
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        protocol: asyncio.Protocol,
        port: serial.Serial,
    ) -> None:
        super().__init__({"serial": port})
        self._loop = loop
        self._protocol = protocol
        self._port = port
        self._fd: int = port.fileno()
        self._closing = False
        self._reading = False
        self._writing = False
        self._buffer = bytearray()
        self._protocol_paused = False
        self._high = 64 * 1024
        self._low = 16 * 1024
        protocol.connection_made(self)
        self.resume_reading()

    # -- reading ---------------------------------------------------------------------------------

    def is_reading(self) -> bool:
        return self._reading

    def pause_reading(self) -> None:
        if self._reading:
            self._loop.remove_reader(self._fd)
            self._reading = False

    def resume_reading(self) -> None:
        if not self._reading and not self._closing:
            self._loop.add_reader(self._fd, self._read_ready)
            self._reading = True

    def _read_ready(self) -> None:
        try:
            data = os.read(self._fd, _READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._fail(PortLostError(exc.errno, f"read failed: {exc.strerror}"))
            return
        if not data:
            # A tty whose device is gone (USB unplugged, pty master closed) polls readable and
            # reads nothing, forever.
            self._fail(PortLostError(errno.EIO, "hang-up: the device went away"))
            return
        self._protocol.data_received(data)

    # -- writing ---------------------------------------------------------------------------------

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._closing or not data:
            return
        if not self._buffer:
            try:
                sent = os.write(self._fd, data)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError as exc:
                self._fail(PortLostError(exc.errno, f"write failed: {exc.strerror}"))
                return
            data = memoryview(data)[sent:]
            if not data:
                return
            self._loop.add_writer(self._fd, self._write_ready)
            self._writing = True
        self._buffer.extend(data)
        self._maybe_pause_protocol()

    def _write_ready(self) -> None:
        try:
            sent = os.write(self._fd, self._buffer)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._fail(PortLostError(exc.errno, f"write failed: {exc.strerror}"))
            return
        del self._buffer[:sent]
        if not self._buffer:
            self._loop.remove_writer(self._fd)
            self._writing = False
        if self._protocol_paused and len(self._buffer) <= self._low:
            self._protocol_paused = False
            self._protocol.resume_writing()

    def _maybe_pause_protocol(self) -> None:
        if not self._protocol_paused and len(self._buffer) > self._high:
            self._protocol_paused = True
            self._protocol.pause_writing()

    def get_write_buffer_size(self) -> int:
        return len(self._buffer)

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._low, self._high

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        high = 64 * 1024 if high is None else high
        low = high // 4 if low is None else low
        if not high >= low >= 0:
            raise ValueError(f"high ({high}) must be >= low ({low}) must be >= 0")
        self._high, self._low = high, low
        self._maybe_pause_protocol()

    def can_write_eof(self) -> bool:
        return False

    def write_eof(self) -> None:
        # asyncio's WriteTransport contract: can_write_eof() is False, so nobody should call this.
        raise NotImplementedError("a serial port has no end-of-file")

    # -- closing ---------------------------------------------------------------------------------

    def is_closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        """Close now; unsent output is dropped (see _close_serial)."""
        self._shutdown(None)

    def abort(self) -> None:
        self._shutdown(None)

    def _fail(self, exc: Exception) -> None:
        self._shutdown(exc)

    def _shutdown(self, exc: Exception | None) -> None:
        if self._closing:
            return
        self._closing = True
        self.pause_reading()
        if self._writing:
            self._loop.remove_writer(self._fd)
            self._writing = False
        self._buffer.clear()
        _close_serial(self._port)
        # As in asyncio's own transports: the protocol hears about it on the next loop turn.
        self._loop.call_soon(self._protocol.connection_lost, exc)


async def open_port(
    settings: SerialSettings, limit: int = 65536
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Open the port as an asyncio stream pair; raises PortProblemError.

    Closing the writer closes the port at once (no executor, no background task).
    """
    loop = asyncio.get_running_loop()
    future = loop.run_in_executor(None, _open_serial, settings)
    try:
        port = await asyncio.shield(future)
    except asyncio.CancelledError:
        # The thread keeps going; whatever it opens must not stay open (and locked) behind us.
        future.add_done_callback(_close_late_open)
        raise
    except (OSError, serial.SerialException, ValueError) as exc:
        raise classify(settings.port, exc) from exc
    try:
        reader = asyncio.StreamReader(limit=limit, loop=loop)
        protocol = asyncio.StreamReaderProtocol(reader, loop=loop)
        transport = PortTransport(loop, protocol, port)
    except BaseException:
        _close_serial(port)
        raise
    return reader, asyncio.StreamWriter(transport, protocol, reader, loop)


def _close_late_open(future: asyncio.Future[serial.Serial]) -> None:
    if not future.cancelled() and future.exception() is None:
        _close_serial(future.result())


@dataclass(frozen=True, slots=True)
class PortStatus:
    """What a port is doing, for the stats message and the log."""

    state: str  # starting, open, or a PortProblemError kind (missing, permission, busy, ...)
    problem: str | None  # the message naming the fix, when not open
    since: float  # time.monotonic() of the last change


class PortSupervisor:
    """Runs a protocol session on a port and survives the port going away and coming back.

    ``run(session, ...)`` opens the port and awaits ``session(reader, writer)``. When the session
    raises an OSError (the port failed), the supervisor reports ``serial_lost``, re-opens with
    jittered capped backoff and reports ``serial_restored``; when the session returns, ``run``
    returns (a finite session: the demo, a probe). Other exceptions propagate.
    """

    def __init__(self, source: str, device: str, settings: SerialSettings) -> None:
        self._source = source
        self._device = device
        self._settings = settings
        self.status = PortStatus("starting", None, time.monotonic())
        self.opened = asyncio.Event()
        self.opens = 0
        self.losses = 0
        self._lost_at: float | None = None

    @property
    def settings(self) -> SerialSettings:
        return self._settings

    def summary(self) -> dict[str, Any]:
        """The port's health for the stats message."""
        status = self.status
        return {
            "port": self._settings.port,
            "state": status.state,
            "problem": status.problem,
            "for_s": round(time.monotonic() - status.since, 1),
            "opens": self.opens,
            "losses": self.losses,
        }

    def _set(self, state: str, problem: str | None) -> None:
        if state != self.status.state or problem != self.status.problem:
            self.status = PortStatus(state, problem, time.monotonic())

    async def run(self, session: Session, emit: Emit, report_error: ReportError) -> None:
        """Open, run ``session`` until the port fails, report, back off, repeat."""
        delay = self._settings.reopen_min_s
        last_kind: str | None = None
        while True:
            try:
                reader, writer = await open_port(self._settings)
            except PortProblemError as problem:
                if problem.kind != last_kind:
                    # Once per kind of problem: a port missing for a week is one log line.
                    report_error(f"serial_{problem.kind}", str(problem))
                    last_kind = problem.kind
                self._set(problem.kind, str(problem))
                if self._lost_at is None:
                    self._lost_at = time.monotonic()
                    await emit(self._event("serial_lost", str(problem), problem.kind))
                await asyncio.sleep(_jitter(delay))
                delay = min(delay * 2, self._settings.reopen_max_s)
                continue
            last_kind = None
            opened_at = time.monotonic()
            self.opens += 1
            self._set("open", None)
            if self._lost_at is not None:
                down = round(opened_at - self._lost_at, 2)
                self._lost_at = None
                self._log_open("serial_restored", down_for_s=down)
                await emit(self._event("serial_restored", f"reopened after {down} s", None, down))
            else:
                self._log_open("serial_opened")
            self.opened.set()
            failure: OSError | None = None
            try:
                await session(reader, writer)
            except OSError as exc:
                failure = exc
            finally:
                self.opened.clear()
                writer.close()
            if failure is None:
                return
            lost = classify(self._settings.port, failure)
            self.losses += 1
            self._lost_at = time.monotonic()
            self._set(lost.kind, str(lost))
            report_error("serial_lost", str(lost))
            # The re-open attempts that fail the same way (missing, ...) need no second line.
            last_kind = lost.kind
            await emit(self._event("serial_lost", str(lost), lost.kind))
            if self._lost_at - opened_at >= _STABLE_AFTER_S:
                delay = self._settings.reopen_min_s
            await asyncio.sleep(_jitter(delay))
            delay = min(delay * 2, self._settings.reopen_max_s)

    def _log_open(self, what: str, **fields: Any) -> None:
        # The device node behind a by-id link tells the technician which ttyUSB it is now.
        node = os.path.realpath(self._settings.port)
        log.info(what, source=self._source, port=self._settings.port, device_node=node, **fields)

    def _event(
        self, kind: str, reason: str, problem: str | None, down_s: float | None = None
    ) -> Event:
        values = [
            Measurement("port", self._settings.port[:256]),
            Measurement("reason", reason[:256]),
        ]
        if problem is not None:
            values.append(Measurement("problem", problem))
        if down_s is not None:
            values.append(Measurement("down_for", down_s, "s"))
        return Event(
            kind=kind,
            device=self._device,
            ts=utc_now(),
            severity=Severity.WARNING if kind == "serial_lost" else Severity.INFO,
            values=tuple(values),
        )


def _jitter(delay: float) -> float:
    # Full jitter in the upper half: spreads gateways that lost power together, and keeps the
    # wait near the configured one so `restored` stays within reopen_max_s of a re-plug.
    return delay * random.uniform(0.5, 1.0)  # noqa: S311 -- jitter, not crypto


@runtime_checkable
class SerialSource(Protocol):
    """What the stats message reads from a serial source."""

    name: str
    port: PortSupervisor

    @property
    def counters(self) -> Mapping[str, int]: ...
