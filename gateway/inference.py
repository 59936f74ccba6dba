"""On-device inference: verified onnxruntime sessions built from model cards, and the engine.

:func:`load_model` turns a card (:mod:`models.card`) into a :class:`LoadedModel` only after the
model file hashed to the card's sha256, its signature matched the card's inputs and outputs, and
one warm-up run succeeded. Anything else raises :class:`~gateway.errors.ModelError` naming the
file, so a bad model is refused before it can decide anything.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from onnxruntime.capi import onnxruntime_pybind11_state as _ort_state

from gateway.errors import ModelError
from gateway.types import Provenance
from models.card import DTYPES, ModelCard, TensorSpec, load_card

__all__ = ["LoadedModel", "load_model"]

# What onnxruntime raises for a model it cannot load or run. Its exception classes derive from
# Exception directly; pybind11 maps argument mix-ups to ValueError/RuntimeError/TypeError.
ORT_ERRORS: tuple[type[Exception], ...] = (
    _ort_state.Fail,
    _ort_state.InvalidArgument,
    _ort_state.InvalidGraph,
    _ort_state.InvalidProtobuf,
    _ort_state.NoSuchFile,
    _ort_state.NoModel,
    _ort_state.NotImplemented,
    _ort_state.RuntimeException,
    _ort_state.EPFail,
    ValueError,
    RuntimeError,
    TypeError,
)


def _shape_text(shape: Sequence[object]) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


class LoadedModel:
    """A verified, warmed-up model: its card, digest and onnxruntime session.

    ``run`` is synchronous and may be called from any worker thread (onnxruntime sessions are
    safe for concurrent ``run`` calls).
    """

    def __init__(
        self,
        card: ModelCard,
        *,
        card_path: Path,
        model_path: Path,
        sha256: str,
        session: ort.InferenceSession,
        threads: int,
    ) -> None:
        self.card = card
        self.card_path = card_path
        self.model_path = model_path
        self.sha256 = sha256
        self.threads = threads
        self._session = session
        self._output_names = [spec.name for spec in card.outputs]
        self._inputs = {spec.name: spec for spec in card.inputs}

    @property
    def model_id(self) -> str:
        return self.card.name

    @property
    def version(self) -> str:
        return self.card.version

    @property
    def batched(self) -> bool:
        """Whether several calls can be stacked along the first dim of every input and output."""
        return self.card.batched

    def check_feeds(self, feeds: Mapping[str, np.ndarray]) -> None:
        """Raise ModelError unless ``feeds`` match the card's inputs (names, dtypes, shapes)."""
        if feeds.keys() != self._inputs.keys():
            raise ModelError(
                f"{self.model_path}: inputs: expected {sorted(self._inputs)} (got: {sorted(feeds)})"
            )
        for name, array in feeds.items():
            spec = self._inputs[name]
            if not isinstance(array, np.ndarray):
                raise ModelError(
                    f"{self.model_path}: inputs.{name}: not a numpy array "
                    f"(got: {type(array).__name__})"
                )
            if array.dtype != np.dtype(spec.dtype):
                raise ModelError(
                    f"{self.model_path}: inputs.{name}: dtype must be {spec.dtype} "
                    f"(got: {array.dtype})"
                )
            if not _shape_fits(spec, array.shape):
                raise ModelError(
                    f"{self.model_path}: inputs.{name}: shape must be {_shape_text(spec.shape)} "
                    f"(got: {_shape_text(array.shape)})"
                )

    def run(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        """Run once; outputs in the card's order. Bad feeds or a failed run raise ModelError."""
        self.check_feeds(feeds)
        try:
            outputs = self._session.run(self._output_names, dict(feeds))
        except ORT_ERRORS as exc:
            raise ModelError(f"{self.model_path}: run failed: {_first_line(exc)}") from exc
        return [np.asarray(out) for out in outputs]

    def provenance(self, score: float, threshold: float) -> Provenance:
        """Which model decided, for an AI-derived event."""
        return Provenance(
            model_id=self.card.name,
            version=self.card.version,
            sha256=self.sha256,
            score=float(score),
            threshold=float(threshold),
        )

    def __repr__(self) -> str:
        return f"LoadedModel({self.card.name} {self.card.version} {self.sha256[:12]})"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    line = text[0] if text else type(exc).__name__
    return line if len(line) <= 300 else line[:297] + "..."


def _shape_fits(spec: TensorSpec, shape: Sequence[int]) -> bool:
    if len(shape) != len(spec.shape):
        return False
    return all(
        isinstance(want, str) or want == got for want, got in zip(spec.shape, shape, strict=True)
    )


def _check_signature(
    where: str, kind: str, specs: Sequence[TensorSpec], nodes: Sequence[Any]
) -> list[str]:
    """Differences between the card's tensors and the session's (names, dtypes, ranks, dims)."""
    problems: list[str] = []
    by_name = {node.name: node for node in nodes}
    card_names = [spec.name for spec in specs]
    if set(card_names) != set(by_name):
        problems.append(
            f"{where}: {kind}: the model has {sorted(by_name)} (card: {sorted(card_names)})"
        )
    for spec in specs:
        node = by_name.get(spec.name)
        if node is None:
            continue
        key = f"{where}: {kind}.{spec.name}"
        if node.type != DTYPES[spec.dtype]:
            problems.append(f"{key}: dtype is {node.type} in the model (card: {spec.dtype})")
        model_shape = list(node.shape)
        if len(model_shape) != len(spec.shape):
            problems.append(
                f"{key}: rank {len(model_shape)} in the model {_shape_text(model_shape)} "
                f"(card: {_shape_text(spec.shape)})"
            )
            continue
        for index, (want, have) in enumerate(zip(spec.shape, model_shape, strict=True)):
            if isinstance(have, int) and isinstance(want, str):
                # The card promises a free dim (e.g. batching) that the model does not have.
                problems.append(
                    f"{key}: dim {index} is fixed at {have} in the model (card: symbolic {want!r})"
                )
            elif isinstance(have, int) and isinstance(want, int) and have != want:
                problems.append(f"{key}: dim {index} is {have} in the model (card: {want})")
            # A symbolic model dim with a fixed card dim is fine: the card is stricter.
    return problems


def _warmup_feeds(card: ModelCard, card_path: Path) -> dict[str, np.ndarray]:
    """The card's sample input, or zeros with every symbolic dim set to 1."""
    sample = card.sample_path(card_path)
    if sample is None:
        return {
            spec.name: np.zeros(
                [d if isinstance(d, int) else 1 for d in spec.shape], dtype=spec.dtype
            )
            for spec in card.inputs
        }
    try:
        with np.load(sample, allow_pickle=False) as npz:
            return {name: np.asarray(npz[name]) for name in npz.files}
    except FileNotFoundError as exc:
        raise ModelError(f"{card_path}: sample: file not found (got: {sample})") from exc
    except (OSError, ValueError, KeyError) as exc:
        raise ModelError(
            f"{card_path}: sample: not a readable .npz ({exc}) (got: {sample})"
        ) from exc


def session_options(threads: int) -> ort.SessionOptions:
    """CPU session options for a budget of ``threads`` intra-op threads."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    # onnxruntime's pool threads spin while waiting for work by default: on a shared 2-core
    # gateway that burns the CPU the sources and the uplink need.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    # Warnings (e.g. about unused initializers) go to stderr outside structured logs; errors
    # still raise and are reported by us with the file name.
    options.log_severity_level = 3
    return options


def load_model(card_path: Path, *, threads: int = 1) -> LoadedModel:
    """Read a card, verify its model file and signature, and warm the session up.

    Blocking (reads and hashes the file, builds the session, runs once): call it off the event
    loop. Any problem raises ModelError naming the card or model file.
    """
    if threads < 1:
        raise ValueError(f"threads must be at least 1 (got: {threads})")
    card = load_card(card_path)
    model_path = card.model_path(card_path)
    try:
        # Hash and load the same bytes: a file replaced between the two cannot slip through.
        blob = model_path.read_bytes()
    except FileNotFoundError as exc:
        raise ModelError(f"{card_path}: file: model file not found (got: {model_path})") from exc
    except IsADirectoryError as exc:
        raise ModelError(f"{card_path}: file: is a directory (got: {model_path})") from exc
    except PermissionError as exc:
        raise ModelError(f"{card_path}: file: permission denied (got: {model_path})") from exc
    digest = hashlib.sha256(blob).hexdigest()
    if digest != card.sha256:
        raise ModelError(
            f"{card_path}: sha256: {model_path} hashes to {digest}, the card says {card.sha256}; "
            f"refusing the model"
        )
    try:
        session = ort.InferenceSession(
            blob, sess_options=session_options(threads), providers=["CPUExecutionProvider"]
        )
    except ORT_ERRORS as exc:
        raise ModelError(
            f"{card_path}: file: {model_path} is not a loadable ONNX model: {_first_line(exc)}"
        ) from exc
    where = str(card_path)
    problems = _check_signature(where, "inputs", card.inputs, session.get_inputs())
    problems += _check_signature(where, "outputs", card.outputs, session.get_outputs())
    if problems:
        raise ModelError("; ".join(problems))
    model = LoadedModel(
        card,
        card_path=card_path,
        model_path=model_path,
        sha256=digest,
        session=session,
        threads=threads,
    )
    warm_up(model)
    return model


def warm_up(model: LoadedModel) -> None:
    """One run with the card's sample (or zeros); the outputs must match the card's outputs."""
    card_path = model.card_path
    feeds = _warmup_feeds(model.card, card_path)
    try:
        outputs = model.run(feeds)
    except ModelError as exc:
        raise ModelError(f"{card_path}: warm-up failed: {exc}") from exc
    for spec, out in zip(model.card.outputs, outputs, strict=True):
        if out.dtype != np.dtype(spec.dtype) or not _shape_fits(spec, out.shape):
            raise ModelError(
                f"{card_path}: warm-up: outputs.{spec.name} is {out.dtype} "
                f"{_shape_text(out.shape)} (card: {spec.dtype} {_shape_text(spec.shape)})"
            )
