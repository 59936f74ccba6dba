"""The streaming water-level analyzer: rules on synthetic series, the shipped int8 model, events."""

from __future__ import annotations

import math
import tomllib
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from gateway.analyzers.config import AnalyzerConfig
from gateway.analyzers.runtime import model_ref
from gateway.analyzers.water_level import (
    Analysis,
    DeviceAnalyzers,
    ModelRef,
    Observation,
    Scorer,
    SeriesAnalyzer,
    analyze_all,
    observation,
    to_event,
)
from gateway.config import config_from_dict
from gateway.errors import ConfigError
from gateway.inference import LoadedModel, load_model
from gateway.types import Lane, Measurement, Reading, Severity
from models.water_level.features import ForecastParams, ForecastState, squash

CARD = Path(__file__).resolve().parents[1] / "models" / "water_level" / "forecaster.toml"
T0 = datetime(2024, 3, 1, tzinfo=UTC)
RULES_ONLY = {"model": ""}


def run(
    values: Sequence[float | None],
    *,
    step_s: float = 900.0,
    scorer: Scorer | None = None,
    model: ModelRef | None = None,
    **cfg: object,
) -> list[Analysis]:
    """Feed ``values`` at a fixed step through one analyzer (rules only unless a scorer)."""
    settings = AnalyzerConfig.model_validate({**RULES_ONLY, **cfg} if scorer is None else cfg)
    analyzer = SeriesAnalyzer(settings, ForecastParams())
    return [
        analyzer.analyze(Observation(T0 + timedelta(seconds=i * step_s), v), scorer, model)
        for i, v in enumerate(values)
    ]


def flagged(results: Sequence[Analysis], flag: str) -> list[int]:
    return [i for i, r in enumerate(results) if flag in r.flags]


def calm(n: int, level: float = 100.0, seed: int = 1) -> list[float]:
    """A calm river read to the mm: small noise around ``level``."""
    rng = np.random.default_rng(seed)
    return [round(level + float(x), 1) for x in rng.normal(0, 0.4, n)]


@pytest.fixture(scope="module")
def shipped() -> LoadedModel:
    return load_model(CARD)


def scorer_of(model: LoadedModel) -> Scorer:
    def score(batch: np.ndarray) -> np.ndarray:
        return model.run({"window": batch})[0][:, 0]

    return score


# -- warning stages -------------------------------------------------------------------------


def test_a_level_hovering_at_a_stage_does_not_flap() -> None:
    # Up to 205 cm, then +-4 cm around the 200 cm threshold (inside the 10 cm band), then down.
    rise = [150.0 + 5 * i for i in range(12)]
    hover = [200 + (4 if i % 2 else -4) for i in range(40)]
    fall = [185.0, 180.0]
    results = run(rise + hover + fall, rise_cm=None)
    assert flagged(results, "stage_entered") == [10]  # 200 reached
    assert flagged(results, "stage_left") == [len(rise) + len(hover)]  # 185 < 200 - 10
    assert all("stage_1" in r.flags for r in results[10 : len(rise) + len(hover)])
    assert results[10].severity == Severity.WARNING
    assert results[-1].stage == 0 and results[-1].severity == Severity.INFO


def test_stages_can_be_skipped_and_hysteresis_is_per_stage() -> None:
    levels = [100.0] * 10 + [110.0, 120.0, 135.0, 150.0, 170.0, 210.0, 320.0, 420.0, 520.0]
    results = run(levels, stages_cm=[200, 300, 400, 500], rise_cm=None)
    assert [r.stage for r in results[-4:]] == [1, 2, 3, 4]
    assert results[-1].severity == Severity.CRITICAL
    assert results[-2].severity == Severity.ALARM
    down = run([*levels, 495.0, 489.0, 405.0, 389.0], stages_cm=[200, 300, 400, 500], rise_cm=None)
    assert [r.stage for r in down[-4:]] == [4, 3, 3, 2]


def test_mm_readings_are_converted_to_cm() -> None:
    cfg = AnalyzerConfig(devices=["g"], model="")
    reading = Reading("s", "g", T0, (Measurement("water_level", 2150, "mm"),))
    assert observation(reading, cfg).value == pytest.approx(215.0)
    odd = Reading("s", "g", T0, (Measurement("water_level", 3, "[ft_i]"),))
    assert "bad_unit" in observation(odd, cfg).problems


# -- rate of rise ---------------------------------------------------------------------------


def test_rate_of_rise_is_time_based_not_sample_based() -> None:
    # +25 cm in 100 minutes, sampled every 5 minutes (20 steps): more than 22 cm in 3 h.
    fast = run([100.0] * 10 + [100 + 25 * i / 20 for i in range(1, 21)], step_s=300)
    assert flagged(fast, "rate_of_rise")
    assert max(r.rise or 0 for r in fast) == pytest.approx(25.0)
    # The same 20 steps of +1.25 cm every 15 minutes (5 h): at most 15 cm in any 3 h.
    slow = run([100.0] * 10 + [100 + 25 * i / 20 for i in range(1, 21)], step_s=900)
    assert not flagged(slow, "rate_of_rise")
    assert max(r.rise or 0 for r in slow) == pytest.approx(15.0)


def test_rise_between_sparse_readings_is_interpolated_at_the_window_start() -> None:
    # Readings 3.5 h apart: 100 then 130 cm. At the window's start (3 h before the second)
    # the level was about 104.3 cm, so the rise within 3 h is about 25.7 cm.
    results = run([100.0] * 8 + [130.0], step_s=3.5 * 3600, outlier_min_scale=20.0)
    assert results[-1].rise == pytest.approx(30 - 30 * 0.5 / 3.5)
    assert "rate_of_rise" in results[-1].flags
    assert results[-1].severity == Severity.ALARM


def test_rate_of_rise_ends_only_below_its_hysteresis_band() -> None:
    # 40 cm in 2 h, then flat: the rise measured over 3 h shrinks as the start slides out.
    levels = [100.0] * 12 + [105.0 + 5 * i for i in range(8)] + [140.0] * 16
    results = run(levels, rise_cm=22.0, rise_hysteresis_cm=5.0, stages_cm=[])
    on = flagged(results, "rate_of_rise")
    assert on == list(range(on[0], on[-1] + 1))  # one episode
    after = results[on[-1] + 1]
    assert after.rise is not None and after.rise <= 17.0
    assert all(r.rise is not None and r.rise > 17.0 for r in results[on[0] : on[-1] + 1])


# -- outliers, spikes and the confirmation of real changes ----------------------------------


def test_an_echo_spike_is_flagged_forwarded_and_raises_no_alarm() -> None:
    levels = [*calm(30), 480.0, *calm(10, seed=2)]
    results = run(levels)
    spike = results[30]
    assert spike.value == 480.0  # forwarded, not dropped
    assert {"outlier", "unconfirmed", "rate_of_rise", "stage_3"} <= set(spike.flags)
    assert spike.severity == Severity.WARNING  # capped: one reading is no alarm
    assert all(r.stage == 0 and "rate_of_rise" not in r.flags for r in results[31:])
    assert flagged(results, "outlier") == [30]


def test_a_steady_cycle_or_ramp_is_not_an_outlier() -> None:
    # A daily cycle (tide, snow melt, a city's water use): far from a 3-hour median at times,
    # but no single step is out of the ordinary.
    cycle = [100 + 50 * math.sin(2 * math.pi * i / 48) for i in range(200)]
    assert not flagged(run(cycle, profile="generic"), "outlier")
    # A sensor taken out of the water (the Logan River's maintenance visits): the first reading
    # jumps, and the run is flagged while it stays away from the median.
    pulled = [*calm(30, level=60.0), 14.7, 14.3, 14.1, *calm(10, level=60.0, seed=4)]
    assert flagged(run(pulled), "outlier") == [30, 31, 32]


def test_a_drop_out_spike_does_not_fake_a_rise_afterwards() -> None:
    levels = [*calm(30), 20.0, *calm(12, seed=3)]
    results = run(levels)
    assert "outlier" in results[30].flags
    assert not flagged(results, "rate_of_rise")
    assert max(r.rise or 0.0 for r in results[31:]) < 5.0


def test_a_sensor_out_of_the_water_neither_clears_nor_fakes_a_warning() -> None:
    # A maintenance visit at stage 1 (the Logan River's technicians lift the probe out for
    # 45 minutes): the readings drop by 1.5 m for three readings, then come back.
    levels = [*calm(30, level=230.0), 80.0, 79.0, 78.5, *calm(20, level=230.0, seed=6)]
    results = run(levels)
    assert [r.stage for r in results[30:34]] == [1, 1, 1, 1]
    assert flagged(results, "outlier") == [30, 31, 32]
    assert not flagged(results, "rate_of_rise")
    assert not flagged(results, "stage_left")


def test_a_real_jump_is_confirmed_by_the_next_reading() -> None:
    # A flash flood: 13 cm to 235 cm in one step, then on up (the Gard at Anduze, 2020).
    levels = [*calm(40, level=13.0), 235.0, 394.0, 482.0]
    results = run(levels)
    first, second = results[40], results[41]
    assert {"unconfirmed", "stage_1", "rate_of_rise"} <= set(first.flags)
    assert first.severity == Severity.WARNING
    assert "unconfirmed" not in second.flags
    assert {"stage_entered", "stage_2", "rate_of_rise"} <= set(second.flags)
    assert second.severity == Severity.ALARM
    assert results[42].stage == 3


# -- stuck sensors, gaps, plausibility, battery ---------------------------------------------


def test_flatline_needs_the_count_and_the_duration() -> None:
    levels = [*calm(20), *([101.0] * 60)]
    results = run(levels, step_s=900)  # water-level: 24 readings and 12 h
    first = flagged(results, "flatline")[0]
    # 24 readings take 5 h 45 min; 12 h needs 49 readings from the first 101.0.
    assert first == 20 + 48
    generic = run(levels, step_s=900, profile="generic")
    assert flagged(generic, "flatline")[0] == 20 + 23


def test_a_gap_is_reported_on_the_reading_after_it() -> None:
    analyzer = SeriesAnalyzer(AnalyzerConfig(model=""), ForecastParams())
    stamps = [T0 + timedelta(minutes=15 * i) for i in range(10)]
    stamps.append(stamps[-1] + timedelta(hours=2))
    results = [analyzer.analyze(Observation(t, 100.0), None, None) for t in stamps]
    assert flagged(results, "gap") == [10]  # 2 h > 3 x the usual 15 min
    assert results[10].severity == Severity.WARNING
    fixed = run([100.0] * 5, step_s=4000, gap_after_s=3600)
    assert flagged(fixed, "gap") == [1, 2, 3, 4]


def test_sentinels_ranges_and_missing_values_are_invalid_and_leave_the_state() -> None:
    levels: list[float | None] = [*[150.0 + 10 * i for i in range(8)], 0.0, None, 900.0, 225.0]
    results = run(levels, valid_max=800.0, rise_cm=None)
    assert results[7].stage == 1
    assert results[8].flags == ("invalid", "sentinel", "stage_1")
    assert results[9].flags == ("invalid", "missing", "stage_1")
    assert results[10].flags == ("invalid", "above_range", "stage_1")
    assert all(r.severity == Severity.WARNING and r.value is None for r in results[8:11])
    assert results[11].flags == ("stage_1",)  # the series goes on as if they were not there


def test_upstream_invalid_distance_makes_the_level_invalid() -> None:
    cfg = AnalyzerConfig(devices=["g"], model="")
    reading = Reading(
        "s", "g", T0, (Measurement("water_level", 900, "cm"),), quality=("invalid_distance",)
    )
    assert observation(reading, cfg).problems == ("upstream_invalid",)


def test_out_of_order_readings_do_not_move_the_state() -> None:
    analyzer = SeriesAnalyzer(AnalyzerConfig(model=""), ForecastParams())
    first = analyzer.analyze(Observation(T0, 100.0), None, None)
    late = analyzer.analyze(Observation(T0 - timedelta(minutes=5), 900.0), None, None)
    assert first.flags == ()
    assert late.flags == ("out_of_order",) and late.severity == Severity.WARNING
    assert analyzer.stage == 0


def test_battery_low_and_falling() -> None:
    analyzer = SeriesAnalyzer(AnalyzerConfig(model=""), ForecastParams())
    flags = []
    for day, volts in enumerate([3.6, 3.58, 3.55, 3.45, 3.35, 3.25]):
        obs = Observation(T0 + timedelta(days=day), 100.0, battery=volts, battery_unit="V")
        flags.append(analyzer.analyze(obs, None, None).flags)
    assert flags[0] == ()
    assert flags[3] == ()  # 0.15 V in 3 days: not yet
    assert flags[4] == ("battery_falling",)  # 0.25 V within 7 days
    assert flags[5] == ("battery_low", "battery_falling")
    percent = SeriesAnalyzer(AnalyzerConfig(model=""), ForecastParams())
    obs = Observation(T0, 100.0, battery=15.0, battery_unit="%")
    assert percent.analyze(obs, None, None).flags == ("battery_low",)


# -- profiles and config --------------------------------------------------------------------


def test_generic_profile_has_no_level_rules() -> None:
    results = run([*calm(30), 600.0, 650.0, 700.0], profile="generic")
    assert not any(f.startswith("stage") or f == "rate_of_rise" for r in results for f in r.flags)
    assert "outlier" in results[30].flags
    with pytest.raises(ValidationError, match="need profile = 'water-level'"):
        AnalyzerConfig(profile="generic", stages_cm=[100.0])


def test_profile_defaults_fill_only_what_is_not_given() -> None:
    water = AnalyzerConfig()
    assert water.rise_cm == 22.0 and water.rise_window_s == 3 * 3600
    assert water.stages_cm == [200.0, 300.0, 400.0, 500.0]
    assert water.sentinel_values == [0.0]
    generic = AnalyzerConfig(profile="generic")
    assert generic.rise_cm is None and generic.stages_cm == [] and generic.sentinel_values == []
    custom = AnalyzerConfig(stages_cm=[50.0], rise_cm=10.0)
    assert custom.stages_cm == [50.0] and custom.rise_cm == 10.0
    with pytest.raises(ValidationError, match="ascend"):
        AnalyzerConfig(stages_cm=[300.0, 200.0])
    with pytest.raises(ValidationError, match="more than once"):
        AnalyzerConfig(devices=["a", "a"])


def test_check_config_names_an_analyzer_model_without_a_card() -> None:
    base = {
        "inference": {"cards": ["water_level/forecaster.toml"]},
        "analyzers": {"anduze": {"devices": ["a84041000181c071"]}},
    }
    assert config_from_dict(base, "t").analyzers["anduze"].model == "water_level_forecaster"
    wrong = {**base, "analyzers": {"anduze": {"devices": ["g"], "model": "water_levl"}}}
    with pytest.raises(ConfigError) as exc:
        config_from_dict(wrong, "t")
    assert exc.value.problems == [
        "analyzers.anduze.model: no card in [inference] cards is named 'water_levl' "
        "(cards: water_level_forecaster)"
    ]
    with pytest.raises(ConfigError, match=r"analyzers\.anduze\.model: needs its card"):
        config_from_dict({"analyzers": base["analyzers"]}, "t")
    twice = {**base, "analyzers": {"a": {"devices": ["g"]}, "b": {"devices": ["g"]}}}
    with pytest.raises(ConfigError, match=r"analyzers\.b\.devices: device 'g' already has"):
        config_from_dict(twice, "t")


# -- the learned score with the shipped int8 model ------------------------------------------


def test_the_shipped_card_describes_the_features_the_analyzer_computes(
    shipped: LoadedModel,
) -> None:
    card = tomllib.loads(CARD.read_text())
    assert ForecastParams.from_params(card["params"]) == ForecastParams()
    assert shipped.card.quantization == "int8-qdq-static"
    assert shipped.card.inputs[0].shape == ["batch", ForecastParams().window]
    assert 0 < shipped.card.thresholds["anomaly"] < 1


def test_the_learned_score_flags_a_surprise_and_carries_provenance(shipped: LoadedModel) -> None:
    ref = model_ref(shipped)
    levels = [*calm(80), 130.0, *calm(20, seed=5)]
    results = run(levels, scorer=scorer_of(shipped), model=ref, profile="generic")
    warm = ForecastParams().warmup
    assert all(r.model is None and r.score == 0.0 for r in results[: warm + 1])
    scored = results[warm + 1 :]
    assert all(r.model is not None for r in scored)
    assert all(0.0 <= r.score < 1.0 for r in scored)
    spike = results[80]
    assert "learned_anomaly" in spike.flags and spike.score >= ref.threshold
    assert spike.model is not None
    assert spike.model.sha256 == shipped.sha256
    assert spike.model.model_id == "water_level_forecaster"
    assert spike.model.threshold == ref.threshold and spike.model.score == spike.score
    calm_scores = [r.score for r in scored if r is not spike]
    assert sum(s >= ref.threshold for s in calm_scores) <= 1
    assert np.median(calm_scores) < 0.2


def test_a_configured_model_that_cannot_answer_leaves_no_score(shipped: LoadedModel) -> None:
    analyzer = SeriesAnalyzer(AnalyzerConfig(), ForecastParams())
    results = [
        analyzer.analyze(Observation(T0 + timedelta(minutes=15 * i), v), None, None)
        for i, v in enumerate(calm(40))
    ]
    assert flagged(results, "no_score") == list(range(ForecastParams().warmup + 1, 40))
    assert all(r.severity == Severity.INFO for r in results)


def test_scoring_a_batch_equals_scoring_one_by_one(shipped: LoadedModel) -> None:
    ref = model_ref(shipped)
    scorer = scorer_of(shipped)
    levels = [*calm(60), 150.0, 150.5, *calm(30, seed=7)]
    cfg = AnalyzerConfig(devices=["g"])
    one = run(levels, scorer=scorer, model=ref)
    batched = DeviceAnalyzers({"g": cfg}, {cfg.model: ForecastParams()})
    readings = [
        Reading("s", "g", T0 + timedelta(seconds=900 * i), (Measurement("water_level", v),))
        for i, v in enumerate(levels)
    ]
    pendings = [batched.observe(r) for r in readings]
    assert analyze_all(pendings, scorer, ref) == one


def test_forecast_state_scores_are_squashed_standardised_errors() -> None:
    state = ForecastState(ForecastParams(warmup=3, window=3))
    for v in [1.0, 2.0, 3.0, 4.0, 5.0]:
        state.push(v)
    assert state.ready
    assert state.features() == [0.0, 0.0, 0.0]  # constant steps: all at their mean
    target = state.target(5.0)  # no change is a 1e9-sigma surprise on a perfect ramp's scale
    assert target < -1000
    z, score = state.score(0.5, 0.0)
    assert score == pytest.approx(squash(z, 4.0))
    assert squash(4.0, 4.0) == 0.5 and squash(0.0, 4.0) == 0.0
    with pytest.raises(ValueError, match=r"params\.window: missing"):
        ForecastParams.from_params({})
    with pytest.raises(ValueError, match=r"params\.clip: must be finite"):
        ForecastParams.from_params({**ForecastParams().to_params(), "clip": math.inf})


# -- events ---------------------------------------------------------------------------------


def test_one_event_per_reading_with_every_reason(shipped: LoadedModel) -> None:
    ref = model_ref(shipped)
    cfg = AnalyzerConfig(devices=["gauge-1"], stages_cm=[200, 300, 400, 500])
    analyzers = DeviceAnalyzers({"g": cfg}, {cfg.model: ForecastParams()})
    levels = [*calm(40, level=13.0), 235.0, 394.0]
    events = []
    for i, v in enumerate(levels):
        reading = Reading(
            "lorawan",
            "gauge-1",
            T0 + timedelta(minutes=30 * i),
            (Measurement("water_level", v, "cm"), Measurement("battery", 3.6, "V")),
            quality=("unvalidated",),
            event_id=f"ID{i:024d}",
        )
        pending = analyzers.observe(reading)
        (analysis,) = analyze_all([pending], scorer_of(shipped), ref)
        events.append(to_event(reading, analysis, cfg))
    alarm = events[-1]
    assert alarm.kind == "water_level" and alarm.device == "gauge-1"
    assert alarm.event_id == f"ID{len(levels) - 1:024d}"  # the source's stable id survives
    assert alarm.severity == Severity.ALARM and alarm.lane == Lane.ALARM
    assert alarm.quality[-1] == "unvalidated"  # upstream flags are kept, after the reasons
    assert {"stage_entered", "stage_2", "rate_of_rise"} <= set(alarm.quality)
    names = {m.name: m for m in alarm.values}
    assert names["water_level"].value == 394.0 and names["battery"].value == 3.6
    assert names["rise"].unit == "cm" and names["rise"].value == pytest.approx(381.0, abs=1)
    assert alarm.model is not None and alarm.model.sha256 == shipped.sha256
    assert "anomaly_score" not in names  # the score travels in the provenance only
    assert events[0].severity == Severity.INFO and events[0].model is None
