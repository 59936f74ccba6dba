"""``edge-gateway models list|verify|quantize|eval`` on tiny real models."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from gateway.inference import load_model
from gateway.models_cli import discover_cards, main
from models.card import ModelCard, load_card, sha256_file
from models.evaluation import Evaluation, EvaluationUnavailableError, Runner
from models.evaluators import EVALUATORS
from tests.support.tiny_models import (
    linear_card,
    linear_card_data,
    linear_model,
    linear_weights,
    write_card,
)

ROOT = Path(__file__).resolve().parents[1]


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _bad_sha_card(directory: Path) -> Path:
    model = linear_model(directory / "bad.onnx")
    return write_card(
        directory / "bad.toml", linear_card_data(model, name="bad_model", sha256="1" * 64)
    )


def test_list_shows_each_card_and_whether_it_verifies(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    linear_card(tmp_path / "cards")
    bad = _bad_sha_card(tmp_path / "cards")
    (tmp_path / "cards" / "notes.toml").write_text('title = "not a card"\n', encoding="utf-8")
    code, out, _ = _run(capsys, "list", str(tmp_path / "cards"))
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == [
        "CARD", "NAME", "VERSION", "TASK", "QUANT", "SHA256", "VERIFIED", "SIZE",
    ]  # fmt: skip
    good_row = next(line for line in lines if "tiny_linear" in line).split()
    assert good_row[1:7] == ["tiny_linear", "1.0.0", "regress", "none", good_row[5], "yes"]
    assert len(good_row[5]) == 12
    bad_row = next(line for line in lines if line.split()[1:2] == ["bad_model"]).split()
    assert bad_row[6] == "NO"
    assert any(line.startswith(f"{bad}: sha256: ") for line in lines)
    assert "notes" not in out


def test_discover_skips_toml_that_is_not_a_card(tmp_path: Path) -> None:
    card = linear_card(tmp_path / "a" / "b")
    (tmp_path / "other.toml").write_text("x = 1\n", encoding="utf-8")
    assert discover_cards(tmp_path) == [card]


def test_shipped_cards_verify(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _run(capsys, "verify")
    assert code == 0, out
    assert "water_level/forecaster.toml: water_level_forecaster" in out
    assert out.splitlines()[-1].endswith("card(s) verified")


def test_verify_names_the_problem_per_card(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good = linear_card(tmp_path)
    bad = _bad_sha_card(tmp_path)
    missing = linear_card(tmp_path / "m", name="missing_file")
    (tmp_path / "m" / "missing_file.onnx").unlink()
    code, out, _ = _run(capsys, "verify", str(good), str(bad), str(missing))
    assert code == 1
    lines = out.splitlines()
    assert lines[0].startswith(f"OK     {good}: tiny_linear 1.0.0 none sha256 ")
    assert lines[1].startswith(f"FAILED {bad}: sha256: ")
    assert lines[2].startswith(f"FAILED {missing}: file: model file not found")
    assert lines[3] == "1 of 3 card(s) verified"


def test_verify_all_good_exits_zero(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _run(capsys, "verify", str(linear_card(tmp_path)))
    assert code == 0
    assert out.endswith("1 of 1 card(s) verified\n")


def test_verify_the_configured_cards(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    linear_card(tmp_path / "models")
    config = tmp_path / "gateway.toml"
    config.write_text(
        f'[inference]\nmodels_dir = "{tmp_path / "models"}"\ncards = ["tiny_linear.toml"]\n',
        encoding="utf-8",
    )
    code, out, _ = _run(capsys, "verify", "-c", str(config))
    assert code == 0
    assert "tiny_linear 1.0.0" in out
    config.write_text("[inference]\nthreads = 0\n", encoding="utf-8")
    code, _, err = _run(capsys, "verify", "-c", str(config))
    assert code == 78
    assert "inference.threads" in err


def _regress_evaluator(run: Runner, card: ModelCard, data_dir: Path) -> Evaluation:
    """Mean absolute error against the exact linear function, on fixed inputs."""
    if not data_dir.is_dir():
        raise EvaluationUnavailableError(f"{data_dir}: no evaluation data here")
    x = np.random.default_rng(7).uniform(-0.8, 0.8, size=(64, 4)).astype(np.float32)
    weight, bias = linear_weights()
    (y,) = run({"x": x})
    return Evaluation(
        metrics={"mae": float(np.abs(y - (x @ weight + bias)).mean())},
        primary="mae",
        higher_is_better=False,
        dataset="64 fixed uniform inputs (test)",
        samples=64,
    )


def _calibration_npz(path: Path, rows: int = 128) -> Path:
    x = np.random.default_rng(3).uniform(-1, 1, size=(rows, 4)).astype(np.float32)
    np.savez(path, x=x)
    return path


def test_quantize_static_writes_verified_int8_card_and_reports(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(EVALUATORS, "regress", _regress_evaluator)
    fp32_card = linear_card(tmp_path / "fp32")
    calibration = _calibration_npz(tmp_path / "calib.npz")
    out_dir = tmp_path / "int8"
    code, out, err = _run(
        capsys,
        "quantize",
        "--card", str(fp32_card),
        "--out", str(out_dir),
        "--calibration", str(calibration),
        "--eval",
        "--data", str(tmp_path),
        "--runs", "5",
    )  # fmt: skip
    assert code == 0, err
    int8_card = out_dir / "tiny_linear.int8.toml"
    card = load_card(int8_card)
    assert card.quantization == "int8-qdq-static"
    assert card.file == "tiny_linear.int8.onnx"
    assert card.sha256 == sha256_file(out_dir / "tiny_linear.int8.onnx")
    assert card.name == "tiny_linear"
    assert card.metrics["mae"] == pytest.approx(float(out.split("int8 ")[-1].split()[0]), rel=1e-5)
    load_model(int8_card)
    assert f"wrote {out_dir / 'tiny_linear.int8.onnx'}" in out
    assert "size:    fp32 " in out
    assert "latency: bare session.run, 1 thread, batch 1, 5 runs interleaved: fp32 p50 " in out
    assert "evaluation: 64 fixed uniform inputs (test) (64 samples)" in out
    mae_line = next(line for line in out.splitlines() if line.strip().startswith("mae:"))
    assert mae_line.strip().startswith("mae: fp32 ")
    fp32_mae, int8_mae, delta = (
        float(mae_line.split(word)[1].split()[0]) for word in ("fp32", "int8", "delta")
    )
    assert fp32_mae < 1e-5  # the fp32 model is the exact function
    assert int8_mae > fp32_mae
    assert delta == pytest.approx(int8_mae - fp32_mae, rel=1e-3)
    assert mae_line.endswith("(primary)")


def test_quantize_dynamic_and_missing_evaluation_data(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(EVALUATORS, "regress", _regress_evaluator)
    fp32_card = linear_card(tmp_path / "fp32")
    code, out, _ = _run(
        capsys,
        "quantize",
        "--card", str(fp32_card),
        "--out", str(tmp_path / "int8"),
        "--method", "dynamic",
        "--eval",
        "--data", str(tmp_path / "absent"),
        "--runs", "3",
    )  # fmt: skip
    assert code == 0
    assert load_card(tmp_path / "int8" / "tiny_linear.int8.toml").quantization == "int8-dynamic"
    assert "metric delta: not measured: " in out
    assert "no evaluation data here" in out


def test_quantize_refusals(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    fp32_card = linear_card(tmp_path)
    code, _, err = _run(capsys, "quantize", "--card", str(fp32_card), "--out", str(tmp_path))
    assert code == 2
    assert "static quantisation needs --calibration NPZ" in err
    wrong = tmp_path / "wrong.npz"
    np.savez(wrong, window=np.zeros((4, 4), np.float32))
    code, _, err = _run(
        capsys,
        "quantize", "--card", str(fp32_card), "--out", str(tmp_path / "o"),
        "--calibration", str(wrong),
    )  # fmt: skip
    assert code == 1
    assert f"{wrong}: arrays must be the model's inputs ['x'] (got: ['window'])" in err
    bad = _bad_sha_card(tmp_path)
    code, _, err = _run(
        capsys, "quantize", "--card", str(bad), "--out", str(tmp_path / "o"), "--method", "dynamic"
    )
    assert code == 1
    assert err.startswith(f"{bad}: sha256: ")


def test_eval_dispatches_on_task(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    card = linear_card(tmp_path)
    code, out, _ = _run(capsys, "eval", "--card", str(card), "--data", str(tmp_path))
    assert code == 2
    assert "no evaluator for task 'regress'" in out
    monkeypatch.setitem(EVALUATORS, "regress", _regress_evaluator)
    code, out, _ = _run(capsys, "eval", "--card", str(card), "--data", str(tmp_path))
    assert code == 0
    assert out.startswith("tiny_linear 1.0.0 (none, sha256 ")
    assert "on 64 fixed uniform inputs (test), 64 samples:" in out
    assert "  mae: " in out
    code, _, err = _run(capsys, "eval", "--card", str(card), "--data", str(tmp_path / "nope"))
    assert code == 1
    assert err.startswith("not evaluated: ")


def test_eval_reports_an_evaluator_failure(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(run: Runner, card: ModelCard, data_dir: Path) -> Evaluation:
        run({"x": np.zeros((1, 3), np.float32)})  # wrong shape: the runner refuses it
        raise AssertionError("unreachable")

    monkeypatch.setitem(EVALUATORS, "regress", broken)
    code, _, err = _run(capsys, "eval", "--card", str(linear_card(tmp_path)))
    assert code == 1
    assert "inputs.x: shape must be [batch, 4]" in err


def test_registered_on_the_main_command(tmp_path: Path) -> None:
    card = linear_card(tmp_path)
    result = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "models", "verify", str(card)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=False,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "1 of 1 card(s) verified" in result.stdout
