"""Health: systemd notification, component heartbeats and the counters behind the stats message."""

from __future__ import annotations

import os
import socket
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import structlog

log = structlog.get_logger(__name__)


class Notifier:
    """sd_notify(3) over the datagram socket systemd names in $NOTIFY_SOCKET.

    A no-op without $NOTIFY_SOCKET (tests, a shell). Send errors are logged, never raised: a
    missing notification must not take the gateway down.
    """

    def __init__(self, environ: Mapping[str, str]) -> None:
        address = environ.get("NOTIFY_SOCKET", "")
        # A leading '@' names a socket in the abstract namespace (sd_notify(3)).
        self._address = "\0" + address[1:] if address.startswith("@") else address
        usec = environ.get("WATCHDOG_USEC", "")
        pid = environ.get("WATCHDOG_PID", "")
        enabled = usec.isdigit() and (not pid or pid == str(os.getpid()))
        self.watchdog_interval_s: float | None = int(usec) / 1e6 if enabled else None
        self._warned = False

    @property
    def enabled(self) -> bool:
        return bool(self._address)

    def notify(self, message: str) -> None:
        if not self._address:
            return
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.sendto(message.encode(), self._address)
        except OSError as exc:
            if not self._warned:
                log.warning("sd_notify_failed", address=self._address, error=str(exc))
                self._warned = True

    def ready(self, status: str) -> None:
        self.notify(f"READY=1\nSTATUS={status}")

    def status(self, status: str) -> None:
        self.notify(f"STATUS={status}")

    def watchdog(self) -> None:
        self.notify("WATCHDOG=1")

    def stopping(self, status: str) -> None:
        self.notify(f"STOPPING=1\nSTATUS={status}")


class Heartbeats:
    """Each long-running component beats; the watchdog is fed only while all are fresh."""

    def __init__(self, timeout_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._timeout_s = timeout_s
        self._clock = clock
        self._last: dict[str, float] = {}

    def register(self, name: str) -> Callable[[], None]:
        """Add a component; returns the function it calls to say it is alive."""
        self._last[name] = self._clock()

        def beat() -> None:
            self._last[name] = self._clock()

        return beat

    def unregister(self, name: str) -> None:
        self._last.pop(name, None)

    def stale(self) -> list[str]:
        """Components whose last beat is older than the timeout."""
        now = self._clock()
        return sorted(name for name, t in self._last.items() if now - t > self._timeout_s)


@dataclass
class Metrics:
    """Counters shared by the components of one gateway (created by the composition root)."""

    started_monotonic: float = field(default_factory=time.monotonic)
    counters: Counter[str] = field(default_factory=Counter)

    def inc(self, name: str, n: int = 1) -> None:
        self.counters[name] += n

    def uptime_s(self) -> float:
        return time.monotonic() - self.started_monotonic


class RateMeter:
    """Per-second rates of selected counters between two snapshots."""

    def __init__(self, metrics: Metrics, names: tuple[str, ...]) -> None:
        self._metrics = metrics
        self._names = names
        self._last_t = time.monotonic()
        self._last = {n: metrics.counters[n] for n in names}

    def rates(self) -> dict[str, float]:
        now = time.monotonic()
        elapsed = max(now - self._last_t, 1e-6)
        current = {n: self._metrics.counters[n] for n in self._names}
        out = {n: round((current[n] - self._last[n]) / elapsed, 2) for n in self._names}
        self._last_t, self._last = now, current
        return out
