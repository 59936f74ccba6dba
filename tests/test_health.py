"""sd_notify over a real datagram socket, heartbeats with a controlled clock, rate meter."""

from __future__ import annotations

import socket
from pathlib import Path

from gateway.health import Heartbeats, Metrics, Notifier, RateMeter


def _listener(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(5)
    return sock


def test_notifier_sends_datagrams(tmp_path: Path) -> None:
    with _listener(tmp_path / "n.sock") as sock:
        notifier = Notifier({"NOTIFY_SOCKET": str(tmp_path / "n.sock")})
        notifier.ready("broker connecting; outbox 0 queued")
        notifier.watchdog()
        notifier.stopping("bye")
        assert sock.recv(4096) == b"READY=1\nSTATUS=broker connecting; outbox 0 queued"
        assert sock.recv(4096) == b"WATCHDOG=1"
        assert sock.recv(4096) == b"STOPPING=1\nSTATUS=bye"


def test_notifier_abstract_namespace() -> None:
    name = f"edge-gateway-test-{id(object())}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5)
        Notifier({"NOTIFY_SOCKET": "@" + name}).status("hello")
        assert sock.recv(4096) == b"STATUS=hello"


def test_notifier_without_socket_is_a_noop() -> None:
    notifier = Notifier({})
    assert not notifier.enabled
    notifier.ready("x")  # nothing to send to, nothing raised


def test_notifier_survives_a_vanished_socket(tmp_path: Path) -> None:
    notifier = Notifier({"NOTIFY_SOCKET": str(tmp_path / "gone.sock")})
    notifier.watchdog()
    notifier.watchdog()  # logged once, never raised


def test_watchdog_interval_only_for_this_pid() -> None:
    assert Notifier({"WATCHDOG_USEC": "30000000"}).watchdog_interval_s == 30.0
    assert Notifier({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}).watchdog_interval_s is None
    assert Notifier({}).watchdog_interval_s is None


def test_heartbeats_go_stale_and_recover() -> None:
    now = [100.0]
    beats = Heartbeats(timeout_s=30, clock=lambda: now[0])
    outbox = beats.register("outbox")
    uplink = beats.register("uplink")
    now[0] += 20
    outbox()
    now[0] += 15
    assert beats.stale() == ["uplink"]
    uplink()
    assert beats.stale() == []
    beats.unregister("uplink")
    now[0] += 31
    assert beats.stale() == ["outbox"]


def test_rate_meter_reports_per_second() -> None:
    metrics = Metrics()
    meter = RateMeter(metrics, ("events_out",))
    metrics.inc("events_out", 50)
    rates = meter.rates()
    assert rates["events_out"] > 0
    assert meter.rates()["events_out"] < rates["events_out"]
