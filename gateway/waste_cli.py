"""``edge-gateway waste classify IMAGE...``: the citizen result for photos, one JSON line each.

Each line is exactly ``{"image": path, "top": [{"label", "score"} x 3], "uncertain": bool,
"fraction": str|null, "advice": str|null}``, using the model and the municipality file that the
configuration selects (``-c``, else /etc/edge-gateway/gateway.toml if present, else the
defaults: the shipped classifier and general German rules). A file that is not a readable
JPEG/PNG gets an error line on stderr naming it, and the others go on (exit 1 at the end).
stderr also says, once, that the results come from an AI system and which model made them.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import IO

import orjson

from gateway.config import DEFAULT_CONFIG_PATH, GatewayConfig, config_from_dict, load_config
from gateway.errors import ConfigError, ModelError
from gateway.inference import load_model
from gateway.waste import WasteService, waste_setup
from models.waste.advice import AI_NOTICE
from models.waste.preprocess import ImageDecodeError

__all__ = ["add_waste_parser", "classify_files"]

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_CONFIG = 78
# A file larger than this is not read: no photo a citizen sends is near it.
MAX_FILE_BYTES = 64_000_000


def _config(path: Path | None) -> GatewayConfig:
    if path is None:
        if not DEFAULT_CONFIG_PATH.exists():
            return config_from_dict({}, "defaults")
        path = DEFAULT_CONFIG_PATH
    return load_config(path)


def _read(path: Path) -> bytes:
    size = path.stat().st_size
    if size > MAX_FILE_BYTES:
        raise ImageDecodeError(f"{size} bytes, larger than {MAX_FILE_BYTES}")
    return path.read_bytes()


def classify_files(paths: list[Path], cfg: GatewayConfig, out: IO[str], err: IO[str]) -> int:
    """Classify ``paths``; result lines to ``out``, notices and errors to ``err``."""
    try:
        setup = waste_setup(cfg)
        model = load_model(setup.card_path, threads=cfg.inference.threads)
    except ModelError as exc:
        err.write(f"edge-gateway waste classify: {exc}\n")
        return EXIT_FAILED
    service = WasteService(setup)
    err.write(
        f"edge-gateway waste classify: {AI_NOTICE} Model {model.model_id} {model.version} "
        f"(sha256 {model.sha256}), rules: {setup.municipality.municipality.name} "
        f"({setup.municipality_path.name}), uncertain below {setup.uncertain_below:g}\n"
    )
    failed = 0
    for path in paths:
        try:
            result = service.classify(model, _read(path))
        except (OSError, ImageDecodeError, ModelError) as exc:
            failed += 1
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            err.write(f"edge-gateway waste classify: {path}: {reason}\n")
            continue
        out.write(orjson.dumps(result.as_json(str(path))).decode() + "\n")
        out.flush()
    return EXIT_FAILED if failed else EXIT_OK


def cmd_classify(args: argparse.Namespace) -> int:
    try:
        cfg = _config(args.config)
    except ConfigError as exc:
        for problem in exc.problems:
            sys.stderr.write(f"{exc.source}: {problem}\n")
        return EXIT_CONFIG
    return classify_files(args.images, cfg, sys.stdout, sys.stderr)


def add_waste_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    waste = sub.add_parser("waste", help="waste photo recognition for a citizen service")
    commands = waste.add_subparsers(dest="waste_command", required=True)
    classify = commands.add_parser(
        "classify", help="one JSON line per image: top 3, uncertain, fraction, advice"
    )
    classify.add_argument("images", type=Path, nargs="+", metavar="IMAGE")
    classify.add_argument(
        "-c",
        "--config",
        type=Path,
        default=None,
        help=f"config file (default: {DEFAULT_CONFIG_PATH} if present, else the defaults)",
    )
    classify.set_defaults(func=cmd_classify)
