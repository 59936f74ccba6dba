"""One serial port, kept open: opening, classifying faults, hot-plug recovery, health events.

pyserial has no hot re-open: when a USB adapter is pulled, reads fail and the port object is
dead. :class:`PortSupervisor` closes it, reports ``serial_lost``, re-opens with jittered capped
backoff (by the configured path, so a ``/dev/serial/by-id/...`` link finds the adapter again under
another ttyUSB number) and reports ``serial_restored``. Open failures are classified (missing,
permission, busy, not a tty) into messages that name the port, the user and the fix.
"""

from __future__ import annotations

import asyncio
import errno
import getpass
import grp
import os
import random
import stat
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import serial
import serial_asyncio_fast

from gateway.types import Emit, Event, Measurement, ReportError, Severity

Session = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


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
    """A port that cannot be opened or used; ``kind`` is missing/permission/busy/not_a_tty/io."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return str(os.getuid())


def port_problem(port: str) -> PortProblemError | None:
    """What is wrong with a port before opening it (None: it looks usable).

    Used by ``check-config`` and to turn open errors into messages a technician can act on.
    """
    try:
        st = Path(port).stat()
    except FileNotFoundError:
        return PortProblemError(
            "missing",
            f"serial port {port} does not exist (unplugged? check `ls /dev/serial/by-id/`)",
        )
    except PermissionError:
        return _permission(port)
    if not stat.S_ISCHR(st.st_mode):
        return PortProblemError(
            "not_a_tty", f"{port} is not a serial device (not a character device)"
        )
    if not os.access(port, os.R_OK | os.W_OK):
        return _permission(port, st.st_gid)
    return None


def _permission(port: str, gid: int | None = None) -> PortProblemError:
    try:
        group = grp.getgrgid(gid).gr_name if gid is not None else "dialout"
    except KeyError:
        group = str(gid)
    user = _user()
    return PortProblemError(
        "permission",
        f"permission denied on serial port {port} for user {user}: add the user to the "
        f"'{group}' group (`usermod -aG {group} {user}`; the systemd unit sets "
        f"SupplementaryGroups=dialout) and restart",
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
    if code == errno.EBUSY or "busy" in text.lower() or "exclusively lock" in text:
        return PortProblemError(
            "busy", f"serial port {port} is busy: another program has it open (`fuser {port}`)"
        )
    if code == errno.ENOTTY or "Inappropriate ioctl" in text:
        return PortProblemError("not_a_tty", f"{port} is not a tty: {text}")
    return PortProblemError("io", f"serial port {port}: {text}")


async def open_port(
    settings: SerialSettings, limit: int = 65536
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Open the port as an asyncio stream pair; raises PortProblemError."""
    try:
        return await serial_asyncio_fast.open_serial_connection(
            url=settings.port,
            baudrate=settings.baud,
            bytesize=settings.bytesize,
            parity=settings.parity,
            stopbits=settings.stopbits,
            # exclusive: a second program on the same RS-485 bus corrupts both sides' frames.
            exclusive=True,
            limit=limit,
        )
    except (OSError, serial.SerialException, ValueError) as exc:
        raise classify(settings.port, exc) from exc


class PortSupervisor:
    """Runs a protocol session on a port and survives the port going away and coming back."""

    def __init__(
        self,
        source: str,
        device: str,
        settings: SerialSettings,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._source = source
        self._device = device
        self._settings = settings
        self._clock = clock
        self.status = "starting"
        self.lost_at: float | None = None
        self.opened = asyncio.Event()

    async def run(self, session: Session, emit: Emit, report_error: ReportError) -> None:
        """Open, run ``session`` until the port fails, report, back off, repeat (forever)."""
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
                if self.lost_at is None:
                    self.lost_at = self._clock()
                    await emit(self._event("serial_lost", str(problem), problem.kind))
                self.status = f"{problem.kind}: {problem}"
                await asyncio.sleep(delay * random.uniform(0.5, 1.0))  # noqa: S311 -- jitter, not crypto
                delay = min(delay * 2, self._settings.reopen_max_s)
                continue
            delay = self._settings.reopen_min_s
            last_kind = None
            if self.lost_at is not None:
                down = round(self._clock() - self.lost_at, 1)
                await emit(self._event("serial_restored", f"reopened after {down} s", None, down))
                self.lost_at = None
            self.status = "open"
            self.opened.set()
            try:
                await session(reader, writer)
                reason = "the port closed"
            except (OSError, serial.SerialException) as exc:
                reason = str(classify(self._settings.port, exc))
            finally:
                self.opened.clear()
                writer.close()
            self.lost_at = self._clock()
            self.status = f"lost: {reason}"
            await emit(self._event("serial_lost", reason, "io"))

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
            ts=datetime.fromtimestamp(self._clock(), UTC),
            severity=Severity.WARNING if kind == "serial_lost" else Severity.INFO,
            values=tuple(values),
        )
