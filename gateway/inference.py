"""On-device inference: verified onnxruntime sessions built from model cards, and the engine.

:func:`load_model` turns a card (:mod:`models.card`) into a :class:`LoadedModel` only after the
model file hashed to the card's sha256, its signature matched the card's inputs and outputs, and
one warm-up run succeeded. Anything else raises :class:`~gateway.errors.ModelError` naming the
file, so a bad model is refused before it can decide anything.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import hashlib
import time
import zipfile
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import onnxruntime as ort
import structlog
from onnxruntime.capi import onnxruntime_pybind11_state as _ort_state

from gateway.errors import ModelError
from gateway.types import Provenance
from models.card import DTYPES, ModelCard, TensorSpec, load_card

if TYPE_CHECKING:
    from gateway.config import InferenceSection

__all__ = [
    "Comparison",
    "InferenceEngine",
    "InferenceTimeoutError",
    "LoadedModel",
    "compare_outputs",
    "load_model",
]

log = structlog.get_logger(__name__)
_T = TypeVar("_T")

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
        if self.card.batched and len({array.shape[0] for array in feeds.values()}) > 1:
            rows = {name: array.shape[0] for name, array in feeds.items()}
            raise ModelError(f"{self.model_path}: inputs: batch dims differ (got: {rows})")

    def run(self, feeds: Mapping[str, np.ndarray], *, check: bool = True) -> list[np.ndarray]:
        """Run once; outputs in the card's order. Bad feeds or a failed run raise ModelError.

        ``check=False`` skips the feed check (the engine checks each call before batching).
        """
        if check:
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


def read_npz(path: Path, what: str) -> dict[str, np.ndarray]:
    """The named arrays of an .npz; ModelError starting with ``what`` when it cannot be read."""
    try:
        loaded = np.load(path, allow_pickle=False)
        if isinstance(loaded, np.lib.npyio.NpzFile):
            with loaded as npz:
                return {name: np.asarray(npz[name]) for name in npz.files}
    except FileNotFoundError as exc:
        raise ModelError(f"{what}: file not found (got: {path})") from exc
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as exc:
        raise ModelError(f"{what}: not a readable .npz ({exc}) (got: {path})") from exc
    # np.load read a plain .npy array: no input names to feed it by.
    raise ModelError(f"{what}: not a readable .npz (an .npy array, no input names) (got: {path})")


def warmup_feeds(card: ModelCard, card_path: Path) -> dict[str, np.ndarray]:
    """The card's sample input, or zeros with every symbolic dim set to 1."""
    sample = card.sample_path(card_path)
    if sample is None:
        return {
            spec.name: np.zeros(
                [d if isinstance(d, int) else 1 for d in spec.shape], dtype=spec.dtype
            )
            for spec in card.inputs
        }
    return read_npz(sample, f"{card_path}: sample")


def session_options(threads: int) -> ort.SessionOptions:
    """CPU session options for a budget of ``threads`` intra-op threads."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    # onnxruntime's pool threads spin while waiting for work by default: on a shared 2-core
    # gateway that burns the CPU the sources and the uplink need.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    # onnxruntime's own log goes to stderr, outside our structured logs; every error it would
    # print there also reaches us as an exception, which we report with the file name. Fatal only.
    options.log_severity_level = 4
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
    except OSError as exc:
        raise ModelError(
            f"{card_path}: file: cannot read ({exc.strerror or exc}) (got: {model_path})"
        ) from exc
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
    feeds = warmup_feeds(model.card, card_path)
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


# ---------------------------------------------------------------------------------------------
# The engine


class InferenceTimeoutError(ModelError):
    """A call did not finish (queue wait plus run) within the configured timeout."""


# Latency windows: enough calls for a stable p99, small enough to sort on every stats message.
_LATENCY_WINDOW = 1024
# Reasons in stats and logs are cut to this: the stats message has to stay small.
_MAX_REASON = 240


def _short(text: str) -> str:
    return text if len(text) <= _MAX_REASON else text[: _MAX_REASON - 3] + "..."


def _percentiles(window: deque[float]) -> dict[str, float | None]:
    if not window:
        return {"p50": None, "p99": None}
    p50, p99 = np.percentile(np.fromiter(window, dtype=np.float64), [50, 99])
    return {"p50": round(float(p50), 3), "p99": round(float(p99), 3)}


@dataclass(slots=True)
class _Call:
    """One caller's request, waiting for (or in) a run."""

    feeds: Mapping[str, np.ndarray]
    future: asyncio.Future[list[np.ndarray]]
    started: float
    rows: int
    # Calls batch together only when every input agrees on everything but the first dim.
    key: tuple[tuple[int, ...], ...]


@dataclass(frozen=True, slots=True)
class Comparison:
    """How a shadow candidate's outputs differed from the active model's on one run."""

    rows: int
    elements: int
    abs_diff_sum: float
    max_abs_diff: float
    decisions: int
    agreements: int


def compare_outputs(
    active: LoadedModel,
    candidate: LoadedModel,
    active_outputs: Sequence[np.ndarray],
    candidate_outputs: Sequence[np.ndarray],
    rows: int,
) -> Comparison:
    """Differences between two models' outputs for the same inputs (pure; ModelError if unlike).

    A threshold whose key names an output (``[thresholds] y = 0.5``) turns that output into
    decisions (``value >= threshold``); each model uses its own card's threshold when it has one,
    as it would once promoted, so agreement measures what operators would see change.
    """
    elements = 0
    abs_sum = 0.0
    max_abs = 0.0
    decisions = 0
    agreements = 0
    for spec, a, b in zip(active.card.outputs, active_outputs, candidate_outputs, strict=True):
        if a.shape != b.shape:
            raise ModelError(
                f"{candidate.card_path}: outputs.{spec.name} has shape {_shape_text(b.shape)}, "
                f"the active model's {_shape_text(a.shape)}"
            )
        if a.size == 0:
            continue
        diff = np.abs(a.astype(np.float64) - b.astype(np.float64))
        if not np.all(np.isfinite(diff)):
            raise ModelError(
                f"{candidate.card_path}: outputs.{spec.name}: not finite where the active "
                f"model's is, or the other way round"
            )
        elements += diff.size
        abs_sum += float(diff.sum())
        max_abs = max(max_abs, float(diff.max()))
        threshold = active.card.thresholds.get(spec.name)
        if threshold is not None:
            own = candidate.card.thresholds.get(spec.name, threshold)
            decisions += a.size
            agreements += int(np.count_nonzero((a >= threshold) == (b >= own)))
    return Comparison(rows, elements, abs_sum, max_abs, decisions, agreements)


def _identity(model: LoadedModel) -> dict[str, Any]:
    """Which model a stats entry describes."""
    return {
        "version": model.version,
        "sha256": model.sha256,
        "quantization": model.card.quantization,
    }


class _ShadowStats:
    """Running comparison of a candidate with the active model."""

    def __init__(self, model: LoadedModel) -> None:
        self.model = model
        self.runs = 0
        self.rows = 0
        self.elements = 0
        self.abs_diff_sum = 0.0
        self.max_abs_diff = 0.0
        self.decisions = 0
        self.agreements = 0
        self.run_ms: deque[float] = deque(maxlen=_LATENCY_WINDOW)
        self.dropped: str | None = None

    def add(self, comparison: Comparison, run_ms: float) -> None:
        self.runs += 1
        self.rows += comparison.rows
        self.elements += comparison.elements
        self.abs_diff_sum += comparison.abs_diff_sum
        self.max_abs_diff = max(self.max_abs_diff, comparison.max_abs_diff)
        self.decisions += comparison.decisions
        self.agreements += comparison.agreements
        self.run_ms.append(run_ms)

    def summary(self) -> dict[str, Any]:
        return {
            **_identity(self.model),
            "runs": self.runs,
            "rows": self.rows,
            "mean_abs_diff": self.abs_diff_sum / self.elements if self.elements else None,
            "max_abs_diff": self.max_abs_diff if self.elements else None,
            "decision_agreement": self.agreements / self.decisions if self.decisions else None,
            "run_ms": _percentiles(self.run_ms),
            "dropped": self.dropped,
        }


class _Lane:
    """One model name: its active model, optional shadow, queued calls and counters."""

    def __init__(self, model: LoadedModel) -> None:
        self.model = model
        self.shadow: _ShadowStats | None = None
        self.pending: deque[_Call] = deque()
        self.inflight = 0
        self.calls = 0
        self.errors = 0
        self.timeouts = 0
        self.runs = 0
        self.batched_rows = 0
        self.largest_batch = 0
        self.swaps = 0
        self.swap_failures = 0
        self.last_swap_error: str | None = None
        # A candidate dropped after a failure: its figures and reason stay visible in stats.
        self.dropped_shadow: _ShadowStats | None = None
        self.latency_ms: deque[float] = deque(maxlen=_LATENCY_WINDOW)
        self.run_ms: deque[float] = deque(maxlen=_LATENCY_WINDOW)

    def summary(self) -> dict[str, Any]:
        return {
            **_identity(self.model),
            "calls": self.calls,
            "errors": self.errors,
            "timeouts": self.timeouts,
            "queued": len(self.pending),
            "runs": self.runs,
            "batch_size": {
                "mean": round(self.batched_rows / self.runs, 2) if self.runs else None,
                "max": self.largest_batch,
            },
            # latency: from the call to its result (queue wait included); run: one session.run.
            "latency_ms": _percentiles(self.latency_ms),
            "run_ms": _percentiles(self.run_ms),
            "swaps": self.swaps,
            "swap_failures": self.swap_failures,
            "last_swap_error": self.last_swap_error,
            "shadow": None if self.shadow is None else self.shadow.summary(),
        }


@dataclass(frozen=True, slots=True)
class _ShadowOutcome:
    candidate: LoadedModel
    comparison: Comparison | None
    error: str | None
    run_ms: float


@dataclass(frozen=True, slots=True)
class _JobResult:
    # None when the job posted the results itself (before running a shadow).
    results: list[list[np.ndarray] | ModelError] | None
    run_ms: float
    shadow: _ShadowOutcome | None


def _same_signature(old: LoadedModel, new: LoadedModel) -> str | None:
    """Why ``new`` cannot stand in for ``old`` (name, inputs, outputs, processing), or None.

    The processing definition (``preprocess``, ``postprocess``, ``params``) must match too: the
    analyzers read it once, when they start (the water-level feature window and scaling, a
    detector's decoding), and would feed a model with other params what it was not trained on.
    Thresholds may differ; they are read with every result.
    """
    if new.card.name != old.card.name:
        return f"the card is for model {new.card.name!r}, not {old.card.name!r}"
    for kind in ("inputs", "outputs"):
        mine = [spec.model_dump() for spec in getattr(old.card, kind)]
        theirs = [spec.model_dump() for spec in getattr(new.card, kind)]
        if mine != theirs:
            return f"{kind} differ from the active model's ({theirs} vs {mine})"
    for key in ("preprocess", "postprocess", "params"):
        mine, theirs = getattr(old.card, key), getattr(new.card, key)
        if mine != theirs:
            return f"{key} differs from the active model's ({theirs} vs {mine})"
    return None


class InferenceEngine:
    """Runs verified models off the event loop within a thread budget.

    * ``threads // intra_op_threads`` runs go at once (each session may use ``intra_op_threads``
      threads), so inference never takes more than ``threads`` cores from the sources and the
      uplink, however many models are loaded.
    * Every call has a timeout covering its wait and its run.
    * Calls to one model that queue up while its runs are busy are stacked along the batch dim
      into one run (when the card's first dims are symbolic) and split again.
    * ``swap`` replaces a model only once its successor is verified and warmed up; ``set_shadow``
      runs a candidate beside the active model and compares, never answering a caller.

    All state lives on the event loop; worker threads only compute and post results back.
    """

    def __init__(self, cfg: InferenceSection, *, executor: Executor | None = None) -> None:
        self._cfg = cfg
        self._parallel = max(1, cfg.threads // cfg.intra_op_threads)
        self._timeout_s = cfg.timeout_ms / 1000
        self._lanes: dict[str, _Lane] = {}
        self._unavailable: dict[str, str] = {}
        self._given_executor = executor
        self._executor: Executor | None = executor
        self._closed = False
        # Set whenever no run is in progress and nothing is queued (shadow runs included).
        self._idle = asyncio.Event()
        self._idle.set()

    async def __aenter__(self) -> InferenceEngine:
        if self._executor is None:
            # The pool is the thread budget: it never grows past the parallel runs allowed.
            self._executor = ThreadPoolExecutor(
                max_workers=self._parallel, thread_name_prefix="inference"
            )
        self._closed = False
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Fail queued calls, wait for runs in progress, and stop the worker threads."""
        self._closed = True
        for lane in self._lanes.values():
            while lane.pending:
                call = lane.pending.popleft()
                if not call.future.done():
                    call.future.set_exception(ModelError("the inference engine is stopped"))
        executor, self._executor = self._executor, None
        if executor is not None and self._given_executor is None:
            # A running session.run cannot be interrupted; waiting for it is bounded by the
            # model's own run time. Queued jobs are cancelled.
            await asyncio.to_thread(executor.shutdown, wait=True, cancel_futures=True)

    async def wait_idle(self) -> None:
        """Return once no run is in progress or queued, shadow comparisons included."""
        await self._idle.wait()

    # -- models ---------------------------------------------------------------------------

    @property
    def parallel_runs(self) -> int:
        return self._parallel

    def names(self) -> list[str]:
        """The models that are loaded and answer calls."""
        return sorted(self._lanes)

    def available(self, name: str) -> bool:
        return name in self._lanes

    def unavailable(self) -> dict[str, str]:
        """Models (or cards) that failed to load at start, with the reason."""
        return dict(self._unavailable)

    def active(self, name: str) -> LoadedModel:
        """The model that currently answers calls for ``name``; ModelError if there is none."""
        lane = self._lanes.get(name)
        if lane is None:
            raise self._not_loaded(name)
        return lane.model

    def _not_loaded(self, name: str) -> ModelError:
        reason = self._unavailable.get(name)
        if reason is not None:
            return ModelError(f"model {name!r} is unavailable: {reason}")
        known = ", ".join(sorted(self._lanes)) or "none"
        return ModelError(f"model {name!r} is not loaded (loaded: {known})")

    async def _off_loop(self, func: Callable[..., _T], *args: Any) -> _T:
        if self._executor is None or self._closed:
            raise ModelError("the inference engine is not running")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, func, *args)

    def _load_blocking(self, card_path: Path) -> LoadedModel:
        return load_model(card_path, threads=self._cfg.intra_op_threads)

    async def _load_for(self, name: str, lane: _Lane | None, card_path: Path) -> LoadedModel:
        """Load ``card_path`` to stand in for model ``name`` (its lane's model, if any)."""
        model = await self._off_loop(self._load_blocking, card_path)
        if lane is not None:
            problem = _same_signature(lane.model, model)
        elif model.model_id != name:
            problem = f"the card is for model {model.model_id!r}, not {name!r}"
        else:
            problem = None
        if problem is not None:
            raise ModelError(f"{card_path}: {problem}")
        return model

    async def load(self, card_path: Path) -> LoadedModel:
        """Verify, warm up and activate a model under its card's name (ModelError if taken)."""
        model = await self._off_loop(self._load_blocking, card_path)
        name = model.model_id
        if name in self._lanes:
            raise ModelError(
                f"{card_path}: model {name!r} is already loaded from "
                f"{self._lanes[name].model.card_path}; swap it instead"
            )
        self._lanes[name] = _Lane(model)
        self._unavailable.pop(name, None)
        log.info(
            "model_loaded",
            model=name,
            version=model.version,
            sha256=model.sha256,
            quantization=model.card.quantization,
            card=str(card_path),
        )
        return model

    async def load_configured(self) -> dict[str, str]:
        """Load the configured cards and shadows; failures are logged and returned, not raised.

        A model that fails verification is left out (its analyzers report themselves degraded)
        rather than stopping the gateway: the other sensors' warnings must still go out.
        """
        for card in self._cfg.cards:
            path = self._cfg.card_path(card)
            try:
                await self.load(path)
            except ModelError as exc:
                key = _card_name(path) or str(path)
                self._unavailable[key] = _short(str(exc))
                log.error("model_unavailable", model=key, card=str(path), reason=str(exc))
        for name, card in self._cfg.shadow.items():
            # set_shadow logs a refusal; the active model runs on alone.
            with contextlib.suppress(ModelError):
                await self.set_shadow(name, self._cfg.card_path(card))
        return self.unavailable()

    async def swap(self, name: str, card_path: Path) -> LoadedModel:
        """Replace ``name`` with the model of ``card_path`` once that is verified and warm.

        On any failure the active model stays, the failure is counted and logged
        (``model_swap_failed``), and ModelError is raised. A model that failed at start can be
        brought in this way too.
        """
        lane = self._lanes.get(name)
        try:
            new = await self._load_for(name, lane, card_path)
        except ModelError as exc:
            if lane is not None:
                lane.swap_failures += 1
                lane.last_swap_error = _short(str(exc))
            log.error("model_swap_failed", model=name, card=str(card_path), reason=str(exc))
            raise
        if lane is None:
            self._lanes[name] = lane = _Lane(new)
            self._unavailable.pop(name, None)
        old, lane.model = lane.model, new
        lane.swaps += 1
        lane.last_swap_error = None
        # The latency windows describe the model now answering, not its predecessor.
        lane.latency_ms.clear()
        lane.run_ms.clear()
        log.info(
            "model_swapped",
            model=name,
            old_version=old.version,
            old_sha256=old.sha256,
            version=new.version,
            sha256=new.sha256,
            card=str(card_path),
        )
        return new

    async def set_shadow(self, name: str, card_path: Path) -> LoadedModel:
        """Run the candidate of ``card_path`` beside ``name`` on the same inputs, for comparison.

        Its outputs are compared (stats ``shadow``) and never returned to a caller. A candidate
        that fails to load is refused (ModelError); one that fails later is dropped, logged.
        """
        lane = self._lanes.get(name)
        try:
            if lane is None:
                raise self._not_loaded(name)
            candidate = await self._load_for(name, lane, card_path)
        except ModelError as exc:
            log.error("model_shadow_refused", model=name, card=str(card_path), reason=str(exc))
            raise
        lane.shadow = _ShadowStats(candidate)
        lane.dropped_shadow = None
        log.info(
            "model_shadow_started",
            model=name,
            version=candidate.version,
            sha256=candidate.sha256,
            card=str(card_path),
        )
        return candidate

    def clear_shadow(self, name: str) -> None:
        """Stop comparing ``name`` with its candidate (its stats go with it)."""
        lane = self._lanes.get(name)
        if lane is None:
            return
        if lane.shadow is not None:
            log.info("model_shadow_stopped", model=name, version=lane.shadow.model.version)
        lane.shadow = None
        lane.dropped_shadow = None

    # -- calls ----------------------------------------------------------------------------

    async def run(self, name: str, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        """Run model ``name`` on ``feeds`` off the loop; outputs in the card's order.

        Raises ModelError for bad feeds, a failed run, or an unknown model, and
        InferenceTimeoutError when the call took longer than ``timeout_ms``.
        """
        lane = self._lanes.get(name)
        if lane is None:
            raise self._not_loaded(name)
        if self._closed or self._executor is None:
            raise ModelError("the inference engine is not running")
        lane.calls += 1
        try:
            lane.model.check_feeds(feeds)
        except ModelError:
            lane.errors += 1
            raise
        first = next(iter(feeds.values()))
        call = _Call(
            feeds=feeds,
            future=asyncio.get_running_loop().create_future(),
            started=time.perf_counter(),
            rows=first.shape[0] if lane.model.batched else 1,
            key=tuple(array.shape[1:] for array in feeds.values()),
        )
        lane.pending.append(call)
        self._pump(lane)
        try:
            async with asyncio.timeout(self._timeout_s):
                return await call.future
        except TimeoutError:
            lane.timeouts += 1
            log.warning("inference_timeout", model=name, timeout_ms=self._cfg.timeout_ms)
            # The run may still be going on in its thread: a thread cannot be killed, and its
            # result is dropped when it comes. The thread budget bounds what a slow model costs.
            raise InferenceTimeoutError(
                f"model {name!r}: no result within {self._cfg.timeout_ms:g} ms "
                f"(queued: {len(lane.pending)}, runs in progress: {lane.inflight})"
            ) from None

    def _take(self, lane: _Lane) -> list[_Call]:
        """The next run's calls: the oldest live call, plus those it can be stacked with."""
        while lane.pending and lane.pending[0].future.done():
            lane.pending.popleft()  # timed out or cancelled while queued
        if not lane.pending:
            return []
        first = lane.pending.popleft()
        taken = [first]
        if not lane.model.batched or self._cfg.max_batch <= 1:
            return taken
        rows = first.rows
        kept: deque[_Call] = deque()
        while lane.pending:
            call = lane.pending.popleft()
            if call.future.done():
                continue
            if call.key == first.key and rows + call.rows <= self._cfg.max_batch:
                taken.append(call)
                rows += call.rows
            else:
                kept.append(call)
        lane.pending = kept
        return taken

    def _pump(self, lane: _Lane) -> None:
        """Start runs while this model has fewer than the allowed number in progress."""
        loop = asyncio.get_running_loop()
        while lane.inflight < self._parallel and self._executor is not None:
            calls = self._take(lane)
            if not calls:
                return
            lane.inflight += 1
            self._idle.clear()
            model = lane.model
            shadow = lane.shadow.model if lane.shadow is not None else None
            job = self._executor.submit(self._job, loop, lane, model, shadow, calls)
            job.add_done_callback(functools.partial(self._post_done, loop, lane, calls))

    def _post_done(
        self,
        loop: asyncio.AbstractEventLoop,
        lane: _Lane,
        calls: list[_Call],
        job: concurrent.futures.Future[_JobResult],
    ) -> None:
        """In the worker thread (or the loop's, for a cancelled job): hand the job to the loop."""
        if not loop.is_closed():
            loop.call_soon_threadsafe(self._job_done, lane, calls, job)

    def _job(
        self,
        loop: asyncio.AbstractEventLoop,
        lane: _Lane,
        model: LoadedModel,
        shadow: LoadedModel | None,
        calls: list[_Call],
    ) -> _JobResult:
        """In a worker thread: one (batched) run, then the shadow's run on the same inputs.

        Without a shadow, the results reach the loop with the job's completion (one wake-up of
        the loop per run); with one, they are posted before the candidate runs.
        """
        started = time.perf_counter()
        results: list[list[np.ndarray] | ModelError]
        outputs: list[np.ndarray] | None = None
        feeds: Mapping[str, np.ndarray]
        if len(calls) == 1:
            feeds = calls[0].feeds
            try:
                outputs = model.run(feeds, check=False)
                results = [outputs]
            except ModelError as exc:
                results = [exc]
        else:
            names = [spec.name for spec in model.card.inputs]
            feeds = {n: np.concatenate([call.feeds[n] for call in calls]) for n in names}
            try:
                outputs = model.run(feeds, check=False)
                results = list(_split(outputs, [call.rows for call in calls], model))
            except ModelError:
                # One caller's input can fail a whole batch: run each alone so only it fails.
                outputs = None
                results = []
                for call in calls:
                    try:
                        results.append(model.run(call.feeds, check=False))
                    except ModelError as exc:
                        results.append(exc)
        run_ms = (time.perf_counter() - started) * 1000
        if shadow is None or outputs is None:
            return _JobResult(results, run_ms, None)
        # The callers get their results first: the candidate never delays them.
        loop.call_soon_threadsafe(self._deliver, lane, calls, results, run_ms)
        started = time.perf_counter()
        rows = sum(call.rows for call in calls)
        try:
            candidate_outputs = shadow.run(feeds, check=False)
            comparison = compare_outputs(model, shadow, outputs, candidate_outputs, rows)
        except ModelError as exc:
            return _JobResult(None, run_ms, _ShadowOutcome(shadow, None, str(exc), 0.0))
        shadow_ms = (time.perf_counter() - started) * 1000
        return _JobResult(None, run_ms, _ShadowOutcome(shadow, comparison, None, shadow_ms))

    def _deliver(
        self,
        lane: _Lane,
        calls: list[_Call],
        results: list[list[np.ndarray] | ModelError],
        run_ms: float,
    ) -> None:
        now = time.perf_counter()
        lane.runs += 1
        rows = sum(call.rows for call in calls)
        lane.batched_rows += rows
        lane.largest_batch = max(lane.largest_batch, rows)
        lane.run_ms.append(run_ms)
        for call, result in zip(calls, results, strict=True):
            if isinstance(result, ModelError):
                lane.errors += 1
                if not call.future.done():
                    call.future.set_exception(result)
            elif not call.future.done():
                call.future.set_result(result)
                lane.latency_ms.append((now - call.started) * 1000)

    def _job_done(
        self, lane: _Lane, calls: list[_Call], job: concurrent.futures.Future[_JobResult]
    ) -> None:
        lane.inflight -= 1
        if job.cancelled():
            # Cancelled before it started (the engine is stopping).
            for call in calls:
                if not call.future.done():
                    call.future.set_exception(ModelError("the inference engine is stopped"))
        elif (error := job.exception()) is not None:
            # A bug, not a model failure: hand it to the callers so it surfaces in their task.
            for call in calls:
                if not call.future.done():
                    call.future.set_exception(error)
        else:
            result = job.result()
            if result.results is not None:
                self._deliver(lane, calls, result.results, result.run_ms)
            if result.shadow is not None:
                self._record_shadow(lane, result.shadow)
        if not self._closed:
            self._pump(lane)
        if all(not other.inflight for other in self._lanes.values()):
            self._idle.set()

    def _record_shadow(self, lane: _Lane, outcome: _ShadowOutcome) -> None:
        shadow = lane.shadow
        if shadow is None or shadow.model is not outcome.candidate:
            return  # replaced or cleared while this run was in progress
        if outcome.comparison is not None:
            shadow.add(outcome.comparison, outcome.run_ms)
            return
        reason = _short(outcome.error or "unknown")
        shadow.dropped = reason
        log.error(
            "model_shadow_dropped",
            model=lane.model.model_id,
            version=shadow.model.version,
            reason=reason,
        )
        # Keep the figures gathered so far visible (with the reason) but stop running it.
        lane.shadow = None
        lane.dropped_shadow = shadow

    # -- stats ----------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """The engine's part of the stats message."""
        models = {}
        for name, lane in sorted(self._lanes.items()):
            summary = lane.summary()
            if summary["shadow"] is None and lane.dropped_shadow is not None:
                summary["shadow"] = lane.dropped_shadow.summary()
            models[name] = summary
        return {
            "threads": self._cfg.threads,
            "parallel_runs": self._parallel,
            "intra_op_threads": self._cfg.intra_op_threads,
            "timeout_ms": self._cfg.timeout_ms,
            "models": models,
            "unavailable": dict(sorted(self._unavailable.items())),
        }


def _split(
    outputs: Sequence[np.ndarray], rows: Sequence[int], model: LoadedModel
) -> list[list[np.ndarray]]:
    """Cut a batched run's outputs back into one list per call."""
    total = sum(rows)
    for spec, out in zip(model.card.outputs, outputs, strict=True):
        if out.ndim == 0 or out.shape[0] != total:
            raise ModelError(
                f"{model.model_path}: outputs.{spec.name}: first dim {out.shape[:1]} is not the "
                f"batch of {total}"
            )
    bounds = np.cumsum(rows)[:-1]
    per_output = [np.split(out, bounds) for out in outputs]
    return [list(parts) for parts in zip(*per_output, strict=True)]


def _card_name(path: Path) -> str | None:
    try:
        return load_card(path).name
    except ModelError:
        return None
