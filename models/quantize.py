"""fp32 → int8 with onnxruntime's quantisation tools.

``static``: QDQ format (QuantizeLinear/DequantizeLinear pairs around int8 operators), weights per
channel, activation ranges from a calibration set (MinMax). This is the format onnxruntime's CPU
provider fuses into int8 kernels, and what the reference models ship as.
``dynamic``: int8 weights, activation ranges computed at run time; no calibration set needed. It
fits MatMul/Gemm-heavy models (MLPs, recurrent cells) whose activations vary a lot between inputs.

No logging, no asyncio; writes only the output file (and a temporary pre-processed copy).
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import onnx
from google.protobuf.message import DecodeError
from onnxruntime.capi import onnxruntime_pybind11_state as _ort_state
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quant_pre_process,
    quantize_dynamic,
    quantize_static,
)

from gateway.errors import ModelError

__all__ = ["Method", "quantize_model"]

Method = Literal["static", "dynamic"]

# Errors onnxruntime's tools raise for a model or calibration data they cannot handle.
_TOOL_ERRORS: tuple[type[Exception], ...] = (
    _ort_state.Fail,
    _ort_state.InvalidArgument,
    _ort_state.InvalidGraph,
    _ort_state.InvalidProtobuf,
    _ort_state.RuntimeException,
    ValueError,
    RuntimeError,
    KeyError,
    TypeError,
    AssertionError,  # onnxruntime.quantization checks its preconditions with assert
    OSError,
)


class _Feeds(CalibrationDataReader):  # type: ignore[misc]  # onnxruntime ships no type hints
    """Hands the calibration input sets to onnxruntime one at a time."""

    def __init__(self, feeds: Iterable[dict[str, np.ndarray]]) -> None:
        self._iter: Iterator[dict[str, np.ndarray]] = iter(feeds)
        self.count = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        item = next(self._iter, None)
        if item is not None:
            self.count += 1
        return item


def quantize_model(
    fp32: Path,
    out: Path,
    *,
    calibration: Iterable[dict[str, np.ndarray]] | None,
    method: Method,
    exclude_nodes: Sequence[str] = (),
) -> None:
    """Write an int8 version of ``fp32`` to ``out``; ModelError (naming the file) on failure.

    ``calibration`` (required for ``static``) yields input sets as the model takes them, drawn
    from the training portion of the data, never from the evaluation portion.
    ``exclude_nodes`` names nodes left in fp32 (mixed precision, for parts of a graph that one
    per-tensor int8 scale cannot represent).
    """
    if method not in ("static", "dynamic"):
        raise ModelError(f"{fp32}: method must be static or dynamic (got: {method!r})")
    if method == "static" and calibration is None:
        raise ModelError(f"{fp32}: static quantisation needs a calibration set")
    if not fp32.is_file():
        raise ModelError(f"{fp32}: model file not found")
    try:
        onnx.checker.check_model(onnx.load(str(fp32)))
    except (DecodeError, onnx.checker.ValidationError, OSError) as exc:
        raise ModelError(f"{fp32}: not a valid ONNX model: {exc}") from exc
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="edge-gateway-quant-") as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        try:
            # Shape inference and graph clean-up first, as onnxruntime recommends: without
            # them some operators are left in fp32. Symbolic shape inference (for dynamic
            # shapes in transformer graphs) needs sympy, which our small models do not justify.
            quant_pre_process(str(fp32), str(prepared), skip_symbolic_shape=True)
        except _TOOL_ERRORS as exc:
            raise ModelError(f"{fp32}: pre-processing for quantisation failed: {exc}") from exc
        try:
            if method == "dynamic":
                quantize_dynamic(
                    prepared,
                    out,
                    per_channel=True,
                    weight_type=QuantType.QInt8,
                    nodes_to_exclude=list(exclude_nodes),
                )
            else:
                assert calibration is not None
                reader = _Feeds(calibration)
                quantize_static(
                    prepared,
                    out,
                    reader,
                    quant_format=QuantFormat.QDQ,
                    per_channel=True,
                    # Signed int8 for both (S8S8): onnxruntime's recommended first choice for
                    # QDQ on x86-64 and ARM64; U8S8 can saturate on CPUs without VNNI.
                    activation_type=QuantType.QInt8,
                    weight_type=QuantType.QInt8,
                    calibrate_method=CalibrationMethod.MinMax,
                    nodes_to_exclude=list(exclude_nodes),
                )
                if reader.count == 0:
                    out.unlink(missing_ok=True)
                    raise ModelError(f"{fp32}: the calibration set is empty")
        except _TOOL_ERRORS as exc:
            out.unlink(missing_ok=True)
            raise ModelError(f"{fp32}: {method} quantisation failed: {exc}") from exc
