"""End-to-end alarm timing of the pool analyzer on synthetic sequences (models/pool/synth.py).

Each video is read by the real camera source (fast pace: clip time), the real detector runs
through the inference engine, and the real :class:`~gateway.analyzers.pool_runtime.PoolMonitor`
decides; its ``history`` gives the clip time of every candidate and alarm. Against the truth the
generator wrote (when the person stopped or went under; whether an alarm is due) this reports,
per scenario, the time from stillness to ``candidate`` and to ``alarm``, and any alarm where none
is due (a person who keeps swimming or leaves the water)::

    python -m models.pool.synth --data ../shared/data/pool-swimmers-train --out /tmp/seq --people 4
    python -m gateway.analyzers.pool_eval /tmp/seq [--card pool/person_detector.toml]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway.analyzers.pool_config import PoolConfig
from gateway.analyzers.pool_runtime import PoolMonitor
from gateway.config import InferenceSection
from gateway.health import Metrics
from gateway.inference import InferenceEngine
from gateway.types import Event, Reading
from models.pool import DEFAULT_DETECTOR_CARD

__all__ = ["Outcome", "evaluate", "replay"]

# The synthetic pool's water (models/pool/synth.py WATER).
WATER_AREA = [(16.0, 16.0), (304.0, 16.0), (304.0, 224.0), (16.0, 224.0)]


@dataclass(frozen=True)
class Outcome:
    """What the analyzer did on one sequence, in clip time."""

    name: str
    scenario: str
    stop_s: float | None
    candidates: tuple[float, ...]
    alarms: tuple[float, ...]

    @property
    def alarm_due(self) -> bool:
        return self.stop_s is not None

    def delay(self, times: tuple[float, ...]) -> float | None:
        """Seconds from the stop to the first such signal at or after the stop."""
        if self.stop_s is None:
            return None
        after = [t for t in times if t >= self.stop_s]
        return round(after[0] - self.stop_s, 2) if after else None


async def replay(video: Path, card: Path, **overrides: Any) -> list[tuple[float, str, int]]:
    """Run the pool monitor over a video (fast pace); its (clip time, signal, track) history."""
    cfg = PoolConfig.model_validate(
        {
            "camera": {"url": str(video), "pace": "fast", "analysis_fps": 4.0},
            "detector_card": str(card),
            "water_area": WATER_AREA,
            **overrides,
        }
    )

    async def emit(item: Reading | Event, on_stored: Callable[[], None] | None = None) -> None:
        return None

    def report(kind: str, detail: str) -> None:
        raise RuntimeError(f"{kind}: {detail}")

    section = InferenceSection(threads=1)
    async with InferenceEngine(section) as engine:
        monitor = PoolMonitor("eval", cfg, engine, section, Metrics())
        await monitor.run(emit, report)
    return list(monitor.history)


async def evaluate(directory: Path, card: Path) -> list[Outcome]:
    """Every sequence of a synth output directory (its truth.json), in name order."""
    truth = json.loads((directory / "truth.json").read_text())
    outcomes = []
    for name in sorted(truth):
        item = truth[name]
        history = await replay(directory / item["video"], card)
        outcomes.append(
            Outcome(
                name=name,
                scenario=item.get("scenario", name),
                stop_s=item["stop_s"],
                candidates=tuple(t for t, kind, _track in history if kind == "candidate"),
                alarms=tuple(t for t, kind, _track in history if kind == "alarm"),
            )
        )
    return outcomes


def _spread(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"


def table(outcomes: Sequence[Outcome]) -> str:
    """A markdown table: per scenario, runs, detected, delays, alarms where none was due."""
    lines = [
        "| scenario | runs | alarm due | candidate after stop, s median (range) "
        "| alarm after stop, s median (range) | missed alarms | alarms not due |",
        "|---|---|---|---|---|---|---|",
    ]
    for scenario in sorted({o.scenario for o in outcomes}):
        runs = [o for o in outcomes if o.scenario == scenario]
        due = runs[0].alarm_due
        cand = [d for o in runs if (d := o.delay(o.candidates)) is not None]
        alarm = [d for o in runs if (d := o.delay(o.alarms)) is not None]
        missed = sum(1 for o in runs if due and o.delay(o.alarms) is None)
        extra = sum(1 for o in runs if not due and o.alarms)
        lines.append(
            f"| {scenario} | {len(runs)} | {'yes' if due else 'no'} | {_spread(cand)} "
            f"| {_spread(alarm)} | {missed if due else '-'} | {extra if not due else '-'} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Alarm timing on synthetic pool sequences.")
    parser.add_argument("directory", type=Path, help="output of models.pool.synth")
    parser.add_argument(
        "--card",
        type=Path,
        default=DEFAULT_DETECTOR_CARD,
        help="detector card (relative: below the shipped models)",
    )
    args = parser.parse_args(argv)
    card = InferenceSection().card_path(args.card)
    outcomes = asyncio.run(evaluate(args.directory, card))
    for o in outcomes:
        print(  # noqa: T201
            f"{o.name}: stop {o.stop_s} candidates {list(o.candidates)} alarms {list(o.alarms)}"
        )
    print(table(outcomes))  # noqa: T201
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
