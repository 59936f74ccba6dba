"""load_model: digest, signature and warm-up checks on real onnxruntime sessions; run()."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from gateway.errors import ModelError
from gateway.inference import load_model
from gateway.types import Provenance
from models.card import load_card, sha256_file
from tests.support.tiny_models import (
    linear_card,
    linear_card_data,
    linear_model,
    linear_weights,
    reshape_card_data,
    reshape_model,
    write_card,
)


def test_loads_verifies_and_runs(tmp_path: Path) -> None:
    card_path = linear_card(tmp_path)
    model = load_model(card_path)
    assert model.model_id == "tiny_linear"
    assert model.version == "1.0.0"
    assert model.sha256 == sha256_file(tmp_path / "tiny_linear.onnx")
    assert model.card_path == card_path
    assert model.model_path == tmp_path / "tiny_linear.onnx"
    assert model.batched
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    (y,) = model.run({"x": x})
    weight, bias = linear_weights()
    np.testing.assert_allclose(y, x @ weight + bias, rtol=1e-5)
    assert y.shape == (3, 2)


def test_provenance_carries_model_identity(tmp_path: Path) -> None:
    model = load_model(linear_card(tmp_path))
    assert model.provenance(0.9, 0.5) == Provenance(
        model_id="tiny_linear", version="1.0.0", sha256=model.sha256, score=0.9, threshold=0.5
    )


def test_wrong_sha256_is_refused_naming_both_digests(tmp_path: Path) -> None:
    model = linear_model(tmp_path / "m.onnx")
    wrong = "0" * 64
    card = write_card(tmp_path / "m.toml", linear_card_data(model, sha256=wrong))
    with pytest.raises(ModelError) as info:
        load_model(card)
    message = str(info.value)
    assert message.startswith(f"{card}: sha256: ")
    assert sha256_file(model) in message
    assert wrong in message


def test_model_file_changed_after_card_was_written(tmp_path: Path) -> None:
    card = linear_card(tmp_path)
    linear_model(tmp_path / "tiny_linear.onnx", seed=1)  # retrained, card not updated
    with pytest.raises(ModelError, match=r"sha256: .* hashes to"):
        load_model(card)


def test_missing_model_file(tmp_path: Path) -> None:
    card = linear_card(tmp_path)
    (tmp_path / "tiny_linear.onnx").unlink()
    with pytest.raises(ModelError, match=r"tiny_linear\.toml: file: model file not found"):
        load_model(card)


def test_a_model_path_through_a_file_is_a_model_error(tmp_path: Path) -> None:
    card = linear_card(tmp_path)
    data = load_card(card).model_dump()
    data["file"] = "tiny_linear.onnx/inner.onnx"  # NotADirectoryError, not "not found"
    write_card(card, data)
    with pytest.raises(ModelError, match=r"file: cannot read \(Not a directory\)"):
        load_model(card)


def test_missing_card(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="card: file not found"):
        load_model(tmp_path / "absent.toml")


def test_corrupt_file_with_matching_digest(tmp_path: Path) -> None:
    # The digest only proves the file is the one the card describes; the loader must still
    # refuse a file that is not an ONNX model.
    model = tmp_path / "m.onnx"
    model.write_bytes(linear_model(tmp_path / "good.onnx").read_bytes()[:100])
    card = write_card(tmp_path / "m.toml", linear_card_data(model))
    with pytest.raises(ModelError, match="is not a loadable ONNX model"):
        load_model(card)


@pytest.mark.parametrize(
    ("inputs", "expected"),
    [
        (
            [{"name": "x", "shape": ["batch", 5], "dtype": "float32"}],
            "inputs.x: dim 1 is 4 in the model (card: 5)",
        ),
        (
            [{"name": "x", "shape": ["batch", 4], "dtype": "int64"}],
            "inputs.x: dtype is tensor(float) in the model (card: int64)",
        ),
        (
            [{"name": "x", "shape": ["batch", 4, 1], "dtype": "float32"}],
            "inputs.x: rank 2 in the model",
        ),
        (
            [{"name": "window", "shape": ["batch", 4], "dtype": "float32"}],
            "inputs: the model has ['x'] (card: ['window'])",
        ),
    ],
)
def test_signature_mismatch_is_refused(
    tmp_path: Path, inputs: list[dict[str, Any]], expected: str
) -> None:
    model = linear_model(tmp_path / "m.onnx")
    card = write_card(tmp_path / "m.toml", linear_card_data(model, inputs=inputs))
    with pytest.raises(ModelError) as info:
        load_model(card)
    assert str(info.value).startswith(str(card))
    assert expected in str(info.value)


def test_card_claims_batch_dim_the_model_fixes(tmp_path: Path) -> None:
    model = linear_model(tmp_path / "m.onnx", batch=1)
    card = write_card(tmp_path / "m.toml", linear_card_data(model))
    with pytest.raises(ModelError, match="dim 0 is fixed at 1 in the model"):
        load_model(card)


def test_card_may_fix_a_dim_the_model_leaves_free(tmp_path: Path) -> None:
    model = linear_model(tmp_path / "m.onnx")
    spec = {"shape": [1, 4], "dtype": "float32", "name": "x"}
    out = {"shape": [1, 2], "dtype": "float32", "name": "y"}
    card = write_card(tmp_path / "m.toml", linear_card_data(model, inputs=[spec], outputs=[out]))
    loaded = load_model(card)
    assert not loaded.batched
    with pytest.raises(ModelError, match=r"inputs\.x: shape must be \[1, 4\] \(got: \[2, 4\]\)"):
        loaded.run({"x": np.zeros((2, 4), np.float32)})


def test_bad_feeds_are_refused_before_onnxruntime(tmp_path: Path) -> None:
    model = load_model(linear_card(tmp_path))
    with pytest.raises(ModelError, match=r"inputs: expected \['x'\] \(got: \['y'\]\)"):
        model.run({"y": np.zeros((1, 4), np.float32)})
    with pytest.raises(ModelError, match=r"inputs\.x: dtype must be float32 \(got: float64\)"):
        model.run({"x": np.zeros((1, 4))})
    with pytest.raises(
        ModelError, match=r"inputs\.x: shape must be \[batch, 4\] \(got: \[1, 3\]\)"
    ):
        model.run({"x": np.zeros((1, 3), np.float32)})
    with pytest.raises(ModelError, match="not a numpy array"):
        model.run({"x": [[0.0] * 4]})  # type: ignore[dict-item]


def test_model_that_fails_at_run_time_gives_clear_error_and_keeps_working(
    tmp_path: Path,
) -> None:
    model_file = reshape_model(tmp_path / "r.onnx")
    card = write_card(tmp_path / "r.toml", reshape_card_data(model_file))
    model = load_model(card)  # the warm-up with zeros (keep dims) succeeds
    x = np.arange(4, dtype=np.float32).reshape(1, 4)
    with pytest.raises(ModelError) as info:
        model.run({"x": x, "shape": np.array([3, 3], np.int64)})
    assert str(info.value).startswith(f"{model_file}: run failed: ")
    # The session is still usable afterwards.
    (y,) = model.run({"x": x, "shape": np.array([2, 2], np.int64)})
    np.testing.assert_array_equal(y, x.reshape(2, 2))


def test_warm_up_uses_the_card_sample_and_fails_clearly(tmp_path: Path) -> None:
    model_file = reshape_model(tmp_path / "r.onnx")
    np.savez(tmp_path / "good.npz", x=np.ones((1, 4), np.float32), shape=np.array([4, 1]))
    np.savez(tmp_path / "bad.npz", x=np.ones((1, 4), np.float32), shape=np.array([3, 3]))
    good = write_card(tmp_path / "good.toml", reshape_card_data(model_file, sample="good.npz"))
    assert load_model(good).card.sample == "good.npz"
    bad = write_card(tmp_path / "bad.toml", reshape_card_data(model_file, sample="bad.npz"))
    with pytest.raises(ModelError, match=r"bad\.toml: warm-up failed: .*run failed"):
        load_model(bad)
    missing = write_card(tmp_path / "m.toml", reshape_card_data(model_file, sample="none.npz"))
    with pytest.raises(ModelError, match=r"m\.toml: sample: file not found"):
        load_model(missing)
    # A broken zip and a plain .npy array: ModelError too, not BadZipFile or AttributeError.
    (tmp_path / "broken.npz").write_bytes(b"PK\x03\x04" + b"\x00" * 40)
    np.save(tmp_path / "array.npy", np.ones((1, 4), np.float32))
    for sample in ("broken.npz", "array.npy"):
        card = write_card(tmp_path / "s.toml", reshape_card_data(model_file, sample=sample))
        with pytest.raises(ModelError, match=r"s\.toml: sample: not a readable \.npz"):
            load_model(card)


def test_warm_up_checks_output_shape_against_card(tmp_path: Path) -> None:
    model_file = reshape_model(tmp_path / "r.onnx")
    # The model's output dims are free, so only the warm-up can see they are not [4, 4].
    outputs = [{"name": "y", "shape": [4, 4], "dtype": "float32"}]
    card = write_card(tmp_path / "r.toml", reshape_card_data(model_file, outputs=outputs))
    with pytest.raises(ModelError, match=r"warm-up: outputs\.y is float32 \[1, 4\]"):
        load_model(card)


def test_threads_are_validated(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="threads must be at least 1"):
        load_model(linear_card(tmp_path), threads=0)
    assert load_model(linear_card(tmp_path), threads=2).threads == 2
