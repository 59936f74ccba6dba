"""quantize_model: real onnxruntime quantisation of a tiny fp32 model, static and dynamic."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import pytest

from gateway.errors import ModelError
from gateway.inference import load_model
from models.quantize import quantize_model
from tests.support.tiny_models import linear_card_data, linear_model, linear_weights, write_card


def _calibration(n: int = 256) -> Iterator[dict[str, np.ndarray]]:
    rng = np.random.default_rng(1)
    for _ in range(n):
        yield {"x": rng.uniform(-1, 1, size=(1, 4)).astype(np.float32)}


def _ops(path: Path) -> set[str]:
    return {node.op_type for node in onnx.load(str(path)).graph.node}


def test_static_qdq_model_runs_close_to_fp32(tmp_path: Path) -> None:
    fp32 = linear_model(tmp_path / "fp32.onnx", in_dim=4, out_dim=2)
    int8 = tmp_path / "out" / "int8.onnx"
    quantize_model(fp32, int8, calibration=_calibration(), method="static")
    assert {"QuantizeLinear", "DequantizeLinear"} <= _ops(int8)
    card = write_card(
        tmp_path / "out" / "int8.toml",
        linear_card_data(int8, quantization="int8-qdq-static"),
    )
    model = load_model(card)  # verifies and warms up the int8 file like any other
    # Inside the calibrated range: values beyond it are clipped, by design of static int8.
    x = np.random.default_rng(2).uniform(-0.8, 0.8, size=(16, 4)).astype(np.float32)
    (y,) = model.run({"x": x})
    weight, bias = linear_weights()
    expected = x @ weight + bias
    # int8 with per-channel weights: a few percent of the output range, not exact.
    assert np.max(np.abs(y - expected)) < 0.1 * np.ptp(expected)
    assert not np.array_equal(y, expected)


def test_dynamic_needs_no_calibration(tmp_path: Path) -> None:
    fp32 = linear_model(tmp_path / "fp32.onnx")
    int8 = tmp_path / "int8.onnx"
    quantize_model(fp32, int8, calibration=None, method="dynamic")
    assert "DynamicQuantizeLinear" in _ops(int8) or "MatMulInteger" in _ops(int8)
    model = load_model(write_card(tmp_path / "c.toml", linear_card_data(int8)))
    (y,) = model.run({"x": np.ones((2, 4), np.float32)})
    weight, bias = linear_weights()
    np.testing.assert_allclose(y, np.ones((2, 4)) @ weight + bias, atol=0.1)


def test_static_without_calibration_is_refused(tmp_path: Path) -> None:
    fp32 = linear_model(tmp_path / "fp32.onnx")
    with pytest.raises(ModelError, match="static quantisation needs a calibration set"):
        quantize_model(fp32, tmp_path / "int8.onnx", calibration=None, method="static")


def test_empty_calibration_is_refused_and_leaves_no_file(tmp_path: Path) -> None:
    fp32 = linear_model(tmp_path / "fp32.onnx")
    out = tmp_path / "int8.onnx"
    with pytest.raises(ModelError, match=r"fp32\.onnx: "):
        quantize_model(fp32, out, calibration=iter([]), method="static")
    assert not out.exists()


def test_corrupt_or_missing_input(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="model file not found"):
        quantize_model(
            tmp_path / "nope.onnx", tmp_path / "o.onnx", calibration=None, method="dynamic"
        )
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    with pytest.raises(ModelError, match=r"bad\.onnx: "):
        quantize_model(bad, tmp_path / "o.onnx", calibration=None, method="dynamic")
