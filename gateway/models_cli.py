"""``edge-gateway models list|verify|quantize|eval``: the model lifecycle on the command line.

* ``list [DIR | -c CONFIG]``: every model card (name, version, task, quantisation, digest, size)
  and whether it verifies on this machine (sha256, signature against the card, warm-up run).
* ``verify [CARD...]``: the same checks, one line per card naming the problem; exit 1 if any fails.
* ``quantize --card FP32CARD --out DIR``: an int8 model and its card (new sha256), with size,
  bare ``session.run`` latency fp32 vs int8 measured here, and with ``--eval`` the metric delta
  from the task's evaluator (:data:`models.evaluators.EVALUATORS`).
* ``eval --card CARD``: the task's evaluator on its evaluation data.

Without DIR or CARD arguments the commands look at the models shipped with edge-gateway; with
``-c CONFIG`` at the cards ``[inference]`` configures (active and shadow).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import onnxruntime as ort

import models
from gateway.argtypes import positive_int
from gateway.config import load_config
from gateway.errors import ConfigError, ModelError
from gateway.inference import (
    LoadedModel,
    load_model,
    read_npz,
    session_options,
    warmup_feeds,
)
from models.card import ModelCard, dump_card, load_card, sha256_file
from models.evaluation import Evaluation, EvaluationUnavailableError
from models.evaluators import EVALUATORS
from models.quantize import quantize_model

__all__ = ["add_models_parser", "main"]

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_CONFIG = 78

# Bare-session latency: enough runs for a stable median and p99 of a sub-millisecond model,
# few enough to finish in seconds on a busy 2-core gateway.
_LATENCY_RUNS = 500
_LATENCY_WARMUP = 20


def shipped_models_dir() -> Path:
    """Where the installed ``models`` package keeps its cards and .onnx files."""
    return Path(models.__file__).resolve().parent


def default_data_dir() -> Path:
    """``../shared/data`` next to a development checkout (evaluators say when it is absent)."""
    return shipped_models_dir().parents[1] / "shared" / "data"


def discover_cards(root: Path) -> list[Path]:
    """TOML files under ``root`` that are model cards (they have a top-level ``sha256``)."""
    cards = []
    for path in sorted(root.rglob("*.toml")):
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            cards.append(path)  # unreadable: listed, and verification names the problem
            continue
        if any(line.lstrip().startswith("sha256") for line in text.splitlines()):
            cards.append(path)
    return cards


def _shown(path: Path) -> str:
    """A path relative to the working directory when it is below it (shorter tables)."""
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _human_size(size: int) -> str:
    if size < 1024:
        return f"{size} B"
    if size < 1024 * 1024:
        return f"{size / 1024:.1f} KiB"
    return f"{size / (1024 * 1024):.1f} MiB"


def _table(rows: Sequence[Sequence[str]], out: IO[str]) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        cells = (cell.ljust(width) for cell, width in zip(row, widths, strict=True))
        out.write("  ".join(cells).rstrip() + "\n")


@dataclass(frozen=True, slots=True)
class _Checked:
    path: Path
    card: ModelCard | None
    model: LoadedModel | None
    problem: str | None


def _check(path: Path) -> _Checked:
    card: ModelCard | None = None
    try:
        card = load_card(path)
        return _Checked(path, card, load_model(path), None)
    except ModelError as exc:
        return _Checked(path, card, None, str(exc))


def _cards_from_args(args: argparse.Namespace, err: IO[str]) -> list[Path] | None:
    """The cards a command looks at: arguments, the config's, or the shipped ones."""
    if getattr(args, "cards", None):
        return [Path(c) for c in args.cards]
    if args.config is not None:
        try:
            cfg = load_config(args.config)
        except ConfigError as exc:
            for problem in exc.problems:
                err.write(f"{exc.source}: {problem}\n")
            return None
        section = cfg.inference
        return [section.card_path(c) for c in section.cards] + [
            section.card_path(c) for c in section.shadow.values()
        ]
    root = Path(args.dir) if getattr(args, "dir", None) else shipped_models_dir()
    return discover_cards(root)


def cmd_list(args: argparse.Namespace, out: IO[str], err: IO[str]) -> int:
    paths = _cards_from_args(args, err)
    if paths is None:
        return EXIT_CONFIG
    if not paths:
        out.write("no model cards found\n")
        return EXIT_OK
    rows = [["CARD", "NAME", "VERSION", "TASK", "QUANT", "SHA256", "VERIFIED", "SIZE"]]
    problems = []
    for path in paths:
        checked = _check(path)
        card = checked.card
        size = "-"
        if card is not None and card.model_path(path).is_file():
            size = _human_size(card.model_path(path).stat().st_size)
        rows.append(
            [
                _shown(path),
                card.name if card else "?",
                card.version if card else "?",
                card.task if card else "?",
                card.quantization if card else "?",
                card.sha256[:12] if card else "?",
                "yes" if checked.model is not None else "NO",
                size,
            ]
        )
        if checked.problem is not None:
            problems.append(checked.problem)
    _table(rows, out)
    for problem in problems:
        out.write(f"\n{problem}")
    if problems:
        out.write("\n")
    return EXIT_OK


def cmd_verify(args: argparse.Namespace, out: IO[str], err: IO[str]) -> int:
    paths = _cards_from_args(args, err)
    if paths is None:
        return EXIT_CONFIG
    if not paths:
        err.write("no model cards to verify\n")
        return EXIT_FAILED
    failed = 0
    for path in paths:
        checked = _check(path)
        if checked.model is None:
            failed += 1
            out.write(f"FAILED {checked.problem}\n")
        else:
            model = checked.model
            out.write(
                f"OK     {path}: {model.model_id} {model.version} "
                f"{model.card.quantization} sha256 {model.sha256}\n"
            )
    out.write(f"{len(paths) - failed} of {len(paths)} card(s) verified\n")
    return EXIT_FAILED if failed else EXIT_OK


def calibration_sets(npz: Path, card: ModelCard) -> Iterator[dict[str, np.ndarray]]:
    """Input sets from an .npz holding one array per input, samples along the first axis.

    For an input with a batch dim, sample ``i`` is ``array[i:i+1]``; for a fixed-shape input
    it is ``array[i]``.
    """
    arrays = read_npz(npz, "calibration")
    wanted = {spec.name for spec in card.inputs}
    if set(arrays) != wanted:
        raise ModelError(
            f"{npz}: arrays must be the model's inputs {sorted(wanted)} (got: {sorted(arrays)})"
        )
    counts = {name: len(array) for name, array in arrays.items()}
    if len(set(counts.values())) != 1:
        raise ModelError(f"{npz}: arrays hold different numbers of samples (got: {counts})")
    count = next(iter(counts.values()))
    for index in range(count):
        yield {
            spec.name: (
                arrays[spec.name][index : index + 1] if spec.batched else arrays[spec.name][index]
            ).astype(spec.dtype)
            for spec in card.inputs
        }


def bare_latency_ms(
    paths: Sequence[Path], feeds: Mapping[str, np.ndarray], runs: int = _LATENCY_RUNS
) -> list[tuple[float, float]]:
    """(median, p99) ms of a bare one-thread ``session.run`` per model, runs interleaved.

    Interleaving the models run by run makes a burst of load from other processes on this
    shared machine hit both alike, so their ratio stays meaningful.
    """
    sessions = [
        ort.InferenceSession(str(p), session_options(1), providers=["CPUExecutionProvider"])
        for p in paths
    ]
    for session in sessions:
        for _ in range(_LATENCY_WARMUP):
            session.run(None, dict(feeds))
    times: list[list[float]] = [[] for _ in sessions]
    for _ in range(runs):
        for session, samples in zip(sessions, times, strict=True):
            started = time.perf_counter()
            session.run(None, dict(feeds))
            samples.append((time.perf_counter() - started) * 1000)
    return [
        (float(np.percentile(samples, 50)), float(np.percentile(samples, 99))) for samples in times
    ]


def _evaluate(model: LoadedModel, data_dir: Path, out: IO[str]) -> Evaluation | None:
    evaluator = EVALUATORS.get(model.card.task)
    if evaluator is None:
        known = ", ".join(sorted(EVALUATORS)) or "none"
        out.write(f"no evaluator for task {model.card.task!r} (tasks with one: {known})\n")
        return None
    return evaluator(model.run, model.card, data_dir)


def _int8_card(fp32: LoadedModel, int8_file: Path, sample: str, quantization: str) -> ModelCard:
    data: dict[str, Any] = fp32.card.model_dump()
    data |= {
        "file": int8_file.name,
        "sha256": sha256_file(int8_file),
        "quantization": quantization,
        "sample": sample,
        # The fp32 model's measurements do not describe the int8 one.
        "metrics": {"size_bytes": int8_file.stat().st_size},
    }
    return ModelCard.model_validate(data)


def cmd_quantize(args: argparse.Namespace, out: IO[str], err: IO[str]) -> int:
    fp32_card_path = Path(args.card)
    out_dir = Path(args.out)
    try:
        fp32 = load_model(fp32_card_path)
        if args.method == "static" and args.calibration is None:
            err.write(
                "static quantisation needs --calibration NPZ (input sets from the training "
                "portion), or use --method dynamic\n"
            )
            return EXIT_USAGE
        calibration = (
            None
            if args.calibration is None
            else calibration_sets(Path(args.calibration), fp32.card)
        )
        stem = fp32.model_path.stem.removesuffix(".fp32").removesuffix("-fp32")
        int8_file = out_dir / f"{stem}.int8.onnx"
        quantize_model(fp32.model_path, int8_file, calibration=calibration, method=args.method)
        sample = ""
        sample_path = fp32.card.sample_path(fp32_card_path)
        if sample_path is not None:
            sample = sample_path.name
            if sample_path.resolve() != (out_dir / sample).resolve():
                shutil.copyfile(sample_path, out_dir / sample)
        quantization = "int8-qdq-static" if args.method == "static" else "int8-dynamic"
        card = _int8_card(fp32, int8_file, sample, quantization)
        card_path = out_dir / f"{stem}.int8.toml"
        card_path.write_text(dump_card(card), encoding="utf-8")
        int8 = load_model(card_path)  # the new card and file verify like any other
    except ModelError as exc:
        err.write(f"{exc}\n")
        return EXIT_FAILED

    fp32_size = fp32.model_path.stat().st_size
    int8_size = int8.model_path.stat().st_size
    out.write(f"wrote {int8.model_path} and {card_path} (sha256 {int8.sha256})\n")
    out.write(
        f"size:    fp32 {_human_size(fp32_size)}  int8 {_human_size(int8_size)}  "
        f"({int8_size / fp32_size:.2f}x)\n"
    )
    feeds = warmup_feeds(fp32.card, fp32_card_path)
    (fp32_p50, fp32_p99), (int8_p50, int8_p99) = bare_latency_ms(
        [fp32.model_path, int8.model_path], feeds, args.runs
    )
    rows = ",".join(str(a.shape[0]) if a.ndim else "1" for a in feeds.values())
    out.write(
        f"latency: bare session.run, 1 thread, batch {rows}, {args.runs} runs interleaved: "
        f"fp32 p50 {fp32_p50:.4f} ms p99 {fp32_p99:.4f} ms; "
        f"int8 p50 {int8_p50:.4f} ms p99 {int8_p99:.4f} ms ({int8_p50 / fp32_p50:.2f}x)\n"
    )
    if not args.eval:
        return EXIT_OK
    try:
        before = _evaluate(fp32, Path(args.data), out)
        after = None if before is None else _evaluate(int8, Path(args.data), out)
    except EvaluationUnavailableError as exc:
        out.write(f"metric delta: not measured: {exc}\n")
        return EXIT_OK
    except ModelError as exc:
        err.write(f"evaluation failed: {exc}\n")
        return EXIT_FAILED
    if before is None or after is None:
        return EXIT_OK
    out.write(f"evaluation: {before.dataset} ({before.samples} samples)\n")
    for name in before.metrics:
        a, b = before.metrics[name], after.metrics.get(name, float("nan"))
        mark = " (primary)" if name == before.primary else ""
        out.write(f"  {name}: fp32 {a:.6g}  int8 {b:.6g}  delta {b - a:+.6g}{mark}\n")
    card_with_metrics = ModelCard.model_validate(
        card.model_dump() | {"metrics": {**card.metrics, **after.metrics}}
    )
    card_path.write_text(dump_card(card_with_metrics), encoding="utf-8")
    return EXIT_OK


def cmd_eval(args: argparse.Namespace, out: IO[str], err: IO[str]) -> int:
    try:
        model = load_model(Path(args.card))
        evaluation = _evaluate(model, Path(args.data), out)
    except EvaluationUnavailableError as exc:
        err.write(f"not evaluated: {exc}\n")
        return EXIT_FAILED
    except ModelError as exc:
        err.write(f"{exc}\n")
        return EXIT_FAILED
    if evaluation is None:
        return EXIT_USAGE
    out.write(
        f"{model.model_id} {model.version} ({model.card.quantization}, sha256 "
        f"{model.sha256[:12]}) on {evaluation.dataset}, {evaluation.samples} samples:\n"
    )
    for name, value in evaluation.metrics.items():
        mark = " (primary)" if name == evaluation.primary else ""
        out.write(f"  {name}: {value:.6g}{mark}\n")
    return EXIT_OK


def add_models_parser(sub: Any) -> None:
    """Register ``models list|verify|quantize|eval`` on the main parser's sub-commands."""
    models_cmd = sub.add_parser("models", help="model cards: list, verify, quantise, evaluate")
    models_sub = models_cmd.add_subparsers(dest="models_command", required=True, metavar="COMMAND")

    list_cmd = models_sub.add_parser(
        "list",
        help="list model cards and whether they verify here",
        description="Cards under DIR (default: the shipped models), or those -c CONFIG names.",
    )
    list_cmd.add_argument("dir", nargs="?", metavar="DIR", help="look for cards here")
    list_cmd.add_argument("-c", "--config", type=Path, default=None)
    list_cmd.set_defaults(models_func=cmd_list)

    verify_cmd = models_sub.add_parser(
        "verify",
        help="verify cards: sha256, signature, warm-up (exit 1 if one fails)",
        description="Check each CARD (default: the shipped models, or those -c CONFIG names) "
        "as the gateway does before using a model; one line per card names the problem.",
    )
    verify_cmd.add_argument("cards", nargs="*", metavar="CARD")
    verify_cmd.add_argument("-c", "--config", type=Path, default=None)
    verify_cmd.set_defaults(models_func=cmd_verify)

    quant_cmd = models_sub.add_parser(
        "quantize",
        help="make an int8 model and card from an fp32 one",
        description="Writes OUT/<stem>.int8.onnx and its card, prints size and bare "
        "session.run latency fp32 vs int8, and with --eval the metric delta on the task's "
        "evaluation data. --calibration NPZ: one array per input, samples along the first "
        "axis, from the training portion of the data.",
    )
    quant_cmd.add_argument("--card", required=True, metavar="FP32CARD")
    quant_cmd.add_argument("--out", required=True, metavar="DIR")
    quant_cmd.add_argument("--calibration", metavar="NPZ", default=None)
    quant_cmd.add_argument("--method", choices=("static", "dynamic"), default="static")
    quant_cmd.add_argument("--eval", action="store_true", help="also report the metric delta")
    quant_cmd.add_argument("--data", default=str(default_data_dir()), metavar="DIR")
    quant_cmd.add_argument(
        "--runs", type=positive_int, default=_LATENCY_RUNS, help="latency runs per model"
    )
    quant_cmd.set_defaults(models_func=cmd_quantize)

    eval_cmd = models_sub.add_parser(
        "eval",
        help="evaluate a model with its task's evaluator",
        description="Runs the evaluator registered for the card's task on its evaluation data.",
    )
    eval_cmd.add_argument("--card", required=True, metavar="CARD")
    eval_cmd.add_argument("--data", default=str(default_data_dir()), metavar="DIR")
    eval_cmd.set_defaults(models_func=cmd_eval)

    models_cmd.set_defaults(func=_dispatch)


def _dispatch(args: argparse.Namespace) -> int:
    code: int = args.models_func(args, sys.stdout, sys.stderr)
    return code


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m gateway.models_cli ...``: the same as ``edge-gateway models ...``."""
    parser = argparse.ArgumentParser(prog="edge-gateway")
    add_models_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["models", *(sys.argv[1:] if argv is None else argv)])
    return _dispatch(args)


if __name__ == "__main__":
    sys.exit(main())
