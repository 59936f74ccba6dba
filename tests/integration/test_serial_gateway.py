"""A serial weather station through a real Gateway: pty → source → pipeline → outbox → uplink.

The station is a simulator on the far end of a socat pty pair. The uplink is a JSON-lines file
(what left the gateway, decoded with the wire format) or a real mosquitto.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiomqtt
import pytest

from drivers.ascii_lines import AsciiLineSource, nmea_checksum
from gateway.app import Gateway
from gateway.config import config_from_dict
from gateway.types import Event
from gateway.wire import Encoding, decode
from tests.integration.helpers import Tally, mqtt_config
from tests.support.mosquitto import Mosquitto, Recorder
from tests.support.socat import PtyPair

SOURCE = "weather"
DEVICE = "ws-anduze"


def station_source(port: Path, **extra: Any) -> dict[str, Any]:
    return {
        "type": "serial_ascii",
        "name": SOURCE,
        "device": DEVICE,
        "port": str(port),
        "format": "keyvalue",
        "checksum": "nmea",
        "reopen_min_s": 0.1,
        "reopen_max_s": 1.0,
        "fields": [
            {"key": "T", "name": "air_temperature", "unit": "Cel"},
            {"key": "N", "name": "sequence"},
        ],
        **extra,
    }


def line(n: int) -> bytes:
    body = f"T={20 + n / 100:.2f},N={n}"
    return f"{body}*{nmea_checksum(body):02X}\r\n".encode()


def file_config(state: Path, out: Path, port: Path, **extra: Any) -> dict[str, Any]:
    return {
        "gateway": {"id": "gw-serial", "state_dir": str(state), "shutdown_flush_s": 5.0},
        "uplink": {"type": "file", "path": str(out), "fsync": False},
        "sources": [station_source(port, **extra)],
    }


@asynccontextmanager
async def running(cfg: dict[str, Any]) -> AsyncIterator[tuple[Gateway, AsciiLineSource]]:
    gateway = Gateway(config_from_dict(cfg, "test"), {})
    async with asyncio.TaskGroup() as tg:
        task = tg.create_task(gateway.run(), name="gateway")
        async with asyncio.timeout(15):
            await gateway.ready.wait()
            source = gateway.source(SOURCE)
            assert isinstance(source, AsciiLineSource)
            await source.port.opened.wait()
        try:
            yield gateway, source
        finally:
            gateway.request_stop()
            async with asyncio.timeout(20):
                assert await task == 0


async def until(condition: Any, timeout: float = 15.0) -> None:
    """Re-check ``condition`` (a source's counters) until it holds or the deadline passes."""
    async with asyncio.timeout(timeout):
        while not condition():  # noqa: ASYNC110 -- counters change without a callback to await
            await asyncio.sleep(0.01)


def sent_events(out: Path) -> list[Event]:
    return [decode(raw, Encoding.JSON) for raw in out.read_bytes().splitlines()]


def numbers(events: list[Event]) -> list[int]:
    return [
        int(next(m.value for m in e.values if m.name == "sequence"))
        for e in events
        if e.kind == "reading"
    ]


async def test_readings_faults_unplug_and_gap_end_to_end(pty_pair: PtyPair, tmp_path: Path) -> None:
    out = tmp_path / "uplink.jsonl"
    cfg = file_config(tmp_path / "state", out, pty_pair.sensor, gap_after_s=0.5)
    async with running(cfg) as (gateway, source):
        sim = pty_pair.open_sim()
        try:
            os.write(sim, b"".join(line(n) for n in range(50)))
            os.write(sim, line(50).replace(b"T=", b"X=") + b"\x00\xff\xfe\n" + b"#" * 600 + b"\n")
            os.write(sim, b"".join(line(n) for n in range(51, 100)) + b"T=21")
            await until(lambda: source.counters["bytes"] >= 99 * len(line(10)))
        finally:
            os.close(sim)
        # The adapter is pulled with half a line in the buffer, and comes back.
        await asyncio.to_thread(pty_pair.unplug)
        await until(lambda: source.port.status.state != "open")
        await asyncio.to_thread(pty_pair.replug)
        await until(lambda: source.port.opens == 2)
        sim = pty_pair.open_sim()
        try:
            os.write(sim, b"".join(line(n) for n in range(100, 120)))
            await until(lambda: source.readings == 119)
            # Then the station goes quiet: one gap event.
            await until(lambda: source.in_gap)
        finally:
            os.close(sim)
        accepted = source.readings
        counters = dict(source.counters)
    events = sent_events(out)
    # Everything the source accepted left the gateway, once, in order: 0..119 but 50.
    assert numbers(events) == [n for n in range(120) if n != 50]
    assert accepted == 119
    kinds = [e.kind for e in events if e.kind != "reading"]
    assert kinds == ["serial_lost", "serial_restored", "gap"]
    assert all(e.device == DEVICE for e in events)
    assert counters["checksum_mismatch"] == 1  # the X= line: its checksum was for T=
    assert counters["garbage"] == 1
    assert counters["overlong"] == 1
    assert counters["partial"] == 1
    restored = next(e for e in events if e.kind == "serial_restored")
    down_for = next(m.value for m in restored.values if m.name == "down_for")
    assert isinstance(down_for, float) and 0 < down_for < 10
    assert gateway.metrics.counters["source_errors_serial_lost"] == 1


async def test_stopping_during_a_burst_loses_nothing_accepted(
    pty_pair: PtyPair, tmp_path: Path
) -> None:
    out = tmp_path / "uplink.jsonl"
    cfg = file_config(tmp_path / "state", out, pty_pair.sensor)
    cfg["pipeline"] = {"queue_max": 50}  # small: the source waits on the pipeline (block policy)
    burst = b"".join(line(n) for n in range(5000))
    sim = pty_pair.open_sim()
    try:
        async with running(cfg) as (_gateway, source):
            writer = asyncio.create_task(asyncio.to_thread(os.write, sim, burst))
            await until(lambda: source.readings >= 500)
            accepted_at_stop = source.readings
        accepted = source.readings
        writer.cancel()
    finally:
        os.close(sim)
    sent = numbers(sent_events(out))
    assert len(sent) == accepted >= accepted_at_stop
    assert sent == list(range(accepted))
    # At most the one line that waited for room in the full pipeline when the stop came.
    assert source.counters.get("unsent_at_stop", 0) <= 1


@pytest.mark.broker
async def test_stats_carry_the_port_state_and_counters(
    mosquitto: Mosquitto, pty_pair: PtyPair, tmp_path: Path
) -> None:
    cfg = mqtt_config(tmp_path / "state", mosquitto.port, sources=[station_source(pty_pair.sensor)])
    base = "edge/gateway/gw-test"
    async with Recorder(mosquitto.host, mosquitto.port, topics=[f"{base}/#"]) as rec:
        tally = Tally(rec.messages)
        async with running(cfg) as (_gateway, source):
            sim = pty_pair.open_sim()
            try:
                os.write(sim, line(1) + b"garbage\x07\n" + line(2))
                await rec.wait_for(lambda _m: len(tally.readings()) == 2)
            finally:
                os.close(sim)
            await asyncio.to_thread(pty_pair.unplug)
            await until(lambda: source.port.status.state == "missing")
            await request_stats(mosquitto, base)

            def serial_stats(messages: list[Any]) -> list[dict[str, Any]]:
                return [
                    entry
                    for m in messages
                    if m.topic == f"{base}/state/stats"
                    for entry in json.loads(m.payload).get("serial", [])
                ]

            await rec.wait_for(lambda ms: any(s["state"] == "missing" for s in serial_stats(ms)))
    stats = next(s for s in serial_stats(rec.messages) if s["state"] == "missing")
    assert stats["source"] == SOURCE
    assert stats["port"] == str(pty_pair.sensor)
    assert "does not exist" in stats["problem"]
    assert stats["counters"]["readings"] == 2
    assert stats["counters"]["garbage"] == 1
    assert stats["opens"] == 1 and stats["losses"] == 1
    readings = tally.readings()
    assert [r.device for r in readings] == [DEVICE, DEVICE]


async def request_stats(mosquitto: Mosquitto, base: str) -> None:
    async with aiomqtt.Client(mosquitto.host, mosquitto.port) as client:
        await client.publish(f"{base}/command/stats", b"", qos=1)
