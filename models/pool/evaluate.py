"""Evaluate a person detector on the drowning sample: precision, recall and AP at IoU 0.5.

    edge-gateway models eval --card models/pool/person_detector.toml [--data DIR]

The evaluator of task ``detect`` (``edge-gateway models eval``): any detector card
(:mod:`models.detection`) over ``pool-swimmers-drowning-sample`` (39 images, 48 people; never
trained or tuned on). Every labelled box is a person in the water; a detector of several classes
is scored on the classes its card keeps (``keep_labels``, "person" for the generic ones).

- ``ap50`` (primary): all-points AP at IoU 0.5 over detections scoring at least 0.05;
- ``precision`` / ``recall``: at the card's own score threshold (chosen on training data);
- ``true_positives``, ``false_positives``, ``false_negatives`` at that threshold.

People on the pool deck are not labelled in this data set, so a correct detection of one counts
as a false positive: precision is understated for every model alike.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from models.card import ModelCard
from models.detection import DetectorSpec, decode_views, preprocess, views
from models.evaluation import Evaluation, EvaluationUnavailableError, Runner
from models.pool.data import EVALUATION_SET, list_images, read_boxes
from models.pool.metrics import ImageResult, average_precision, match, score_at

__all__ = ["AP_FLOOR", "evaluate_detector"]

# Detections below this score are not part of the AP curve (and never of any decision).
AP_FLOOR = 0.05


def evaluate_detector(run: Runner, card: ModelCard, data_dir: Path) -> Evaluation:
    """Score ``run`` on the drowning sample; EvaluationUnavailableError without the data."""
    folder = data_dir / EVALUATION_SET
    items = list_images(folder)
    if not items:
        raise EvaluationUnavailableError(
            f"{folder}: the evaluation set {EVALUATION_SET} is not here"
        )
    spec = DetectorSpec.from_card(card)
    results: list[ImageResult] = []
    for item in items:
        image = cv2.imread(str(item.image))
        if image is None:
            raise EvaluationUnavailableError(f"{item.image}: not a readable image")
        h, w = image.shape[:2]
        tensor, transform = preprocess(image, spec)
        outputs = [run({spec.input_name: view}) for view in views(tensor, spec)]
        found = decode_views(
            outputs, spec, transform, score_threshold=min(AP_FLOOR, spec.score_threshold)
        )
        boxes = np.array([d.box for d in found], np.float32).reshape(-1, 4)
        scores = np.array([d.score for d in found], np.float32)
        results.append(match(boxes, scores, read_boxes(item.labels, w, h)))
    at = score_at(results, spec.score_threshold)
    return Evaluation(
        metrics={
            "ap50": round(average_precision(results), 4),
            "precision": round(at.precision, 4),
            "recall": round(at.recall, 4),
            "score_threshold": spec.score_threshold,
            "true_positives": at.true_positives,
            "false_positives": at.false_positives,
            "false_negatives": at.false_negatives,
        },
        primary="ap50",
        higher_is_better=True,
        dataset=f"{EVALUATION_SET} ({len(items)} images, evaluation only), IoU 0.5",
        samples=len(items),
    )
