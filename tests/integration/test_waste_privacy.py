"""Privacy as a tested property: a citizen's photo never leaves the waste analyzer.

End to end through real brokers: the gateway runs in-process with the shipped classifier, an
``image_inbox`` source watching a directory and a topic on a *local* mosquitto, and its uplink to
a second mosquitto standing for the city platform. Photos arrive both ways (plus a file that is
not an image). Then: no upstream payload, no outbox byte (database, WAL), no log line, and no
file left in the inbox, the state directory or the temp directory contains the image's bytes,
in raw, base64 or hex form, or the model input computed from it.
"""

from __future__ import annotations

import asyncio
import base64
import json
from pathlib import Path
from typing import Any

import aiomqtt
import numpy as np
import pytest
from structlog.testing import capture_logs

from gateway.app import Gateway
from gateway.config import config_from_dict
from gateway.waste import prepare, waste_setup
from gateway.wire import Encoding, decode
from tests.integration.helpers import mqtt_config
from tests.support.mosquitto import Mosquitto, Recorder
from tests.support.privacy import (
    assert_new_temp_files_clean,
    assert_state_clean,
    leaks,
    temp_entries,
)

ROOT = Path(__file__).resolve().parents[2]
PHOTOS = sorted((ROOT / "gateway" / "demo" / "waste").glob("*.jpg"))
BASE = "edge/gateway/gw-test"


def _needles(photo: bytes) -> list[bytes]:
    """Every 16-byte piece of a photo (8-byte steps), as raw bytes, hex and base64, and pieces
    of the model input computed from it: a copy of any 24 bytes of it, in any usual encoding,
    contains one of them."""
    needles = []
    for start in range(0, len(photo) - 16, 8):
        piece = photo[start : start + 16]
        needles += [piece, piece.hex().encode(), piece.hex().upper().encode()]
    for shift in range(3):  # base64 of a copy that starts anywhere
        b64 = base64.b64encode(photo[shift:])
        needles += [b64[i : i + 24] for i in range(0, len(b64) - 24, 12)]
    # The shipped model's input, at the size its card declares.
    size = waste_setup(config_from_dict({}, "test")).image_size
    tensor = prepare(photo, size=size).tobytes()
    needles += [tensor[i : i + 64] for i in range(0, len(tensor) - 64, 4096)]
    return needles


@pytest.mark.broker
async def test_no_image_data_upstream_in_the_outbox_in_logs_or_in_files(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    assert len(PHOTOS) >= 2
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    state = tmp_path / "state"
    temp_before = temp_entries()
    by_file, by_mqtt = PHOTOS[0].read_bytes(), PHOTOS[1].read_bytes()
    needles = _needles(by_file) + _needles(by_mqtt)
    with Mosquitto(tmp_path / "local-broker") as local:
        cfg = mqtt_config(state, mosquitto.port)
        cfg["sources"] = [
            {
                "type": "image_inbox",
                "name": "kiosk",
                "directory": str(inbox),
                "poll_interval_s": 0.05,
                "settle_s": 0.0,
                "host": local.host,
                "port": local.port,
                "topic": "citizen/photo/+",
            }
        ]
        gateway = Gateway(config_from_dict(cfg, "test"), {})
        with capture_logs() as logs:
            async with (
                Recorder(mosquitto.host, mosquitto.port, topics=["#"]) as upstream,
                Recorder(local.host, local.port, topics=["citizen/photo/+/result"]) as replies,
                asyncio.TaskGroup() as tg,
            ):
                run = tg.create_task(gateway.run(), name="gateway")
                async with asyncio.timeout(20):
                    await gateway.ready.wait()
                    source: Any = gateway.source("kiosk")
                    await source.inbox.subscribed.wait()
                (inbox / ".IMG_0001.jpg").write_bytes(by_file)  # written, then renamed in
                (inbox / ".IMG_0001.jpg").rename(inbox / "IMG_0001.jpg")
                (inbox / "letter.pdf").write_bytes(b"%PDF-1.4 a letter, not a photo")
                async with aiomqtt.Client(local.host, local.port) as client:
                    await client.publish("citizen/photo/r-17", by_mqtt, qos=1)
                    await replies.wait_for_count(1, timeout=20)

                def events(kind: str) -> list[Any]:
                    return [
                        decode(m.payload, Encoding.JSON)
                        for m in upstream.messages
                        if m.topic == f"{BASE}/event/{kind}"
                    ]

                await upstream.wait_for(
                    lambda _m: (
                        len(events("waste_classified")) >= 2 and len(events("image_rejected")) >= 1
                    ),
                    timeout=20,
                )
                gateway.request_stop()
                async with asyncio.timeout(20):
                    assert await run == 0

    # The service worked: both photos classified, the PDF refused with its reason.
    results = events("waste_classified")
    assert sorted(e.device for e in results) == ["kiosk", "kiosk"]
    for event in results:
        values = {m.name: m.value for m in event.values}
        assert values["ai_generated"] is True
        assert values["label"] in {"cardboard", "glass", "metal", "paper", "plastic", "trash"}
        assert event.model is not None
        assert event.model.model_id == "waste_classifier"
    rejected = {m.name: m.value for m in events("image_rejected")[0].values}
    assert rejected["reason"] == "not a JPEG or PNG image (unknown file signature)"
    reply = json.loads(replies.messages[0].payload)
    assert reply["ai_generated"] is True
    assert len(reply["top"]) == 3

    # Nothing upstream carries image data, and every message is small.
    assert upstream.messages
    for message in upstream.messages:
        assert not leaks(message.payload, needles), message.topic
        assert len(message.payload) < 4096, message.topic
    # No log line does.
    assert logs
    assert not leaks(repr(logs).encode(), needles)
    # No file the gateway owns or touched does: inbox emptied, outbox and WAL clean.
    assert list(inbox.iterdir()) == []
    assert_state_clean(state, needles)
    assert_new_temp_files_clean(temp_before, needles)
    # The bytes compared really are the photos' (the check would catch a copy).
    assert leaks(by_file + by_mqtt, needles)
    assert np.frombuffer(by_file[:3], dtype=np.uint8).tolist() == [0xFF, 0xD8, 0xFF]
