"""Model cards: validation with errors that name the file and key, TOML round trip, hashing."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest

from gateway.errors import ModelError
from models.card import ModelCard, dump_card, load_card, parse_card, sha256_file
from tests.support.tiny_models import linear_card_data, linear_model, write_card


@pytest.fixture
def card_data(tmp_path: Path) -> dict[str, Any]:
    return linear_card_data(linear_model(tmp_path / "m.onnx"))


def test_round_trip_through_toml(tmp_path: Path, card_data: dict[str, Any]) -> None:
    card_data |= {
        "labels": ["low", 'high "quoted"'],
        "thresholds": {"y": 0.5, "odd key": 2},
        "params": {"window": 48, "mean": 1.5, "kind": "robust", "scale": [1.0, 2.5]},
        "metrics": {"mae_cm": 1.25, "eval_set": "hubeau 2020"},
        "quantization": "int8-qdq-static",
        "description": "line one\nline two",
    }
    path = write_card(tmp_path / "m.toml", card_data)
    card = load_card(path)
    assert card == ModelCard.model_validate(card_data)
    # Types survive: an int param stays an int, a threshold becomes a float.
    assert card.params["window"] == 48
    assert isinstance(card.params["window"], int)
    assert card.thresholds == {"y": 0.5, "odd key": 2.0}
    assert dump_card(card) == path.read_text(encoding="utf-8")
    assert card.model_path(path) == tmp_path / "m.onnx"
    assert card.batched


def test_sha256_file_matches_hashlib(tmp_path: Path) -> None:
    path = tmp_path / "blob"
    data = bytes(range(256)) * 10_000  # more than one read chunk
    path.write_bytes(data)
    assert sha256_file(path) == hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"name": "Water-Level"}, "name: must be lower_snake_case"),
        ({"sha256": "abc"}, "sha256: must be 64 lowercase hex digits (got: 'abc')"),
        ({"sha256": "A" * 64}, "sha256: must be 64 lowercase hex digits"),
        ({"file": "/etc/passwd"}, "file: must be relative to the card's directory"),
        ({"quantization": "int4"}, "quantization: Input should be"),
        ({"colour": "red"}, "colour: unknown key (got: 'red')"),
        ({"inputs": []}, "inputs: List should have at least 1 item"),
        (
            {"inputs": [{"name": "x", "shape": ["batch", 0], "dtype": "float32"}]},
            "inputs[0].shape: a fixed dim must be at least 1 (got: 0)",
        ),
        (
            {"inputs": [{"name": "x", "shape": ["batch", 4], "dtype": "float"}]},
            "inputs[0].dtype: Input should be",
        ),
        (
            {"inputs": [{"name": "x", "shape": [4.0], "dtype": "float32"}]},
            "inputs[0].shape[0]",
        ),
        ({"thresholds": {"y": "high"}}, "thresholds.y"),
        ({"thresholds": {"y": float("nan")}}, "thresholds: Value error, y must be finite"),
    ],
)
def test_bad_card_names_file_and_key(
    card_data: dict[str, Any], change: dict[str, Any], expected: str
) -> None:
    with pytest.raises(ModelError) as info:
        parse_card(card_data | change, "cards/m.toml")
    message = str(info.value)
    assert message.startswith("cards/m.toml: ")
    assert expected.removeprefix("thresholds: Value error, ") in message


def test_missing_keys_are_listed(card_data: dict[str, Any]) -> None:
    del card_data["sha256"]
    del card_data["licence"]
    with pytest.raises(ModelError) as info:
        parse_card(card_data, "m.toml")
    assert "m.toml: sha256: Field required" in str(info.value)
    assert "m.toml: licence: Field required" in str(info.value)


def test_duplicate_tensor_names_refused(card_data: dict[str, Any]) -> None:
    spec = {"name": "x", "shape": ["batch", 4], "dtype": "float32"}
    with pytest.raises(ModelError, match="inputs: names must be unique"):
        parse_card(card_data | {"inputs": [spec, spec]}, "m.toml")


def test_load_card_file_problems(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match=r"nope\.toml: card: file not found"):
        load_card(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text('name = "x"\nversion = = 1\n', encoding="utf-8")
    with pytest.raises(ModelError, match=r"bad\.toml: card: TOML syntax error: .*line 2"):
        load_card(bad)
    binary = tmp_path / "binary.toml"
    binary.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ModelError, match=r"binary\.toml: card: not UTF-8"):
        load_card(binary)
    with pytest.raises(ModelError, match="card: is a directory"):
        load_card(tmp_path)


def test_batched_needs_every_tensor_symbolic_first(card_data: dict[str, Any]) -> None:
    fixed_out = card_data | {"outputs": [{"name": "y", "shape": [1, 2], "dtype": "float32"}]}
    assert not parse_card(fixed_out, "m.toml").batched
