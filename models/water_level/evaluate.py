"""The forecaster's own evaluation (``edge-gateway models eval`` / ``models quantize --eval``).

Runs a water-level forecaster (any card of task ``forecast`` with this feature definition) over
the *evaluation* portion of the real series of ``train.py`` (the part after the documented
training cut, :mod:`models.water_level.data`) and measures the model alone, without the
analyzer's rules:

- ``forecast_huber`` (primary, lower is better): Huber loss of the predicted standardised
  difference, next to ``no_change_huber`` (always predicting "no change") for scale;
- ``anomaly_rows_per_1000``: readings whose score reaches the card's threshold;
- ``nab_windows_by_score``: NAB windows (evaluation portion) with a reading at the threshold.

The analyzer as a whole (rules and score, per data set) is evaluated by
``python -m gateway.analyzers.evaluate``; see docs/water-level-evaluation.md.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from models.card import ModelCard
from models.evaluation import Evaluation, EvaluationUnavailableError, Runner
from models.water_level.data import Series, load_hubeau, load_lro, load_nab
from models.water_level.features import ForecastParams, ForecastState

__all__ = ["evaluate_forecaster", "evaluation_series"]


def evaluation_series(root: Path) -> list[Series]:
    """The real series (NAB's artificial ones are not sensor data), as train.py uses them."""
    nab = [s for s in load_nab(root) if not s.name.startswith("artificial")]
    return [*nab, *load_hubeau(root), load_lro(root)]


def _huber(residual: np.ndarray, delta: float = 1.0) -> float:
    a = np.abs(residual)
    return float(np.mean(np.where(a <= delta, 0.5 * a * a, delta * (a - 0.5 * delta))))


def evaluate_forecaster(run: Runner, card: ModelCard, data_dir: Path) -> Evaluation:
    """Score ``run`` on the evaluation portions; EvaluationUnavailableError without the data."""
    if not (data_dir / "nab-anomaly").is_dir() or not (data_dir / "lro-stream-stage-qc").is_dir():
        raise EvaluationUnavailableError(
            f"{data_dir}: the shared data sets (nab-anomaly, hubeau-river-level-floods, "
            "lro-stream-stage-qc) are not here"
        )
    try:
        params = ForecastParams.from_params(card.params)
    except ValueError as exc:
        raise EvaluationUnavailableError(f"card {card.name}: {exc}") from exc
    threshold = card.thresholds.get("anomaly", 1.0)
    input_name = card.inputs[0].name
    targets: list[float] = []
    predictions: list[float] = []
    anomalies = rows = windows = windows_hit = 0
    for series in evaluation_series(data_dir):
        state = ForecastState(params)
        pending: list[tuple[int, list[float], float]] = []
        for i, value in enumerate(series.values):
            if value is None:
                continue
            # The training portion only warms the running statistics up.
            if state.ready and i >= series.train_end:
                pending.append((i, state.features(), state.target(value)))
            state.push(value)
        if not pending:
            continue
        batch = np.asarray([f for _i, f, _t in pending], dtype=np.float32)
        out = np.asarray(run({input_name: batch})[0]).reshape(-1)
        flagged: set[int] = set()
        for (i, _f, target), prediction in zip(pending, out, strict=True):
            targets.append(max(-params.clip, min(params.clip, target)))
            predictions.append(float(prediction))
            _z, score = state.score(target, float(prediction))
            if score >= threshold:
                flagged.add(i)
        anomalies += len(flagged)
        rows += len(pending)
        first = series.times[series.train_end]
        for start, end in series.windows:
            if start < first:
                continue
            windows += 1
            windows_hit += any(start <= series.times[i] <= end for i in flagged)
    y = np.asarray(targets)
    p = np.asarray(predictions)
    return Evaluation(
        metrics={
            "forecast_huber": round(_huber(p - y), 5),
            "no_change_huber": round(_huber(-y), 5),
            "anomaly_rows_per_1000": round(1000 * anomalies / max(rows, 1), 3),
            "nab_windows_by_score": float(windows_hit),
            "nab_windows": float(windows),
        },
        primary="forecast_huber",
        higher_is_better=False,
        dataset="7 real NAB series, 5 Hub'Eau stage series, Logan River 2019 raw stage: "
        "evaluation portions (after the first 15 % / first labelled anomaly)",
        samples=rows,
    )
