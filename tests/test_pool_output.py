"""Local alarm outputs and the monitor's watch on a silent camera."""

from __future__ import annotations

import asyncio
import json
import os
import socket
from pathlib import Path
from typing import Any

import pytest

from gateway.analyzers.pool_config import PoolConfig, SerialAlarmConfig
from gateway.analyzers.pool_output import SerialAlarmOutput
from gateway.analyzers.pool_runtime import PoolMonitor
from gateway.config import InferenceSection
from gateway.health import Metrics
from gateway.types import Event, Reading
from tests.support.mosquitto import Mosquitto, Recorder
from tests.support.socat import PtyPair


async def _read(path: Path, n: int) -> bytes:
    def blocking() -> bytes:
        fd = os.open(path, os.O_RDONLY | os.O_NOCTTY)
        try:
            data = b""
            while len(data) < n:
                data += os.read(fd, n - len(data))
            return data
        finally:
            os.close(fd)

    return await asyncio.wait_for(asyncio.to_thread(blocking), 10)


async def test_serial_relay_is_switched_on_at_each_alarm_and_off_at_the_all_clear(
    pty_pair: PtyPair,
) -> None:
    output = SerialAlarmOutput(SerialAlarmConfig(type="serial", port=str(pty_pair.sensor)))
    reader = asyncio.ensure_future(_read(pty_pair.sim, 12))
    await asyncio.sleep(0)
    await output.alarm({"alarm": "p-1"})
    await output.alarm({"alarm": "p-1", "repeat": 1})
    await output.clear({"state": "clear"})
    assert await reader == bytes.fromhex("A00101A2A00101A2A00100A1")
    assert output.counters["sent"] == 3


async def test_a_missing_relay_is_counted_not_raised(tmp_path: Path) -> None:
    output = SerialAlarmOutput(SerialAlarmConfig(type="serial", port=str(tmp_path / "ttyUSB9")))
    await output.alarm({"alarm": "p-1"})
    assert output.counters["not_sent"] == 1


async def test_a_silent_camera_is_not_monitoring_within_the_configured_time(
    tmp_path: Path,
) -> None:
    now = [100.0]
    cfg = PoolConfig.model_validate(
        {
            # A realtime source whose file never appears: the camera delivers nothing.
            "camera": {"url": str(tmp_path / "cam.mp4"), "reconnect_min_s": 0.05},
            "detector_card": str(tmp_path / "missing.toml"),
        }
    )
    events: list[Event] = []
    arrived = asyncio.Event()

    async def emit(item: Reading | Event, on_stored: Any = None) -> None:
        assert isinstance(item, Event)
        events.append(item)
        arrived.set()

    monitor = PoolMonitor("p", cfg, None, InferenceSection(), Metrics(), clock=lambda: now[0])
    task = asyncio.ensure_future(monitor.run(emit, lambda _k, _d: None))
    try:
        async with asyncio.timeout(10):
            await arrived.wait()  # the detector is missing: not monitoring at once
        first = {m.name: m.value for m in events[0].values}
        assert first["reasons"] == "detector_unavailable"
        now[0] += 5.0  # no frame for 5 s (health.no_frames_after_s)
        await monitor.tick()
        last = {m.name: m.value for m in events[-1].values}
        assert last["state"] == "not_monitoring"
        assert last["reasons"] == "detector_unavailable,no_frames"
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


@pytest.mark.broker
async def test_the_local_alarm_sounds_with_the_uplink_down(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    """The platform's broker is unreachable: the alarm still reaches the pool's own broker."""
    from gateway.app import Gateway
    from gateway.config import config_from_dict
    from gateway.demo import pool as demo_pool
    from tests.integration.helpers import mqtt_config

    with socket.socket() as probe:  # a port nobody listens on: the uplink cannot connect
        probe.bind(("127.0.0.1", 0))
        dead_port = probe.getsockname()[1]
    cfg = mqtt_config(tmp_path / "state", dead_port)
    pool = demo_pool.config()["pools"]["demo_pool"]
    pool["local_alarm"] = {
        "type": "mqtt",
        "host": mosquitto.host,
        "port": mosquitto.port,
        "topic": "pool/main/alarm",
    }
    cfg["pools"] = {"main": pool}
    gateway = Gateway(config_from_dict(cfg, "test"), {})
    async with (
        Recorder(mosquitto.host, mosquitto.port, topics=["pool/#"]) as on_site,
        asyncio.TaskGroup() as tg,
    ):
        run = tg.create_task(gateway.run(stop_when_sources_done=True), name="gateway")
        await on_site.wait_for(
            lambda msgs: any(m.topic == "pool/main/alarm" for m in msgs), timeout=30
        )
        gateway.request_stop()
        async with asyncio.timeout(30):
            assert await run == 0
    alarm = json.loads(next(m.payload for m in on_site.messages if m.topic == "pool/main/alarm"))
    assert alarm["alarm"] == "main-1"
    assert alarm["state"] == "alarm"
    status = [json.loads(m.payload) for m in on_site.messages if m.topic.endswith("/status")]
    assert status[0]["state"] == "monitoring"
    assert gateway.metrics.counters["uplink_connects"] == 0
