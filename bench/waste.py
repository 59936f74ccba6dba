"""Waste photo classification: latency, throughput and memory, against a bare session.run.

    .venv/bin/python bench/waste.py [--card CARD] [--runs N] [--threads T]

Rows (one photo at a time, ``--threads`` intra-op threads, runs interleaved so load from other
processes on this shared machine hits every row alike):

* bare session.run        the reference: the int8 model on an already prepared input
* classify (256x192 JPEG) what ``waste classify`` does per photo: decode, resize, normalise,
                          LoadedModel.run, temperature softmax, top 3, the town's fraction
* classify (12 MP JPEG)   the same for a 4032x3024 phone photo (decoding dominates)

Printed: p50/p99 latency in ms, images/s (sequential), the ratio to the bare row measured in the
same run, and the process RSS before and after the model is loaded.
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

from gateway.config import config_from_dict  # noqa: E402
from gateway.inference import load_model, session_options  # noqa: E402
from gateway.waste import WasteService, prepare, waste_setup  # noqa: E402

PHOTOS = sorted((ROOT / "gateway" / "demo" / "waste").glob("*.jpg"))


def rss_mb() -> float:
    """Resident set size now (VmRSS), in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def phone_photo(small: bytes) -> bytes:
    """A 4032x3024 JPEG (quality 90) made by enlarging a bundled photo."""
    rgb = cv2.imdecode(np.frombuffer(small, np.uint8), cv2.IMREAD_COLOR)
    big = cv2.resize(rgb, (4032, 3024), interpolation=cv2.INTER_CUBIC)
    ok, buf = cv2.imencode(".jpg", big, [cv2.IMWRITE_JPEG_QUALITY, 90])
    assert ok
    return buf.tobytes()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--card", type=Path, default=None)
    parser.add_argument("--runs", type=int, default=300)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    overrides = {} if args.card is None else {"waste": {"card": str(args.card.resolve())}}
    cfg = config_from_dict({"inference": {"threads": args.threads}, **overrides}, "bench")
    setup = waste_setup(cfg)
    before = rss_mb()
    model = load_model(setup.card_path, threads=args.threads)
    after = rss_mb()
    service = WasteService(setup)
    bare = ort.InferenceSession(
        str(model.model_path), session_options(args.threads), providers=["CPUExecutionProvider"]
    )
    photos = [p.read_bytes() for p in PHOTOS]
    big = phone_photo(photos[0])
    prepared = [prepare(p, size=setup.image_size) for p in photos]
    rows: dict[str, list[float]] = {"bare": [], "small": [], "big": []}
    big_every = 10  # the 12 MP rows are slow: one in ten rounds
    for _ in range(5):  # warm-up
        bare.run(None, {"image": prepared[0]})
        service.classify(model, photos[0])
    started = time.perf_counter()
    for i in range(args.runs):
        x = prepared[i % len(prepared)]
        t0 = time.perf_counter()
        bare.run(None, {"image": x})
        t1 = time.perf_counter()
        service.classify(model, photos[i % len(photos)])
        t2 = time.perf_counter()
        rows["bare"].append(t1 - t0)
        rows["small"].append(t2 - t1)
        if i % big_every == 0:
            t3 = time.perf_counter()
            service.classify(model, big)
            rows["big"].append(time.perf_counter() - t3)
    wall = time.perf_counter() - started
    print(
        f"waste classifier {model.model_id} {model.version} ({model.card.quantization}, "
        f"{model.model_path.stat().st_size / 1e6:.2f} MB), {args.threads} threads, "
        f"{args.runs} runs interleaved in {wall:.1f} s (shared machine: compare ratios)"
    )
    reference = float(np.mean(rows["bare"]))
    names = {
        "bare": "bare session.run",
        "small": "classify (256x192 JPEG)",
        "big": "classify (12 MP JPEG)",
    }
    for key, name in names.items():
        ms = np.array(rows[key]) * 1000
        ratio = float(np.mean(rows[key])) / reference
        print(
            f"{name:<26} p50 {np.percentile(ms, 50):7.1f} ms  p99 {np.percentile(ms, 99):7.1f} ms"
            f"  {1000 / ms.mean():7.1f} images/s  {ratio:5.2f}x bare time  (n={len(ms)})"
        )
    print(
        f"RSS: {before:.0f} MB before loading the model (onnxruntime, numpy, cv2 imported), "
        f"{after:.0f} MB with it loaded ({after - before:+.0f} MB)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
