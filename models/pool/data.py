"""The pool-swimmer data sets on disk: images and their YOLO person boxes.

``../shared/data/pool-swimmers-train`` (train + valid, CC BY 4.0, "AI Drone Lifeguard" v6) is
the training data; ``../shared/data/pool-swimmers-drowning-sample`` (39 test images of the same
export) is the evaluation data and is never trained or tuned on. Every labelled class (active
drowning, passive drowner, swimming) is a person in the water: the detector has one class.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = [
    "EVALUATION_SET",
    "TRAINING_SET",
    "LabelledImage",
    "default_data_dir",
    "list_images",
    "read_boxes",
]

TRAINING_SET = "pool-swimmers-train"
EVALUATION_SET = "pool-swimmers-drowning-sample"


def default_data_dir() -> Path:
    """``../shared/data`` next to a development checkout."""
    return Path(__file__).resolve().parents[2].parent / "shared" / "data"


@dataclass(frozen=True, slots=True)
class LabelledImage:
    """An image file and its YOLO label file (normalised cx, cy, w, h per person)."""

    image: Path
    labels: Path


def list_images(folder: Path) -> list[LabelledImage]:
    """The ``images/*.jpg`` of a split folder with their ``labels/*.txt``, sorted by name."""
    out = []
    for image in sorted((folder / "images").glob("*.jpg")):
        out.append(LabelledImage(image, folder / "labels" / f"{image.stem}.txt"))
    return out


def read_boxes(labels: Path, width: float, height: float) -> np.ndarray:
    """(N, 4) person boxes x1, y1, x2, y2 in pixels of a ``width`` x ``height`` image.

    A missing label file means no person (YOLO convention). Every class is a person.
    """
    if not labels.is_file():
        return np.zeros((0, 4), np.float32)
    rows = []
    for line in labels.read_text(encoding="utf-8").splitlines():
        parts = line.split()
        if len(parts) < 5:
            continue
        cx, cy, w, h = (float(v) for v in parts[1:5])
        rows.append(
            [
                (cx - w / 2) * width,
                (cy - h / 2) * height,
                (cx + w / 2) * width,
                (cy + h / 2) * height,
            ]
        )
    if not rows:
        return np.zeros((0, 4), np.float32)
    boxes = np.asarray(rows, dtype=np.float32)
    boxes[:, 0::2] = np.clip(boxes[:, 0::2], 0, width)
    boxes[:, 1::2] = np.clip(boxes[:, 1::2], 0, height)
    return boxes
