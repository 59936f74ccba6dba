"""Readings/s through the water-level analyzer with the learned int8 model, on one core.

    .venv/bin/python bench/water_level.py [--devices N] [--readings-per-device R] [--cpu C]
                                          [--quick]

Input: the real flood of the demo recording (Le Gard at Anduze, Sept 2020, 144 levels at 30 min,
Hub'Eau / Etalab 2.0), replayed as N gauges (each shifted by its own offset and noise, R readings
each, interleaved as a gateway would receive them). The whole process is pinned to one CPU
(``sched_setaffinity``) and every onnxruntime session uses one intra-op thread. Rows:

* bare session.run        reference: the same one-row windows through a plain onnxruntime session
                          (no analyzer, no checks), measured in the same run
* analyzer, sync          what ``anomaly replay`` runs per reading: rules + features, one
                          LoadedModel.run (feed check included), score, the Event built
* analyzer, daemon path   what the gateway runs per reading: ``Analyzers.analyze`` with the model
                          call through the InferenceEngine (a worker thread and back to the loop),
                          one reading at a time as a source's emit awaits it

Per row: readings (or calls) per second, p50/p99 per reading, and for the analyzer rows the p99 of
the model call alone. RSS: VmRSS after the model is loaded and VmHWM at the end. Targets (issue 5):
>= 2,000 readings/s and p99 < 5 ms per reading; a miss prints FAIL (exit status stays 0).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections.abc import Iterator
from datetime import datetime, timedelta
from importlib import resources
from pathlib import Path

import numpy as np
import onnxruntime as ort
import structlog

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gateway.analyzers.config import AnalyzerConfig  # noqa: E402
from gateway.analyzers.runtime import Analyzers, model_ref  # noqa: E402
from gateway.analyzers.water_level import DeviceAnalyzers, analyze_all, to_event  # noqa: E402
from gateway.config import InferenceSection  # noqa: E402
from gateway.health import Metrics  # noqa: E402
from gateway.inference import InferenceEngine, LoadedModel, load_model, session_options  # noqa: E402
from gateway.types import Measurement, Reading  # noqa: E402
from models.water_level.features import ForecastParams  # noqa: E402

CARD = ROOT / "models" / "water_level" / "forecaster.toml"
TARGET_RATE = 2000.0
TARGET_P99_MS = 5.0


def _status_kb(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def gard_levels() -> list[tuple[datetime, float]]:
    text = resources.files("gateway.demo").joinpath("gard-anduze-2020-09.jsonl").read_text()
    out = []
    for line in text.splitlines():
        data = json.loads(line)
        out.append((datetime.fromisoformat(data["ts"]), data["values"][0]["v"] / 10))
    return out


def readings(devices: int, per_device: int, seed: int = 1) -> Iterator[Reading]:
    """Interleaved readings of ``devices`` gauges replaying the Gard flood (looped)."""
    base = gard_levels()
    rng = np.random.default_rng(seed)
    offsets = rng.uniform(0, 300, devices)
    noise = rng.normal(0, 0.5, (devices, per_device))
    t0 = base[0][0]
    for i in range(per_device):
        level = base[i % len(base)][1]
        ts = t0 + timedelta(minutes=30 * i)
        for d in range(devices):
            yield Reading(
                "bench",
                f"gauge-{d}",
                ts,
                (Measurement("water_level", round(level + offsets[d] + noise[d, i], 1), "cm"),),
            )


def _row(name: str, per_item_s: list[float], wall_s: float, ref: float | None, extra: str) -> float:
    us = np.array(per_item_s) * 1e6
    rate = len(per_item_s) / wall_s
    if not name:
        return rate
    ratio = "" if ref is None else f"{rate / ref:6.3f}x"
    print(
        f"{name:<24} {rate:10.0f}/s  p50 {np.percentile(us, 50):7.1f} us  "
        f"p99 {np.percentile(us, 99):7.1f} us  {ratio:>8}  {extra}"
    )
    return rate


def bench_bare(model: LoadedModel, windows: np.ndarray) -> tuple[float, float]:
    session = ort.InferenceSession(
        str(model.model_path), session_options(1), providers=["CPUExecutionProvider"]
    )
    for w in windows[:200]:
        session.run(["forecast"], {"window": w[None, :]})
    lat = []
    start = time.perf_counter()
    for w in windows:
        t = time.perf_counter()
        session.run(["forecast"], {"window": w[None, :]})
        lat.append(time.perf_counter() - t)
    wall = time.perf_counter() - start
    rate = _row("bare session.run", lat, wall, None, "")
    return rate, float(np.percentile(np.array(lat) * 1e6, 99))


def bench_sync(
    model: LoadedModel,
    cfg: AnalyzerConfig,
    items: list[Reading],
    ref_rate: float,
    name: str = "analyzer, sync",
) -> tuple[float, float, np.ndarray]:
    analyzers = DeviceAnalyzers({"bench": cfg}, {cfg.model: ForecastParams()})
    ref = model_ref(model)
    model_lat: list[float] = []

    def scorer(batch: np.ndarray) -> np.ndarray:
        t = time.perf_counter()
        out = model.run({"window": batch})[0][:, 0]
        model_lat.append(time.perf_counter() - t)
        return out

    windows: list[list[float]] = []
    lat = []
    start = time.perf_counter()
    for reading in items:
        t = time.perf_counter()
        pending = analyzers.observe(reading)
        if pending.features is not None:
            windows.append(pending.features)
        (analysis,) = analyze_all([pending], scorer, ref)
        to_event(reading, analysis, cfg)
        lat.append(time.perf_counter() - t)
    wall = time.perf_counter() - start
    model_p99 = float(np.percentile(np.array(model_lat) * 1e6, 99))
    rate = _row(name, lat, wall, ref_rate, f"model call p99 {model_p99:6.1f} us")
    return rate, float(np.percentile(np.array(lat) * 1e3, 99)), np.asarray(windows, np.float32)


async def bench_daemon(
    cfg: AnalyzerConfig, items: list[Reading], ref_rate: float
) -> tuple[float, float]:
    section = InferenceSection(threads=1, intra_op_threads=1, cards=[CARD])
    async with InferenceEngine(section) as engine:
        await engine.load_configured()
        analyzers = Analyzers({"bench": cfg}, engine, Metrics())
        for reading in items[:200]:
            await analyzers.analyze(reading)
        lat = []
        start = time.perf_counter()
        for reading in items[200:]:
            t = time.perf_counter()
            await analyzers.analyze(reading)
            lat.append(time.perf_counter() - t)
        wall = time.perf_counter() - start
        stats = engine.stats()["models"]["water_level_forecaster"]
    extra = f"engine p99 {stats.get('latency_ms', {}).get('p99', '?')} ms"
    rate = _row("analyzer, daemon path", lat, wall, ref_rate, extra)
    return rate, float(np.percentile(np.array(lat) * 1e3, 99))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=100)
    parser.add_argument("--readings-per-device", type=int, default=200)
    parser.add_argument("--cpu", type=int, default=None, help="CPU to pin to (default: the last)")
    parser.add_argument("--quick", action="store_true", help="10 devices x 60 readings")
    args = parser.parse_args()
    if args.quick:
        args.devices, args.readings_per_device = 10, 60
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(40))
    cpu = args.cpu if args.cpu is not None else max(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {cpu})
    rss_start = _status_kb("VmRSS")
    model = load_model(CARD, threads=1)
    rss_model = _status_kb("VmRSS")
    items = list(readings(args.devices, args.readings_per_device))
    cfg = AnalyzerConfig(profile="water-level", devices=[f"gauge-{d}" for d in range(args.devices)])
    print(
        f"model {model.model_id} {model.version} ({model.card.quantization}, "
        f"{model.model_path.stat().st_size} bytes, sha256 {model.sha256[:12]}); pinned to CPU {cpu}"
        f"; {args.devices} gauges x {args.readings_per_device} readings = {len(items)} readings"
    )
    # A warm-up pass (not shown), which also collects the windows the analyzer computes: the
    # bare reference runs on them, so both rows see the same inputs.
    few = {f"gauge-{d}" for d in range(min(args.devices, 10))}
    warm = [r for r in items if r.device in few]
    _warm_rate, _p99, windows = bench_sync(model, cfg, warm, 1.0, name="")
    bare_rate, _bare_p99 = bench_bare(model, np.resize(windows, (len(items), windows.shape[1])))
    sync_rate, sync_p99_ms, _w = bench_sync(model, cfg, items, bare_rate)
    daemon_rate, daemon_p99_ms = asyncio.run(bench_daemon(cfg, items, bare_rate))
    print(
        f"RSS: {rss_start / 1024:.1f} MB before the model, {rss_model / 1024:.1f} MB with it "
        f"loaded (+{(rss_model - rss_start) / 1024:.1f} MB), "
        f"peak {_status_kb('VmHWM') / 1024:.1f} MB"
    )
    for name, rate, p99 in (
        ("sync", sync_rate, sync_p99_ms),
        ("daemon path", daemon_rate, daemon_p99_ms),
    ):
        ok = rate >= TARGET_RATE and p99 < TARGET_P99_MS
        print(
            f"{'PASS' if ok else 'FAIL'} {name}: {rate:.0f} readings/s "
            f"(target >= {TARGET_RATE:.0f}), p99 {p99:.3f} ms per reading "
            f"(target < {TARGET_P99_MS} ms)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
