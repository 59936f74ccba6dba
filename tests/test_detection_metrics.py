"""Detection metrics (precision, recall, AP at IoU 0.5) and the pool data's YOLO boxes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from models.pool.data import read_boxes
from models.pool.metrics import average_precision, match, score_at


def _boxes(*rows: tuple[float, float, float, float]) -> np.ndarray:
    return np.asarray(rows, dtype=np.float32).reshape(-1, 4)


def test_each_truth_matches_one_detection_best_score_first() -> None:
    truth = _boxes((0, 0, 10, 10), (20, 20, 30, 30))
    dets = _boxes((0, 0, 10, 10), (1, 0, 10, 10), (50, 50, 60, 60), (20, 20, 30, 31))
    scores = np.array([0.6, 0.9, 0.8, 0.7], np.float32)
    result = match(dets, scores, truth)
    # Sorted by score: 0.9 (matches truth 0), 0.8 (nothing), 0.7 (truth 1), 0.6 (truth 0 taken).
    assert result.scores.tolist() == pytest.approx([0.9, 0.8, 0.7, 0.6])
    assert result.true_positive.tolist() == [True, False, True, False]
    assert result.truths == 2


def test_iou_below_half_is_a_miss() -> None:
    result = match(_boxes((0, 0, 10, 10)), np.array([0.9], np.float32), _boxes((5, 0, 15, 10)))
    assert result.true_positive.tolist() == [False]


def test_precision_recall_at_a_threshold() -> None:
    truth = _boxes((0, 0, 10, 10), (20, 20, 30, 30), (40, 40, 50, 50))
    dets = _boxes((0, 0, 10, 10), (60, 60, 70, 70), (20, 20, 30, 30))
    r = match(dets, np.array([0.9, 0.8, 0.3], np.float32), truth)
    high = score_at([r], 0.5)
    assert (high.true_positives, high.false_positives, high.false_negatives) == (1, 1, 2)
    assert (high.precision, high.recall) == (0.5, pytest.approx(1 / 3))
    low = score_at([r], 0.1)
    assert (low.true_positives, low.false_positives, low.false_negatives) == (2, 1, 1)
    assert score_at([r], 0.95).precision == 1.0  # nothing claimed, nothing wrong


def test_average_precision_perfect_and_interpolated() -> None:
    truth = _boxes((0, 0, 10, 10), (20, 20, 30, 30))
    perfect = match(truth.copy(), np.array([0.9, 0.8], np.float32), truth)
    assert average_precision([perfect]) == pytest.approx(1.0)
    # TP (0.9), FP (0.8), TP (0.7): recall 0.5 at precision 1, recall 1 at precision 2/3.
    dets = _boxes((0, 0, 10, 10), (60, 60, 70, 70), (20, 20, 30, 30))
    mixed = match(dets, np.array([0.9, 0.8, 0.7], np.float32), truth)
    assert average_precision([mixed]) == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)
    missed = match(_boxes(), np.zeros(0, np.float32), truth)
    assert average_precision([missed]) == 0.0
    assert average_precision([perfect, missed]) == pytest.approx(0.5)


def test_yolo_labels_become_clipped_pixel_boxes(tmp_path: Path) -> None:
    labels = tmp_path / "a.txt"
    labels.write_text("2 0.5 0.5 0.2 0.4\n0 0.05 0.5 0.2 0.2\n\n")
    boxes = read_boxes(labels, 200, 100)
    np.testing.assert_allclose(boxes, [[80, 30, 120, 70], [0, 40, 30, 60]], atol=1e-4)
    assert read_boxes(tmp_path / "missing.txt", 10, 10).shape == (0, 4)
