"""What the inference engine costs on top of a bare onnxruntime session.run, and what batching buys.

    .venv/bin/python bench/inference_engine.py [--card CARD] [--calls N] [--callers C] [--quick]

Default model: the shipped water-level forecaster (int8), else a tiny linear model built here.
Every row runs the same one-row input (the card's sample, or zeros) through one thread:

* bare session.run   the reference: an onnxruntime session with the engine's options, no checks
* LoadedModel.run    + the feed check against the card
* engine, 1 caller   + the hop to the worker thread and back to the event loop, one call at a time
* engine, C callers  C tasks calling at once: calls queue and are stacked into batched runs
* same, max_batch=1  C callers with batching off, to see what the stacking is worth

Figures are per call (p50/p99 in microseconds) and calls per second; the ratio column is calls/s
relative to the bare row measured in the same run (this machine is shared and noisy).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import onnxruntime as ort
import structlog

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gateway.config import InferenceSection  # noqa: E402
from gateway.inference import (  # noqa: E402
    InferenceEngine,
    LoadedModel,
    load_model,
    session_options,
    warmup_feeds,
)

SHIPPED = ROOT / "models" / "water_level" / "forecaster.toml"


def _row(name: str, latencies_s: list[float], wall_s: float, reference: float | None) -> float:
    us = np.array(latencies_s) * 1e6
    rate = len(latencies_s) / wall_s
    ratio = "" if reference is None else f"{rate / reference:6.2f}x"
    print(
        f"{name:<28} p50 {np.percentile(us, 50):8.1f} us  p99 {np.percentile(us, 99):8.1f} us  "
        f"{rate:10.0f} calls/s  {ratio}"
    )
    return rate


def bench_bare(model: LoadedModel, feeds: Mapping[str, np.ndarray], calls: int) -> float:
    session = ort.InferenceSession(
        str(model.model_path), session_options(1), providers=["CPUExecutionProvider"]
    )
    names = [spec.name for spec in model.card.outputs]
    plain = dict(feeds)
    for _ in range(100):
        session.run(names, plain)
    latencies = []
    start = time.perf_counter()
    for _ in range(calls):
        t = time.perf_counter()
        session.run(names, plain)
        latencies.append(time.perf_counter() - t)
    return _row("bare session.run", latencies, time.perf_counter() - start, None)


def bench_loaded(
    model: LoadedModel, feeds: Mapping[str, np.ndarray], calls: int, ref: float
) -> None:
    for _ in range(100):
        model.run(feeds)
    latencies = []
    start = time.perf_counter()
    for _ in range(calls):
        t = time.perf_counter()
        model.run(feeds)
        latencies.append(time.perf_counter() - t)
    _row("LoadedModel.run", latencies, time.perf_counter() - start, ref)


async def bench_engine(
    card: Path,
    *,
    feeds: Mapping[str, np.ndarray],
    calls: int,
    callers: int,
    max_batch: int,
    ref: float,
    label: str,
) -> None:
    section = InferenceSection(threads=1, max_batch=max_batch, timeout_ms=60_000)
    async with InferenceEngine(section) as engine:
        model = await engine.load(card)
        name = model.model_id
        for _ in range(100):
            await engine.run(name, feeds)
        latencies: list[float] = []
        per_caller = max(1, calls // callers)

        async def caller() -> None:
            for _ in range(per_caller):
                t = time.perf_counter()
                await engine.run(name, feeds)
                latencies.append(time.perf_counter() - t)

        start = time.perf_counter()
        async with asyncio.TaskGroup() as tg:
            for _ in range(callers):
                tg.create_task(caller())
        wall = time.perf_counter() - start
        stats = engine.stats()["models"][name]
    _row(label, latencies, wall, ref)
    print(
        f"{'':<28} runs {stats['runs']}, mean batch {stats['batch_size']['mean']}, "
        f"max batch {stats['batch_size']['max']}"
    )


def _tiny_card(directory: Path) -> Path:
    from tests.support.tiny_models import linear_card

    return linear_card(directory)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--card", type=Path, default=None)
    parser.add_argument("--calls", type=int, default=20_000)
    parser.add_argument("--callers", type=int, default=64)
    parser.add_argument("--quick", action="store_true", help="2,000 calls: a smoke run")
    args = parser.parse_args()
    # The engine's model_loaded lines would interleave with the table.
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(30))
    calls = 2_000 if args.quick else args.calls
    with tempfile.TemporaryDirectory() as tmp:
        card = args.card or (SHIPPED if SHIPPED.is_file() else _tiny_card(Path(tmp)))
        model = load_model(card)
        feeds = warmup_feeds(model.card, card)
        print(
            f"model {model.model_id} {model.version} ({model.card.quantization}), "
            f"{model.model_path.stat().st_size} bytes; {calls} calls, one thread"
        )
        ref = bench_bare(model, feeds, calls)
        bench_loaded(model, feeds, calls, ref)
        for callers, max_batch, label in (
            (1, 32, "engine, 1 caller"),
            (args.callers, 32, f"engine, {args.callers} callers"),
            (args.callers, 1, f"{args.callers} callers, max_batch=1"),
        ):
            asyncio.run(
                bench_engine(
                    card,
                    feeds=feeds,
                    calls=calls,
                    callers=callers,
                    max_batch=max_batch,
                    ref=ref,
                    label=label,
                )
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
