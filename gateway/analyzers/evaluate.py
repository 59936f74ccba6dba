"""Evaluate the water-level analyzer (rules + learned score) on real data no one here wrote.

    .venv/bin/python -m gateway.analyzers.evaluate [--data DIR] [--markdown FILE]

Runs the daemon's analyzer (:mod:`gateway.analyzers.water_level`, reading by reading, no
look-ahead) over ``../shared/data`` with the shipped int8 model and with its fp32 original, and
reports on the *evaluation* portion of every series (:mod:`models.water_level.data`; the first
15 % is training and only warms the analyzer's state up here):

- NAB (generic profile): labelled windows detected, first detection after a window opens, and
  false alarms outside the windows (rows and episodes);
- Hub'Eau floods (water-level profile): lead time of the first warning (stage or rate of rise)
  and of the first confirmed alarm before each flood's peak; warnings outside the flood, and on
  the calm control (L'Aude at Carcassonne);
- Logan River stage (water-level profile): precision and recall of the points the analyzer
  flags as suspect (invalid, outlier, flatline, learned anomaly) against the technician's QC.

No threshold is chosen here: rules use their a-priori defaults (``gateway/analyzers/config.py``),
the score threshold is the card's (set on the training portion by ``train.py``). The only
per-gauge setting is the stage levels, which a flood service sets per gauge and which are taken
here as the training portion's median level + 1, 2, 3, 4 m. When the data directory is absent,
it says so and exits 0 (nothing to evaluate on a fresh clone).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import numpy as np

from gateway.analyzers.config import AnalyzerConfig
from gateway.analyzers.runtime import model_ref
from gateway.analyzers.water_level import (
    Analysis,
    ModelRef,
    Observation,
    Pending,
    Scorer,
    SeriesAnalyzer,
    analyze_all,
)
from gateway.inference import LoadedModel, load_model
from models.water_level.data import (
    FAULT_LABELS,
    HUBEAU_FILES,
    Series,
    default_data_dir,
    load_hubeau,
    load_lro,
    load_nab,
)
from models.water_level.features import ForecastParams

__all__ = ["main", "run_series"]

MODELS = Path(__file__).resolve().parents[2] / "models" / "water_level"
CARDS = {"int8": MODELS / "forecaster.toml", "fp32": MODELS / "forecaster.fp32.toml"}
# Flags that say "this point is suspect" (data quality), as opposed to hydrological warnings.
QC_FLAGS = frozenset({"invalid", "outlier", "flatline", "learned_anomaly", "out_of_order"})
WARNING_FLAGS = ("rate_of_rise", "stage_1", "stage_2", "stage_3", "stage_4")
# The rising limb of a flood: warnings within this time before the peak belong to the flood.
FLOOD_WINDOW = timedelta(hours=48)
STAGE_STEPS_CM = (100.0, 200.0, 300.0, 400.0)
_CHUNK = 1024


def run_series(
    series: Series,
    cfg: AnalyzerConfig,
    scorer: Scorer | None,
    model: ModelRef | None,
    params: ForecastParams,
) -> list[Analysis]:
    """The analyzer's verdict on every row, in order (chunks of rows share one model call)."""
    analyzer = SeriesAnalyzer(cfg, params)
    out: list[Analysis] = []
    chunk: list[Pending] = []
    for ts, value in zip(series.times, series.values, strict=True):
        chunk.append(analyzer.observe(Observation(ts, value)))
        if len(chunk) >= _CHUNK:
            out.extend(analyze_all(chunk, scorer, model))
            chunk.clear()
    out.extend(analyze_all(chunk, scorer, model))
    return out


def _episodes(rows: Sequence[int]) -> list[tuple[int, int]]:
    """Runs of consecutive row numbers as (first, last)."""
    runs: list[tuple[int, int]] = []
    for row in rows:
        if runs and row == runs[-1][1] + 1:
            runs[-1] = (runs[-1][0], row)
        else:
            runs.append((row, row))
    return runs


def _hours(delta: timedelta) -> float:
    return round(delta.total_seconds() / 3600, 1)


@dataclass
class Model:
    """A model as the evaluation runs it."""

    name: str
    loaded: LoadedModel
    ref: ModelRef
    params: ForecastParams
    scorer: Scorer


def _model(name: str, card: Path) -> Model:
    loaded = load_model(card)

    def scorer(batch: np.ndarray) -> np.ndarray:
        return loaded.run({"window": batch})[0][:, 0]

    params = ForecastParams.from_params(loaded.card.params)
    return Model(name, loaded, model_ref(loaded), params, scorer)


@dataclass
class Report:
    """Markdown lines plus the headline figures for the fp32/int8 comparison."""

    lines: list[str] = field(default_factory=list)
    figures: dict[str, float] = field(default_factory=dict)
    scores: list[float] = field(default_factory=list)
    decisions: list[bool] = field(default_factory=list)

    def add(self, *text: str) -> None:
        self.lines.extend(text)


def evaluate_nab(root: Path, model: Model, report: Report) -> None:
    report.add(
        "### NAB: labelled anomaly windows (generic profile)",
        "",
        "| series | eval rows | windows | detected | with a learned-score flag "
        "| first flag after opening (h) | false-alarm rows | false-alarm episodes "
        "| per 1000 rows outside |",
        "|---|---:|---:|---:|---:|---|---:|---:|---:|",
    )
    cfg = AnalyzerConfig(profile="generic")
    total_windows = detected_all = by_model_all = false_rows_all = false_eps_all = 0
    outside_all = 0
    for series in load_nab(root):
        results = run_series(series, cfg, model.scorer, model.ref, model.params)
        start = series.train_end
        times = series.times
        first_eval = times[start]
        windows = [(a, b) for a, b in series.windows if a >= first_eval]
        inside = [False] * len(times)
        delays: list[str] = []
        detected = by_model = 0
        for a, b in windows:
            rows = [i for i in range(start, len(times)) if a <= times[i] <= b]
            for i in rows:
                inside[i] = True
            hits = [i for i in rows if results[i].anomaly]
            model_hits = [i for i in rows if "learned_anomaly" in results[i].flags]
            detected += bool(hits)
            by_model += bool(model_hits)
            delays.append(f"{_hours(times[hits[0]] - a)}" if hits else "-")
        false_rows = [i for i in range(start, len(times)) if results[i].anomaly and not inside[i]]
        outside = sum(1 for i in range(start, len(times)) if not inside[i])
        episodes = len(_episodes(false_rows))
        rate = 1000 * len(false_rows) / max(outside, 1)
        report.add(
            f"| {series.name} | {len(times) - start} | {len(windows)} | {detected} | {by_model} "
            f"| {', '.join(delays) or '-'} | {len(false_rows)} | {episodes} | {rate:.1f} |"
        )
        total_windows += len(windows)
        detected_all += detected
        by_model_all += by_model
        false_rows_all += len(false_rows)
        false_eps_all += episodes
        outside_all += outside
        report.scores.extend(r.score for r in results[start:])
        report.decisions.extend("learned_anomaly" in r.flags for r in results[start:])
    report.add(
        f"| **all** | | {total_windows} | {detected_all} | {by_model_all} | | {false_rows_all} "
        f"| {false_eps_all} | {1000 * false_rows_all / max(outside_all, 1):.1f} |",
        "",
    )
    report.figures["nab_windows_detected"] = detected_all
    report.figures["nab_windows"] = total_windows
    report.figures["nab_windows_detected_by_model"] = by_model_all
    report.figures["nab_false_alarm_episodes"] = false_eps_all
    report.figures["nab_false_alarm_rows_per_1000"] = round(
        1000 * false_rows_all / max(outside_all, 1), 2
    )


def gauge_config(series: Series) -> AnalyzerConfig:
    """Water-level profile with the gauge's stages: training-portion median + 1, 2, 3, 4 m."""
    baseline = statistics.median(series.training())
    return AnalyzerConfig(
        profile="water-level", stages_cm=[round(baseline + step, 1) for step in STAGE_STEPS_CM]
    )


def _warning_episodes(results: Sequence[Analysis], rows: range) -> list[tuple[int, int]]:
    warned = [i for i in rows if any(f in results[i].flags for f in WARNING_FLAGS)]
    return _episodes(warned)


def _control_lines(series: Series, results: Sequence[Analysis], baseline: float) -> list[str]:
    start, times, values = series.train_end, series.times, series.values
    episodes = _warning_episodes(results, range(start, len(times)))
    anomalies = _episodes(
        [i for i in range(start, len(times)) if "learned_anomaly" in results[i].flags]
    )
    outliers = sum("outlier" in r.flags for r in results[start:])
    highest = max(v for v in values[start:] if v is not None)
    lines = [
        f"- **{series.name}** (control, {len(times) - start} evaluation rows, baseline "
        f"{baseline:.0f} cm, highest level {highest:.0f} cm): {len(episodes)} warning "
        f"episode(s), {len(anomalies)} learned-anomaly episode(s), {outliers} outlier row(s)."
    ]
    for a, b in episodes:
        reasons = sorted({f for i in range(a, b + 1) for f in results[i].flags} & {*WARNING_FLAGS})
        rise = max(results[i].rise or 0.0 for i in range(a, b + 1))
        lines.append(
            f"  - {times[a]:%Y-%m-%d %H:%M} to {times[b]:%H:%M}: {', '.join(reasons)} "
            f"(largest rise within 3 h: {rise:.0f} cm; level {values[a]:.0f} to "
            f"{max(v or 0 for v in values[a : b + 1]):.0f} cm)"
        )
    return lines


def _first(
    results: Sequence[Analysis], rows: Sequence[int], test: Callable[[Analysis], bool]
) -> int | None:
    return next((i for i in rows if test(results[i])), None)


def _flood_row(
    series: Series, results: Sequence[Analysis], baseline: float
) -> tuple[str, float | None, int]:
    """The flood's table row, its first warning's lead time and its warnings before the flood."""
    start, times = series.train_end, series.times
    values = [v if v is not None else -1.0 for v in series.values]
    peak = max(range(start, len(values)), key=values.__getitem__)
    peak_t = times[peak]
    in_flood = [i for i in range(start, peak + 1) if times[i] >= peak_t - FLOOD_WINDOW]

    def lead(row: int | None) -> str:
        return "-" if row is None else f"{_hours(peak_t - times[row])}"

    warn = _first(results, in_flood, lambda r: any(f in r.flags for f in WARNING_FLAGS))
    alarm = _first(results, in_flood, lambda r: r.severity in ("alarm", "critical"))
    learned = _first(results, in_flood, lambda r: "learned_anomaly" in r.flags)
    stage_leads = []
    for n in range(1, 5):

        def reached(r: Analysis, n: int = n) -> bool:
            return r.stage >= n

        stage_leads.append(lead(_first(results, in_flood, reached)))
    warn_text = "none"
    lead_h = None
    if warn is not None:
        shown = (*WARNING_FLAGS, "unconfirmed")
        reason = ", ".join(f for f in results[warn].flags if f in shown)
        lead_h = _hours(peak_t - times[warn])
        warn_text = f"{lead_h} ({reason})"
    # Warning episodes that ended before the flood's 48 h (after the peak is the falling limb).
    before = [
        (a, b)
        for a, b in _warning_episodes(results, range(start, len(times)))
        if times[b] < peak_t - FLOOD_WINDOW
    ]
    before_text = (
        "; ".join(
            f"{times[a]:%m-%d %H:%M} "
            + ",".join(
                sorted({f for i in range(a, b + 1) for f in results[i].flags} & {*WARNING_FLAGS})
            )
            for a, b in before
        )
        or "none"
    )
    row = (
        f"| {series.name} | {baseline:.0f} | {values[peak]:.0f} | {peak_t:%Y-%m-%d %H:%M} "
        f"| {warn_text} | {lead(alarm)} | {' / '.join(stage_leads)} | {lead(learned)} "
        f"| {before_text} |"
    )
    return row, lead_h, len(before)


def evaluate_floods(root: Path, model: Model, report: Report) -> None:
    report.add(
        "### Hub'Eau river floods (water-level profile)",
        "",
        "Stages per gauge: training-portion median level + 1 / 2 / 3 / 4 m. Lead times are "
        "counted back from the highest level of the evaluation portion; the flood is the 48 h "
        "before it.",
        "",
        "| gauge | baseline (cm) | peak (cm) | peak time (UTC) | first warning: lead (h), reason "
        "| first alarm: lead (h) | stage 1 / 2 / 3 / 4 reached: lead (h) "
        "| first learned anomaly: lead (h) | warning episodes before the flood |",
        "|---|---:|---:|---|---|---:|---|---:|---|",
    )
    control: list[str] = []
    leads: list[float] = []
    outside_total = 0
    for series in load_hubeau(root):
        cfg = gauge_config(series)
        results = run_series(series, cfg, model.scorer, model.ref, model.params)
        baseline = cfg.stages_cm[0] - STAGE_STEPS_CM[0]
        report.scores.extend(r.score for r in results[series.train_end :])
        report.decisions.extend("learned_anomaly" in r.flags for r in results[series.train_end :])
        code = series.name.rsplit("(", 1)[1].rstrip(")")
        flood = next(v for k, v in HUBEAU_FILES.items() if code in k)[1]
        if flood is None:
            control += _control_lines(series, results, baseline)
            report.figures["control_warning_episodes"] = len(
                _warning_episodes(results, range(series.train_end, len(series)))
            )
            continue
        row, lead_h, before = _flood_row(series, results, baseline)
        report.add(row)
        if lead_h is not None:
            leads.append(lead_h)
        outside_total += before
    report.add("", "Calm control:", "", *control, "")
    report.figures["flood_mean_lead_h"] = round(sum(leads) / max(len(leads), 1), 2)
    report.figures["flood_warnings_before_flood"] = outside_total


def evaluate_stage_qc(root: Path, model: Model, report: Report) -> None:
    series = load_lro(root)
    cfg = gauge_config(series)
    results = run_series(series, cfg, model.scorer, model.ref, model.params)
    start = series.train_end
    rows = range(start, len(series))
    labels = series.labels
    flagged = {i for i in rows if QC_FLAGS.intersection(results[i].flags)}
    positives = {i for i in rows if labels[i] in FAULT_LABELS}
    tp = len(flagged & positives)
    precision = tp / max(len(flagged), 1)
    recall = tp / max(len(positives), 1)
    report.scores.extend(r.score for r in results[start:])
    report.decisions.extend("learned_anomaly" in r.flags for r in results[start:])
    report.add(
        "### Logan River stage vs the technician's QC (water-level profile)",
        "",
        f"Evaluation portion: {len(rows)} rows from {series.times[start]:%Y-%m-%d %H:%M}. "
        f"Suspect points = rows flagged {', '.join(sorted(QC_FLAGS))}; faults = rows the "
        f"technician removed, replaced or corrected on their own ({len(positives)} rows).",
        "",
        "| | rows | flagged | precision | recall |",
        "|---|---:|---:|---:|---:|",
        f"| all faults (points) | {len(positives)} | {len(flagged)} | {precision:.3f} "
        f"| {recall:.3f} |",
    )
    for kind in ("removed", "replaced", "corrected", "qualified"):
        kind_rows = {i for i in rows if labels[i] == kind}
        hit = len(kind_rows & flagged)
        report.add(f"| {kind} | {len(kind_rows)} | {hit} | | {hit / max(len(kind_rows), 1):.3f} |")
    episodes = _episodes(sorted(positives))
    found = sum(any(i in flagged for i in range(a, b + 1)) for a, b in episodes)
    clean = {i for i in rows if not labels[i]}
    false_flags = flagged & clean
    report.add(
        "",
        f"Fault episodes (runs of consecutive fault rows): {len(episodes)}, of which {found} "
        f"have at least one flagged row. Flags on rows the technician left alone: "
        f"{len(false_flags)} of {len(clean)} ({1000 * len(false_flags) / max(len(clean), 1):.1f} "
        "per 1000).",
        "",
        "| flag | rows flagged | of them faults |",
        "|---|---:|---:|",
    )
    for flag in sorted(QC_FLAGS):
        with_flag = {i for i in rows if flag in results[i].flags}
        report.add(f"| {flag} | {len(with_flag)} | {len(with_flag & positives)} |")
    warned = _warning_episodes(results, rows)
    described = [
        f"{series.times[a]:%Y-%m-%d %H:%M} ({b - a + 1} rows"
        + (
            f", right after rows the technician {labels[a - 1]}"
            if labels[a - 1] in FAULT_LABELS or labels[a] in FAULT_LABELS
            else ""
        )
        + ")"
        for a, b in warned
    ]
    report.add(
        "",
        f"Hydrological warnings (stage or rate of rise; not counted as suspect points): "
        f"{len(warned)} episode(s){': ' if described else ''}{'; '.join(described)}.",
        "",
    )
    report.figures["stage_qc_warning_episodes"] = len(warned)
    report.figures["stage_qc_precision"] = round(precision, 4)
    report.figures["stage_qc_recall"] = round(recall, 4)
    report.figures["stage_qc_episodes_found"] = found
    report.figures["stage_qc_episodes"] = len(episodes)


def _latency_us(model: Model) -> float:
    batch = np.zeros((1, model.params.window), np.float32)
    for _ in range(50):
        model.scorer(batch)
    t0 = time.perf_counter()
    for _ in range(2000):
        model.scorer(batch)
    return (time.perf_counter() - t0) / 2000 * 1e6


def evaluate(root: Path) -> list[str]:
    """The report as markdown lines."""
    reports: dict[str, Report] = {}
    models = {name: _model(name, card) for name, card in CARDS.items()}
    for name, model in models.items():
        report = Report()
        evaluate_nab(root, model, report)
        evaluate_floods(root, model, report)
        evaluate_stage_qc(root, model, report)
        reports[name] = report
    int8, fp32 = models["int8"], models["fp32"]
    head = [
        f"Model: `{int8.ref.model_id}` {int8.ref.version}, int8 `{int8.loaded.model_path.name}` "
        f"sha256 `{int8.ref.sha256}`, threshold {int8.ref.threshold} (fp32 reference: "
        f"`{fp32.loaded.model_path.name}` sha256 `{fp32.ref.sha256[:16]}…`, threshold "
        f"{fp32.ref.threshold}).",
        "",
        "## Results with the shipped int8 model",
        "",
        *reports["int8"].lines,
        "## fp32 vs int8",
        "",
        "| | fp32 | int8 |",
        "|---|---:|---:|",
        f"| file size (bytes) | {fp32.loaded.model_path.stat().st_size} "
        f"| {int8.loaded.model_path.stat().st_size} |",
        f"| one-row session.run (µs, this run) | {_latency_us(fp32):.1f} "
        f"| {_latency_us(int8):.1f} |",
        f"| score threshold (training portion) | {fp32.ref.threshold} | {int8.ref.threshold} |",
    ]
    for key in reports["int8"].figures:
        head.append(
            f"| {key} | {reports['fp32'].figures.get(key)} | {reports['int8'].figures[key]} |"
        )
    a = np.asarray(reports["fp32"].scores)
    b = np.asarray(reports["int8"].scores)
    differ = sum(
        x != y for x, y in zip(reports["fp32"].decisions, reports["int8"].decisions, strict=True)
    )
    head += [
        "",
        f"Scores on all {len(a)} evaluation rows: mean |fp32 - int8| = "
        f"{np.mean(np.abs(a - b)):.4f}, "
        f"max {np.max(np.abs(a - b)):.4f}; the learned-anomaly decision differs on {differ} rows "
        f"({1000 * differ / max(len(a), 1):.2f} per 1000).",
        "",
    ]
    return head


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=default_data_dir())
    parser.add_argument("--markdown", type=Path, default=None, help="also write the report here")
    args = parser.parse_args(argv)
    needed = ["nab-anomaly", "hubeau-river-level-floods", "lro-stream-stage-qc"]
    missing = [name for name in needed if not (args.data / name).is_dir()]
    if missing:
        sys.stdout.write(
            f"evaluation skipped: {args.data} has no {', '.join(missing)} (the shared data sets "
            "are not part of a clone; see models/water_level/README.md)\n"
        )
        return 0
    lines = evaluate(args.data)
    text = "\n".join(lines) + "\n"
    sys.stdout.write(text)
    if args.markdown is not None:
        args.markdown.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
