"""Frames/s of the pool person detector on 2 threads, against a bare session.run.

    .venv/bin/python bench/pool_detector.py [--frames N] [--threads T] [--card CARD ...] [--quick]

Frames: the bundled test images (tests/fixtures/vision: three training images of the pool data
set and FastestDet's sample), decoded once and cycled, so JPEG decoding is not measured (a camera
source hands over decoded frames). Each card (default: the shipped pool detector, int8, and its
fp32 twin; add the generic FastestDet with ``--card``) gets two rows, measured interleaved in
rounds so load from other processes on this shared machine hits both alike:

* ``bare session.run``   reference: onnxruntime on a tensor prepared once, nothing else;
* ``detect()``           what the pool analyzer runs per frame: resize + normalise
                         (models.detection.preprocess), LoadedModel.run (card-verified session;
                         twice with the card's ``tta = "hflip"``: the frame and its mirror),
                         decode + threshold + NMS (or the views' fusion), boxes mapped back.

Per row: frames/s, p50/p99 ms per frame; and the pre/post-processing overhead of ``detect()`` over
the bare run. Target (issue 6): >= 10 frames/s on 2 threads; a miss prints FAIL (exit status
stays 0). The input size is the card's (416 x 416 for the pool detector).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import onnxruntime as ort

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gateway.inference import load_model, session_options  # noqa: E402
from models.detection import DetectorSpec, detect, preprocess, views  # noqa: E402

CARDS = [
    ROOT / "models" / "pool" / "person_detector.toml",
    ROOT / "models" / "pool" / "person_detector.fp32.toml",
]
FRAMES = sorted((ROOT / "tests" / "fixtures" / "vision").glob("*.jpg"))
TARGET_FPS = 10.0


def _row(name: str, times: list[float]) -> str:
    a = np.asarray(times) * 1000
    fps = 1000.0 / float(np.mean(a))
    p50, p99 = np.percentile(a, [50, 99])
    return f"  {name:<20} {fps:7.1f} frames/s   p50 {p50:6.2f} ms   p99 {p99:6.2f} ms"


def bench_card(card: Path, frames: list[np.ndarray], n: int, threads: int) -> None:
    model = load_model(card, threads=threads)
    spec = DetectorSpec.from_card(model.card, str(card))
    bare = ort.InferenceSession(
        str(model.model_path),
        sess_options=session_options(threads),
        providers=["CPUExecutionProvider"],
    )
    tensor, _ = preprocess(frames[0], spec)
    feeds = {spec.input_name: tensor}
    for i in range(5):  # warm-up both paths
        bare.run(None, feeds)
        detect(model, frames[i % len(frames)], spec)
    bare_t: list[float] = []
    full_t: list[float] = []
    found = 0
    for i in range(n):
        # Interleaved: one bare run, one full frame, so both see the same machine load.
        t0 = time.perf_counter()
        bare.run(None, feeds)
        t1 = time.perf_counter()
        found += len(detect(model, frames[i % len(frames)], spec))
        t2 = time.perf_counter()
        bare_t.append(t1 - t0)
        full_t.append(t2 - t1)
    size = model.model_path.stat().st_size
    print(
        f"{card.relative_to(ROOT) if card.is_relative_to(ROOT) else card}: "
        f"{model.card.name} {model.card.quantization}, {size / 1e6:.2f} MB, input "
        f"{spec.input_width}x{spec.input_height}, {threads} threads, {n} frames "
        f"({found / n:.1f} detections/frame)"
        + (
            f", tta {spec.tta}: {len(views(tensor, spec))} runs per frame"
            if spec.tta != "none"
            else ""
        )
    )
    print(_row("bare session.run", bare_t))
    print(_row("detect()", full_t))
    fps = 1.0 / float(np.mean(full_t))
    runs = len(views(tensor, spec))
    # With TTA a frame costs ``runs`` model runs: the overhead is over that many bare runs.
    overhead = float(np.mean(full_t)) / (runs * float(np.mean(bare_t))) - 1
    verdict = "ok" if fps >= TARGET_FPS else "FAIL"
    print(
        f"  detect() {fps:.1f} frames/s (target >= {TARGET_FPS:g}): {verdict}; "
        f"pre/post-processing adds {overhead * 100:.1f} % to the bare run"
        + (f"s ({runs} per frame)" if runs > 1 else "")
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--frames", type=int, default=300)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--card", type=Path, action="append", default=None)
    parser.add_argument("--quick", action="store_true", help="20 frames (a smoke run)")
    args = parser.parse_args()
    frames = [cv2.imread(str(f)) for f in FRAMES]
    n = 20 if args.quick else args.frames
    sizes = sorted({f"{f.shape[1]}x{f.shape[0]}" for f in frames})
    print(f"frames: {len(frames)} images cycled ({', '.join(sizes)}), decoded beforehand")
    for card in args.card or CARDS:
        bench_card(card, frames, n, args.threads)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
