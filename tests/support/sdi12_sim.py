"""A simulated SDI-12 bus for tests: probes behind a transparent adapter, across a socat pty pair.

:class:`Sdi12BusSim` serves the device's end of a pty pair (``tests.support.socat.PtyPair``) from
a thread, answering SDI-12 commands the way a transparent adapter relays its sensors' responses.
It outlives the pair being unplugged and replugged: it reopens the link when it comes back. It
formats answers and computes CRCs on its own, without ``drivers.sdi12``, so the driver and its
test peer cannot share a mistake.

The default :class:`Probe` is modelled on a vented pressure/CTD probe for hydrology (level,
temperature, conductivity on address 0): ``0M!`` → ``00013`` (3 values, ready within 1 s) and a
service request 50 ms later; ``0D0!`` carries two values and ``0D1!`` the third, so the data
recorder has to collect across several send-data commands. A new ``aM!`` does not abort a pending
service request here (a real sensor would abort): a retried ``aM!`` then leaves two service
requests on the line, the worst case for the recorder, which must not take the second one for an
empty data answer.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Self

import serial

__all__ = ["Probe", "Sdi12BusSim"]


def _crc(data: bytes) -> str:
    # Table-driven CRC-16/ARC (SDI-12's CRC), written apart from the driver's bitwise loop.
    crc = 0
    for byte in data:
        crc = (crc >> 8) ^ _CRC_TABLE[(crc ^ byte) & 0xFF]
    return "".join(chr(0x40 | ((crc >> shift) & 0x3F)) for shift in (12, 6, 0))


def _table() -> list[int]:
    table = []
    for n in range(256):
        crc = n
        for _ in range(8):
            crc = (crc >> 1) ^ 0xA001 if crc & 1 else crc >> 1
        table.append(crc)
    return table


_CRC_TABLE = _table()


@dataclass
class Probe:
    """One simulated sensor; its fields are the test's knobs (set them while the bus runs)."""

    address: str = "0"
    # (value, decimals): water level in mm, temperature in °C, conductivity in µS/cm.
    values: list[tuple[float, int]] = field(
        default_factory=lambda: [(1234.5, 1), (12.34, 2), (456.0, 0)]
    )
    per_data: int = 2  # values per aDn! answer
    ready_s: int = 1  # the ttt of the aM! answer
    service_request_after_s: float | None = 0.05  # None: no service request, ready at ttt
    # "14" + 8 vendor + 6 model + 3 version + serial
    identity: str = "14GWSIM   CTD-10110SN000123"
    silent: bool = False  # never answers (a cut cable, a dead sensor)
    garbage: bytes | None = None  # answers aM! with these bytes instead
    _delays: list[float] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def delay_next(self, count: int, seconds: float) -> None:
        """Answer the next ``count`` commands ``seconds`` late (a slow sensor or adapter)."""
        with self._lock:
            self._delays.extend([seconds] * count)

    def take_delay(self) -> float:
        with self._lock:
            return self._delays.pop(0) if self._delays else 0.0


class Sdi12BusSim:
    """Serves SDI-12 probes on the bus end of a pty pair, in a (non-daemon) thread.

    It survives the pair being recreated: when its pty hangs up it waits for the link to come
    back and opens it again. ``echo`` makes it send each command back first, as single-wire
    adapters do.
    """

    def __init__(self, path: Path, probes: Sequence[Probe], *, echo: bool = False) -> None:
        self.path = path
        self.probes = {p.address: p for p in probes}
        self.echo = echo
        self.commands: list[str] = []
        self.opens = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sdi12-bus-sim")
        self._pending: list[tuple[float, str]] = []  # service requests: (monotonic due, address)
        self._crc_mode: dict[str, bool] = {}

    def count(self, command: str) -> int:
        """How many times ``command`` (e.g. ``"0M!"``) was received."""
        return sum(c == command for c in list(self.commands))

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        if self._thread.is_alive():
            raise RuntimeError("the SDI-12 simulator thread did not stop")

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                port = serial.Serial(str(self.path), timeout=0.01)
            except (OSError, serial.SerialException):
                self._stop.wait(0.02)  # the pair is being recreated: try again shortly
                continue
            self.opens += 1
            try:
                self._serve(port)
            except (OSError, serial.SerialException):
                pass  # socat went away (unplugged): reopen when the link is back
            finally:
                port.close()

    def _serve(self, port: serial.Serial) -> None:
        buffer = bytearray()
        self._pending.clear()
        while not self._stop.is_set():
            now = time.monotonic()
            for due, address in [p for p in self._pending if p[0] <= now]:
                self._pending.remove((due, address))
                port.write(f"{address}\r\n".encode())
            buffer += port.read(64)
            while b"!" in buffer:
                command, _, rest = bytes(buffer).partition(b"!")
                buffer = bytearray(rest)
                self._handle(port, command.strip(b"\x00\r\n ") + b"!")

    def _handle(self, port: serial.Serial, raw: bytes) -> None:
        command = raw.decode("ascii", "replace")
        self.commands.append(command)
        if self.echo:
            port.write(raw)
        if command == "?!":
            live = [p for p in self.probes.values() if not p.silent]
            if len(live) == 1:
                port.write(f"{live[0].address}\r\n".encode())
            return
        probe = self.probes.get(command[0])
        if probe is None or probe.silent:
            return  # nobody at that address: the bus stays quiet
        delay = probe.take_delay()
        if delay:
            self._stop.wait(delay)
        answer = self._answer(probe, command[1:-1])
        if answer is not None:
            port.write(answer)

    def _answer(self, probe: Probe, body: str) -> bytes | None:
        a = probe.address
        if body == "":
            return f"{a}\r\n".encode()
        if body == "I":
            return f"{a}{probe.identity}\r\n".encode()
        if body in {"M", "MC"} or (body[:-1] in {"M", "MC"} and body[-1:].isdigit()):
            if probe.garbage is not None:
                return probe.garbage
            self._crc_mode[a] = body.startswith("MC")
            if probe.ready_s and probe.service_request_after_s is not None:
                self._pending.append((time.monotonic() + probe.service_request_after_s, a))
            return f"{a}{probe.ready_s:03d}{len(probe.values)}\r\n".encode()
        if len(body) == 2 and body[0] == "D" and body[1].isdigit():
            first = int(body[1]) * probe.per_data
            chunk = probe.values[first : first + probe.per_data]
            text = a + "".join(f"{v:+.{d}f}" for v, d in chunk)
            if self._crc_mode.get(a):
                text += _crc(text.encode())
            return f"{text}\r\n".encode()
        return None  # a command this probe does not know: real sensors ignore it
