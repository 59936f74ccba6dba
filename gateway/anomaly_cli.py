"""``edge-gateway anomaly replay``: a CSV series through the gateway's streaming analyzer.

    edge-gateway anomaly replay --input FILE.csv --time-column NAME --value-column NAME \\
        [--profile generic|water-level] --out OUT.csv [--model CARD.toml]

Rows are fed one by one, in file order, through the same analyzer the daemon runs
(:mod:`gateway.analyzers.water_level`, no look-ahead) with the shipped int8 model
(``models/water_level/forecaster.toml``, verified like the daemon verifies it). One output row
per input row: ``timestamp,value,score,anomaly,flags`` (``timestamp`` and ``value`` as they were in
the input, ``score`` in [0, 1), ``anomaly`` 0/1, ``flags`` ``;``-separated).

- ``generic`` knows nothing of units: learned score, robust outliers, flatline, gap.
  ``water-level`` takes the values as a level in cm and adds the level rules with the default
  thresholds of ``[analyzers]`` (stages 200/300/400/500 cm, rise > 22 cm in 3 h, sentinel 0).
- The delimiter (``,``, ``;`` or tab) is taken from the header line. A time without a zone is
  UTC; a number is seconds since the epoch.
- A missing column, an unreadable file or a time that cannot be parsed is an error naming the
  file, row and column (exit 2): without its time a row cannot be placed in the series. A blank
  or non-numeric value is not: the row is written with ``anomaly`` 1 and the flags
  ``invalid;missing`` or ``invalid;not_a_number`` (as the daemon does with a reading that has no
  usable value), it is named on stderr, and the replay goes on.
- Rows out of time order are flagged ``out_of_order`` and do not change the analyzer's state:
  sort a newest-first file first.
- A progress bar is drawn on stderr when it is a terminal.
"""

from __future__ import annotations

import argparse
import csv
import io
import math
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, TextIO

import numpy as np

from gateway.analyzers.config import AnalyzerConfig, Profile
from gateway.analyzers.water_level import (
    DeviceAnalyzers,
    ModelRef,
    Pending,
    Scorer,
    analyze_all,
)
from gateway.errors import ModelError
from gateway.types import Measurement, Reading
from models.water_level.features import ForecastParams

__all__ = ["DEFAULT_CARD", "ReplayError", "add_anomaly_parser", "replay"]

EXIT_OK = 0
EXIT_USAGE = 2

DEFAULT_CARD = Path(__file__).resolve().parent.parent / "models" / "water_level" / "forecaster.toml"
DEVICE = "replay"
OUTPUT_COLUMNS = ("timestamp", "value", "score", "anomaly", "flags")
# Rows observed before one model call: the features of a reading never depend on the scores of
# the ones before it, so scoring a chunk at once gives the same numbers as one by one.
_CHUNK = 512


class ReplayError(Exception):
    """The input cannot be replayed; the message names the file, row and column."""


@dataclass(frozen=True, slots=True)
class _Row:
    line: int
    time_text: str
    value_text: str
    reading: Reading


def parse_timestamp(text: str) -> datetime:
    """ISO 8601 (a time without a zone is UTC) or seconds since the epoch; ValueError if neither."""
    text = text.strip()
    if not text:
        raise ValueError("empty")
    try:
        seconds = float(text)
    except ValueError:
        ts = datetime.fromisoformat(text.replace("Z", "+00:00"))
        return ts if ts.tzinfo is not None else ts.replace(tzinfo=UTC)
    if not math.isfinite(seconds):
        raise ValueError("not a finite number of seconds")
    return datetime.fromtimestamp(seconds, UTC)


def _value(text: str) -> tuple[float | None, str | None]:
    """The number in a value cell, or None and why not."""
    text = text.strip()
    if not text:
        return None, "missing"
    try:
        number = float(text)
    except ValueError:
        return None, "not_a_number"
    if not math.isfinite(number):
        return None, "not_a_number"
    return number, None


def _rows(
    path: Path,
    fh: TextIO,
    *,
    time_column: str,
    value_column: str,
    cfg: AnalyzerConfig,
    problems: list[str],
) -> Iterator[_Row]:
    header_line = fh.readline()
    if not header_line.strip():
        raise ReplayError(f"{path}: the file is empty (a header row is needed)")
    delimiter = max(",;\t", key=header_line.count)
    header = next(csv.reader([header_line], delimiter=delimiter))
    header = [name.strip() for name in header]
    indexes = {}
    for option, name in (("--time-column", time_column), ("--value-column", value_column)):
        if name not in header:
            raise ReplayError(
                f"{path}: row 1: no column {name!r} ({option}); the columns are "
                f"{', '.join(repr(h) for h in header)}"
            )
        indexes[name] = header.index(name)
    unit = "cm" if cfg.profile == "water-level" else None
    for number, cells in enumerate(csv.reader(fh, delimiter=delimiter), start=2):
        if not cells or all(not c.strip() for c in cells):
            continue
        t_index, v_index = indexes[time_column], indexes[value_column]
        time_text = cells[t_index] if t_index < len(cells) else ""
        value_text = cells[v_index] if v_index < len(cells) else ""
        try:
            ts = parse_timestamp(time_text)
        except (ValueError, OverflowError, OSError) as exc:
            raise ReplayError(
                f"{path}: row {number}: column {time_column!r}: not a time ({exc}) "
                f"(got: {time_text[:80]!r})"
            ) from exc
        value, problem = _value(value_text)
        if problem is not None:
            problems.append(
                f"{path}: row {number}: column {value_column!r}: {problem.replace('_', ' ')} "
                f"(got: {value_text[:80]!r}); flagged invalid"
            )
        values = () if value is None else (Measurement(cfg.measurement, value, unit),)
        reading = Reading(
            source="replay",
            device=DEVICE,
            ts=ts,
            values=values,
            quality=(problem,) if problem == "not_a_number" else (),
        )
        yield _Row(number, time_text, value_text, reading)


class _Progress:
    """A one-line progress bar on a terminal; nothing otherwise."""

    def __init__(self, stream: TextIO, total_bytes: int) -> None:
        self._stream = stream
        self._total = max(total_bytes, 1)
        self._on = stream.isatty()
        self._shown = -1

    def update(self, done_bytes: int, rows: int) -> None:
        if not self._on:
            return
        percent = min(100, done_bytes * 100 // self._total)
        if percent == self._shown:
            return
        self._shown = percent
        bar = "#" * (percent // 4)
        self._stream.write(f"\ranomaly replay [{bar:<25}] {percent:3d}% {rows} rows")
        self._stream.flush()

    def close(self) -> None:
        if self._on and self._shown >= 0:
            self._stream.write("\n")
            self._stream.flush()


def _flush(
    chunk: list[tuple[_Row, Pending]],
    scorer: Scorer | None,
    model: ModelRef | None,
    writer: csv.DictWriter[str],
) -> int:
    analyses = analyze_all([p for _r, p in chunk], scorer, model)
    anomalies = 0
    for (row, _pending), analysis in zip(chunk, analyses, strict=True):
        anomalies += analysis.anomaly
        writer.writerow(
            {
                "timestamp": row.time_text,
                "value": row.value_text.strip(),
                "score": f"{analysis.score:.6f}",
                "anomaly": int(analysis.anomaly),
                "flags": ";".join(analysis.flags),
            }
        )
    chunk.clear()
    return anomalies


def replay(
    input_path: Path,
    out: IO[str],
    *,
    time_column: str,
    value_column: str,
    profile: Profile,
    scorer: Scorer | None,
    model: ModelRef | None,
    params: ForecastParams,
    errors: TextIO,
) -> tuple[int, int, list[str]]:
    """Replay a CSV file into ``out``; returns (rows, anomalous rows, value problems)."""
    cfg = AnalyzerConfig(profile=profile, devices=[DEVICE])
    analyzers = DeviceAnalyzers({"replay": cfg}, {cfg.model: params})
    problems: list[str] = []
    writer = csv.DictWriter(out, fieldnames=OUTPUT_COLUMNS, lineterminator="\n")
    writer.writeheader()
    rows = anomalies = 0
    try:
        size = input_path.stat().st_size
        raw = input_path.open("rb")
        fh = io.TextIOWrapper(raw, encoding="utf-8-sig", newline="")
    except OSError as exc:
        raise ReplayError(f"{input_path}: cannot read: {exc.strerror or exc}") from exc
    progress = _Progress(errors, size)
    chunk: list[tuple[_Row, Pending]] = []
    try:
        with fh:
            rows_in = _rows(
                input_path,
                fh,
                time_column=time_column,
                value_column=value_column,
                cfg=cfg,
                problems=problems,
            )
            for row in rows_in:
                chunk.append((row, analyzers.observe(row.reading)))
                rows += 1
                if len(chunk) >= _CHUNK:
                    anomalies += _flush(chunk, scorer, model, writer)
                    progress.update(raw.tell(), rows)
            anomalies += _flush(chunk, scorer, model, writer)
            progress.update(size, rows)
    except UnicodeDecodeError as exc:
        raise ReplayError(f"{input_path}: not UTF-8 text ({exc.reason})") from exc
    except csv.Error as exc:
        raise ReplayError(f"{input_path}: CSV syntax error: {exc}") from exc
    finally:
        progress.close()
    return rows, anomalies, problems


def _say(text: str) -> None:
    sys.stderr.write(f"edge-gateway anomaly replay: {text}\n")


def _cmd_replay(args: argparse.Namespace) -> int:
    from gateway.inference import load_model  # noqa: PLC0415 -- onnxruntime only for this command

    try:
        loaded = load_model(args.model, threads=1)
        params = ForecastParams.from_params(loaded.card.params)
    except ModelError as exc:
        _say(str(exc))
        return EXIT_USAGE
    except ValueError as exc:
        _say(f"{args.model}: {exc}")
        return EXIT_USAGE
    threshold = loaded.card.thresholds.get("anomaly")
    if threshold is None:
        _say(f"{args.model}: thresholds.anomaly: missing")
        return EXIT_USAGE
    model = ModelRef(loaded.model_id, loaded.version, loaded.sha256, threshold)
    input_name = loaded.card.inputs[0].name

    def scorer(batch: np.ndarray) -> np.ndarray:
        return loaded.run({input_name: batch})[0][:, 0]

    out_path: Path = args.out
    tmp = out_path.with_name(out_path.name + ".part")
    try:
        with tmp.open("w", newline="", encoding="utf-8") as out:
            rows, anomalies, problems = replay(
                args.input,
                out,
                time_column=args.time_column,
                value_column=args.value_column,
                profile=args.profile,
                scorer=scorer,
                model=model,
                params=params,
                errors=sys.stderr,
            )
        tmp.replace(out_path)
    except (ReplayError, ModelError) as exc:
        # ModelError: the model failed at run time (a card given with --model); the daemon
        # would say no_score, but a replay's point is the model's verdict: stop and say why.
        tmp.unlink(missing_ok=True)
        _say(str(exc))
        return EXIT_USAGE
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        _say(f"{out_path}: cannot write: {exc.strerror or exc}")
        return EXIT_USAGE
    for problem in problems[:20]:
        _say(problem)
    if len(problems) > 20:
        _say(f"... and {len(problems) - 20} more such rows")
    _say(
        f"{rows} rows, {anomalies} anomalous, {len(problems)} without a usable "
        f"value; model {model.model_id} {model.version} sha256 {model.sha256[:12]} threshold "
        f"{threshold}; wrote {out_path}"
    )
    return EXIT_OK


def _configure(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="anomaly_command", required=True, metavar="COMMAND")
    run = sub.add_parser(
        "replay",
        help="feed a CSV series through the streaming analyzer, one verdict per row",
        description="Feed a CSV series row by row through the gateway's streaming analyzer "
        "(the daemon's code and the shipped int8 model, no look-ahead) and write "
        "timestamp,value,score,anomaly,flags per input row.",
    )
    run.add_argument("--input", type=Path, required=True, metavar="FILE.csv")
    run.add_argument("--time-column", required=True, metavar="NAME")
    run.add_argument("--value-column", required=True, metavar="NAME")
    run.add_argument(
        "--profile",
        choices=("generic", "water-level"),
        default="generic",
        help="generic: no units (learned score, outliers, flatline, gap); water-level: values "
        "are a level in cm, plus warning stages and rate of rise (default: generic)",
    )
    run.add_argument("--out", type=Path, required=True, metavar="OUT.csv")
    run.add_argument(
        "--model",
        type=Path,
        default=DEFAULT_CARD,
        metavar="CARD.toml",
        help="model card (default: the shipped int8 water-level forecaster)",
    )
    run.set_defaults(func=_cmd_replay)


def add_anomaly_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``anomaly`` with the ``edge-gateway`` command line."""
    parser = sub.add_parser("anomaly", help="replay a series through the anomaly analyzer")
    _configure(parser)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="edge-gateway anomaly")
    _configure(parser)
    args = parser.parse_args(argv)
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
