"""Pseudo-terminal pairs from socat, for serial tests and benchmarks.

``PtyPair`` runs ``socat pty,raw,echo=0,link=DIR/sensor pty,raw,echo=0,link=DIR/sim``: the gateway
opens ``sensor``, a simulator writes on ``sim``. ``unplug()`` stops socat (SIGTERM: socat removes
both links, as udev removes a ``/dev/serial/by-id`` link when an adapter is pulled) and
``replug()`` starts it again under the same link names, usually on other ``/dev/pts/N`` nodes.

Synchronous on purpose, like ``tests.support.mosquitto``: fixtures and plain scripts drive it.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from types import TracebackType
from typing import Self

__all__ = ["PtyPair", "require_socat", "socat_path"]

_START_TIMEOUT_S = 10.0


def socat_path() -> Path | None:
    """The socat binary, or None when it is not installed."""
    found = shutil.which("socat") or (
        "/usr/bin/socat" if os.access("/usr/bin/socat", os.X_OK) else None
    )
    return Path(found) if found else None


def require_socat() -> None:
    """Skip the calling test when socat is missing, or fail it when running under CI.

    ``./run tests`` installs socat, so a missing binary under CI is a broken setup, not a reason
    to skip the serial tests silently.
    """
    import pytest  # only tests call this; benchmark scripts must not need pytest

    if socat_path() is not None:
        return
    reason = "socat not installed (apt-get install socat)"
    if os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no"):
        pytest.fail(f"{reason}: CI must run the serial tests", pytrace=False)
    pytest.skip(reason)


class PtyPair:
    """Two linked pseudo-terminals: ``sensor`` (the gateway's side) and ``sim`` (the device's)."""

    def __init__(self, directory: Path, sensor: str = "sensor", sim: str = "sim") -> None:
        binary = socat_path()
        if binary is None:
            raise RuntimeError("socat is not installed")
        self._binary = binary
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        self.sensor = directory / sensor
        self.sim = directory / sim
        self._log = directory / f"socat-{sensor}.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> Self:
        """Start socat and wait until both links point at live pseudo-terminals."""
        if self._proc is not None:
            raise RuntimeError("already running")
        with self._log.open("ab") as log:
            self._proc = subprocess.Popen(
                [
                    str(self._binary),
                    "-d",
                    "-d",
                    f"pty,raw,echo=0,link={self.sensor}",
                    f"pty,raw,echo=0,link={self.sim}",
                ],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=log,
            )
        self.starts += 1
        deadline = time.monotonic() + _START_TIMEOUT_S
        # socat logs "starting data transfer loop" once both ptys exist and the links are made.
        while not (self._ready() and self.sensor.exists() and self.sim.exists()):
            if self._proc.poll() is not None:
                raise RuntimeError(f"socat exited {self._proc.returncode}: {self.log_text()}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"socat did not make its links: {self.log_text()}")
            time.sleep(0.01)
        return self

    def _ready(self) -> bool:
        return self.log_text().count("starting data transfer loop") >= self.starts

    def log_text(self) -> str:
        try:
            return self._log.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    @property
    def pid(self) -> int:
        """socat's process id (for its CPU time in benchmarks)."""
        if self._proc is None:
            raise RuntimeError("not running")
        return self._proc.pid

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def device_node(self) -> str:
        """The /dev/pts/N behind the sensor link."""
        return os.path.realpath(self.sensor)

    def stop(self) -> None:
        """Stop socat (SIGTERM: the links disappear); idempotent."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def unplug(self) -> None:
        """The adapter is pulled: the pty pair and both links go away."""
        self.stop()
        deadline = time.monotonic() + _START_TIMEOUT_S
        while self.sensor.is_symlink() or self.sim.is_symlink():
            if time.monotonic() > deadline:
                raise RuntimeError("socat left its links behind")
            time.sleep(0.01)

    def replug(self) -> Self:
        """The adapter comes back: a new pty pair under the same link names."""
        return self.start()

    def open_sim(self) -> int:
        """A blocking read/write fd on the device's side (close it with os.close)."""
        return os.open(self.sim, os.O_RDWR | os.O_NOCTTY)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
