"""The water-level model's data split, training reproducibility and evaluations.

Tests that read ``../shared/data`` skip when it is absent (a fresh clone has no shared data).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.analyzers import evaluate as analyzer_evaluation
from gateway.inference import load_model
from models.card import load_card, sha256_file
from models.evaluation import EvaluationUnavailableError
from models.evaluators import EVALUATORS
from models.water_level import train
from models.water_level.data import FAULT_LABELS, default_data_dir, load_hubeau, load_lro, load_nab
from models.water_level.evaluate import evaluate_forecaster

DATA = default_data_dir()
SHIPPED = Path(__file__).resolve().parents[1] / "models" / "water_level"
needs_data = pytest.mark.skipif(
    not (DATA / "nab-anomaly").is_dir(), reason=f"shared data sets not found at {DATA}"
)


def test_the_evaluation_says_it_skips_without_data(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert analyzer_evaluation.main(["--data", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"evaluation skipped: {tmp_path} has no nab-anomaly")


def test_the_forecast_evaluator_is_registered_and_refuses_missing_data(tmp_path: Path) -> None:
    assert EVALUATORS["forecast"] is evaluate_forecaster
    card = load_card(SHIPPED / "forecaster.toml")
    with pytest.raises(EvaluationUnavailableError, match="shared data sets"):
        evaluate_forecaster(lambda feeds: [], card, tmp_path)


@needs_data
def test_training_portions_stop_before_every_label() -> None:
    for series in load_nab(DATA):
        cut = series.times[series.train_end]
        assert series.train_end <= int(0.15 * len(series))
        assert all(cut <= start for start, _end in series.windows), series.name
    for series in load_hubeau(DATA):
        assert series.train_end == int(0.15 * len(series))
        assert series.times == sorted(series.times)
    stage = load_lro(DATA)
    assert not FAULT_LABELS.intersection(stage.labels[: stage.train_end])
    assert stage.labels[stage.train_end] in FAULT_LABELS


@needs_data
def test_the_shipped_model_is_what_the_training_script_builds(tmp_path: Path) -> None:
    assert train.main(["--out", str(tmp_path)]) == 0
    for name in ("forecaster.fp32.onnx", "forecaster.int8.onnx"):
        assert sha256_file(tmp_path / name) == sha256_file(SHIPPED / name), name
    for name in ("forecaster.toml", "forecaster.fp32.toml"):
        assert (tmp_path / name).read_text() == (SHIPPED / name).read_text(), name


@needs_data
def test_the_forecaster_beats_no_change_and_int8_keeps_fp32_quality() -> None:
    results = {}
    for card in ("forecaster.toml", "forecaster.fp32.toml"):
        model = load_model(SHIPPED / card)
        results[card] = evaluate_forecaster(model.run, model.card, DATA)
    int8, fp32 = results["forecaster.toml"], results["forecaster.fp32.toml"]
    assert int8.samples == fp32.samples > 50_000
    assert int8.metrics["forecast_huber"] < 0.95 * int8.metrics["no_change_huber"]
    assert abs(int8.metrics["forecast_huber"] - fp32.metrics["forecast_huber"]) < 0.01
    assert int8.metrics["anomaly_rows_per_1000"] < 10
