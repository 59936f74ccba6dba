"""The image inbox: a watched directory and a topic on a real local mosquitto."""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path
from typing import Any

import aiomqtt
import cv2
import numpy as np
import pytest

from drivers.inbox import BrokerInbox, ImageInbox, InboxImage
from gateway.config import config_from_dict
from gateway.errors import ConfigError
from tests.support.mosquitto import Mosquitto, Recorder


def _jpeg(seed: int = 0) -> bytes:
    rgb = np.random.default_rng(seed).integers(0, 255, size=(48, 64, 3), dtype=np.uint8)
    ok, buf = cv2.imencode(".jpg", rgb)
    assert ok
    return buf.tobytes()


def _names(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


class _Sink:
    """Records what the inbox hands over and refuses; answers every image with a reply."""

    def __init__(self) -> None:
        self.images: list[InboxImage] = []
        self.rejected: list[tuple[str, str, str]] = []

    async def handle(self, image: InboxImage) -> bytes | None:
        self.images.append(image)
        return json.dumps({"label": "glass", "n": len(self.images)}).encode()

    async def reject(self, origin: str, name: str, reason: str) -> None:
        self.rejected.append((origin, name, reason))


def _inbox(directory: Path | None, **kwargs: object) -> ImageInbox:
    options: dict[str, object] = {"max_bytes": 100_000, "settle_s": 0.0, "broker": None}
    options.update(kwargs)
    return ImageInbox("kiosk", directory=directory, **options)  # type: ignore[arg-type]


async def test_files_are_handed_over_in_memory_and_deleted(tmp_path: Path) -> None:
    photo = _jpeg()
    (tmp_path / "a.jpg").write_bytes(photo)
    (tmp_path / "b.txt").write_text("not a photo", encoding="utf-8")
    (tmp_path / "c.jpg.part").write_bytes(photo)  # still being written: left alone
    (tmp_path / ".hidden.jpg").write_bytes(photo)
    sink = _Sink()
    inbox = _inbox(tmp_path)
    assert await inbox.scan_once(sink.handle, sink.reject) == 2
    assert [(i.origin, i.name, i.data) for i in sink.images] == [("file", "a.jpg", photo)]
    assert sink.rejected == [("file", "b.txt", "not a JPEG or PNG image (unknown file signature)")]
    assert _names(tmp_path) == [".hidden.jpg", "c.jpg.part"]
    assert inbox.counters["files_deleted"] == 2


async def test_an_oversized_file_is_refused_unread_and_deleted(tmp_path: Path) -> None:
    (tmp_path / "huge.jpg").write_bytes(b"\xff\xd8\xff" + b"\x00" * 200_000)
    sink = _Sink()
    await _inbox(tmp_path).scan_once(sink.handle, sink.reject)
    assert sink.images == []
    assert sink.rejected == [("file", "huge.jpg", "200003 bytes, more than max_bytes")]
    assert _names(tmp_path) == []


async def test_a_file_still_changing_waits_for_the_next_scan(tmp_path: Path) -> None:
    path = tmp_path / "fresh.jpg"
    path.write_bytes(_jpeg())
    sink = _Sink()
    inbox = _inbox(tmp_path, settle_s=30.0)
    assert await inbox.scan_once(sink.handle, sink.reject) == 0
    old = time.time() - 60
    os.utime(path, (old, old))
    assert await inbox.scan_once(sink.handle, sink.reject) == 1


async def test_keep_files_leaves_them_and_does_not_analyse_them_twice(tmp_path: Path) -> None:
    (tmp_path / "a.png").write_bytes(cv2.imencode(".png", np.zeros((8, 8, 3), np.uint8))[1])
    sink = _Sink()
    inbox = _inbox(tmp_path, keep_files=True)
    await inbox.scan_once(sink.handle, sink.reject)
    await inbox.scan_once(sink.handle, sink.reject)
    assert len(sink.images) == 1
    assert _names(tmp_path) == ["a.png"]


@pytest.mark.broker
async def _round_trip(
    mosquitto: Mosquitto, inbox: ImageInbox, sink: _Sink, photos: list[tuple[str, bytes]]
) -> dict[str, Any]:
    """Publish each (topic, payload) to the running inbox; its answers, by result topic."""
    async with (
        Recorder(mosquitto.host, mosquitto.port, topics=["waste/image/+/result"]) as rec,
        asyncio.TaskGroup() as tg,
    ):
        task = tg.create_task(inbox.run(sink.handle, sink.reject))
        async with asyncio.timeout(10):
            await inbox.subscribed.wait()
        async with aiomqtt.Client(mosquitto.host, mosquitto.port) as client:
            for topic, payload in photos:
                await client.publish(topic, payload, qos=1)
            await rec.wait_for_count(len(photos), timeout=20)
        task.cancel()
    return {m.topic: json.loads(m.payload) for m in rec.messages}


async def test_images_over_the_local_broker_get_their_answer_on_the_result_topic(
    mosquitto: Mosquitto,
) -> None:
    sink = _Sink()
    photo = _jpeg(1)
    inbox = _inbox(
        None, broker=BrokerInbox(mosquitto.host, mosquitto.port, "waste/image/+", "test-inbox")
    )
    replies = await _round_trip(
        mosquitto, inbox, sink, [("waste/image/req-1", photo), ("waste/image/req-2", b"GIF89a")]
    )
    assert replies["waste/image/req-1/result"] == {"label": "glass", "n": 1}
    assert replies["waste/image/req-2/result"]["error"].startswith("image rejected: not a JPEG")
    assert [(i.origin, i.name, i.data) for i in sink.images] == [
        ("mqtt", "waste/image/req-1", photo)
    ]
    assert sink.rejected[0][:2] == ("mqtt", "waste/image/req-2")


async def test_photos_over_one_mebibyte_come_through_the_broker_and_larger_ones_are_refused(
    mosquitto: Mosquitto,
) -> None:
    # Phone photos are several MB: the intake's packet limit follows max_bytes, and a message
    # beyond it is refused with its size (it used to arrive empty and be called "empty").
    sink = _Sink()
    broker = BrokerInbox(mosquitto.host, mosquitto.port, "waste/image/+", "test-inbox-big")
    inbox = _inbox(None, broker=broker, max_bytes=3_000_000)
    rng = np.random.default_rng(7)
    photo = b"\xff\xd8\xff\xe0" + rng.integers(0, 256, 2_500_000, dtype=np.uint8).tobytes()
    too_big = b"\xff\xd8\xff\xe0" + bytes(3_200_000)
    replies = await _round_trip(
        mosquitto,
        inbox,
        sink,
        [
            ("waste/image/big", photo),
            ("waste/image/huge", too_big),
            ("waste/image/after", _jpeg(2)),
        ],
    )
    assert replies["waste/image/big/result"] == {"label": "glass", "n": 1}
    assert replies["waste/image/after/result"] == {"label": "glass", "n": 2}
    reason = f"a message of {3_200_004 + 2 + len('waste/image/huge') + 2} bytes, more than"
    assert replies["waste/image/huge/result"]["error"].startswith("image rejected: " + reason)
    assert [(i.name, i.data) for i in sink.images] == [
        ("waste/image/big", photo),
        ("waste/image/after", _jpeg(2)),
    ]
    assert sink.rejected == [
        ("mqtt", "waste/image/huge", reason + " max_bytes 3000000"),
    ]
    assert inbox.counters["rejected"] == 1
    assert inbox.counters["broker_connects"] == 1  # the large messages did not end the session


def test_inbox_config_needs_an_input_and_once_only_for_a_directory() -> None:
    base = {"gateway": {"id": "t"}}
    with pytest.raises(ConfigError) as missing:
        config_from_dict({**base, "sources": [{"type": "image_inbox"}]}, "test.toml")
    assert "sources[0]: needs a directory, a topic, or both" in str(missing.value.problems)
    with pytest.raises(ConfigError) as once:
        config_from_dict(
            {**base, "sources": [{"type": "image_inbox", "topic": "a/+", "once": True}]},
            "test.toml",
        )
    assert "not with a topic" in str(once.value.problems)
    cfg = config_from_dict(
        {**base, "sources": [{"type": "image_inbox", "directory": "/tmp/in", "topic": "a/+"}]},
        "test.toml",
    )
    assert cfg.sources[0].type == "image_inbox"
