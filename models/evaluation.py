"""What an evaluator is: `models eval` and `models quantize --eval` score a model with one.

An evaluator belongs to the task's owner (the water-level forecaster's lives with it). It runs a
model through a :data:`Runner` over the *evaluation* portion of its data set and returns an
:class:`Evaluation`. The registry is an explicit literal dict (no import-time discovery): a task
without an entry has no evaluator, and the CLI says so. The registry itself is
:data:`models.evaluators.EVALUATORS`; these types live apart from it so that an evaluator's
module can import them without importing the registry (which imports it).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gateway.errors import ModelError
from models.card import ModelCard

__all__ = ["Evaluation", "EvaluationUnavailableError", "Evaluator", "Runner"]

# One model run: feeds by input name -> outputs in the card's order (LoadedModel.run fits).
Runner = Callable[[Mapping[str, np.ndarray]], list[np.ndarray]]


@dataclass(frozen=True, slots=True)
class Evaluation:
    """What an evaluator measured, on which data."""

    metrics: dict[str, float]
    primary: str  # the metric that fp32 -> int8 deltas are reported on; a key of metrics
    higher_is_better: bool
    dataset: str  # which data and which portion, e.g. "hubeau ... 2020-2023 (evaluation portion)"
    samples: int


class EvaluationUnavailableError(ModelError):
    """The evaluation cannot run here (e.g. its data set is not on this machine)."""


# (run, card, data_dir) -> Evaluation. data_dir is the root of the shared data sets
# (../shared/data in a development checkout); raise EvaluationUnavailableError when it lacks yours.
Evaluator = Callable[[Runner, ModelCard, Path], Evaluation]
