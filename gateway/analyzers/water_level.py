"""The streaming water-level (and generic series) analyzer: one state machine per device.

Pure and synchronous: no asyncio, no I/O, no logging. The daemon (through
:mod:`gateway.analyzers.runtime`, model calls off the event loop) and ``edge-gateway anomaly
replay`` (model called directly) drive the same code, reading by reading, with no look-ahead.

Per reading, in this order:

1. **Order and gap**: a reading not newer than the previous one is ``out_of_order`` and leaves
   the state alone; one that comes more than ``gap_after_s`` (or ``gap_factor`` x the usual
   interval) after the previous one reports a ``gap``.
2. **Battery** (when the reading has one): ``battery_low``, ``battery_falling``.
3. **Plausibility**: a missing value, a sentinel, a value outside ``valid_min``..``valid_max``,
   an upstream quality flag that says the value is unusable (e.g. ``invalid_distance`` from the
   LoRaWAN gauge profile) → ``invalid`` plus the reason; the state is not updated by it.
4. **Robust outliers**: the value deviates from the rolling median by more than ``outlier_k``
   robust deviations (1.4826 x MAD, floored by ``outlier_min_scale`` and by the series' usual
   step), in a run that started with a jump of more than ``outlier_k`` usual steps → ``outlier``.
   Flagged and forwarded, never dropped.
5. **Flatline**: ``flatline_readings`` values within ``flatline_tolerance`` of the first of the
   run, spanning ``flatline_duration_s`` → ``flatline`` (a stuck sensor).
6. **Level rules** (water-level profile): warning stages 1-4 with hysteresis (``stage_N`` while in
   stage N, ``stage_entered`` / ``stage_left`` on a change) and the rate of rise over a time
   window (``rate_of_rise``, with hysteresis). A lone outlier does not move them: an echo spike is
   one reading; a second reading deviating the same way confirms a real change, and it is that
   reading which raises the warning (one reading of delay only when the onset itself looks like
   a spike; meanwhile the reading says ``unconfirmed`` at warning severity). Outliers *below* the
   series never move them: a sensor out of the water must not clear a warning, nor make its
   return look like a flash flood.
7. **Learned score**: the forecaster's standardised error (see :mod:`models.water_level.features`)
   → ``score`` in [0, 1); at or above the threshold → ``learned_anomaly``. The model call happens
   between :meth:`SeriesAnalyzer.observe` and :meth:`SeriesAnalyzer.complete`, so the caller
   decides where it runs.

Everything found goes into ONE result with the reasons listed as flags, its severity the worst
reason's, and the model's provenance (id, version, sha256, score, threshold) whenever the model
scored the reading.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime

import numpy as np

from gateway.analyzers.config import AnalyzerConfig
from gateway.types import (
    MAX_QUALITY_FLAGS,
    Event,
    Measurement,
    Provenance,
    Reading,
    Severity,
    new_event_id,
)
from models.water_level.features import ForecastParams, ForecastState

__all__ = [
    "FLAG_SEVERITY",
    "INVALID_UPSTREAM_FLAGS",
    "Analysis",
    "DeviceAnalyzers",
    "ModelRef",
    "Observation",
    "Pending",
    "Scorer",
    "SeriesAnalyzer",
    "analyze_all",
]

# Every flag the analyzer sets and how urgent it is alone; an event's severity is its worst flag's.
# German flood services' Meldestufe 1 means minor flooding (warning); 2 and 3 are alarms, 4 is a
# major flood (critical). A rate of rise beyond the flash-flood criterion is an alarm.
FLAG_SEVERITY: dict[str, Severity] = {
    "invalid": Severity.WARNING,
    "missing": Severity.INFO,
    "not_a_number": Severity.INFO,
    "sentinel": Severity.INFO,
    "below_range": Severity.INFO,
    "above_range": Severity.INFO,
    "bad_unit": Severity.INFO,
    "upstream_invalid": Severity.INFO,
    "out_of_order": Severity.WARNING,
    "gap": Severity.WARNING,
    "outlier": Severity.WARNING,
    "flatline": Severity.WARNING,
    "learned_anomaly": Severity.WARNING,
    "no_score": Severity.INFO,
    "battery_low": Severity.WARNING,
    "battery_falling": Severity.WARNING,
    "unconfirmed": Severity.INFO,
    "stage_entered": Severity.INFO,
    "stage_left": Severity.INFO,
    "stage_1": Severity.WARNING,
    "stage_2": Severity.ALARM,
    "stage_3": Severity.ALARM,
    "stage_4": Severity.CRITICAL,
    "rate_of_rise": Severity.ALARM,
}
_RANK = {severity: rank for rank, severity in enumerate(Severity)}

# Upstream quality flags that say the value itself is unusable (not merely unvalidated).
INVALID_UPSTREAM_FLAGS = frozenset({"invalid_distance", "out_of_range", "no_level", "invalid"})

# Upstream quality flags that say why a reading has no value (e.g. a CSV cell that is not a number).
_VALUE_PROBLEMS = ("missing", "not_a_number")

# Water-level values are analysed in cm, whatever unit the source reports.
_CM_PER_UNIT: dict[str | None, float] = {None: 1.0, "cm": 1.0, "mm": 0.1, "m": 100.0}

# 1.4826 x MAD estimates a normal distribution's standard deviation.
_MAD_TO_SD = 1.4826
# Readings in the rolling window before outliers are judged at all.
_MIN_OUTLIER_HISTORY = 5
# Intervals remembered to learn a device's usual reporting period, and how many it takes.
_INTERVALS = 15
_MIN_INTERVALS = 5

# [n, window] standardised differences -> [n] predicted next standardised difference.
Scorer = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True, slots=True)
class ModelRef:
    """The model that scored a reading: its identity and the threshold in force."""

    model_id: str
    version: str
    sha256: str
    threshold: float

    def provenance(self, score: float, threshold: float) -> Provenance:
        return Provenance(self.model_id, self.version, self.sha256, score, threshold)


@dataclass(frozen=True, slots=True)
class Observation:
    """What the analyzer takes from a reading: the value (in cm for water level) and context."""

    ts: datetime
    value: float | None
    problems: tuple[str, ...] = ()  # why ``value`` cannot be used, if it cannot
    battery: float | None = None
    battery_unit: str | None = None


@dataclass(frozen=True, slots=True)
class Analysis:
    """The verdict on one reading."""

    ts: datetime
    value: float | None
    score: float
    flags: tuple[str, ...]
    severity: Severity
    rise: float | None
    stage: int
    model: Provenance | None

    @property
    def anomaly(self) -> bool:
        """Whether anything at warning level or above was found."""
        return _RANK[self.severity] >= _RANK[Severity.WARNING]


class Pending:
    """A reading observed by the rules, waiting for the model's prediction (if it needs one)."""

    __slots__ = ("analyzer", "features", "flags", "obs", "rise", "stage", "target", "value")

    def __init__(self, analyzer: SeriesAnalyzer, obs: Observation) -> None:
        self.analyzer = analyzer
        self.obs = obs
        self.flags: list[str] = []
        self.value: float | None = None
        self.features: list[float] | None = None
        self.target: float | None = None
        self.rise: float | None = None
        self.stage = 0


def _worst(flags: Iterable[str]) -> Severity:
    worst = Severity.INFO
    for flag in flags:
        severity = FLAG_SEVERITY.get(flag, Severity.INFO)
        if _RANK[severity] > _RANK[worst]:
            worst = severity
    return worst


class SeriesAnalyzer:
    """The state of one device's series and the rules that judge its next reading."""

    def __init__(self, cfg: AnalyzerConfig, params: ForecastParams) -> None:
        self.cfg = cfg
        self.forecast = ForecastState(params)
        self._last_ts: float | None = None
        self._intervals: deque[float] = deque(maxlen=_INTERVALS)
        self._recent: deque[float] = deque(maxlen=cfg.outlier_window)
        self._last_outlier = 0  # -1, 0, +1: the previous valid reading's outlier direction
        self._flat_value: float | None = None
        self._flat_since = 0.0
        self._flat_count = 0
        self._stage = 0
        self._rise_points: deque[tuple[float, float]] = deque()
        self._rising = False
        self._battery: deque[tuple[float, float]] = deque()
        self._sentinels = frozenset(cfg.sentinel_values)

    @property
    def stage(self) -> int:
        """The warning stage the gauge is in (0: none)."""
        return self._stage

    def observe(self, obs: Observation) -> Pending:
        """Apply the rules to a reading; the result still needs :meth:`complete`."""
        pending = Pending(self, obs)
        flags = pending.flags
        ts = obs.ts.timestamp()
        if self._last_ts is not None and ts <= self._last_ts:
            flags.append("out_of_order")
            self._level_flags(pending, None, confirmed=False)
            return pending
        if self._last_ts is not None:
            interval = ts - self._last_ts
            expected = self.cfg.gap_after_s
            if expected is None and len(self._intervals) >= _MIN_INTERVALS:
                expected = self.cfg.gap_factor * statistics.median(self._intervals)
            if expected is not None and interval > expected:
                flags.append("gap")
            self._intervals.append(interval)
        self._last_ts = ts
        if obs.battery is not None:
            self._battery_rules(ts, obs.battery, obs.battery_unit, flags)

        problems = list(obs.problems)
        value = obs.value
        if value is None:
            if not problems:
                problems.append("missing")
        elif value in self._sentinels:
            problems.append("sentinel")
        elif self.cfg.valid_min is not None and value < self.cfg.valid_min:
            problems.append("below_range")
        elif self.cfg.valid_max is not None and value > self.cfg.valid_max:
            problems.append("above_range")
        if problems or value is None:
            flags.append("invalid")
            flags.extend(problems)
            self._level_flags(pending, None, confirmed=False)
            return pending

        pending.value = value
        direction = self._outlier(value)
        if direction:
            flags.append("outlier")
        # A lone spike does not move the warning state; a second reading that deviates the
        # same way confirms the change. A run that dropped away abruptly (a sensor lifted out of
        # the water, a lost echo) never does: it neither clears a warning nor becomes the low
        # point the next rise is measured from. Rivers do not fall off a cliff; sensors do.
        confirmed = direction in (0, self._last_outlier) and direction >= 0
        self._last_outlier = direction
        if self._flatline(ts, value):
            flags.append("flatline")
        self._level_flags(pending, (ts, value), confirmed=confirmed)

        if self.forecast.ready:
            pending.features = self.forecast.features()
            pending.target = self.forecast.target(value)
        self.forecast.push(value)
        return pending

    def complete(
        self, pending: Pending, prediction: float | None, model: ModelRef | None
    ) -> Analysis:
        """Add the model's verdict.

        ``prediction`` and ``model`` are None when the model could not run (unavailable, failed,
        timed out): an analyzer configured with a model then says ``no_score``, and the rules'
        verdict stands alone.
        """
        assert pending.analyzer is self
        flags = pending.flags
        score = 0.0
        provenance = None
        if pending.target is not None and self.cfg.model:
            if prediction is None or model is None or not math.isfinite(prediction):
                flags.append("no_score")
            else:
                _z, score = self.forecast.score(pending.target, prediction)
                threshold = self.cfg.anomaly_threshold or model.threshold
                if score >= threshold:
                    flags.append("learned_anomaly")
                provenance = model.provenance(score, threshold)
        severity = _worst(flags)
        if "unconfirmed" in flags and _RANK[severity] > _RANK[Severity.WARNING]:
            severity = Severity.WARNING
        return Analysis(
            ts=pending.obs.ts,
            value=pending.value,
            score=score,
            flags=tuple(flags),
            severity=severity,
            rise=pending.rise,
            stage=pending.stage,
            model=provenance,
        )

    def analyze(self, obs: Observation, scorer: Scorer | None, model: ModelRef | None) -> Analysis:
        """Observe and complete one reading, calling ``scorer`` when the model is needed."""
        pending = self.observe(obs)
        prediction = None
        if pending.features is not None and scorer is not None:
            prediction = float(scorer(np.asarray([pending.features], dtype=np.float32))[0])
        return self.complete(pending, prediction, model)

    def _outlier(self, value: float) -> int:
        """+1 / -1 for a spike up / down, else 0.

        An outlier departs from the rolling median by more than ``outlier_k`` robust deviations,
        and a run of them starts with a jump of more than ``outlier_k`` usual steps from the
        previous valid value: a river (or a daily cycle) ramping up steadily leaves its median
        behind without any one step being out of the ordinary, and is not an outlier.
        """
        recent = self._recent
        direction = 0
        if len(recent) >= _MIN_OUTLIER_HISTORY:
            median = statistics.median(recent)
            mad = statistics.median(abs(v - median) for v in recent)
            # The series' usual step floors both yardsticks: on a quantised or smooth series
            # the MAD can be 0, and an ordinary step is not a spike.
            step = self.forecast.scale() if self.forecast.ready else 0.0
            floor = max(self.cfg.outlier_min_scale, step)
            scale = max(_MAD_TO_SD * mad, floor)
            deviation = value - median
            jump = value - recent[-1]
            k = self.cfg.outlier_k
            # With every yardstick at 0 (a constant history and outlier_min_scale = 0) any
            # change stands out.
            sign = (deviation > 0) - (deviation < 0)
            # A run of outliers starts with an abnormal jump and lasts while the values stay
            # far from the median (a sensor out of the water, the first hours of a flash flood).
            starts = abs(jump) > k * floor and (jump > 0) == (deviation > 0)
            if sign and abs(deviation) > k * scale and (starts or self._last_outlier == sign):
                direction = sign
        recent.append(value)
        return direction

    def _flatline(self, ts: float, value: float) -> bool:
        if self._flat_value is not None and abs(value - self._flat_value) <= (
            self.cfg.flatline_tolerance
        ):
            self._flat_count += 1
        else:
            self._flat_value, self._flat_since, self._flat_count = value, ts, 1
        return (
            self._flat_count >= self.cfg.flatline_readings
            and ts - self._flat_since >= self.cfg.flatline_duration_s
        )

    def _level_flags(
        self, pending: Pending, point: tuple[float, float] | None, *, confirmed: bool
    ) -> None:
        """Stages and rate of rise for a valid (ts, level), or ``None`` (the state holds).

        An unconfirmed reading (a lone outlier) does not change the state, but when it would
        raise a stage or start a rate-of-rise warning it says so at once, flagged ``unconfirmed``
        and at most at warning severity: the operator hears of a possible flash flood within one
        reading, and a single echo spike never sounds an alarm.
        """
        cfg = self.cfg
        if cfg.profile != "water-level":
            return
        before = stage = self._stage
        rising = self._rising
        if point is not None:
            ts, level = point
            rise = self._rise(ts, level, commit=confirmed) if cfg.rise_cm is not None else None
            pending.rise = rise
            if confirmed:
                if cfg.stages_cm:
                    self._stage = self._next_stage(level)
                if rise is not None and cfg.rise_cm is not None:
                    if rise > cfg.rise_cm:
                        self._rising = True
                    elif rise <= cfg.rise_cm - cfg.rise_hysteresis_cm:
                        self._rising = False
                stage, rising = self._stage, self._rising
            else:
                up = max(stage, self._next_stage(level)) if cfg.stages_cm else stage
                starts = rise is not None and cfg.rise_cm is not None and rise > cfg.rise_cm
                if up > stage or (starts and not rising):
                    pending.flags.append("unconfirmed")
                stage, rising = up, rising or starts
        pending.stage = stage
        if stage > before:
            pending.flags.append("stage_entered")
        elif stage < before:
            pending.flags.append("stage_left")
        if stage:
            pending.flags.append(f"stage_{stage}")
        if rising:
            pending.flags.append("rate_of_rise")

    def _next_stage(self, level: float) -> int:
        stages = self.cfg.stages_cm
        stage = self._stage
        # Up: every threshold reached counts at once (a flash flood can skip stages).
        while stage < len(stages) and level >= stages[stage]:
            stage += 1
        # Down: a stage is left only once the level is a hysteresis band below its threshold.
        while stage > 0 and level < stages[stage - 1] - self.cfg.stage_hysteresis_cm:
            stage -= 1
        return stage

    def _rise(self, ts: float, level: float, *, commit: bool) -> float:
        """The level now minus the lowest level within the rise window (time-based).

        ``commit``: remember the point; otherwise only ask what the rise would be.
        """
        start = ts - self.cfg.rise_window_s
        points = self._rise_points
        if commit:
            points.append((ts, level))
            # Keep one point at or before the window's start to interpolate the level there.
            while len(points) >= 2 and points[1][0] <= start:
                points.popleft()
            window: Sequence[tuple[float, float]] = points
        else:
            window = [*points, (ts, level)]
            first = 0
            while len(window) - first >= 2 and window[first + 1][0] <= start:
                first += 1
            window = window[first:]
        lowest = min(v for t, v in window if t >= start)
        first_t, first_v = window[0]
        if first_t < start:
            next_t, next_v = window[1]
            at_start = first_v + (next_v - first_v) * (start - first_t) / (next_t - first_t)
            lowest = min(lowest, at_start)
        return level - lowest

    def _battery_rules(self, ts: float, value: float, unit: str | None, flags: list[str]) -> None:
        cfg = self.cfg
        if unit == "%":
            low, drop = cfg.battery_low_pct, cfg.battery_drop_pct
        else:
            low, drop = cfg.battery_low_v, cfg.battery_drop_v
        if value < low:
            flags.append("battery_low")
        history = self._battery
        history.append((ts, value))
        while history and history[0][0] < ts - cfg.battery_window_s:
            history.popleft()
        if max(v for _t, v in history) - value >= drop:
            flags.append("battery_falling")


class DeviceAnalyzers:
    """The configured analyzers by device id, turning readings into analysed events."""

    def __init__(
        self, configs: Mapping[str, AnalyzerConfig], params: Mapping[str, ForecastParams]
    ) -> None:
        """``params``: the feature definition of each model named in ``configs``."""
        self._configs: dict[str, AnalyzerConfig] = {}
        for cfg in configs.values():
            for device in cfg.devices:
                self._configs[device] = cfg
        self._params = params
        self._series: dict[str, SeriesAnalyzer] = {}

    def handles(self, device: str) -> bool:
        return device in self._configs

    def series(self, device: str, cfg: AnalyzerConfig | None = None) -> SeriesAnalyzer:
        """The state machine of a device (made on its first reading)."""
        analyzer = self._series.get(device)
        if analyzer is None:
            cfg = cfg or self._configs[device]
            params = self._params.get(cfg.model, ForecastParams())
            analyzer = self._series[device] = SeriesAnalyzer(cfg, params)
        return analyzer

    def observe(self, reading: Reading, cfg: AnalyzerConfig | None = None) -> Pending:
        """Run the rules on a reading of a configured device (or with an explicit ``cfg``)."""
        analyzer = self.series(reading.device, cfg)
        return analyzer.observe(observation(reading, analyzer.cfg))


def observation(reading: Reading, cfg: AnalyzerConfig) -> Observation:
    """What the analyzer needs of a reading: the value (in cm for water level) and the battery."""
    value: float | None = None
    problems: list[str] = []
    battery: float | None = None
    battery_unit: str | None = None
    for m in reading.values:
        if m.name == cfg.measurement:
            if isinstance(m.value, bool) or not isinstance(m.value, int | float):
                problems.append("missing")
                continue
            value = float(m.value)
            if cfg.profile == "water-level":
                factor = _CM_PER_UNIT.get(m.unit)
                if factor is None:
                    problems.append("bad_unit")
                else:
                    value *= factor
        elif (
            m.name == cfg.battery_measurement
            and isinstance(m.value, int | float)
            and not isinstance(m.value, bool)
        ):
            battery, battery_unit = float(m.value), m.unit
    if INVALID_UPSTREAM_FLAGS.intersection(reading.quality):
        problems.append("upstream_invalid")
    if value is None:
        problems.extend(q for q in _VALUE_PROBLEMS if q in reading.quality and q not in problems)
    return Observation(reading.ts, value, tuple(problems), battery, battery_unit)


def event_kind(cfg: AnalyzerConfig) -> str:
    return "water_level" if cfg.profile == "water-level" else "series_analysis"


def to_event(reading: Reading, analysis: Analysis, cfg: AnalyzerConfig) -> Event:
    """The reading's one event: its values as they came plus the rise, every reason as a flag,
    and the model's provenance (with its score) when the model scored the reading."""
    values = list(reading.values)
    if analysis.rise is not None:
        values.append(Measurement("rise", round(analysis.rise, 3), "cm"))
    flags = list(dict.fromkeys((*analysis.flags, *reading.quality)))
    if len(flags) > MAX_QUALITY_FLAGS:
        # The analyzer's own flags come first and are the ones kept: they carry the severity.
        flags = flags[:MAX_QUALITY_FLAGS]
    return Event(
        kind=event_kind(cfg),
        device=reading.device,
        ts=reading.ts,
        severity=analysis.severity,
        values=tuple(values),
        model=analysis.model,
        quality=tuple(flags),
        event_id=reading.event_id or new_event_id(),
    )


def analyze_all(
    pendings: Sequence[Pending], scorer: Scorer | None, model: ModelRef | None
) -> list[Analysis]:
    """Complete observed readings in order, with one model call for all that need it."""
    needing = [p for p in pendings if p.features is not None]
    predictions: dict[int, float] = {}
    if needing and scorer is not None:
        batch = np.asarray([p.features for p in needing], dtype=np.float32)
        out = scorer(batch)
        predictions = {id(p): float(v) for p, v in zip(needing, out, strict=True)}
    return [p.analyzer.complete(p, predictions.get(id(p)), model) for p in pendings]
