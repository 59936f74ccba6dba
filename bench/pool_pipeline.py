"""Frames/s of the pool pipeline against a bare session.run loop on the same frames, same run.

    .venv/bin/python bench/pool_pipeline.py [--card CARD] [--size WxH] [--rounds N] [--quick]

Input: the bundled synthetic clip (gateway/demo/pool-demo.mp4, 88 frames), scaled to ``--size``
(default 1280x720, what a pool camera's sub-stream delivers) and written to a temporary MPEG-4
file, so decoding costs what it would. The detector runs on 2 intra-op threads in both rows.

* bare session.run   reference: the detector's input tensors, prepared beforehand from the same
                     frames, through a plain onnxruntime session, back to back; one run per
                     view the card asks for (two with ``tta = "hflip"``: image and mirror)
* detector alone     decoded frames -> preprocess -> session.run -> decode boxes (no camera, no
                     tracking): what every pool pipeline must pay
* pool pipeline      what the daemon runs: the OpenCV camera source decoding the file (fast pace,
                     every frame), camera health, preprocess, the InferenceEngine (a worker thread
                     and back to the event loop), box decoding, tracker and state machine, events

Rows run interleaved, ``--rounds`` times (each round starting with another row); medians are
printed. Overhead = pipeline time per frame
over bare time per frame, minus 1 (target <= 15 %). RSS: VmHWM (peak) of a child process that
runs only the pool pipeline on the same file (this process holds every decoded frame and tensor
for the reference rows, which a gateway never does).
The machine is shared: the ratio measured in the same run is what stays meaningful.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import tempfile
import time
from importlib import resources
from pathlib import Path

import cv2
import numpy as np
import onnxruntime as ort
import structlog

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gateway.analyzers.pool_config import PoolConfig  # noqa: E402
from gateway.analyzers.pool_runtime import PoolMonitor  # noqa: E402
from gateway.config import InferenceSection  # noqa: E402
from gateway.inference import InferenceEngine, load_model, session_options  # noqa: E402
from gateway.types import Event, Reading  # noqa: E402
from models.detection import DetectorSpec, decode_views, preprocess, views  # noqa: E402
from models.pool import DEFAULT_DETECTOR_CARD  # noqa: E402
from models.pool.synth import read_video  # noqa: E402

TARGET_OVERHEAD = 0.15
THREADS = 2


def _status_kb(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def _clip_frames() -> list[np.ndarray]:
    return read_video(Path(str(resources.files("gateway.demo").joinpath("pool-demo.mp4"))))


def _write(path: Path, frames: list[np.ndarray], size: tuple[int, int]) -> list[np.ndarray]:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter.fourcc(*"mp4v"), 4.0, size)
    for frame in frames:
        writer.write(cv2.resize(frame, size, interpolation=cv2.INTER_LINEAR))
    writer.release()
    # What the pipeline will decode, decoded once here for the reference rows.
    return read_video(path)


def bare(session: ort.InferenceSession, name: str, tensors: list[list[np.ndarray]]) -> float:
    """Per frame: one run per view the card asks for (two with ``tta = "hflip"``)."""
    start = time.perf_counter()
    for frame_views in tensors:
        for tensor in frame_views:
            session.run(None, {name: tensor})
    return (time.perf_counter() - start) / len(tensors)


def detector_alone(
    session: ort.InferenceSession, spec: DetectorSpec, frames: list[np.ndarray]
) -> float:
    start = time.perf_counter()
    for frame in frames:
        tensor, transform = preprocess(frame, spec)
        outputs = [session.run(None, {spec.input_name: v}) for v in views(tensor, spec)]
        decode_views(outputs, spec, transform)  # as the analyzer does (with the card's tta)
    return (time.perf_counter() - start) / len(frames)


async def pipeline(video: Path, card: Path, n_frames: int) -> tuple[float, int]:
    # analysis_fps far above the file's 4 fps: fast pace then analyses every frame.
    cfg = PoolConfig.model_validate(
        {
            "camera": {"url": str(video), "pace": "fast", "analysis_fps": 30.0},
            "detector_card": str(card),
        }
    )
    section = InferenceSection(threads=THREADS, intra_op_threads=THREADS)
    events = 0

    async def emit(item: Reading | Event, on_stored: object = None) -> None:
        nonlocal events
        events += 1

    def report(kind: str, detail: str) -> None:
        raise RuntimeError(f"{kind}: {detail}")

    async with InferenceEngine(section) as engine:
        await engine.load(card)  # loaded and warmed up outside the timing
        monitor = PoolMonitor("bench", cfg, engine, section, _Metrics())
        start = time.perf_counter()
        await monitor.run(emit, report)  # type: ignore[arg-type]
        elapsed = time.perf_counter() - start
    if monitor.counters["frames"] != n_frames:
        raise RuntimeError(f"pipeline analysed {monitor.counters['frames']} of {n_frames}")
    return elapsed / n_frames, events


def _Metrics() -> object:  # noqa: N802 -- a factory named like the class it makes
    from gateway.health import Metrics

    return Metrics()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--card", type=Path, default=None)
    parser.add_argument("--size", default="1280x720")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--quick", action="store_true", help="one round (the smoke test)")
    parser.add_argument("--pipeline-only", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(40))
    section = InferenceSection()
    card = section.card_path(args.card or DEFAULT_DETECTOR_CARD)
    if args.card is None and not card.is_file():
        card = section.card_path(Path("generic/fastestdet/fastestdet.toml"))
        print(f"(the pool detector card is not installed; using {card.name})")
    if args.pipeline_only is not None:
        n = int(args.size)
        asyncio.run(pipeline(args.pipeline_only, card, n))
        print(f"{_status_kb('VmHWM')}")
        return 0
    width, height = (int(v) for v in args.size.lower().split("x"))
    rounds = 1 if args.quick else args.rounds

    model = load_model(card, threads=THREADS)
    spec = DetectorSpec.from_card(model.card)
    session = ort.InferenceSession(
        str(model.card_path.parent / model.card.file),
        session_options(THREADS),
        providers=["CPUExecutionProvider"],
    )
    with tempfile.TemporaryDirectory(prefix="pool-bench-") as tmp:
        video = Path(tmp) / "clip.mp4"
        frames = _write(video, _clip_frames(), (width, height))
        # C-contiguous, as a model input is at its best: the reference is the bare run.
        tensors = [
            [np.ascontiguousarray(v) for v in views(preprocess(f, spec)[0], spec)] for f in frames
        ]
        bare(session, spec.input_name, tensors[:5])  # warm-up
        rows: dict[str, list[float]] = {"bare": [], "detector": [], "pipeline": []}
        events = 0
        order = ["bare", "detector", "pipeline"]
        for r in range(rounds):
            # Each round starts with another row: load from other processes that comes and
            # goes does not always hit the same one.
            for key in order[r % 3 :] + order[: r % 3]:
                if key == "bare":
                    rows["bare"].append(bare(session, spec.input_name, tensors))
                elif key == "detector":
                    rows["detector"].append(detector_alone(session, spec, frames))
                else:
                    per_frame, events = asyncio.run(pipeline(video, card, len(frames)))
                    rows["pipeline"].append(per_frame)
        child = subprocess.run(
            [
                sys.executable,
                __file__,
                "--card",
                str(card),
                "--size",
                str(len(frames)),
                "--pipeline-only",
                str(video),
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        peak_kb = int(child.stdout.split()[-1])
    ref = statistics.median(rows["bare"])
    print(
        f"detector {model.model_id} {model.version} ({model.card.quantization}), input "
        f"{spec.input_width}x{spec.input_height}, {THREADS} threads; {len(frames)} frames "
        f"{width}x{height}; {rounds} round(s), medians"
    )
    labels = {
        "bare": f"bare session.run ({len(tensors[0])} per frame)",
        "detector": "detector alone (preprocess + run + decode)",
        "pipeline": "pool pipeline (decode -> detect -> track -> state machine)",
    }
    for key, label in labels.items():
        t = statistics.median(rows[key])
        print(f"{label:60s} {1 / t:7.1f} frames/s  {t * 1000:6.2f} ms/frame  x{t / ref:.2f}")
    overhead = statistics.median(rows["pipeline"]) / ref - 1
    verdict = "ok" if overhead <= TARGET_OVERHEAD else "FAIL"
    print(
        f"pipeline overhead vs bare session.run: {overhead * 100:.1f} % "
        f"(target <= {TARGET_OVERHEAD * 100:.0f} %) {verdict}; events: {events}"
    )
    print(
        f"RSS: pool pipeline process peak (VmHWM) {peak_kb / 1024:.0f} MB "
        f"(this benchmark process, holding all frames: {_status_kb('VmHWM') / 1024:.0f} MB)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
