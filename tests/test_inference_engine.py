"""InferenceEngine on real onnxruntime sessions: batching, timeouts, hot swap, shadow mode, stats.

Where a test needs the worker busy (timeouts, queued calls), it hands the engine its own
one-thread executor and parks a blocker on it: the calls then wait in the queue until the test
opens the gate, so nothing depends on how fast this machine runs a model.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from structlog.testing import capture_logs

from gateway.config import InferenceSection
from gateway.errors import ModelError
from gateway.inference import InferenceEngine, InferenceTimeoutError, load_model
from tests.support.tiny_models import (
    gather_card,
    gather_table,
    linear_card,
    linear_card_data,
    linear_model,
    linear_weights,
    write_card,
)

SHIPPED_CARD = Path(__file__).resolve().parents[1] / "models" / "water_level" / "forecaster.toml"


class Gate:
    """A one-thread executor whose thread the test can hold busy."""

    def __init__(self) -> None:
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="test-inference")
        self._event: threading.Event | None = None

    def close(self) -> None:
        """Park a blocker on the only thread: jobs submitted from now on wait behind it."""
        self._event = threading.Event()
        self.pool.submit(self._event.wait)

    def open(self) -> None:
        if self._event is not None:
            self._event.set()


@pytest.fixture
def gate() -> Iterator[Gate]:
    g = Gate()
    yield g
    g.open()
    g.pool.shutdown(wait=True)


def _cfg(**kwargs: Any) -> InferenceSection:
    return InferenceSection(**kwargs)


@pytest.fixture
async def engine(tmp_path: Path) -> AsyncIterator[InferenceEngine]:
    async with InferenceEngine(_cfg(threads=2, max_batch=8)) as eng:
        await eng.load(linear_card(tmp_path))
        yield eng


def _x(rows: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(rows, 4)).astype(np.float32)


def _expected(x: np.ndarray, seed: int = 0) -> np.ndarray:
    weight, bias = linear_weights(seed=seed)
    return x @ weight + bias


async def _let_calls_queue() -> None:
    # Each created task runs up to its first real await in the next loop iteration.
    await asyncio.sleep(0)


async def _run_queued(
    eng: InferenceEngine, gate: Gate, name: str, feeds: list[dict[str, np.ndarray]]
) -> list[Any]:
    """One call per feeds, made while the worker is held so they queue; then released.

    Results in call order; a failed call's exception takes its place.
    """
    gate.close()
    tasks = [asyncio.create_task(eng.run(name, f)) for f in feeds]
    await _let_calls_queue()
    gate.open()
    results: list[Any] = await asyncio.gather(*tasks, return_exceptions=True)
    return results


async def test_run_returns_the_models_outputs(engine: InferenceEngine) -> None:
    x = _x(3, 1)
    (y,) = await engine.run("tiny_linear", {"x": x})
    np.testing.assert_allclose(y, _expected(x), rtol=1e-5)
    stats = engine.stats()["models"]["tiny_linear"]
    assert stats["calls"] == 1
    assert stats["runs"] == 1
    assert stats["errors"] == 0
    assert stats["latency_ms"]["p50"] is not None
    assert stats["sha256"] == engine.active("tiny_linear").sha256


async def test_budget_splits_threads_between_parallel_runs() -> None:
    assert InferenceEngine(_cfg(threads=4, intra_op_threads=2)).parallel_runs == 2
    assert InferenceEngine(_cfg(threads=3, intra_op_threads=2)).parallel_runs == 1
    with pytest.raises(ValueError, match="intra_op_threads"):
        _cfg(threads=1, intra_op_threads=2)


async def test_queued_calls_are_batched_and_results_equal_single_runs(
    tmp_path: Path, gate: Gate
) -> None:
    card = linear_card(tmp_path)
    single = load_model(card)
    async with InferenceEngine(_cfg(threads=1, max_batch=64), executor=gate.pool) as eng:
        await eng.load(card)
        gate.close()
        inputs = [_x(rows, seed) for seed, rows in enumerate([1, 3, 1, 2, 1, 1, 4, 1])]
        tasks = [asyncio.create_task(eng.run("tiny_linear", {"x": x})) for x in inputs]
        await _let_calls_queue()
        # The first call went to the (blocked) worker; the others wait for it to finish.
        assert eng.stats()["models"]["tiny_linear"]["queued"] == len(inputs) - 1
        gate.open()
        results = await asyncio.gather(*tasks)
    for x, (y,) in zip(inputs, results, strict=True):
        (alone,) = single.run({"x": x})
        assert y.shape == alone.shape
        np.testing.assert_allclose(y, alone, rtol=1e-6, atol=1e-6)
    stats = eng.stats()["models"]["tiny_linear"]
    assert stats["runs"] == 2
    assert stats["batch_size"]["max"] == sum(x.shape[0] for x in inputs[1:])
    assert stats["calls"] == len(inputs)


async def test_batch_respects_max_batch_rows(tmp_path: Path, gate: Gate) -> None:
    card = linear_card(tmp_path)
    async with InferenceEngine(_cfg(threads=1, max_batch=3), executor=gate.pool) as eng:
        await eng.load(card)
        inputs = [_x(2, seed) for seed in range(5)]
        results = await _run_queued(eng, gate, "tiny_linear", [{"x": x} for x in inputs])
    for x, (y,) in zip(inputs, results, strict=True):
        np.testing.assert_allclose(y, _expected(x), rtol=1e-5)
    stats = eng.stats()["models"]["tiny_linear"]
    # 2 rows per call and at most 3 rows per run: no two calls fit together.
    assert stats["runs"] == 5
    assert stats["batch_size"]["max"] == 2


async def test_model_without_batch_dim_runs_each_call_alone(tmp_path: Path, gate: Gate) -> None:
    card = linear_card(tmp_path, batch=1)
    async with InferenceEngine(_cfg(threads=1), executor=gate.pool) as eng:
        await eng.load(card)
        inputs = [_x(1, seed) for seed in range(4)]
        results = await _run_queued(eng, gate, "tiny_linear", [{"x": x} for x in inputs])
    for x, (y,) in zip(inputs, results, strict=True):
        np.testing.assert_allclose(y, _expected(x), rtol=1e-5)
    assert eng.stats()["models"]["tiny_linear"]["runs"] == 4


async def test_one_bad_input_fails_only_its_own_call_in_a_batch(tmp_path: Path, gate: Gate) -> None:
    async with InferenceEngine(_cfg(threads=1), executor=gate.pool) as eng:
        await eng.load(gather_card(tmp_path))
        indices = [1, 2, 99, 3, 4]  # 99 is outside the table
        feeds = [{"idx": np.array([[i]], np.int64)} for i in indices]
        results = await _run_queued(eng, gate, "tiny_gather", feeds)
        table = gather_table()
        for index, result in zip(indices, results, strict=True):
            if index == 99:
                assert isinstance(result, ModelError)
                assert "run failed" in str(result)
                assert "tiny_gather-10.onnx" in str(result)
            else:
                assert not isinstance(result, BaseException)
                np.testing.assert_array_equal(result[0], table[[[index]]])
        stats = eng.stats()["models"]["tiny_gather"]
        assert stats["errors"] == 1
        # The engine goes on answering.
        (y,) = await eng.run("tiny_gather", {"idx": np.array([[5]], np.int64)})
        np.testing.assert_array_equal(y, table[[[5]]])


async def test_bad_feeds_fail_at_once_and_are_counted(engine: InferenceEngine) -> None:
    with pytest.raises(ModelError, match=r"inputs\.x: dtype must be float32"):
        await engine.run("tiny_linear", {"x": np.zeros((1, 4))})
    with pytest.raises(ModelError, match=r"inputs\.x: shape must be \[batch, 4\]"):
        await engine.run("tiny_linear", {"x": np.zeros((1, 5), np.float32)})
    stats = engine.stats()["models"]["tiny_linear"]
    assert stats["errors"] == 2
    assert stats["runs"] == 0


async def test_unknown_model_names_the_loaded_ones(engine: InferenceEngine) -> None:
    with pytest.raises(ModelError, match=r"model 'nope' is not loaded \(loaded: tiny_linear\)"):
        await engine.run("nope", {"x": _x(1, 0)})
    with pytest.raises(ModelError, match="not loaded"):
        engine.active("nope")


async def test_timeout_is_counted_and_the_late_result_dropped(tmp_path: Path, gate: Gate) -> None:
    card = linear_card(tmp_path)
    async with InferenceEngine(_cfg(threads=1, timeout_ms=20), executor=gate.pool) as eng:
        await eng.load(card)
        gate.close()
        with capture_logs() as logs:
            first = asyncio.create_task(eng.run("tiny_linear", {"x": _x(1, 0)}))
            second = asyncio.create_task(eng.run("tiny_linear", {"x": _x(1, 1)}))
            for task in (first, second):
                with pytest.raises(InferenceTimeoutError, match=r"no result within 20 ms"):
                    await task
        assert [e["event"] for e in logs] == ["inference_timeout", "inference_timeout"]
        stats = eng.stats()["models"]["tiny_linear"]
        assert stats["timeouts"] == 2
        gate.open()
        await eng.wait_idle()
        # The first call's run finished in its thread and was dropped; the second never ran.
        stats = eng.stats()["models"]["tiny_linear"]
        assert stats["runs"] == 1
        assert stats["queued"] == 0
        x = _x(2, 3)
        (y,) = await eng.run("tiny_linear", {"x": x})
        np.testing.assert_allclose(y, _expected(x), rtol=1e-5)


async def _swap_fails(eng: InferenceEngine, card: Path, expected: str) -> list[dict[str, Any]]:
    with capture_logs() as logs, pytest.raises(ModelError, match=expected):
        await eng.swap("tiny_linear", card)
    return logs


async def test_hot_swap_replaces_the_model(tmp_path: Path) -> None:
    old_card = linear_card(tmp_path / "v1")
    model = linear_model(tmp_path / "v2" / "tiny_linear.onnx", seed=1)
    new_card = write_card(tmp_path / "v2" / "c.toml", linear_card_data(model, version="2.0.0"))
    async with InferenceEngine(_cfg()) as eng:
        old = await eng.load(old_card)
        with capture_logs() as logs:
            new = await eng.swap("tiny_linear", new_card)
        assert eng.active("tiny_linear") is new
        assert logs[0]["event"] == "model_swapped"
        assert logs[0]["old_sha256"] == old.sha256
        assert logs[0]["sha256"] == new.sha256
        x = _x(2, 5)
        (y,) = await eng.run("tiny_linear", {"x": x})
        np.testing.assert_allclose(y, _expected(x, seed=1), rtol=1e-5)
        stats = eng.stats()["models"]["tiny_linear"]
        assert stats["version"] == "2.0.0"
        assert stats["swaps"] == 1


@pytest.mark.parametrize(
    "problem", ["corrupt", "wrong_sha", "warmup", "signature", "name", "params", "preprocess"]
)
async def test_failed_swap_keeps_the_active_model(tmp_path: Path, problem: str) -> None:
    old_card = linear_card(tmp_path / "v1")
    new_dir = tmp_path / "v2"
    model = linear_model(new_dir / "m.onnx", seed=1)
    data = linear_card_data(model, version="2.0.0")
    if problem == "corrupt":
        model.write_bytes(model.read_bytes()[:64])
        data = linear_card_data(model, version="2.0.0")
        expected = "not a loadable ONNX model"
    elif problem == "wrong_sha":
        data["sha256"] = "f" * 64
        expected = "sha256: .* hashes to"
    elif problem == "warmup":
        np.savez(new_dir / "sample.npz", x=np.zeros((1, 5), np.float32))
        data["sample"] = "sample.npz"
        expected = "warm-up failed"
    elif problem == "signature":
        data["outputs"] = [{"name": "y", "shape": ["n", 2], "dtype": "float32"}]
        expected = "outputs differ from the active model's"
    elif problem == "params":
        # Analyzers read the processing definition once; a model with other params would be
        # fed features it was not trained on.
        data["params"] = {"window": 32}
        expected = "params differs from the active model's"
    elif problem == "preprocess":
        data["preprocess"] = "another_kind"
        expected = "preprocess differs from the active model's"
    else:
        data["name"] = "other_model"
        expected = "the card is for model 'other_model', not 'tiny_linear'"
    new_card = write_card(new_dir / "c.toml", data)
    async with InferenceEngine(_cfg()) as eng:
        old = await eng.load(old_card)
        logs = await _swap_fails(eng, new_card, expected)
        assert eng.active("tiny_linear") is old
        assert [e["event"] for e in logs] == ["model_swap_failed"]
        assert logs[0]["log_level"] == "error"
        assert str(new_card) in logs[0]["reason"] or str(model) in logs[0]["reason"]
        x = _x(1, 2)
        (y,) = await eng.run("tiny_linear", {"x": x})
        np.testing.assert_allclose(y, _expected(x), rtol=1e-5)
        stats = eng.stats()["models"]["tiny_linear"]
        assert stats["swap_failures"] == 1
        assert stats["swaps"] == 0
        assert stats["version"] == "1.0.0"
        assert stats["last_swap_error"]


async def test_shadow_is_compared_and_never_answers(tmp_path: Path) -> None:
    threshold = 0.0
    active_card = write_card(
        tmp_path / "a" / "c.toml",
        linear_card_data(linear_model(tmp_path / "a" / "m.onnx"), thresholds={"y": threshold}),
    )
    candidate_model = linear_model(tmp_path / "b" / "m.onnx", seed=1)
    candidate_card = write_card(
        tmp_path / "b" / "c.toml", linear_card_data(candidate_model, version="2.0.0")
    )
    async with InferenceEngine(_cfg()) as eng:
        await eng.load(active_card)
        with capture_logs() as logs:
            await eng.set_shadow("tiny_linear", candidate_card)
        assert logs[0]["event"] == "model_shadow_started"
        inputs = [_x(3, seed) for seed in range(4)]
        for x in inputs:
            (y,) = await eng.run("tiny_linear", {"x": x})
            np.testing.assert_allclose(y, _expected(x), rtol=1e-5)  # the active model's
        await eng.wait_idle()
        shadow = eng.stats()["models"]["tiny_linear"]["shadow"]
    x = np.concatenate(inputs)
    a, b = _expected(x), _expected(x, seed=1)
    assert shadow["version"] == "2.0.0"
    assert shadow["runs"] == 4
    assert shadow["rows"] == 12
    assert shadow["mean_abs_diff"] == pytest.approx(np.abs(a - b).mean(), rel=1e-4)
    assert shadow["max_abs_diff"] == pytest.approx(np.abs(a - b).max(), rel=1e-4)
    assert shadow["decision_agreement"] == pytest.approx(np.mean((a >= 0) == (b >= 0)))
    assert shadow["dropped"] is None


async def test_identical_shadow_agrees_fully(tmp_path: Path) -> None:
    card = linear_card(tmp_path)
    async with InferenceEngine(_cfg()) as eng:
        await eng.load(card)
        await eng.set_shadow("tiny_linear", card)
        await eng.run("tiny_linear", {"x": _x(2, 0)})
        await eng.wait_idle()
        shadow = eng.stats()["models"]["tiny_linear"]["shadow"]
        assert shadow["mean_abs_diff"] == 0.0
        assert shadow["decision_agreement"] is None  # the card has no threshold
        eng.clear_shadow("tiny_linear")
        assert eng.stats()["models"]["tiny_linear"]["shadow"] is None


async def test_failing_shadow_is_dropped_and_callers_unaffected(tmp_path: Path) -> None:
    async with InferenceEngine(_cfg()) as eng:
        await eng.load(gather_card(tmp_path, rows=10))
        # Same signature, smaller table: fails on indices the active model handles.
        await eng.set_shadow("tiny_gather", gather_card(tmp_path, rows=5))
        with capture_logs() as logs:
            (y,) = await eng.run("tiny_gather", {"idx": np.array([[7]], np.int64)})
            await eng.wait_idle()
        np.testing.assert_array_equal(y, gather_table()[[[7]]])
        assert [e["event"] for e in logs] == ["model_shadow_dropped"]
        assert "run failed" in logs[0]["reason"]
        shadow = eng.stats()["models"]["tiny_gather"]["shadow"]
        assert "run failed" in shadow["dropped"]
        # Dropped: later calls no longer run it.
        await eng.run("tiny_gather", {"idx": np.array([[1]], np.int64)})
        await eng.wait_idle()
        assert eng.stats()["models"]["tiny_gather"]["shadow"]["runs"] == 0


async def test_shadow_with_another_signature_is_refused(tmp_path: Path) -> None:
    async with InferenceEngine(_cfg()) as eng:
        await eng.load(gather_card(tmp_path, name="tiny_linear"))
        with capture_logs() as logs, pytest.raises(ModelError, match="inputs differ"):
            await eng.set_shadow("tiny_linear", linear_card(tmp_path / "other"))
        assert logs[0]["event"] == "model_shadow_refused"
        assert eng.stats()["models"]["tiny_linear"]["shadow"] is None
        with pytest.raises(ModelError, match="not loaded"):
            await eng.set_shadow("absent", linear_card(tmp_path / "other"))


async def test_configured_models_load_and_a_bad_one_is_left_out(tmp_path: Path) -> None:
    good = linear_card(tmp_path / "good")
    bad_model = linear_model(tmp_path / "bad" / "m.onnx")
    bad = write_card(
        tmp_path / "bad" / "c.toml", linear_card_data(bad_model, name="broken", sha256="0" * 64)
    )
    missing = tmp_path / "missing.toml"
    cfg = _cfg(
        models_dir=tmp_path,
        cards=[Path("good/tiny_linear.toml"), bad, missing],
        shadow={"tiny_linear": good},
    )
    async with InferenceEngine(cfg) as eng:
        with capture_logs() as logs:
            unavailable = await eng.load_configured()
        assert eng.names() == ["tiny_linear"]
        assert set(unavailable) == {"broken", str(missing)}
        assert "sha256" in unavailable["broken"]
        assert not eng.available("broken")
        with pytest.raises(ModelError, match=r"model 'broken' is unavailable: .*sha256"):
            await eng.run("broken", {"x": _x(1, 0)})
        events = [e["event"] for e in logs]
        assert events.count("model_unavailable") == 2
        assert "model_shadow_started" in events
        assert eng.stats()["unavailable"] == unavailable
        # An operator fixes the card and swaps it in: the model becomes available.
        fixed = write_card(
            tmp_path / "bad" / "fixed.toml", linear_card_data(bad_model, name="broken")
        )
        await eng.swap("broken", fixed)
        assert eng.available("broken")
        assert "broken" not in eng.stats()["unavailable"]


async def test_loading_the_same_name_twice_is_refused(tmp_path: Path) -> None:
    async with InferenceEngine(_cfg()) as eng:
        await eng.load(linear_card(tmp_path / "a"))
        with pytest.raises(ModelError, match=r"already loaded .* swap it instead"):
            await eng.load(linear_card(tmp_path / "b"))


async def test_close_fails_queued_calls_and_refuses_new_ones(tmp_path: Path, gate: Gate) -> None:
    eng = InferenceEngine(_cfg(threads=1), executor=gate.pool)
    async with eng:
        await eng.load(linear_card(tmp_path))
        gate.close()
        first = asyncio.create_task(eng.run("tiny_linear", {"x": _x(1, 0)}))
        queued = asyncio.create_task(eng.run("tiny_linear", {"x": _x(1, 1)}))
        await _let_calls_queue()
    with pytest.raises(ModelError, match="stopped"):
        await queued
    gate.open()
    (y,) = await first  # already handed to its thread: it completes
    assert y.shape == (1, 2)
    with pytest.raises(ModelError, match="not running"):
        await eng.run("tiny_linear", {"x": _x(1, 0)})


async def test_shipped_int8_model_batches_like_single_runs(gate: Gate) -> None:
    card = SHIPPED_CARD
    single = load_model(card)
    assert single.card.quantization == "int8-qdq-static"
    (spec,) = single.card.inputs
    rng = np.random.default_rng(11)
    windows = [rng.normal(size=(1, *spec.shape[1:])).astype(np.float32) for _ in range(12)]
    async with InferenceEngine(_cfg(threads=1), executor=gate.pool) as eng:
        await eng.load(card)
        results = await _run_queued(eng, gate, single.model_id, [{spec.name: w} for w in windows])
        assert eng.stats()["models"][single.model_id]["batch_size"]["max"] == 11
    for window, (batched,) in zip(windows, results, strict=True):
        (alone,) = single.run({spec.name: window})
        np.testing.assert_allclose(batched, alone, rtol=1e-6, atol=1e-6)
