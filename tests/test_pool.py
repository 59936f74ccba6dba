"""The pure pool analyzer: geometry, zones, tracker, stillness state machine (fake clock)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from gateway.analyzers.pool import (
    Box,
    PoolAnalyzer,
    PoolParams,
    Signal,
    Tracker,
    TrackerParams,
    ZoneBook,
    box_iou,
    edge_distance,
    point_in_polygon,
)

W, H = 640, 480
WATER = ((40.0, 40.0), (600.0, 40.0), (600.0, 440.0), (40.0, 440.0))


@dataclass(frozen=True)
class Det:
    box: Box
    score: float = 0.9


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def person(cx: float, cy: float, size: float = 60.0) -> Det:
    return Det((cx - size / 2, cy - size / 4, cx + size / 2, cy + size / 4))


def analyzer(clock: Clock | None = None, **kw: object) -> PoolAnalyzer:
    params = PoolParams(water_area=WATER, **kw)  # type: ignore[arg-type]
    return PoolAnalyzer(params, ZoneBook(clock or Clock()), name="p")


def run(
    pool: PoolAnalyzer,
    positions: list[tuple[float, float] | None],
    fps: float = 4.0,
    t0: float = 0.0,
) -> list[tuple[float, Signal]]:
    """Feed one person's positions (None: not detected) at fps; collect (time, signal)."""
    out = []
    for i, pos in enumerate(positions):
        t = t0 + i / fps
        dets = [] if pos is None else [person(*pos)]
        out.extend((t, s) for s in pool.step(t, dets, W, H))
    return out


def kinds(signals: list[tuple[float, Signal]]) -> list[str]:
    return [s.kind for _t, s in signals]


def test_geometry() -> None:
    assert point_in_polygon((100, 100), WATER)
    assert not point_in_polygon((10, 100), WATER)
    assert not point_in_polygon((100, 100), ((0, 0), (1, 1)))
    assert edge_distance((100, 100), WATER) == pytest.approx(60.0)
    assert box_iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(1 / 3)
    assert box_iou((0, 0, 10, 10), (20, 20, 30, 30)) == 0.0


def test_still_person_candidate_at_t1_and_alarm_at_t2() -> None:
    pool = analyzer()
    # Swims 5 s to the right, then floats still for 20 s.
    moving = [(100 + 20 * i, 200) for i in range(20)]
    still = [(480, 200)] * 80
    signals = run(pool, [*moving, *still])
    assert kinds(signals) == ["candidate", "alarm"]
    stop_t = 19 / 4  # the last moving frame
    (t_c, cand), (t_a, alarm) = signals
    assert cand.reason == "still" and alarm.reason == "still"
    # Stillness counts from the earliest position within 0.3 sizes (18 px) of the resting one:
    # at 20 px per frame that is the stop itself; frame-quantised (0.25 s).
    assert 10.0 <= t_c - stop_t <= 10.25
    assert 15.0 <= t_a - stop_t <= 15.25
    assert alarm.alarm_id == "p-1"
    assert list(pool.alarms) == ["p-1"]


def test_swimmer_who_keeps_moving_never_alarms() -> None:
    pool = analyzer()
    # Lengths back and forth for 60 s at 0.5 person sizes per second.
    xs = [100 + abs((i * 7.5) % 800 - 400) for i in range(240)]
    assert kinds(run(pool, [(x, 200) for x in xs])) == []


def test_detector_jitter_is_not_movement() -> None:
    pool = analyzer()
    jitter = [(300 + (4 if i % 2 else -4), 200 + (3 if i % 3 else -3)) for i in range(70)]
    assert kinds(run(pool, jitter)) == ["candidate", "alarm"]


def test_movement_clears_a_candidate() -> None:
    pool = analyzer()
    positions = [(300, 200)] * 48 + [(300 + 15 * i, 200) for i in range(1, 9)]
    signals = run(pool, positions)
    assert kinds(signals) == ["candidate", "candidate_cleared"]
    assert not pool.alarms


def test_person_leaving_at_the_edge_is_forgotten() -> None:
    pool = analyzer()
    # Swims to the left edge and climbs out (no more detections).
    positions: list[tuple[float, float] | None] = [(300 - 20 * i, 200) for i in range(13)]
    positions += [None] * 100
    assert kinds(run(pool, positions)) == []
    assert pool.tracker.tracks == {}


def test_person_going_under_mid_pool_alarms() -> None:
    pool = analyzer()
    positions: list[tuple[float, float] | None] = [(200 + 10 * i, 240) for i in range(12)]
    positions += [None] * 80
    signals = run(pool, positions)
    assert kinds(signals) == ["candidate", "alarm"]
    assert {s.reason for _t, s in signals} == {"disappeared"}
    last_seen = 11 / 4
    # At 10 px per frame the last 18 px of the path (0.5 s) already count as still.
    assert 9.5 <= signals[0][0] - last_seen <= 10.25


def test_disappearance_can_be_switched_off() -> None:
    pool = analyzer(disappearance=False)
    positions: list[tuple[float, float] | None] = [(200 + 10 * i, 240) for i in range(12)]
    assert kinds(run(pool, [*positions, *[None] * 80])) == []


def test_short_detector_misses_keep_the_track() -> None:
    pool = analyzer()
    positions: list[tuple[float, float] | None] = []
    for i in range(120):
        positions.append(None if i % 5 == 2 else (100 + 3 * i, 200))
    assert kinds(run(pool, positions)) == []
    assert len(pool.tracker.tracks) == 1
    assert next(iter(pool.tracker.tracks)) == 1  # one stable id all along


def test_detections_outside_the_water_are_ignored() -> None:
    pool = analyzer()
    # On the deck (x = 20), standing still for a minute.
    assert kinds(run(pool, [(20, 200)] * 240)) == []
    assert pool.ignored_outside == 240
    assert pool.tracker.tracks == {}


def test_alarm_is_latched_until_acknowledged_then_starts_over() -> None:
    pool = analyzer()
    signals = run(pool, [(300, 200)] * 64)
    assert kinds(signals) == ["candidate", "alarm"]
    # The person moves after the alarm: reported, the alarm stays.
    signals = run(pool, [(300 + 20 * i, 200) for i in range(1, 5)], t0=16.0)
    assert kinds(signals) == ["alarm_movement"]
    assert "p-1" in pool.alarms
    assert pool.acknowledge("p-1", 17.0) is not None
    assert pool.acknowledge("p-1", 17.0) is None
    assert not pool.alarms
    # Still again: a fresh candidate after T1 from the acknowledgement.
    signals = run(pool, [(380, 200)] * 50, t0=17.0)
    assert kinds(signals) == ["candidate"]


def test_two_people_keep_their_own_ids() -> None:
    pool = analyzer()
    out = []
    for i in range(80):
        t = i / 4
        a = person(100 + 5 * i, 150)  # swims right
        b = person(500, 350)  # floats still
        out += pool.step(t, [a, b] if i % 2 else [b, a], W, H)
    assert [(s.kind, s.track_id) for s in out] == [("candidate", 2), ("alarm", 2)] or [
        (s.kind, s.track_id) for s in out
    ] == [("candidate", 1), ("alarm", 1)]
    still_id = out[0].track_id
    moving = [t for t in pool.tracker.tracks.values() if t.track_id != still_id]
    assert len(moving) == 1 and moving[0].hits == 80


def test_off_zone_suppresses_and_switches_back_on_by_itself() -> None:
    clock = Clock()
    pool = analyzer(clock)
    zone = ((250.0, 150.0), (350.0, 150.0), (350.0, 250.0), (250.0, 250.0))
    pool.zones.switch_off("lesson", zone, 30.0, "op-7")
    assert [z.zone_id for z in pool.zones.active()] == ["lesson"]
    signals = []
    for i in range(100):
        clock.t = i / 4
        signals += pool.step(clock.t, [person(300, 200)], W, H)
        pool.zones.expire()
    assert signals == []
    assert pool.ignored_off_zone == 100
    # 30 s later the zone is back on by itself and the still person counts again.
    for i in range(100, 220):
        clock.t = i / 4
        expired = pool.zones.expire()
        if expired:
            assert [z.zone_id for z in expired] == ["lesson"]
            assert clock.t == 30.0
        signals += pool.step(clock.t, [person(300, 200)], W, H)
    assert [s.kind for s in signals] == ["candidate", "alarm"]
    assert pool.zones.active() == []


def test_zone_book_checks() -> None:
    book = ZoneBook(Clock(), max_zones=1)
    with pytest.raises(ValueError, match="at least 3"):
        book.switch_off("z", ((0, 0), (1, 1)), 5, "op")
    book.switch_off("a", ((0, 0), (10, 0), (10, 10)), 5, "op")
    with pytest.raises(ValueError, match="at most 1"):
        book.switch_off("b", ((0, 0), (10, 0), (10, 10)), 5, "op")
    assert book.switch_on("a") is not None
    assert book.switch_on("a") is None


def test_timer_bounds() -> None:
    with pytest.raises(ValueError, match="candidate_after_s"):
        PoolAnalyzer(PoolParams(candidate_after_s=20, alarm_after_s=10), ZoneBook(Clock()))


def test_tentative_one_frame_detections_make_no_track() -> None:
    tracker = Tracker(TrackerParams(min_hits=2))
    tracker.update(0.0, [((10, 10, 50, 50), 0.9)])
    tracker.update(0.25, [])
    assert tracker.tracks == {}


def test_swimming_into_an_off_zone_is_not_a_disappearance() -> None:
    pool = analyzer()
    zone = ((250.0, 100.0), (400.0, 100.0), (400.0, 300.0), (250.0, 300.0))
    pool.zones.switch_off("lesson", zone, 3600.0, "op")
    # Swims right into the zone (x from 100 to 300) and stays there.
    positions = [(100 + 10 * i, 200) for i in range(21)] + [(300, 200)] * 100
    assert kinds(run(pool, positions)) == []


def test_a_duplicate_box_does_not_leave_a_ghost_that_looks_gone_under() -> None:
    pool = analyzer()
    out = []
    for i in range(100):
        t = i / 4
        x = 100 + 6 * i
        dets = [person(x, 200)] if x < 640 else []  # leaves over the right edge
        if i == 6:  # the detector gives the swimmer a second, shifted box for one frame
            dets.append(Det((x - 20, 185, x + 42, 215)))
        out += pool.step(t, dets, W, H)
    assert out == []


def test_the_heir_of_a_merged_track_keeps_the_old_id() -> None:
    tracker = Tracker(TrackerParams())
    for i in range(4):
        tracker.update(i / 4, [((100 + 5 * i, 100, 160 + 5 * i, 130), 0.9)])
    assert list(tracker.tracks) == [1]
    # Two boxes for one frame, then only the second one.
    tracker.update(1.0, [((120, 100, 180, 130), 0.9), ((130, 98, 195, 132), 0.8)])
    tracker.update(1.25, [((135, 98, 200, 132), 0.8)])
    tracker.update(1.5, [((140, 98, 205, 132), 0.8)])
    assert [(t.track_id, t.lost) for t in tracker.tracks.values()] == [(1, False)]


def test_a_swimmer_crossing_a_still_person_does_not_reset_their_clock() -> None:
    pool = analyzer()
    out = []
    for i in range(100):
        t = i / 4
        ax = 100 + 8 * i  # passes right over the still person at x = 300 around t = 6 s
        dets = [person(300, 200)]
        if ax < 640:
            dets.append(person(ax, 205))
        out += [(t, s.kind, s.track_id) for s in pool.step(t, dets, W, H)]
    assert out == [(10.0, "candidate", 1), (15.0, "alarm", 1)]


def test_one_misplaced_box_does_not_restart_the_stillness_clock() -> None:
    pool = analyzer()
    positions: list[tuple[float, float] | None] = [(300, 200)] * 70
    positions[20] = (340, 200)  # the detector's box jumps 0.67 sizes for one frame
    signals = run(pool, positions)
    assert [(t, s.kind) for t, s in signals] == [(10.0, "candidate"), (15.0, "alarm")]
