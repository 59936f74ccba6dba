"""``edge-gateway vision detect IMAGE...``: run the pool person detector on image files.

One JSON line per image, in the order given::

    {"image": PATH, "width": W, "height": H,
     "detections": [{"label": "person", "score": 0.91, "box": [x1, y1, x2, y2]}, ...]}

Boxes are in pixels of the original image, best score first. The model is the one the default
configuration selects (``models/pool/person_detector.toml``, the default of
``[pools.<name>] detector_card``); ``-c CONFIG`` takes the first pool's card of that file (or
``--pool NAME``'s), ``--card`` any detector card. A file that cannot be read or decoded gives
``{"image": PATH, "error": "..."}`` and the next file is processed; the exit status is then 1.
A model that fails verification is reported on stderr (naming the card) with exit status 1.
Nothing is written anywhere but stdout and stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

import cv2
import numpy as np

from gateway.config import load_config
from gateway.errors import ConfigError, ModelError
from gateway.inference import load_model
from models.detection import DetectorSpec, detect
from models.pool import DEFAULT_DETECTOR_CARD

__all__ = ["add_vision_parser", "default_card", "main", "read_image"]

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_CONFIG = 78


def default_card(config: Path | None, pool: str | None = None) -> Path:
    """The detector card a configuration selects (ConfigError for a bad file or pool name).

    Without a file: the default configuration's (the shipped pool detector).
    """
    if config is None:
        import models  # noqa: PLC0415 -- only to locate the shipped model files

        return Path(models.__file__).resolve().parent / DEFAULT_DETECTOR_CARD
    cfg = load_config(config)
    if pool is not None:
        if pool not in cfg.pools:
            raise ConfigError(
                str(config), [f"pools: no pool named {pool!r} (got: {sorted(cfg.pools)})"]
            )
        return cfg.inference.card_path(cfg.pools[pool].detector_card)
    if cfg.pools:
        first = next(iter(cfg.pools.values()))
        return cfg.inference.card_path(first.detector_card)
    return cfg.inference.card_path(DEFAULT_DETECTOR_CARD)


def read_image(path: Path) -> np.ndarray:
    """A BGR uint8 image from a file; ValueError naming what is wrong."""
    try:
        blob = path.read_bytes()
    except FileNotFoundError:
        raise ValueError("file not found") from None
    except IsADirectoryError:
        raise ValueError("is a directory") from None
    except OSError as exc:
        raise ValueError(f"cannot read: {exc.strerror or exc}") from None
    if not blob:
        raise ValueError("empty file")
    image = cv2.imdecode(np.frombuffer(blob, np.uint8), cv2.IMREAD_COLOR)
    if image is None or image.size == 0:
        raise ValueError("not a decodable image (JPEG, PNG, BMP, TIFF, WebP, ...)")
    return np.asarray(image, dtype=np.uint8)


def cmd_detect(args: argparse.Namespace, out: IO[str], err: IO[str]) -> int:
    try:
        card = Path(args.card) if args.card else default_card(args.config, args.pool)
    except ConfigError as exc:
        for problem in exc.problems:
            err.write(f"{exc.source}: {problem}\n")
        return EXIT_CONFIG
    try:
        model = load_model(card, threads=args.threads)
        spec = DetectorSpec.from_card(model.card, str(card))
    except ModelError as exc:
        err.write(f"edge-gateway vision detect: model refused: {exc}\n")
        return EXIT_FAILED
    status = EXIT_OK
    for name in args.images:
        line: dict[str, Any]
        try:
            image = read_image(Path(name))
            found = detect(model, image, spec, score_threshold=args.threshold)
        except (ValueError, ModelError) as exc:
            line = {"image": name, "error": f"{name}: {exc}"}
            status = EXIT_FAILED
        else:
            line = {
                "image": name,
                "width": int(image.shape[1]),
                "height": int(image.shape[0]),
                "detections": [d.to_json() for d in found],
            }
        out.write(json.dumps(line) + "\n")
        out.flush()
    return status


def _threshold(text: str) -> float:
    value = float(text)
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1 (got: {text})")
    return value


def _threads(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1 (got: {text})")
    return value


def add_vision_parser(sub: Any) -> None:
    """Register ``vision detect`` on the main parser's sub-commands."""
    vision = sub.add_parser("vision", help="run the pool person detector on image files")
    vision_sub = vision.add_subparsers(dest="vision_command", required=True, metavar="COMMAND")
    det = vision_sub.add_parser(
        "detect",
        help="detect people in images: one JSON line per image",
        description="Prints {image, width, height, detections: [{label, score, box}]} per "
        "image, boxes in original-image pixels. Exit 1 if an image or the model failed.",
    )
    det.add_argument("images", nargs="+", metavar="IMAGE")
    det.add_argument("-c", "--config", type=Path, default=None, help="take the card from here")
    det.add_argument("--pool", default=None, help="with -c: this pool's detector card")
    det.add_argument("--card", default=None, help="a detector card instead of the configured one")
    det.add_argument(
        "--threshold", type=_threshold, default=None, help="score threshold; default: the card's"
    )
    det.add_argument("--threads", type=_threads, default=2, help="onnxruntime threads")
    det.set_defaults(vision_func=cmd_detect)
    vision.set_defaults(func=_dispatch)


def _dispatch(args: argparse.Namespace) -> int:
    code: int = args.vision_func(args, sys.stdout, sys.stderr)
    return code


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m gateway.vision_cli ...``: the same as ``edge-gateway vision ...``."""
    parser = argparse.ArgumentParser(prog="edge-gateway")
    add_vision_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["vision", *(sys.argv[1:] if argv is None else argv)])
    return _dispatch(args)


if __name__ == "__main__":
    sys.exit(main())
