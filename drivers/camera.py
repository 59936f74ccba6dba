"""A camera over OpenCV: RTSP/HTTP streams, V4L2 devices and video files, newest frame first.

:class:`CameraSource` delivers frames at the configured analysis rate. A live camera produces
frames whether or not anyone analyses them; reading them late builds a backlog that grows until
the analysis is minutes behind the pool. So one worker thread reads the camera continuously and
keeps only the newest frame (older ones are dropped and counted); the analysis takes whatever is
newest when it is ready for the next one. A video file is read the same way when ``pace`` is
``realtime`` (it stands in for a camera), or frame by frame in file order, subsampled to the
analysis rate, when ``pace`` is ``fast`` (tests, the demo, evaluations: every run sees the same
frames, and frame times come from the file, not the wall clock).

Frames exist only in memory: the newest one in a single slot, handed over and dropped by the
caller after analysis. Nothing here writes, logs or returns image data beyond the frame object.

Lost streams (network, unplugged USB camera, the end of a live stream) are reopened with jittered,
capped exponential backoff; ``state`` and ``problem`` say what is going on, for the stats message.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import random
import re
import threading
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import cv2
import numpy as np
import numpy.typing as npt

__all__ = ["CameraSettings", "CameraSource", "Frame", "open_capture", "redact_url"]

Pace = Literal["realtime", "fast"]

_URL = re.compile(r"^[a-z][a-z0-9+.-]*://", re.IGNORECASE)
_USERINFO = re.compile(r"^([a-z][a-z0-9+.-]*://)[^@/]*@", re.IGNORECASE)


def redact_url(url: str) -> str:
    """The camera address without credentials (``rtsp://user:pw@host`` → ``rtsp://***@host``)."""
    return _USERINFO.sub(r"\1***@", url)


@dataclass(frozen=True, slots=True)
class CameraSettings:
    """Where the frames come from and how often they are wanted."""

    url: str  # rtsp://..., http(s)://..., /dev/videoN, or a video file
    analysis_fps: float = 4.0
    pace: Pace = "realtime"
    loop: bool = False  # files: start again at the end
    open_timeout_s: float = 10.0
    read_timeout_s: float = 5.0
    reconnect_min_s: float = 1.0
    reconnect_max_s: float = 30.0

    @property
    def kind(self) -> Literal["stream", "device", "file"]:
        if _URL.match(self.url):
            return "stream"
        if self.url.startswith(("/dev/video", "/dev/v4l/")):
            return "device"
        return "file"


@dataclass(frozen=True, slots=True)
class Frame:
    """One decoded frame (BGR, uint8) with its time in seconds and its position in the stream.

    ``t_s`` is ``time.monotonic()`` at capture for cameras and realtime files, and the position
    in the file for fast files.
    """

    image: npt.NDArray[np.uint8]
    t_s: float
    seq: int
    # What the source's ``prepare`` made of the image in the reader thread (e.g. a model's
    # input tensor), so that work overlaps the caller's analysis of the previous frame.
    prepared: object = None

    @property
    def width(self) -> int:
        return int(self.image.shape[1])

    @property
    def height(self) -> int:
        return int(self.image.shape[0])


class CameraError(OSError):
    """The camera could not be opened or read; the message names it (without credentials)."""


def open_capture(settings: CameraSettings) -> cv2.VideoCapture:
    """Open the capture (blocking); raises CameraError naming the camera."""
    name = redact_url(settings.url)
    if settings.kind == "file" and not Path(settings.url).is_file():
        raise CameraError(f"camera {name}: video file not found")
    if settings.kind == "device":
        device = Path(settings.url)
        if not device.exists():
            raise CameraError(
                f"camera {name}: device not found (unplugged? prefer a stable "
                f"/dev/v4l/by-id/... path: `ls -l /dev/v4l/by-id/`)"
            )
        if not os.access(device, os.R_OK | os.W_OK):
            raise CameraError(
                f"camera {name}: permission denied (the user needs the group of {name}, "
                f"usually 'video': SupplementaryGroups=video)"
            )
        cap = cv2.VideoCapture(settings.url, cv2.CAP_V4L2)
        # One buffered frame: the driver's default (4) would add their age to every analysis.
        cap.set(cv2.CAP_PROP_BUFFERSIZE, 1)
    else:
        params = [
            cv2.CAP_PROP_OPEN_TIMEOUT_MSEC,
            int(settings.open_timeout_s * 1000),
            cv2.CAP_PROP_READ_TIMEOUT_MSEC,
            int(settings.read_timeout_s * 1000),
        ]
        cap = cv2.VideoCapture(settings.url, cv2.CAP_FFMPEG, params)
    if not cap.isOpened():
        cap.release()
        raise CameraError(f"camera {name}: cannot be opened")
    return cap


class _Latest:
    """A one-frame mailbox between the reader thread and the event loop (newest wins)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._lock = threading.Lock()
        self._frame: Frame | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._closed = False
        self.dropped = 0

    @property
    def wanted(self) -> bool:
        """Whether the consumer waits for a frame (read without the lock: a late answer only
        converts one more frame, or one fewer)."""
        return self._waiter is not None

    def skip(self) -> None:
        """A frame was read and not converted: nobody wanted it (reader thread)."""
        with self._lock:
            self.dropped += 1

    def put(self, frame: Frame) -> None:
        """Called from the reader thread."""
        with self._lock:
            if self._frame is not None:
                self.dropped += 1
            self._frame = frame
            waiter, self._waiter = self._waiter, None
        if waiter is not None:
            self._loop.call_soon_threadsafe(_wake, waiter)

    def wake(self) -> None:
        """Called from the reader thread when it stops: a waiting consumer looks again."""
        with self._lock:
            self._closed = True
            waiter, self._waiter = self._waiter, None
        if waiter is not None:
            self._loop.call_soon_threadsafe(_wake, waiter)

    async def take(self, timeout_s: float) -> Frame | None:
        """The newest frame (removed from the slot), or None after ``timeout_s``."""
        with self._lock:
            frame, self._frame = self._frame, None
            if frame is None and not self._closed:
                waiter = self._waiter = self._loop.create_future()
        if frame is not None or self._closed:
            return frame
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                await waiter
        with self._lock:
            frame, self._frame = self._frame, None
            if self._waiter is waiter:
                self._waiter = None
        return frame


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


class CameraSource:
    """Frames from one camera at the analysis rate; reconnects on its own.

    Use ``async for frame in camera.frames(): ...``; an iteration yields ``None`` when no frame
    came within ``read_timeout_s`` (so the caller's health check runs even when the camera is
    silent). The iterator ends only for a file that reached its end (without ``loop``).
    """

    def __init__(
        self,
        name: str,
        settings: CameraSettings,
        prepare: Callable[[npt.NDArray[np.uint8]], object] | None = None,
    ) -> None:
        if settings.analysis_fps <= 0:
            raise ValueError("analysis_fps must be > 0")
        self.name = name
        self.settings = settings
        # Runs in the reader thread on every frame delivered (pure: no I/O, no shared state).
        self.prepare = prepare
        self.state = "starting"
        self.problem: str | None = None
        self.counters: dict[str, int] = {
            "frames_read": 0,
            "frames_delivered": 0,
            "frames_dropped": 0,
            "opens": 0,
            "open_failures": 0,
            "streams_lost": 0,
        }
        self._stop = threading.Event()
        self._failures = 0

    def summary(self) -> dict[str, Any]:
        return {
            "camera": redact_url(self.settings.url),
            "state": self.state,
            "problem": self.problem,
            "counters": dict(self.counters),
        }

    async def frames(self) -> AsyncGenerator[Frame | None, None]:
        if self.settings.kind == "file" and self.settings.pace == "fast":
            async for frame in self._file_frames():
                yield frame
            return
        async for item in self._live_frames():
            yield item

    # -- fast files: every run sees the same frames ---------------------------------------------

    async def _file_frames(self) -> AsyncIterator[Frame | None]:
        settings = self.settings
        step_s = 1.0 / settings.analysis_fps
        offset_s = 0.0
        seq = 0
        while True:
            try:
                cap = await asyncio.to_thread(open_capture, settings)
            except CameraError as exc:
                self._failed(str(exc))
                yield None
                await asyncio.sleep(self._backoff())
                continue
            self._opened()
            fps = cap.get(cv2.CAP_PROP_FPS) or 25.0
            last_t = 0.0
            # The next frame is decoded while the caller analyses this one (a thread each).
            # ``busy`` is held while a thread uses the capture: a cancelled to_thread task is
            # done at once while its thread still reads, so "done" cannot tell when the
            # capture is free to release (releasing it under a read hung a CI run).
            busy = threading.Lock()
            read = functools.partial(_read_due, cap, fps, prepare=self.prepare, busy=busy)
            pending = asyncio.ensure_future(asyncio.to_thread(read, 0, 0.0))
            try:
                while True:
                    image = await pending
                    if image is None:
                        break
                    index, arr, prepared = image
                    last_t = index / fps
                    next_due = last_t + step_s - 1e-9
                    pending = asyncio.ensure_future(asyncio.to_thread(read, index + 1, next_due))
                    self.counters["frames_read"] += 1
                    self.counters["frames_delivered"] += 1
                    seq += 1
                    yield Frame(arr, offset_s + last_t, seq, prepared)
            finally:
                # A read in progress cannot be interrupted: the capture is released after it.
                if busy.acquire(blocking=False):
                    try:
                        cap.release()
                    finally:
                        busy.release()
                else:
                    threading.Thread(
                        target=_release_when_free, args=(cap, busy), daemon=True
                    ).start()
            if not settings.loop:
                self.state = "ended"
                return
            offset_s += last_t + 1.0 / fps

    # -- cameras and realtime files: newest frame wins -------------------------------------------

    async def _live_frames(self) -> AsyncIterator[Frame | None]:
        settings = self.settings
        period_s = 1.0 / settings.analysis_fps
        slot = _Latest(asyncio.get_running_loop())
        self._stop.clear()
        reader = asyncio.ensure_future(asyncio.to_thread(self._read_forever, slot))
        try:
            next_s = time.monotonic()
            while True:
                frame = await slot.take(settings.read_timeout_s)
                self.counters["frames_dropped"] = slot.dropped
                if frame is None:
                    if reader.done():
                        reader.result()  # a bug in the reader thread surfaces here
                        self.state = "ended"
                        return
                    yield None
                    continue
                self.counters["frames_delivered"] += 1
                yield frame
                # The analysis rate: wait out the rest of the period, then take the newest.
                next_s = max(next_s + period_s, time.monotonic())
                delay = next_s - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
        finally:
            self._stop.set()
            # The thread ends after its current read (bounded by read_timeout_s).
            await asyncio.shield(reader)

    def _read_forever(self, slot: _Latest) -> None:
        """The reader thread: open, read until lost, back off, reopen; until stopped."""
        settings = self.settings
        seq = 0
        try:
            while not self._stop.is_set():
                try:
                    cap = open_capture(settings)
                except CameraError as exc:
                    self._failed(str(exc))
                    self._stop.wait(self._backoff())
                    continue
                self._opened()
                opened_s = time.monotonic()
                fps = cap.get(cv2.CAP_PROP_FPS) or 25.0
                pace_s = 1.0 / fps if settings.kind == "file" else 0.0
                try:
                    while not self._stop.is_set():
                        # Every frame is grabbed (decoded: the codec needs them all), but only
                        # one the analysis is waiting for is converted to BGR: the newest one,
                        # at most a camera frame old, and no colour conversion for the rest.
                        if not cap.grab():
                            break
                        seq += 1
                        self.counters["frames_read"] += 1
                        if not slot.wanted:
                            slot.skip()
                        else:
                            ok, image = cap.retrieve()
                            if not ok or image is None:
                                break
                            arr = np.asarray(image, dtype=np.uint8)
                            prepared = self.prepare(arr) if self.prepare is not None else None
                            slot.put(Frame(arr, time.monotonic(), seq, prepared))
                        if pace_s:
                            # A file standing in for a camera plays at its own frame rate.
                            self._stop.wait(pace_s)
                finally:
                    cap.release()
                if self._stop.is_set():
                    return
                if settings.kind == "file" and not settings.loop:
                    self.state = "ended"
                    return
                self.counters["streams_lost"] += 1
                self._failed(f"camera {redact_url(settings.url)}: stream ended or lost")
                if time.monotonic() - opened_s > 10.0:
                    self._failures = 1  # it worked for a while: start the backoff over
                self._stop.wait(self._backoff())
        finally:
            slot.wake()

    def _opened(self) -> None:
        self.counters["opens"] += 1
        self.state = "open"
        self.problem = None

    def _failed(self, message: str) -> None:
        if self.state != "open":
            self.counters["open_failures"] += 1
        self.state = "lost"
        self.problem = message
        self._failures += 1

    def _backoff(self) -> float:
        s = self.settings
        delay = min(s.reconnect_max_s, s.reconnect_min_s * 2.0 ** max(0, self._failures - 1))
        # Full jitter in the upper half: many cameras restarting together do not all reconnect
        # at the same moment.
        return delay * (0.5 + random.random() / 2)  # noqa: S311 -- timing, not security


def _release_when_free(cap: cv2.VideoCapture, busy: threading.Lock) -> None:
    with busy:
        cap.release()


def _read_due(
    cap: cv2.VideoCapture,
    fps: float,
    index: int,
    due_s: float,
    *,
    prepare: Callable[[npt.NDArray[np.uint8]], object] | None,
    busy: threading.Lock,
) -> tuple[int, npt.NDArray[np.uint8], object] | None:
    """Read a file to the first frame at or after ``due_s`` (frames before it are grabbed, not
    converted), and prepare it. ``busy`` is held while the capture is used."""
    with busy:
        return _read_due_locked(cap, fps, index, due_s, prepare=prepare)


def _read_due_locked(
    cap: cv2.VideoCapture,
    fps: float,
    index: int,
    due_s: float,
    *,
    prepare: Callable[[npt.NDArray[np.uint8]], object] | None,
) -> tuple[int, npt.NDArray[np.uint8], object] | None:
    while index / fps < due_s:
        if not cap.grab():
            return None
        index += 1
    ok, image = cap.read()
    if not ok or image is None:
        return None
    arr = np.asarray(image, dtype=np.uint8)
    return index, arr, prepare(arr) if prepare is not None else None
