"""Synthetic pool sequences for the alarm-timing evaluation and the demo clip.

Person crops (the labelled boxes of a YOLO data set) are composited, with a feathered elliptical
edge, onto a drawn indoor pool (pictures of real pools all have people in them, and their
labelled boxes rarely cover a whole body, so painting them out leaves ghosts), and moved along a
scripted path: swimming, then still; swimming all the time; leaving over the edge; going under.
Light ripple and sensor noise make every frame differ, as a real camera's do (a frame repeated
byte for byte is what a frozen stream looks like). The ground truth of each scenario is the time
the person stopped moving or vanished, and whether an alarm is due.

    python -m models.pool.synth --data ../shared/data/pool-swimmers-train --split valid \
        --out /tmp/pool-seq            # writes one .mp4 per scenario and truth.json

The data sets' licences apply to the crops in the videos: the pool-swimmers-train
images are CC BY 4.0 ("AI Drone Lifeguard" v6, Roboflow Universe, ai-drone-lifeguard); the
drowning sample is for internal testing only and must not be redistributed.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import numpy.typing as npt

__all__ = [
    "SCENARIOS",
    "Crop",
    "Scenario",
    "load_crops",
    "pool_background",
    "render",
    "write_video",
]

Image = npt.NDArray[np.uint8]
WIDTH, HEIGHT = 320, 240
# The water area of every scenario: the picture less a 16 px margin (the pool's edge).
WATER = ((16.0, 16.0), (304.0, 16.0), (304.0, 224.0), (16.0, 224.0))
PERSON_PX = 56  # longer side of a composited person at 320x240


@dataclass(frozen=True)
class Crop:
    """A person cut from a labelled image, with a feathered alpha mask (0..1)."""

    image: Image
    alpha: npt.NDArray[np.float32]
    source: str


def _boxes(label_file: Path, width: int, height: int) -> list[tuple[int, int, int, int]]:
    out = []
    for line in label_file.read_text().splitlines():
        parts = line.split()
        if len(parts) != 5:
            continue
        cx, cy, w, h = (float(v) for v in parts[1:])
        x1, y1 = int((cx - w / 2) * width), int((cy - h / 2) * height)
        x2, y2 = int((cx + w / 2) * width), int((cy + h / 2) * height)
        out.append((max(0, x1), max(0, y1), min(width, x2), min(height, y2)))
    return out


def _images(root: Path, split: str) -> list[tuple[Path, Path]]:
    base = root / split if (root / split / "images").is_dir() else root
    pairs = []
    for image in sorted((base / "images").glob("*.jpg")):
        label = base / "labels" / f"{image.stem}.txt"
        if label.is_file():
            pairs.append((image, label))
    return pairs


def load_crops(root: Path, split: str, n: int, min_px: int = 40) -> list[Crop]:
    """Up to n person crops whose boxes are at least min_px on the longer side, in name order."""
    crops: list[Crop] = []
    for image_path, label_path in _images(root, split):
        image = cv2.imread(str(image_path))
        if image is None:
            continue
        h, w = image.shape[:2]
        for x1, y1, x2, y2 in _boxes(label_path, w, h):
            if max(x2 - x1, y2 - y1) < min_px or min(x2 - x1, y2 - y1) < min_px // 3:
                continue
            piece = image[y1:y2, x1:x2]
            scale = PERSON_PX / max(piece.shape[:2])
            size = (max(8, round(piece.shape[1] * scale)), max(8, round(piece.shape[0] * scale)))
            piece = cv2.resize(piece, size, interpolation=cv2.INTER_AREA)
            ph, pw = int(piece.shape[0]), int(piece.shape[1])
            mask = np.zeros((ph, pw), np.float32)
            cv2.ellipse(mask, (pw // 2, ph // 2), (pw // 2 - 1, ph // 2 - 1), 0, 0, 360, 1.0, -1)
            alpha = np.asarray(cv2.GaussianBlur(mask, (0, 0), 2.0), np.float32)
            crops.append(Crop(np.asarray(piece, np.uint8), alpha, image_path.name))
            if len(crops) >= n:
                return crops
    return crops


def pool_background(seed: int = 0) -> Image:
    """A 320x240 indoor pool seen from the deck: the deck along the top, tiled water with lane
    lines on the floor and two lane ropes (drawn, so no one else is in the picture)."""
    rng = np.random.default_rng(seed)
    yy = np.mgrid[0:HEIGHT, 0:WIDTH][0].astype(np.float32)
    water = np.empty((HEIGHT, WIDTH, 3), np.float32)
    # Turquoise, deeper (darker) towards the far end; BGR.
    depth = yy / HEIGHT
    water[..., 0] = 200 - 30 * (1 - depth)
    water[..., 1] = 175 - 35 * (1 - depth)
    water[..., 2] = 70 - 20 * (1 - depth)
    image = water
    for x in range(-40, WIDTH + 40, 24):  # floor tile joints
        cv2.line(image, (x, 16), (x + 30, HEIGHT), (185, 160, 60), 1)
    for y in range(24, HEIGHT, 20):
        cv2.line(image, (0, y), (WIDTH, y), (185, 160, 60), 1)
    for y in (95, 175):  # dark lane markings on the floor, lane ropes above them
        cv2.line(image, (20, y + 18), (300, y + 18), (110, 80, 40), 4)
        for x in range(0, WIDTH, 8):
            colour = (40, 40, 200) if (x // 8) % 4 == 0 else (230, 230, 230)
            cv2.circle(image, (x + 4, y), 3, colour, -1)
    image[:16] = (150, 185, 205)  # the deck
    image += rng.normal(0, 3, image.shape).astype(np.float32)
    return np.clip(cv2.GaussianBlur(image, (0, 0), 0.7), 0, 255).astype(np.uint8)


# A path gives a person's centre at time t, or None while not visible.
Path2D = Callable[[float], tuple[float, float] | None]


@dataclass(frozen=True)
class Actor:
    crop: int
    path: Path2D


@dataclass(frozen=True)
class Scenario:
    """A scripted sequence and its ground truth."""

    name: str
    duration_s: float
    actors: tuple[Actor, ...]
    # When the person who should raise an alarm stopped (or vanished); None: no alarm is due.
    stop_s: float | None
    description: str


def _swim_then_still(x0: float, x1: float, y: float, swim_s: float) -> Path2D:
    def at(t: float) -> tuple[float, float]:
        if t < swim_s:
            return (x0 + (x1 - x0) * t / swim_s, y)
        # Floating: bobbing of a pixel or two (well under the stillness threshold).
        return (x1 + 1.5 * math.sin(t * 1.7), y + 1.0 * math.sin(t * 2.3))

    return at


def _lengths(x0: float, x1: float, y: float, speed: float) -> Path2D:
    span = x1 - x0

    def at(t: float) -> tuple[float, float]:
        d = (t * speed) % (2 * span)
        return (x0 + (d if d < span else 2 * span - d), y + 4 * math.sin(t * 0.9))

    return at


def _swim_then_gone(x0: float, x1: float, y: float, swim_s: float) -> Path2D:
    def at(t: float) -> tuple[float, float] | None:
        return (x0 + (x1 - x0) * t / swim_s, y) if t < swim_s else None

    return at


SCENARIOS: dict[str, Scenario] = {
    "still": Scenario(
        "still",
        30.0,
        (Actor(3, _swim_then_still(70, 180, 120, 5.0)),),
        5.0,
        "swims 5 s (22 px/s, 0.4 sizes/s), then floats still with a little bobbing",
    ),
    "swimmer": Scenario(
        "swimmer",
        40.0,
        (Actor(7, _lengths(60, 260, 110, 30.0)),),
        None,
        "swims lengths for 40 s (30 px/s, about 0.5 sizes/s), turning at each end",
    ),
    "leaves": Scenario(
        "leaves",
        30.0,
        (Actor(5, _swim_then_gone(170, 345, 130, 6.0)),),
        None,
        "swims to the right edge and out of the picture, then the pool is empty",
    ),
    "submerges": Scenario(
        "submerges",
        30.0,
        (Actor(6, _swim_then_gone(70, 160, 120, 4.0)),),
        4.0,
        "swims 4 s, then vanishes in the middle of the pool (goes under)",
    ),
    "demo": Scenario(
        "demo",
        22.0,
        (
            Actor(3, _swim_then_still(60, 140, 150, 3.0)),
            Actor(7, _lengths(70, 250, 70, 35.0)),
        ),
        3.0,
        "two people: one stops after 3 s, one keeps swimming lengths",
    ),
}


def _paste(frame: npt.NDArray[np.float32], crop: Crop, center: tuple[float, float]) -> None:
    ch, cw = crop.alpha.shape
    x0, y0 = round(center[0] - cw / 2), round(center[1] - ch / 2)
    fx0, fy0 = max(0, x0), max(0, y0)
    fx1, fy1 = min(frame.shape[1], x0 + cw), min(frame.shape[0], y0 + ch)
    if fx1 <= fx0 or fy1 <= fy0:
        return
    piece = crop.image[fy0 - y0 : fy1 - y0, fx0 - x0 : fx1 - x0].astype(np.float32)
    alpha = crop.alpha[fy0 - y0 : fy1 - y0, fx0 - x0 : fx1 - x0, None]
    region = frame[fy0:fy1, fx0:fx1]
    region[:] = region * (1 - alpha) + piece * alpha


def render(
    scenario: Scenario,
    background: Image,
    crops: Sequence[Crop],
    fps: float,
    *,
    seed: int = 0,
    crop_offset: int = 0,
) -> Iterator[Image]:
    """The scenario's frames at ``fps``: ripple, noise, and the actors on their paths.

    ``crop_offset`` shifts every actor to another crop (another person, same path)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:HEIGHT, 0:WIDTH].astype(np.float32)
    base = background.astype(np.float32)
    for i in range(round(scenario.duration_s * fps)):
        t = i / fps
        ripple = 4.0 * np.sin(xx / 9.0 + yy / 13.0 + t * 2.0)
        frame = base + ripple[:, :, None]
        for actor in scenario.actors:
            where = actor.path(t)
            if where is not None:
                _paste(frame, crops[(actor.crop + crop_offset) % len(crops)], where)
        frame += rng.normal(0.0, 2.0, frame.shape).astype(np.float32)
        yield np.clip(frame, 0, 255).astype(np.uint8)


def write_video(path: Path, frames: Iterator[Image], fps: float) -> int:
    """Write frames as MPEG-4 part 2 (mp4v, in every OpenCV build); returns the frame count."""
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter.fourcc(*"mp4v"), fps, (WIDTH, HEIGHT))
    if not writer.isOpened():
        raise OSError(f"{path}: cannot write video")
    n = 0
    try:
        for frame in frames:
            writer.write(frame)
            n += 1
    finally:
        writer.release()
    return n


def read_video(path: Path, limit: int | None = None) -> list[Image]:
    """The frames of a video file, decoded (at most ``limit``), for tests and benchmarks."""
    cap = cv2.VideoCapture(str(path))
    frames: list[Image] = []
    try:
        while limit is None or len(frames) < limit:
            ok, frame = cap.read()
            if not ok:
                break
            # OpenCV's stubs type a decoded frame loosely; it is uint8 BGR, H x W x 3.
            frames.append(np.asarray(frame, dtype=np.uint8))
    finally:
        cap.release()
    return frames


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="a YOLO data set directory")
    parser.add_argument("--split", default="valid", help="its split (sub-directory) to use")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--fps", type=float, default=4.0)
    parser.add_argument("--background", type=int, default=0, help="seed of the drawn pool")
    parser.add_argument("--scenarios", nargs="*", default=sorted(SCENARIOS))
    parser.add_argument(
        "--people", type=int, default=1, help="versions of each scenario, each with other crops"
    )
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    crops = load_crops(args.data, args.split, 16, min_px=70)
    background = pool_background(args.background)
    truth = {}
    for name in args.scenarios:
        for offset in range(args.people):
            scenario = SCENARIOS[name]
            key = name if offset == 0 else f"{name}-{offset}"
            video = args.out / f"{key}.mp4"
            frames = render(scenario, background, crops, args.fps, seed=offset, crop_offset=offset)
            n = write_video(video, frames, args.fps)
            truth[key] = {
                "scenario": name,
                "video": video.name,
                "frames": n,
                "fps": args.fps,
                "stop_s": scenario.stop_s,
                "alarm_due": scenario.stop_s is not None,
                "description": scenario.description,
                "background": f"drawn (seed {args.background})",
                "crops": sorted(
                    {crops[(a.crop + offset) % len(crops)].source for a in scenario.actors}
                ),
            }
            print(f"{video}: {n} frames, {video.stat().st_size} bytes")  # noqa: T201
    (args.out / "truth.json").write_text(json.dumps(truth, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
