"""The camera source on a network stream: an MJPEG-over-HTTP camera served by the test.

Many IP cameras offer ``multipart/x-mixed-replace`` JPEG streams; OpenCV reads them through
FFmpeg like RTSP (the stream path: open/read timeouts, reconnect with backoff). The server here
sends 20 frames/s and hangs up after a number of frames, like a camera rebooting.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import cv2
import numpy as np

from drivers.camera import CameraSettings, CameraSource, Frame


def jpeg(value: int) -> bytes:
    ok, data = cv2.imencode(".jpg", np.full((120, 160, 3), value, np.uint8))
    assert ok
    return bytes(data.tobytes())


@asynccontextmanager
async def mjpeg_camera(frames_per_connection: int) -> AsyncIterator[tuple[str, list[int]]]:
    """A camera at http://127.0.0.1:PORT/video; connection n sends brightness 40 * n."""
    connections: list[int] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        connections.append(len(connections) + 1)
        image = jpeg(40 * len(connections))
        writer.write(
            b"HTTP/1.0 200 OK\r\nContent-Type: multipart/x-mixed-replace; boundary=frame\r\n\r\n"
        )
        try:
            for _ in range(frames_per_connection):
                writer.write(
                    b"--frame\r\nContent-Type: image/jpeg\r\n"
                    + f"Content-Length: {len(image)}\r\n\r\n".encode()
                    + image
                    + b"\r\n"
                )
                await writer.drain()
                await asyncio.sleep(0.05)
        except ConnectionError:
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        yield f"http://127.0.0.1:{port}/video", connections


def brightness(frame: Frame) -> int:
    return round(float(frame.image.mean()) / 40) * 40


async def test_a_network_camera_is_read_newest_first_and_reconnected_after_a_drop() -> None:
    async with mjpeg_camera(frames_per_connection=30) as (url, connections):
        camera = CameraSource(
            "cam",
            CameraSettings(
                url,
                analysis_fps=4.0,
                read_timeout_s=2.0,
                reconnect_min_s=0.05,
                reconnect_max_s=0.1,
            ),
        )
        seen: list[Frame] = []
        async with asyncio.timeout(30):
            async for frame in camera.frames():
                if frame is not None:
                    seen.append(frame)
                if any(brightness(f) == 80 for f in seen):
                    break  # a frame of the second connection: reconnected
    assert camera.settings.kind == "stream"
    assert brightness(seen[0]) == 40
    assert len(connections) >= 2
    assert camera.counters["streams_lost"] >= 1
    assert camera.counters["opens"] >= 2
    # 20 frames/s sent, 4 analysed: the rest were dropped, never queued.
    assert camera.counters["frames_dropped"] > 0
    assert len(seen) < camera.counters["frames_read"]
