"""Image inbox: photos dropped into a directory or published on the local MQTT broker.

Each image is read into memory, handed to the handler (the classifier) and then forgotten: a
file is deleted from the directory once handled (unless ``keep_files``), a message is
acknowledged. Nothing here writes an image anywhere or logs its bytes. What is not a JPEG or PNG
within ``max_bytes`` is refused with a reason before the handler sees it.

Directory: scanned every ``poll_interval_s`` (stdlib only: no inotify binding is installed, and a
kiosk receives a photo every few seconds at most). Writers should write to another name and
rename into the directory; as a second guard, a file modified less than ``settle_s`` ago is left
for the next scan. Hidden files and ``*.part``/``*.tmp`` are ignored.

Broker: a subscription (QoS 1, clean session: an image nobody analysed before a restart is not
worth keeping at the broker) through :class:`drivers.mqtt_intake.MqttIntake`. The handler's
reply, if any, is published on the message's topic + ``/result`` (QoS 1), where the kiosk or app
that sent the photo waits for it; messages on ``.../result`` topics are never taken as images.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from drivers.mqtt_intake import MQTT_311, IntakeMessage, MqttIntake, MqttIntakeError

__all__ = ["BrokerInbox", "ImageInbox", "InboxImage", "image_signature"]

RESULT_SUFFIX = "/result"
# An MQTT PUBLISH carries the topic (at most 64 KiB), a packet id and the payload.
_TOPIC_ROOM = 65_536 + 8
_IGNORED_SUFFIXES = (".part", ".tmp", ".swp")
# Files kept in the directory (keep_files) are remembered so they are not analysed again; the
# memory is bounded, oldest forgotten first.
_MAX_REMEMBERED = 10_000


def image_signature(data: bytes) -> str | None:
    """``"jpeg"`` or ``"png"`` from the first bytes, else None."""
    if data[:3] == b"\xff\xd8\xff":
        return "jpeg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    return None


@dataclass(frozen=True, slots=True)
class InboxImage:
    """One image in memory, with where it came from (file name or topic; never a full path)."""

    data: bytes
    origin: str  # "file" | "mqtt"
    name: str


@dataclass(frozen=True, slots=True)
class BrokerInbox:
    """Where images arrive on the local broker."""

    host: str
    port: int
    topic: str
    client_id: str
    reconnect_min_s: float = 1.0
    reconnect_max_s: float = 30.0


# handle(image) -> the reply for the sender (bytes, published on <topic>/result) or None.
Handler = Callable[[InboxImage], Awaitable[bytes | None]]
# reject(origin, name, reason): an input refused before analysis.
Reject = Callable[[str, str, str], Awaitable[None]]


class ImageInbox:
    """Watches a directory and/or a broker topic; hands each image to a handler, then drops it."""

    def __init__(
        self,
        name: str,
        *,
        directory: Path | None,
        broker: BrokerInbox | None,
        max_bytes: int,
        poll_interval_s: float = 0.5,
        settle_s: float = 0.5,
        keep_files: bool = False,
        once: bool = False,
    ) -> None:
        self.name = name
        self._directory = directory
        self._broker = broker
        self._max_bytes = max_bytes
        self._poll_interval_s = poll_interval_s
        self._settle_s = settle_s
        self._keep_files = keep_files
        self._once = once
        self._seen: dict[tuple[str, int, int], None] = {}
        self.counters: dict[str, int] = {
            "images": 0,
            "rejected": 0,
            "files_deleted": 0,
            "broker_connects": 0,
            "broker_errors": 0,
        }
        # Set once the broker subscription is in place (tests and the demo wait for it).
        self.subscribed = asyncio.Event()

    def _check(self, data: bytes) -> str | None:
        if len(data) > self._max_bytes:
            return f"{len(data)} bytes, more than max_bytes {self._max_bytes}"
        if not data:
            return "empty"
        if image_signature(data) is None:
            return "not a JPEG or PNG image (unknown file signature)"
        return None

    async def run(self, handle: Handler, reject: Reject) -> None:
        """Until cancelled: take images from the directory and the broker.

        With ``once``: the files in the directory now, then return.
        """
        if self._once and self._directory is not None:
            await self.scan_once(handle, reject)
            return
        async with asyncio.TaskGroup() as tg:
            if self._directory is not None:
                tg.create_task(self._watch(handle, reject), name=f"inbox-dir:{self.name}")
            if self._broker is not None:
                tg.create_task(self._subscribe(handle, reject), name=f"inbox-mqtt:{self.name}")

    # -- directory -------------------------------------------------------------------------

    def _scan(self) -> list[tuple[Path, int, float]]:
        assert self._directory is not None
        found = []
        with os.scandir(self._directory) as entries:
            for entry in entries:
                if entry.name.startswith(".") or entry.name.endswith(_IGNORED_SUFFIXES):
                    continue
                try:
                    if not entry.is_file(follow_symlinks=False):
                        continue
                    stat = entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue  # removed between listing and stat
                found.append((Path(entry.path), stat.st_size, stat.st_mtime))
        found.sort(key=lambda item: item[2])  # oldest first
        return found

    async def scan_once(self, handle: Handler, reject: Reject) -> int:
        """Handle every settled file now in the directory; returns how many were taken."""
        assert self._directory is not None
        try:
            entries = await asyncio.to_thread(self._scan)
        except FileNotFoundError:
            await reject("file", str(self._directory), "inbox directory does not exist")
            return 0
        # File modification times are wall-clock times.
        now = time.time()
        taken = 0
        for path, size, mtime in entries:
            if now - mtime < self._settle_s:
                continue
            key = (path.name, size, int(mtime * 1e6))
            if key in self._seen:
                continue
            taken += 1
            await self._take_file(path, size, handle, reject)
            if self._keep_files:
                self._seen[key] = None
                if len(self._seen) > _MAX_REMEMBERED:
                    self._seen.pop(next(iter(self._seen)))
        return taken

    async def _take_file(self, path: Path, size: int, handle: Handler, reject: Reject) -> None:
        try:
            if size > self._max_bytes:
                # Not even read: a huge file must not fill the memory of a small gateway.
                self.counters["rejected"] += 1
                await reject("file", path.name, f"{size} bytes, more than max_bytes")
                return
            try:
                data = await asyncio.to_thread(path.read_bytes)
            except OSError as exc:
                self.counters["rejected"] += 1
                await reject("file", path.name, f"unreadable: {exc.strerror or exc}")
                return
            problem = self._check(data)
            if problem is not None:
                self.counters["rejected"] += 1
                await reject("file", path.name, problem)
                return
            self.counters["images"] += 1
            await handle(InboxImage(data, "file", path.name))
        finally:
            # Deleted whatever the outcome (also when refused): a photo of a citizen's
            # belongings is not kept on the device. Not when cancelled mid-analysis (stopping):
            # the file is then analysed at the next start.
            if not self._keep_files and not _cancelling():
                with contextlib.suppress(FileNotFoundError):
                    await asyncio.to_thread(path.unlink)
                    self.counters["files_deleted"] += 1

    async def _watch(self, handle: Handler, reject: Reject) -> None:
        while True:
            await self.scan_once(handle, reject)
            await asyncio.sleep(self._poll_interval_s)

    # -- broker ----------------------------------------------------------------------------

    async def _subscribe(self, handle: Handler, reject: Reject) -> None:
        broker = self._broker
        assert broker is not None
        delay = broker.reconnect_min_s
        while True:
            try:
                intake = await MqttIntake.connect(
                    broker.host,
                    broker.port,
                    broker.client_id,
                    clean_session=True,
                    max_unacked=16,
                    # A photo up to max_bytes fits in one packet with its topic (at most 64 KiB)
                    # and header; a larger one arrives ``oversized`` and is refused unread.
                    max_packet_bytes=self._max_bytes + _TOPIC_ROOM,
                    version=MQTT_311,
                )
            except MqttIntakeError:
                self.counters["broker_errors"] += 1
                await asyncio.sleep(delay * random.uniform(0.5, 1.0))  # noqa: S311  # jitter
                delay = min(delay * 2, broker.reconnect_max_s)
                continue
            self.counters["broker_connects"] += 1
            try:
                await intake.subscribe(broker.topic, qos=1)
                self.subscribed.set()
                delay = broker.reconnect_min_s
                while True:
                    for message in await intake.batch():
                        await self._take_message(intake, message, handle, reject)
            except MqttIntakeError:
                self.counters["broker_errors"] += 1
            finally:
                self.subscribed.clear()
                await intake.close()
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))  # noqa: S311  # jitter
            delay = min(delay * 2, broker.reconnect_max_s)

    async def _take_message(
        self, intake: MqttIntake, message: IntakeMessage, handle: Handler, reject: Reject
    ) -> None:
        ack = intake.acker(message)
        try:
            if message.topic.endswith(RESULT_SUFFIX):
                return  # our own (or another gateway's) answer, not a photo
            problem = (
                f"a message of {message.oversized} bytes, more than max_bytes {self._max_bytes}"
                if message.oversized
                else self._check(message.payload)
            )
            reply: bytes | None
            if problem is not None:
                self.counters["rejected"] += 1
                await reject("mqtt", message.topic, problem)
                reply = _rejection(problem)
            else:
                self.counters["images"] += 1
                reply = await handle(InboxImage(message.payload, "mqtt", message.topic))
            if reply is not None:
                await intake.publish(message.topic + RESULT_SUFFIX, reply, qos=1)
        finally:
            ack()


def _rejection(reason: str) -> bytes:
    return json.dumps({"error": f"image rejected: {reason}"}).encode()


def _cancelling() -> bool:
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0
