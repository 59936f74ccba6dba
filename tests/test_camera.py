"""The OpenCV camera source on real video files (written here with cv2.VideoWriter)."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from drivers.camera import CameraSettings, CameraSource, Frame, redact_url


def write_video(path: Path, n: int, fps: float, size: tuple[int, int] = (160, 120)) -> Path:
    """n frames whose brightness encodes their index (index * 20, modulo 13 indices)."""
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, size)
    assert writer.isOpened()
    for i in range(n):
        writer.write(np.full((size[1], size[0], 3), (i % 13) * 20, np.uint8))
    writer.release()
    return path


def index_of(frame: Frame) -> int:
    return round(float(frame.image.mean()) / 20)


async def collect(camera: CameraSource, limit: int = 1000) -> list[Frame | None]:
    out: list[Frame | None] = []
    async for item in camera.frames():
        out.append(item)
        if len(out) >= limit:
            break
    return out


async def test_fast_file_is_subsampled_to_the_analysis_rate_with_file_times(
    tmp_path: Path,
) -> None:
    video = write_video(tmp_path / "v.mp4", 30, 10.0)
    camera = CameraSource("c", CameraSettings(str(video), analysis_fps=2.0, pace="fast"))
    frames = [f for f in await collect(camera) if f is not None]
    assert [round(f.t_s, 2) for f in frames] == [i * 0.5 for i in range(6)]
    assert [index_of(f) for f in frames] == [i % 13 for i in range(0, 30, 5)]
    assert [f.seq for f in frames] == list(range(1, 7))
    assert (frames[0].width, frames[0].height) == (160, 120)
    assert camera.state == "ended"
    assert camera.counters["frames_delivered"] == 6


async def test_fast_file_loops_with_continuing_times(tmp_path: Path) -> None:
    video = write_video(tmp_path / "v.mp4", 8, 4.0)
    camera = CameraSource("c", CameraSettings(str(video), analysis_fps=4.0, pace="fast", loop=True))
    frames = [f for f in await collect(camera, limit=20) if f is not None]
    times = [f.t_s for f in frames]
    assert times == sorted(times)
    assert round(times[8], 2) == 2.0  # the second pass continues where the first ended
    assert [index_of(f) for f in frames[:10]] == [0, 1, 2, 3, 4, 5, 6, 7, 0, 1]


async def test_realtime_source_delivers_the_newest_frame_and_drops_the_backlog(
    tmp_path: Path,
) -> None:
    # 13 frames at 10 fps (1.3 s of "camera"), analysed at 2 fps: most are never analysed.
    video = write_video(tmp_path / "v.mp4", 13, 10.0)
    camera = CameraSource("c", CameraSettings(str(video), analysis_fps=2.0, pace="realtime"))
    frames = [f for f in await collect(camera) if f is not None]
    assert camera.state == "ended"
    assert camera.counters["frames_read"] == 13
    assert 2 <= len(frames) < 13
    assert camera.counters["frames_dropped"] > 0
    indices = [index_of(f) for f in frames]
    assert indices == sorted(indices)
    assert len(set(indices)) == len(indices)


async def test_missing_camera_is_named_and_retried(tmp_path: Path) -> None:
    missing = tmp_path / "nope.mp4"
    camera = CameraSource(
        "c",
        CameraSettings(
            str(missing), pace="fast", analysis_fps=4.0, reconnect_min_s=0.01, reconnect_max_s=0.02
        ),
    )
    items = await collect(camera, limit=3)
    assert items == [None, None, None]
    assert camera.state == "lost"
    assert camera.problem == f"camera {missing}: video file not found"
    assert camera.counters["open_failures"] == 3


async def test_a_stream_that_fails_reports_none_and_keeps_trying(tmp_path: Path) -> None:
    # A realtime source whose file appears late: silent (None) first, then frames.
    late = tmp_path / "late.mp4"
    camera = CameraSource(
        "c",
        CameraSettings(
            str(late),
            analysis_fps=4.0,
            read_timeout_s=0.05,
            reconnect_min_s=0.05,
            reconnect_max_s=0.1,
        ),
    )
    seen: list[Frame | None] = []
    async for item in camera.frames():
        seen.append(item)
        if item is None and not late.exists():
            write_video(tmp_path / "tmp.mp4", 10, 20.0).rename(late)
        if item is not None:
            break
    assert seen[0] is None
    assert isinstance(seen[-1], Frame)
    assert camera.counters["open_failures"] >= 1
    assert camera.state == "open"


def test_credentials_never_appear_in_names() -> None:
    assert redact_url("rtsp://admin:secret@10.0.0.5:554/s1") == "rtsp://***@10.0.0.5:554/s1"
    assert redact_url("/dev/video0") == "/dev/video0"
    assert CameraSettings("rtsp://x").kind == "stream"
    assert CameraSettings("/dev/video2").kind == "device"
    assert CameraSettings("clip.mp4").kind == "file"


async def test_a_missing_v4l2_device_is_named_with_the_fix(tmp_path: Path) -> None:
    camera = CameraSource(
        "c",
        CameraSettings(
            "/dev/video97", read_timeout_s=0.05, reconnect_min_s=0.01, reconnect_max_s=0.02
        ),
    )
    items: list[Frame | None] = []
    async for item in camera.frames():
        items.append(item)
        if camera.problem is not None:
            break
    assert camera.settings.kind == "device"
    assert camera.problem == (
        "camera /dev/video97: device not found (unplugged? prefer a stable /dev/v4l/by-id/... "
        "path: `ls -l /dev/v4l/by-id/`)"
    )
    assert CameraSettings("/dev/v4l/by-id/usb-cam-video-index0").kind == "device"
