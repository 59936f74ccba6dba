"""Tiny real ONNX models built with onnx.helper, and cards for them, for the inference tests.

Every model here is small enough to build and run in milliseconds, and each exists to exercise
one behaviour of the engine: a linear layer (batchable or not), a Reshape whose target comes from
an input (fails at run time for some inputs), an Identity with an int64 input.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from models.card import ModelCard, dump_card, sha256_file

# The ONNX opset and IR version onnxruntime 1.20+ all run.
OPSET = 17
IR_VERSION = 9


def _save(graph: onnx.GraphProto, path: Path) -> Path:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def linear_weights(in_dim: int = 4, out_dim: int = 2, seed: int = 0) -> tuple[Any, Any]:
    """The weights ``linear_model`` uses for a seed (so tests can compute the expected output)."""
    rng = np.random.default_rng(seed)
    weight = rng.normal(size=(in_dim, out_dim)).astype(np.float32)
    bias = rng.normal(size=(out_dim,)).astype(np.float32)
    return weight, bias


def linear_model(
    path: Path, *, batch: str | int = "batch", in_dim: int = 4, out_dim: int = 2, seed: int = 0
) -> Path:
    """y = x @ W + b with x float32 [batch, in_dim] and y [batch, out_dim] (MatMul + Add)."""
    weight, bias = linear_weights(in_dim, out_dim, seed)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "W"], ["xw"]),
            helper.make_node("Add", ["xw", "b"], ["y"]),
        ],
        "linear",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, in_dim])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, out_dim])],
        initializer=[
            numpy_helper.from_array(weight, "W"),
            numpy_helper.from_array(bias, "b"),
        ],
    )
    return _save(graph, path)


def reshape_model(path: Path) -> Path:
    """y = Reshape(x, shape): x float32 [1, 4], shape int64 [2]; [3, 3] fails at run time.

    Zeros as the shape mean "keep that dim" in ONNX, so a warm-up with zeros succeeds.
    """
    graph = helper.make_graph(
        [helper.make_node("Reshape", ["x", "shape"], ["y"])],
        "reshape",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4]),
            helper.make_tensor_value_info("shape", TensorProto.INT64, [2]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["r0", "r1"])],
    )
    return _save(graph, path)


def linear_card_data(model: Path, **overrides: Any) -> dict[str, Any]:
    """Card fields for a ``linear_model`` file (sha256 computed from the file)."""
    data: dict[str, Any] = {
        "name": "tiny_linear",
        "version": "1.0.0",
        "task": "regress",
        "file": model.name,
        "sha256": sha256_file(model),
        "inputs": [{"name": "x", "shape": ["batch", 4], "dtype": "float32"}],
        "outputs": [{"name": "y", "shape": ["batch", 2], "dtype": "float32"}],
        "licence": "Apache-2.0",
        "training_data": "none: random weights built by the test suite",
    }
    data.update(overrides)
    return data


def reshape_card_data(model: Path, **overrides: Any) -> dict[str, Any]:
    """Card fields for a ``reshape_model`` file."""
    data: dict[str, Any] = {
        "name": "tiny_reshape",
        "version": "1.0.0",
        "task": "regress",
        "file": model.name,
        "sha256": sha256_file(model),
        "inputs": [
            {"name": "x", "shape": [1, 4], "dtype": "float32"},
            {"name": "shape", "shape": [2], "dtype": "int64"},
        ],
        "outputs": [{"name": "y", "shape": ["r0", "r1"], "dtype": "float32"}],
        "licence": "Apache-2.0",
        "training_data": "none: no weights",
    }
    data.update(overrides)
    return data


def write_card(path: Path, data: dict[str, Any]) -> Path:
    """Validate ``data`` as a card and write it as TOML."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(dump_card(ModelCard.model_validate(data)), encoding="utf-8")
    return path


def linear_card(
    directory: Path, name: str = "tiny_linear", *, seed: int = 0, batch: str | int = "batch"
) -> Path:
    """A linear model file and its card in ``directory``; returns the card path."""
    model = linear_model(directory / f"{name}.onnx", seed=seed, batch=batch)
    overrides: dict[str, Any] = {"name": name}
    if isinstance(batch, int):
        overrides["inputs"] = [{"name": "x", "shape": [batch, 4], "dtype": "float32"}]
        overrides["outputs"] = [{"name": "y", "shape": [batch, 2], "dtype": "float32"}]
    return write_card(directory / f"{name}.toml", linear_card_data(model, **overrides))


def gather_table(rows: int = 10, width: int = 3) -> Any:
    """The table ``gather_model`` looks rows up in: row i holds i, i + 0.1, i + 0.2, ..."""
    return (np.arange(rows)[:, None] + 0.1 * np.arange(width)[None, :]).astype(np.float32)


def gather_model(path: Path, *, rows: int = 10, width: int = 3) -> Path:
    """y = table[idx]: idx int64 [batch, 1] -> y float32 [batch, 1, width].

    An index outside the table fails the run (only for the call that carries it): a batchable
    model that fails at run time depending on its input.
    """
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "idx"], ["y"], axis=0)],
        "gather",
        [helper.make_tensor_value_info("idx", TensorProto.INT64, ["batch", 1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 1, width])],
        initializer=[numpy_helper.from_array(gather_table(rows, width), "table")],
    )
    return _save(graph, path)


def gather_card(
    directory: Path, name: str = "tiny_gather", *, rows: int = 10, **overrides: Any
) -> Path:
    """A gather model file (``rows`` table rows) and its card; returns the card path."""
    model = gather_model(directory / f"{name}-{rows}.onnx", rows=rows)
    data: dict[str, Any] = {
        "name": name,
        "version": "1.0.0",
        "task": "lookup",
        "file": model.name,
        "sha256": sha256_file(model),
        "inputs": [{"name": "idx", "shape": ["batch", 1], "dtype": "int64"}],
        "outputs": [{"name": "y", "shape": ["batch", 1, 3], "dtype": "float32"}],
        "licence": "Apache-2.0",
        "training_data": "none: a fixed table",
    }
    data.update(overrides)
    return write_card(directory / f"{name}-{rows}.toml", data)
