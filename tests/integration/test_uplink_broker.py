"""End-to-end through a real mosquitto: schema, outages, crashes, Last Will, TLS, auth, commands."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import sqlite3
from collections import Counter
from pathlib import Path
from typing import Any

import aiomqtt
import pytest

from gateway.app import EXIT_CONFIG, Gateway
from gateway.config import config_from_dict
from gateway.wire import Encoding
from tests.integration.helpers import (
    Tally,
    events_of,
    gateway_process,
    mqtt_config,
    to_toml,
    write_recording,
)
from tests.support.mosquitto import Mosquitto, Recorder, require_mosquitto

pytestmark = pytest.mark.broker

BASE = "edge/gateway/gw-test"
EVENT_KEYS = {"v", "id", "ts", "kind", "dev", "sev", "vals"}


async def _start(cfg: dict[str, Any]) -> tuple[Gateway, asyncio.Task[int]]:
    gateway = Gateway(config_from_dict(cfg, "test"), {})
    task = asyncio.create_task(gateway.run(), name="gateway-under-test")
    return gateway, task


async def _stop(gateway: Gateway, task: asyncio.Task[int]) -> int:
    gateway.request_stop()
    return await asyncio.wait_for(task, 20)


_TALLIES: dict[int, Tally] = {}


def _readings(rec: Recorder, encoding: Encoding = Encoding.JSON) -> list[Any]:
    # Decoding every message again on every arrival would make waiting quadratic.
    tally = _TALLIES.setdefault(id(rec.messages), Tally(rec.messages, encoding))
    return tally.readings()


def _outbox_rows(state_dir: Path) -> int:
    with sqlite3.connect(state_dir / "outbox.sqlite3") as db:
        count: int = db.execute("SELECT COUNT(*) FROM events").fetchone()[0]
    return count


async def test_events_arrive_with_documented_schema(mosquitto: Mosquitto, tmp_path: Path) -> None:
    stamps = write_recording(tmp_path / "rec.jsonl", 50)
    cfg = mqtt_config(
        tmp_path / "state",
        mosquitto.port,
        sources=[{"type": "replay", "file": str(tmp_path / "rec.jsonl")}],
    )
    async with Recorder(mosquitto.host, mosquitto.port, topics=[f"{BASE}/#"]) as rec:
        gateway, task = await _start(cfg)
        await rec.wait_for(lambda _m: len(_readings(rec)) >= 50)
        assert await _stop(gateway, task) == 0
        await rec.wait_for(lambda ms: any(m.payload == b"offline" for m in ms))

    readings = [m for m in rec.messages if m.topic == f"{BASE}/event/reading"]
    assert len(readings) == 50
    for message, ts in zip(readings, stamps, strict=True):
        wire = json.loads(message.payload)
        assert set(wire) == EVENT_KEYS
        assert wire["v"] == 1
        assert len(wire["id"]) == 26
        assert wire["ts"] == ts
        assert wire["kind"] == "reading"
        assert wire["dev"] == "gauge-1"
        assert wire["sev"] == "info"
        assert wire["vals"] == [{"n": "water_level", "v": stamps.index(ts), "u": "cm"}]
    conn = [m.payload for m in rec.messages if m.topic == f"{BASE}/state/conn"]
    assert conn[0] == b"online"
    assert conn[-1] == b"offline"
    stats = [json.loads(m.payload) for m in rec.messages if m.topic == f"{BASE}/state/stats"]
    assert stats, "a stats message is published on connect"
    assert {"outbox", "drops", "rates_per_s", "reconnects", "uptime_s", "version"} <= set(stats[0])


@pytest.mark.parametrize("encoding", [Encoding.JSON, Encoding.CBOR])
async def test_batched_mode_carries_every_event(
    mosquitto: Mosquitto, tmp_path: Path, encoding: Encoding
) -> None:
    write_recording(tmp_path / "rec.jsonl", 400)
    cfg = mqtt_config(
        tmp_path / "state",
        mosquitto.port,
        sources=[{"type": "replay", "file": str(tmp_path / "rec.jsonl")}],
        batch_max_events=50,
        encoding=encoding.value,
    )
    async with Recorder(mosquitto.host, mosquitto.port, topics=[f"{BASE}/event/#"]) as rec:
        gateway, task = await _start(cfg)
        await rec.wait_for(lambda _m: len({e.event_id for e in _readings(rec, encoding)}) >= 400)
        assert await _stop(gateway, task) == 0
    assert any(m.topic == f"{BASE}/event/batch" for m in rec.messages)
    values = [e.values[0].value for e in _readings(rec, encoding)]
    assert sorted(set(values)) == list(range(400))


async def test_broker_outage_mid_stream_loses_nothing(tmp_path: Path) -> None:
    require_mosquitto()
    n = 3000
    write_recording(tmp_path / "rec.jsonl", n)
    # Persistence keeps the recorder's session (and what was queued for it) across the restart,
    # so the recorder itself cannot be the one that loses messages.
    with Mosquitto(tmp_path / "broker", persistence=True) as broker:
        cfg = mqtt_config(
            tmp_path / "state",
            broker.port,
            sources=[{"type": "replay", "file": str(tmp_path / "rec.jsonl"), "interval_s": 0.0005}],
        )
        async with Recorder(
            broker.host, broker.port, topics=[f"{BASE}/event/#"], identifier="outage-recorder"
        ) as rec:
            gateway, task = await _start(cfg)
            await rec.wait_for(lambda _m: len(_readings(rec)) >= 300, timeout=20)
            broker.stop()
            accepted = gateway.metrics.counters["events_in"]
            # Readings keep being accepted into the outbox while the broker is away.
            async with asyncio.timeout(20):
                while gateway.metrics.counters["events_in"] < accepted + 300:  # noqa: ASYNC110 -- polls a counter, no event exists for it
                    await asyncio.sleep(0.01)
            broker.start()
            await rec.wait_for(
                lambda _m: len({e.event_id for e in _readings(rec)}) >= n, timeout=60
            )
            assert await _stop(gateway, task) == 0

    readings = _readings(rec)
    by_id = Counter(e.event_id for e in readings)
    assert len(by_id) == n
    # A duplicate is the same event sent twice (same id, same content), never a new id.
    first: dict[str, Any] = {}
    for event in readings:
        assert first.setdefault(event.event_id, event) == event
    assert sorted({e.values[0].value for e in readings}) == list(range(n))
    assert gateway.metrics.counters["uplink_connects"] >= 2


async def test_sigkill_mid_stream_then_restart_loses_nothing_accepted(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    n = 4000
    write_recording(tmp_path / "rec.jsonl", n)
    state = tmp_path / "state"
    source = {"type": "replay", "file": str(tmp_path / "rec.jsonl"), "interval_s": 0.0005}
    first = tmp_path / "first.toml"
    first.write_text(to_toml(mqtt_config(state, mosquitto.port, sources=[source])))
    # The second run only drains what the first one accepted: replaying the file again would
    # mint new ids and hide a loss.
    second = tmp_path / "second.toml"
    second.write_text(to_toml(mqtt_config(state, mosquitto.port)))

    async with Recorder(mosquitto.host, mosquitto.port, topics=[f"{BASE}/#"]) as rec:
        with gateway_process(first) as gw:
            await rec.wait_for(lambda _m: len(_readings(rec)) >= 500, timeout=30)
            gw.kill()
        # The broker noticed the dead connection and published the Last Will.
        await rec.wait_for(lambda ms: ms[-1].topic.endswith("state/conn"), timeout=10)
        assert rec.messages[-1].payload == b"offline"
        left = _outbox_rows(state)
        before = len({e.event_id for e in _readings(rec)})
        with gateway_process(second) as gw:
            await gw.wait_log("uplink_connected")
            await rec.wait_for(
                lambda _m: len({e.event_id for e in _readings(rec)}) >= before + left - 64,
                timeout=30,
            )
            gw.signal(signal.SIGTERM)
            assert await gw.wait_exit() == 0
        assert _outbox_rows(state) == 0

    values = {e.values[0].value for e in _readings(rec)}
    # Readings enter the outbox in order, so what was accepted is a prefix of the recording:
    # no hole may exist below the highest reading that ever arrived.
    assert values == set(range(max(values) + 1))
    assert len(values) >= 500


async def test_last_will_reaches_new_subscribers(mosquitto: Mosquitto, tmp_path: Path) -> None:
    cfg_file = tmp_path / "gw.toml"
    cfg_file.write_text(to_toml(mqtt_config(tmp_path / "state", mosquitto.port)))
    with gateway_process(cfg_file) as gw:
        await gw.wait_log("uplink_connected")
        async with Recorder(mosquitto.host, mosquitto.port, topics=[f"{BASE}/state/conn"]) as rec:
            await rec.wait_for(lambda ms: [m.payload for m in ms] == [b"online"])
        gw.kill()
    async with Recorder(mosquitto.host, mosquitto.port, topics=[f"{BASE}/state/conn"]) as late:
        retained = await late.wait_for(bool)
    assert retained[0].payload == b"offline"
    assert retained[0].retain


async def test_sigterm_flushes_the_outbox_and_says_offline(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    write_recording(tmp_path / "rec.jsonl", 2000)
    state = tmp_path / "state"
    cfg_file = tmp_path / "gw.toml"
    source = {"type": "replay", "file": str(tmp_path / "rec.jsonl"), "interval_s": 0.0005}
    cfg_file.write_text(to_toml(mqtt_config(state, mosquitto.port, sources=[source])))
    async with Recorder(mosquitto.host, mosquitto.port, topics=[f"{BASE}/#"]) as rec:
        with gateway_process(cfg_file) as gw:
            await rec.wait_for(lambda _m: len(_readings(rec)) >= 100, timeout=20)
            gw.signal(signal.SIGTERM)
            assert await gw.wait_exit() == 0
        assert "gateway_stopped" in gw.log()
        assert _outbox_rows(state) == 0
        await rec.wait_for(lambda ms: ms[-1].payload == b"offline")
    values = {e.values[0].value for e in _readings(rec)}
    assert values == set(range(max(values) + 1))


async def test_tls_with_generated_ca(mosquitto_tls: Mosquitto, tmp_path: Path) -> None:
    assert mosquitto_tls.tls_port is not None and mosquitto_tls.ca_file is not None
    write_recording(tmp_path / "rec.jsonl", 20)
    cfg = mqtt_config(
        tmp_path / "state",
        mosquitto_tls.tls_port,
        sources=[{"type": "replay", "file": str(tmp_path / "rec.jsonl")}],
        tls={"enabled": True, "ca_file": str(mosquitto_tls.ca_file)},
        allow_insecure=False,
    )
    async with Recorder(mosquitto_tls.host, mosquitto_tls.port, topics=[f"{BASE}/#"]) as rec:
        gateway, task = await _start(cfg)
        await rec.wait_for(lambda _m: len(_readings(rec)) >= 20)
        assert await _stop(gateway, task) == 0


async def test_refused_credentials_exit_78_without_leaking_the_password(tmp_path: Path) -> None:
    require_mosquitto(passwd=True)
    secret = "wrong-s3cr3t-7f1c"
    (tmp_path / "mqtt-password").write_text(secret + "\n")
    with Mosquitto(tmp_path / "broker", users={"gw": "right-password"}) as broker:
        cfg = mqtt_config(
            tmp_path / "state", broker.port, username="gw", password_file="mqtt-password"
        )
        cfg_file = tmp_path / "gw.toml"
        cfg_file.write_text(to_toml(cfg))
        env = {"CREDENTIALS_DIRECTORY": str(tmp_path)}
        with gateway_process(cfg_file, env) as gw:
            assert await gw.wait_exit(20) == EXIT_CONFIG
    assert "gateway_refused" in gw.log()
    assert "uplink.password_file" in gw.log()
    assert secret not in gw.log()


async def test_commands_are_answered_never_crash(mosquitto: Mosquitto, tmp_path: Path) -> None:
    cfg = mqtt_config(tmp_path / "state", mosquitto.port)
    async with Recorder(mosquitto.host, mosquitto.port, topics=[f"{BASE}/#"]) as rec:
        gateway, task = await _start(cfg)
        await rec.wait_for(lambda ms: any(m.payload == b"online" for m in ms))
        async with aiomqtt.Client(mosquitto.host, mosquitto.port) as client:
            await client.publish(f"{BASE}/command/ping", b'{"id": "req-1"}', qos=1)
            await client.publish(f"{BASE}/command/reboot-the-world", b"{}", qos=1)
            await client.publish(f"{BASE}/command/ping", b"{not json", qos=1)
            await client.publish(f"{BASE}/command/ping", b"[1, 2]", qos=1)
            await client.publish(f"{BASE}/command/stats", b"", qos=1)

        def replies(_m: object) -> list[Any]:
            return [e for e in events_of(rec.messages) if e.kind.startswith("command_")]

        await rec.wait_for(lambda m: len(replies(m)) >= 5)
        await rec.wait_for(
            lambda ms: sum(m.topic == f"{BASE}/state/stats" for m in ms) >= 2, timeout=10
        )
        assert not task.done(), "a bad command must not stop the gateway"
        assert await _stop(gateway, task) == 0

    answers = replies(None)
    kinds = [e.kind for e in answers]
    assert kinds.count("command_result") == 2
    assert kinds.count("command_error") == 3
    ping = next(e for e in answers if e.kind == "command_result")
    values = {m.name: m.value for m in ping.values}
    assert values == {"command": "ping", "request_id": "req-1", "reply": "pong"}
    errors = [{m.name: m.value for m in e.values} for e in answers if e.kind == "command_error"]
    assert any("unknown command" in str(v["error"]) for v in errors)
    assert any("not JSON" in str(v["error"]) for v in errors)


def _notify_socket(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.setblocking(False)
    return sock


async def _datagrams_until(sock: socket.socket, needle: str, timeout: float) -> list[str]:
    loop = asyncio.get_running_loop()
    seen: list[str] = []
    async with asyncio.timeout(timeout):
        while not any(needle in d for d in seen):
            data = await loop.sock_recv(sock, 4096)
            seen.append(data.decode())
    return seen


async def test_sd_notify_ready_watchdog_status_stopping_with_broker_down(tmp_path: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        dead_port = probe.getsockname()[1]
    cfg_file = tmp_path / "gw.toml"
    cfg_file.write_text(to_toml(mqtt_config(tmp_path / "state", dead_port)))
    sock = _notify_socket(tmp_path / "notify.sock")
    env = {"NOTIFY_SOCKET": str(tmp_path / "notify.sock"), "WATCHDOG_USEC": "1000000"}
    with sock, gateway_process(cfg_file, env) as gw:
        # A broker that is down does not block readiness; STATUS says so.
        seen = await _datagrams_until(sock, "READY=1", 20)
        ready = next(d for d in seen if "READY=1" in d)
        assert "STATUS=broker" in ready
        seen += await _datagrams_until(sock, "WATCHDOG=1", 10)
        gw.signal(signal.SIGTERM)
        seen += await _datagrams_until(sock, "STOPPING=1", 10)
        assert await gw.wait_exit() == 0
    statuses = [d for d in seen if d.startswith("STATUS=")]
    assert any("outbox 0 queued" in s for s in statuses)


async def test_mqtt5_and_mutual_tls_with_key_from_credentials(tmp_path: Path) -> None:
    require_mosquitto()
    with Mosquitto(tmp_path / "broker", tls=True, require_certificate=True) as broker:
        assert broker.tls_port is not None and broker.ca_file is not None
        cert = broker.issue_client_cert("gw-test")
        creds = tmp_path / "creds"
        creds.mkdir()
        (creds / "tls-client-key").write_bytes(cert.key_file.read_bytes())
        write_recording(tmp_path / "rec.jsonl", 10)
        cfg = mqtt_config(
            tmp_path / "state",
            broker.tls_port,
            sources=[{"type": "replay", "file": str(tmp_path / "rec.jsonl")}],
            protocol="5",
            tls={
                "enabled": True,
                "ca_file": str(broker.ca_file),
                "cert_file": str(cert.cert_file),
                "key_file": "tls-client-key",
            },
            allow_insecure=False,
        )
        environ = {"CREDENTIALS_DIRECTORY": str(creds)}
        async with Recorder(broker.host, broker.port, topics=[f"{BASE}/#"]) as rec:
            gateway = Gateway(config_from_dict(cfg, "test", environ), environ)
            task = asyncio.create_task(gateway.run())
            await rec.wait_for(lambda _m: len(_readings(rec)) >= 10)
            assert await _stop(gateway, task) == 0
