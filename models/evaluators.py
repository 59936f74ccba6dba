"""The evaluator registry: task -> how ``edge-gateway models eval`` scores a model of that task.

An explicit literal dict (no import-time discovery). The owner of a task adds its entry here; the
types are in :mod:`models.evaluation`.
"""

from __future__ import annotations

from models.evaluation import Evaluator
from models.pool.evaluate import evaluate_detector
from models.waste.evaluate import evaluate_classifier
from models.water_level.evaluate import evaluate_forecaster

__all__ = ["EVALUATORS"]

EVALUATORS: dict[str, Evaluator] = {
    "classify_waste": evaluate_classifier,
    "detect": evaluate_detector,
    "forecast": evaluate_forecaster,
}
