"""Detection metrics at one IoU: precision, recall at a score threshold, and AP (pure numpy).

Matching is greedy by score within each image: a detection is a true positive when its IoU with
a not-yet-matched ground-truth box is at least ``iou`` (0.5 here, as in PASCAL VOC); each
ground-truth box matches at most one detection. AP is the area under the all-points
interpolated precision/recall curve (VOC 2010+).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from models.detection import box_iou

__all__ = ["ImageResult", "Scores", "average_precision", "match", "score_at"]


@dataclass(frozen=True, slots=True)
class ImageResult:
    """One image: detection scores with their true/false-positive flags, and the truth count."""

    scores: np.ndarray  # (D,)
    true_positive: np.ndarray  # (D,) bool
    truths: int


def match(
    boxes: np.ndarray, scores: np.ndarray, truth: np.ndarray, iou: float = 0.5
) -> ImageResult:
    """Greedy matching of detections (best score first) to ground-truth boxes."""
    order = np.argsort(-scores, kind="stable")
    used = np.zeros(len(truth), dtype=bool)
    tp = np.zeros(len(order), dtype=bool)
    for rank, i in enumerate(order):
        if not len(truth):
            break
        ious = box_iou(boxes[i], truth)
        ious[used] = -1.0
        best = int(np.argmax(ious))
        if ious[best] >= iou:
            used[best] = True
            tp[rank] = True
    return ImageResult(scores[order].astype(np.float64), tp, len(truth))


@dataclass(frozen=True, slots=True)
class Scores:
    """Counts and rates at one score threshold."""

    threshold: float
    true_positives: int
    false_positives: int
    false_negatives: int

    @property
    def precision(self) -> float:
        found = self.true_positives + self.false_positives
        return self.true_positives / found if found else 1.0

    @property
    def recall(self) -> float:
        truths = self.true_positives + self.false_negatives
        return self.true_positives / truths if truths else 1.0


def score_at(results: Sequence[ImageResult], threshold: float) -> Scores:
    """Precision/recall counts keeping the detections scoring at least ``threshold``.

    Valid only when the results were matched from detections above a lower threshold and
    after NMS, which is how the evaluators call it.
    """
    tp = fp = truths = 0
    for r in results:
        kept = r.scores >= threshold
        tp += int(np.count_nonzero(r.true_positive & kept))
        fp += int(np.count_nonzero(~r.true_positive & kept))
        truths += r.truths
    return Scores(threshold, tp, fp, truths - tp)


def average_precision(results: Sequence[ImageResult]) -> float:
    """All-points interpolated AP over the images' pooled detections."""
    truths = sum(r.truths for r in results)
    if truths == 0:
        return 0.0
    scores = np.concatenate([r.scores for r in results]) if results else np.zeros(0)
    tp = np.concatenate([r.true_positive for r in results]) if results else np.zeros(0, bool)
    order = np.argsort(-scores, kind="stable")
    tp = tp[order]
    ctp = np.cumsum(tp)
    cfp = np.cumsum(~tp)
    recall = ctp / truths
    precision = ctp / np.maximum(ctp + cfp, 1)
    r = np.concatenate([[0.0], recall, [recall[-1] if len(recall) else 0.0]])
    p = np.concatenate([[1.0], precision, [0.0]])
    p = np.maximum.accumulate(p[::-1])[::-1]
    return float(np.sum((r[1:] - r[:-1]) * p[1:]))
