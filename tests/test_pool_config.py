"""The [pools.<name>] config: timers within 5-30 s and ordered, polygons, outputs, names."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.config import config_from_dict
from gateway.errors import ConfigError
from models.pool import DEFAULT_DETECTOR_CARD


def load(pool: dict[str, object], name: str = "main") -> list[str]:
    data = {"pools": {name: {"camera": {"url": "rtsp://cam/1"}, **pool}}}
    try:
        config_from_dict(data, "t.toml")
    except ConfigError as exc:
        return exc.problems
    return []


def test_defaults_select_the_pool_detector_and_documented_timers() -> None:
    cfg = config_from_dict({"pools": {"main": {"camera": {"url": "/dev/video0"}}}}, "t")
    pool = cfg.pools["main"]
    assert pool.detector_card == DEFAULT_DETECTOR_CARD == Path("pool/person_detector.toml")
    assert (pool.candidate_after_s, pool.alarm_after_s) == (10.0, 15.0)
    assert pool.local_alarm is None


@pytest.mark.parametrize(
    ("pool", "expected"),
    [
        ({"candidate_after_s": 4}, "pools.main.candidate_after_s: Input should be greater"),
        ({"alarm_after_s": 31}, "pools.main.alarm_after_s: Input should be less"),
        (
            {"candidate_after_s": 20, "alarm_after_s": 10},
            "pools.main: alarm_after_s (10) must be at least candidate_after_s (20)",
        ),
        ({"water_area": [[0, 0], [1, 1]]}, "pools.main.water_area: a polygon needs at least 3"),
        ({"local_alarm": {"type": "mqtt", "topic": "a/#"}}, "topic name without wildcards"),
        ({"local_alarm": {"type": "siren"}}, "pools.main.local_alarm"),
        ({"camera": {"url": "x", "fps": 3}}, "pools.main.camera.fps: unknown key"),
    ],
)
def test_bad_pool_settings_are_named(pool: dict[str, object], expected: str) -> None:
    problems = load(pool)
    assert any(expected in p for p in problems), problems


def test_pool_names_are_event_safe() -> None:
    assert any("lower_snake_case" in p for p in load({}, name="Main Pool"))
