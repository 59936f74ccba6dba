"""Privacy as a tested property: no pool frame ever leaves the pool analyzer.

End to end through real brokers: the gateway runs in-process with the pool analyzer reading the
bundled clip through the real camera source and detector, its uplink to one mosquitto (the city
platform) and its local alarm output on a second one (the pool's own broker). The alarm is
raised, repeated, acknowledged by an upstream ``ack`` command, a detection-off zone is set and
"false alarm" feedback given. Then: no upstream payload, no local alarm message, no outbox byte
(database, WAL), no log line and no new file in the state or temp directory contains image data:
JPEG/PNG signatures (raw or base64), pieces of any analysed frame (raw, hex or base64), pieces of
the detector's input tensor, or anything frame-sized.
"""

from __future__ import annotations

import asyncio
import base64
import json
from importlib import resources
from pathlib import Path
from typing import Any

import aiomqtt
import numpy as np
import pytest
from structlog.testing import capture_logs

from gateway.app import Gateway
from gateway.config import config_from_dict
from gateway.demo import pool as demo_pool
from gateway.inference import load_model
from gateway.types import Event
from gateway.wire import Encoding, decode
from models.detection import DetectorSpec, preprocess
from models.pool.synth import read_video
from tests.integration.helpers import mqtt_config
from tests.support.mosquitto import Mosquitto, Recorder
from tests.support.privacy import (
    assert_new_temp_files_clean,
    assert_state_clean,
    leaks,
    temp_entries,
)

ROOT = Path(__file__).resolve().parents[2]
CLIP = Path(str(resources.files("gateway.demo").joinpath(demo_pool.CLIP)))
DETECTOR = ROOT / "models" / demo_pool.DETECTOR_CARD
BASE = "edge/gateway/gw-test"
FRAME_BYTES = 320 * 240 * 3
SIGNATURES = [b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"/9j/", b"iVBORw0KGgo"]


def _frames() -> list[np.ndarray]:
    return read_video(CLIP)


def _needles(frames: list[np.ndarray]) -> list[bytes]:
    """Pieces of every 4th frame as decoded (raw, hex, base64), of the detector input tensor
    computed from it, and the image file signatures."""
    model = load_model(DETECTOR)
    spec = DetectorSpec.from_card(model.card)
    needles = list(SIGNATURES)
    for frame in frames[::4]:
        raw = frame.tobytes()
        for start in range(0, len(raw) - 48, 7919):
            piece = raw[start : start + 24]
            needles += [piece, piece.hex().encode(), base64.b64encode(piece)[4:28]]
        tensor = preprocess(frame, spec)[0].tobytes()
        needles += [tensor[i : i + 48] for i in range(0, len(tensor) - 48, 40009)]
    return needles


@pytest.mark.broker
async def test_no_image_data_upstream_locally_in_the_outbox_in_logs_or_in_files(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    frames = _frames()
    assert len(frames) == 88
    needles = _needles(frames)
    state = tmp_path / "state"
    temp_before = temp_entries()
    with Mosquitto(tmp_path / "local-broker") as local:
        cfg = mqtt_config(state, mosquitto.port)
        pool = demo_pool.config()["pools"]["demo_pool"]
        # The clip again and again (fast, in clip time): the gateway keeps watching, and its
        # alarms keep repeating, until the test stops it.
        pool["camera"]["loop"] = True
        pool["alarm_repeat_s"] = 1.0
        pool["local_alarm"] = {
            "type": "mqtt",
            "host": local.host,
            "port": local.port,
            "topic": "pool/main/alarm",
        }
        cfg["pools"] = {"main": pool}
        gateway = Gateway(config_from_dict(cfg, "test"), {})
        with capture_logs() as logs:
            async with (
                Recorder(mosquitto.host, mosquitto.port, topics=["#"]) as upstream,
                Recorder(local.host, local.port, topics=["#"]) as on_site,
                asyncio.TaskGroup() as tg,
            ):
                run = tg.create_task(gateway.run(), name="gateway")

                def events(kind: str) -> list[Event]:
                    return [
                        decode(m.payload, Encoding.JSON)
                        for m in upstream.messages
                        if m.topic == f"{BASE}/event/{kind}"
                    ]

                def stats() -> list[dict[str, Any]]:
                    return [
                        json.loads(m.payload)
                        for m in upstream.messages
                        if m.topic == f"{BASE}/state/stats"
                    ]

                def local_alarms() -> list[dict[str, object]]:
                    return [
                        json.loads(m.payload)
                        for m in on_site.messages
                        if m.topic == "pool/main/alarm"
                    ]

                def repeats() -> list[object]:
                    return [
                        v["repeat"]
                        for v in ({m.name: m.value for m in e.values} for e in events("pool_alarm"))
                        if v["alarm_id"] == "main-1"
                    ]

                # The alarm, and a repeat of it, upstream and on site.
                await upstream.wait_for(lambda _m: repeats()[:2] == [0, 1], timeout=30)
                await on_site.wait_for(
                    lambda _m: (
                        [a["repeat"] for a in local_alarms() if a["alarm"] == "main-1"][:2]
                        == [0, 1]
                    ),
                    timeout=30,
                )
                async with aiomqtt.Client(mosquitto.host, mosquitto.port) as client:
                    ack = {"alarm": "all", "operator": "lifeguard-4", "id": "a1"}
                    await client.publish(f"{BASE}/command/ack", json.dumps(ack), qos=1)
                    zone = {
                        "zone": "lesson",
                        "polygon": [[10, 10], [100, 10], [100, 100]],
                        "duration_s": 600,
                        "operator": "lifeguard-4",
                    }
                    await client.publish(f"{BASE}/command/detection_off", json.dumps(zone), qos=1)
                    feedback = {"alarm": "main-1", "operator": "lifeguard-4", "note": "drill"}
                    await client.publish(f"{BASE}/command/false_alarm", json.dumps(feedback), qos=1)
                await upstream.wait_for(
                    lambda _m: (
                        events("pool_alarm_ack")
                        and events("pool_false_alarm")
                        and events("pool_zone")
                    ),
                    timeout=20,
                )
                await on_site.wait_for(
                    lambda _m: any(a.get("state") == "clear" for a in local_alarms()), timeout=20
                )
                # The detection-off zone is listed in the status (the stats message).
                async with aiomqtt.Client(mosquitto.host, mosquitto.port) as client:
                    await client.publish(f"{BASE}/command/stats", b"", qos=1)
                await upstream.wait_for(
                    lambda _m: any(s["pools"][0]["off_zones"] for s in stats() if s.get("pools")),
                    timeout=20,
                )
                gateway.request_stop()
                async with asyncio.timeout(20):
                    assert await run == 0

    # The pool worked: candidate, alarm repeated until the ack, operator logged, zone listed.
    assert events("pool_candidate")
    assert repeats()[:2] == [0, 1]
    ack_values = {m.name: m.value for m in events("pool_alarm_ack")[0].values}
    assert ack_values["operator"] == "lifeguard-4"
    assert ack_values["alarm_id"] == "main-1"
    acknowledged = [e for e in logs if e["event"] == "pool_alarm_acknowledged"]
    assert acknowledged[0]["operator"] == "lifeguard-4"
    assert any(e["event"] == "pool_false_alarm" and e["note"] == "drill" for e in logs)

    listed = next(s["pools"][0] for s in reversed(stats()) if s.get("pools"))
    assert listed["pool"] == "main"
    assert listed["off_zones"][0]["zone"] == "lesson"
    assert 0 < listed["off_zones"][0]["remaining_s"] <= 600
    assert listed["off_zones"][0]["operator"] == "lifeguard-4"
    assert listed["model"] == "pool_person_detector"

    # Nothing upstream or on site carries image data, and every message is small.
    messages = upstream.messages + on_site.messages
    assert len(messages) > 5
    for message in messages:
        assert not leaks(message.payload, needles), message.topic
        assert len(message.payload) < 4096, message.topic
    # No log line does (and none is anywhere near a frame's size).
    assert logs
    for entry in logs:
        line = repr(entry).encode()
        assert not leaks(line, needles), entry
        assert len(line) < 4096
    # No file the gateway owns or touched does.
    assert_state_clean(state, needles)
    assert_new_temp_files_clean(temp_before, needles, frame_bytes=FRAME_BYTES)
    # The needles really are the frames' (the check would catch a copy).
    assert leaks(frames[8].tobytes(), needles)
    assert leaks(base64.b64encode(frames[8].tobytes()), needles)
