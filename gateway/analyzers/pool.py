"""Pool safety: zones, a multi-object tracker and the per-track stillness state machine.

Pure and synchronous: no asyncio, no I/O, no logging, no images. The caller (the daemon's
:mod:`gateway.analyzers.pool_runtime`, the synthetic evaluation, the tests) hands in, per analysed
frame, its time in seconds and the person boxes the detector found; it gets back compact signals
(track id, box as numbers, state, how long the person has been still). Time is whatever clock the
caller uses: a camera's monotonic clock, a video file's position, a test's counter.

Per frame, in this order:

1. **Zones**: detections whose centre lies outside the water area, or inside a detection-off
   zone (switched off by staff for a while, see :class:`ZoneBook`), are ignored.
2. **Tracking** (:class:`Tracker`): detections are matched to tracks by IoU, then by centre
   distance relative to the person's size (a swimmer moves further than its box overlaps between
   two frames at a few frames per second). A track needs ``min_hits`` detections to count; a
   track that is not seen is *lost* and keeps its id, so a person found again near where they
   were is the same track.
3. **Stillness**: a person has been still since the earliest moment from which every centre of
   their track lies within ``still_displacement`` times their size (the longer side of the box)
   of where they are now. Relative to size, so a swimmer near the camera and one at the far end
   are judged alike; measured back from now, so a slow drift while floating counts as still and
   detector jitter (a few pixels) does not count as movement.
4. **Disappearance**: a track lost inside the water area, farther than ``edge_margin`` person
   sizes from its edge, has gone under (or out of sight in the water): its stillness clock keeps
   running. A track lost near the edge has left the water and is forgotten.
5. **State machine** per track: ``tracking`` → ``candidate`` once still (or gone) for
   ``candidate_after_s`` (T1) → ``alarm`` at ``alarm_after_s`` (T2), both counted from the
   moment the person stopped moving. Movement before the alarm clears a candidate. An alarm is
   latched until an operator acknowledges it (:meth:`PoolAnalyzer.acknowledge`): a lifeguard
   must have seen it, whatever the swimmer did since.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

__all__ = [
    "Alarm",
    "Box",
    "DetectedPerson",
    "OffZone",
    "PoolAnalyzer",
    "PoolParams",
    "Signal",
    "Track",
    "Tracker",
    "TrackerParams",
    "ZoneBook",
    "box_center",
    "box_iou",
    "box_size",
    "edge_distance",
    "point_in_polygon",
]

Point = tuple[float, float]
Box = tuple[float, float, float, float]
Polygon = tuple[Point, ...]
TrackState = Literal["tracking", "candidate", "alarm"]
SignalKind = Literal["candidate", "candidate_cleared", "alarm", "alarm_movement"]


class DetectedPerson(Protocol):
    """What the analyzer needs of a detection: a box in image pixels and a score."""

    @property
    def box(self) -> Sequence[float]: ...

    @property
    def score(self) -> float: ...


# -- geometry --------------------------------------------------------------------------------


def box_center(box: Box) -> Point:
    return ((box[0] + box[2]) / 2.0, (box[1] + box[3]) / 2.0)


def box_size(box: Box) -> float:
    """A person's size in pixels: the longer side of the box (a swimmer lies, a wader stands)."""
    return max(box[2] - box[0], box[3] - box[1], 1.0)


def box_iou(a: Box, b: Box) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def point_in_polygon(point: Point, polygon: Polygon) -> bool:
    """Even-odd rule (ray casting); a polygon of fewer than 3 points contains nothing."""
    if len(polygon) < 3:
        return False
    x, y = point
    inside = False
    j = len(polygon) - 1
    for i in range(len(polygon)):
        xi, yi = polygon[i]
        xj, yj = polygon[j]
        if (yi > y) != (yj > y) and x < (xj - xi) * (y - yi) / (yj - yi) + xi:
            inside = not inside
        j = i
    return inside


def edge_distance(point: Point, polygon: Polygon) -> float:
    """Distance from a point to the nearest edge of a polygon (inside or outside)."""
    best = math.inf
    px, py = point
    for i in range(len(polygon)):
        ax, ay = polygon[i]
        bx, by = polygon[(i + 1) % len(polygon)]
        dx, dy = bx - ax, by - ay
        length2 = dx * dx + dy * dy
        u = 0.0 if length2 == 0 else max(0.0, min(1.0, ((px - ax) * dx + (py - ay) * dy) / length2))
        best = min(best, math.hypot(px - (ax + u * dx), py - (ay + u * dy)))
    return best


def frame_polygon(width: int, height: int) -> Polygon:
    """The whole image as a polygon (the water area when none is configured)."""
    return ((0.0, 0.0), (float(width), 0.0), (float(width), float(height)), (0.0, float(height)))


# -- detection-off zones ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class OffZone:
    """A region where detection is switched off until ``until_s`` (the book's clock)."""

    zone_id: str
    polygon: Polygon
    until_s: float
    operator: str


class ZoneBook:
    """The temporary detection-off zones; each switches itself back on when its time is up.

    ``clock`` is the time the durations are counted in (``time.monotonic`` in the daemon).
    """

    def __init__(self, clock: Callable[[], float], max_zones: int = 16) -> None:
        self._clock = clock
        self._max = max_zones
        self._zones: dict[str, OffZone] = {}

    def switch_off(
        self, zone_id: str, polygon: Polygon, duration_s: float, operator: str
    ) -> OffZone:
        """Add (or extend/replace) a zone; raises ValueError on a bad polygon or too many."""
        if len(polygon) < 3:
            raise ValueError("polygon: needs at least 3 points")
        if zone_id not in self._zones and len(self._zones) >= self._max:
            raise ValueError(f"at most {self._max} detection-off zones at once")
        zone = OffZone(zone_id, polygon, self._clock() + duration_s, operator)
        self._zones[zone_id] = zone
        return zone

    def switch_on(self, zone_id: str) -> OffZone | None:
        """End a zone early; returns it, or None if there was none of that id."""
        return self._zones.pop(zone_id, None)

    def expire(self) -> list[OffZone]:
        """Remove the zones whose time is up and return them (each reported once)."""
        now = self._clock()
        done = [z for z in self._zones.values() if z.until_s <= now]
        for zone in done:
            del self._zones[zone.zone_id]
        return done

    def active(self) -> list[OffZone]:
        return list(self._zones.values())

    def remaining_s(self, zone: OffZone) -> float:
        return max(0.0, zone.until_s - self._clock())

    def covers(self, point: Point) -> bool:
        return any(point_in_polygon(point, z.polygon) for z in self._zones.values())

    def near(self, point: Point, margin: float) -> bool:
        """Inside a zone or within ``margin`` pixels of one (about to enter it)."""
        return any(
            point_in_polygon(point, z.polygon) or edge_distance(point, z.polygon) <= margin
            for z in self._zones.values()
        )


# -- tracking --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TrackerParams:
    """Association and track-life settings."""

    iou_min: float = 0.2
    # A match by centre distance: at most this many person sizes from the track's last centre.
    center_gate: float = 1.0
    # Detections needed before a track counts (one-frame false detections never make one).
    min_hits: int = 2
    # A lost track that did not go under in the water is forgotten after this long.
    forget_after_s: float = 3.0
    # A lost track's gate widens by this many person sizes per second lost (a swimmer the
    # detector missed for a while has moved on), up to max_gate: wider would let a passer-by
    # take over the track of someone who went under.
    lost_gate_per_s: float = 0.5
    max_gate: float = 2.0
    # How much of a track's path is kept for the stillness test (longer than any T2).
    trail_s: float = 40.0
    # A track lost within a person's size of a track born this recently is that track.
    merge_window_s: float = 1.0


@dataclass(slots=True)
class Track:
    """One person followed over frames."""

    track_id: int
    box: Box
    score: float
    first_s: float
    last_s: float
    center: Point
    still_since_s: float
    hits: int = 1
    trail: deque[tuple[float, float, float]] = field(default_factory=deque)
    lost: bool = False
    disappeared: bool = False
    state: TrackState = "tracking"
    alarm_id: str | None = None
    moved_in_alarm: bool = False
    movement_reported: bool = False

    def still_for_s(self, now_s: float) -> float:
        return max(0.0, now_s - self.still_since_s)


class Tracker:
    """IoU/centroid multi-object tracker with stable ids and lost tracks."""

    def __init__(self, params: TrackerParams) -> None:
        self.params = params
        self.tracks: dict[int, Track] = {}
        self._next_id = 1

    def update(self, now_s: float, boxes: Sequence[tuple[Box, float]]) -> list[Track]:
        """Match this frame's boxes to the tracks; returns the tracks matched or created."""
        p = self.params
        tracks = list(self.tracks.values())
        pairs: list[tuple[float, int, int]] = []
        for ti, track in enumerate(tracks):
            size = box_size(track.box)
            gate = p.center_gate
            if track.lost:
                gate = min(p.max_gate, gate + (now_s - track.last_s) * p.lost_gate_per_s)
            for di, (box, _score) in enumerate(boxes):
                overlap = box_iou(track.box, box)
                if overlap >= p.iou_min:
                    # IoU matches first (cost below 0), then centre distance (0 .. gate).
                    pairs.append((-overlap, ti, di))
                    continue
                cx, cy = box_center(box)
                distance = math.hypot(cx - track.center[0], cy - track.center[1]) / size
                if distance <= gate:
                    pairs.append((distance, ti, di))
        pairs.sort()
        used_tracks: set[int] = set()
        used_boxes: set[int] = set()
        touched: list[Track] = []
        for _cost, ti, di in pairs:
            if ti in used_tracks or di in used_boxes:
                continue
            used_tracks.add(ti)
            used_boxes.add(di)
            touched.append(self._hit(tracks[ti], now_s, *boxes[di]))
        for di, (box, score) in enumerate(boxes):
            if di not in used_boxes:
                touched.append(self._new(now_s, box, score))
        for ti, track in enumerate(tracks):
            if ti not in used_tracks:
                if track.hits < p.min_hits:
                    # A tentative track not seen again was noise.
                    del self.tracks[track.track_id]
                elif not track.lost:
                    track.lost = True
                    self._merge_into_young(track, touched, now_s)
        return touched

    def _merge_into_young(self, lost: Track, touched: list[Track], now_s: float) -> None:
        """A track lost right where a track began moments ago is the same person.

        The detector gave one person two boxes for a frame (or its box jumped farther than the
        gate): the young track took the person over and the old one would look like someone who
        went under. The young track gets the old id (stable ids) and the old one is dropped.
        Only for a track that raised nothing yet: a candidate or alarm stays with its track.
        """
        p = self.params
        if lost.state != "tracking":
            return
        lx, ly = box_center(lost.box)
        limit = p.center_gate * box_size(lost.box)
        young = [
            t
            for t in touched
            if t is not lost
            and now_s - t.first_s <= p.merge_window_s
            and math.hypot(t.center[0] - lx, t.center[1] - ly) <= limit
        ]
        if not young:
            return
        heir = min(young, key=lambda t: math.hypot(t.center[0] - lx, t.center[1] - ly))
        del self.tracks[lost.track_id]
        del self.tracks[heir.track_id]
        heir.track_id = lost.track_id
        heir.first_s = lost.first_s
        heir.hits += lost.hits
        self.tracks[heir.track_id] = heir

    def forget(self, track_id: int) -> None:
        self.tracks.pop(track_id, None)

    def _hit(self, track: Track, now_s: float, box: Box, score: float) -> Track:
        track.center = box_center(box)
        track.box = box
        track.score = score
        track.last_s = now_s
        track.hits += 1
        track.lost = False
        track.disappeared = False
        return track

    def _new(self, now_s: float, box: Box, score: float) -> Track:
        center = box_center(box)
        track = Track(
            track_id=self._next_id,
            box=box,
            score=score,
            first_s=now_s,
            last_s=now_s,
            center=center,
            still_since_s=now_s,
        )
        self._next_id += 1
        self.tracks[track.track_id] = track
        return track


# -- the analyzer ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PoolParams:
    """The analyzer's settings (from the pool's config)."""

    candidate_after_s: float = 10.0
    alarm_after_s: float = 15.0
    still_displacement: float = 0.3
    edge_margin: float = 0.5
    disappearance: bool = True
    water_area: Polygon = ()
    tracker: TrackerParams = field(default_factory=TrackerParams)


@dataclass(frozen=True, slots=True)
class Signal:
    """Something a lifeguard or the platform must hear about one track."""

    kind: SignalKind
    track_id: int
    box: Box
    still_s: float
    reason: Literal["still", "disappeared"]
    score: float
    alarm_id: str | None = None


@dataclass(slots=True)
class Alarm:
    """A raised alarm, active until acknowledged."""

    alarm_id: str
    track_id: int
    raised_s: float
    box: Box
    reason: Literal["still", "disappeared"]
    score: float
    repeats: int = 0
    last_sent_s: float = 0.0


class PoolAnalyzer:
    """Zones + tracker + per-track state machine; one per camera."""

    def __init__(self, params: PoolParams, zones: ZoneBook, name: str = "pool") -> None:
        if not 0 < params.candidate_after_s <= params.alarm_after_s:
            raise ValueError("candidate_after_s must be > 0 and at most alarm_after_s")
        self.params = params
        self.zones = zones
        self.name = name
        self.tracker = Tracker(params.tracker)
        self.alarms: dict[str, Alarm] = {}
        self._alarm_seq = 0
        self._water: Polygon = params.water_area
        self.frames = 0
        self.ignored_outside = 0
        self.ignored_off_zone = 0

    def _water_area(self, width: int, height: int) -> Polygon:
        if not self._water:
            self._water = frame_polygon(width, height)
        return self._water

    def step(
        self, now_s: float, detections: Iterable[DetectedPerson], width: int, height: int
    ) -> list[Signal]:
        """One analysed frame: its time, the person detections, the image size."""
        self.frames += 1
        water = self._water_area(width, height)
        kept: list[tuple[Box, float]] = []
        for det in detections:
            b = det.box
            box: Box = (float(b[0]), float(b[1]), float(b[2]), float(b[3]))
            center = box_center(box)
            if not point_in_polygon(center, water):
                self.ignored_outside += 1
            elif self.zones.covers(center):
                self.ignored_off_zone += 1
            else:
                kept.append((box, float(det.score)))
        touched = self.tracker.update(now_s, kept)
        for track in touched:
            self._moved(track, now_s)
        signals: list[Signal] = []
        for track in list(self.tracker.tracks.values()):
            if track.lost and not self._still_in_water(track, now_s, water):
                continue
            if track.hits < self.params.tracker.min_hits:
                continue
            if self.zones.covers(track.center) and track.state != "alarm":
                # Staff switched detection off here: no timers run for whoever is inside.
                track.state = "tracking"
                track.trail.clear()
                track.still_since_s = now_s
                continue
            signals.extend(self._advance(track, now_s))
        return signals

    def _moved(self, track: Track, now_s: float) -> None:
        trail = track.trail
        trail.append((now_s, *track.center))
        while trail and trail[0][0] < now_s - self.params.tracker.trail_s:
            trail.popleft()
        # Where the person is now: the median of the last three centres, so one misplaced box
        # neither restarts the clock nor counts as the place they rest.
        recent = list(trail)[-3:]
        cx = statistics.median(x for _t, x, _y in recent)
        cy = statistics.median(y for _t, _x, y in recent)
        limit = self.params.still_displacement * box_size(track.box)
        since = now_s
        moved = False
        away = 0
        for t, x, y in reversed(trail):
            if math.hypot(x - cx, y - cy) > limit:
                # Two positions in a row away from here: a move; one alone: a misplaced box.
                away += 1
                if away == 2:
                    moved = True
                    break
                continue
            away = 0
            since = t
        # Without a move inside the trail, the stillness began before it: keep the older time.
        since = since if moved else min(since, track.still_since_s)
        if since > track.still_since_s:
            track.still_since_s = since
            if track.state == "alarm" and not track.movement_reported:
                track.moved_in_alarm = True
                track.movement_reported = True

    def _still_in_water(self, track: Track, now_s: float, water: Polygon) -> bool:
        """For a lost track: keep it (it went under) or forget it (it left, or timed out)."""
        p = self.params
        # Where it was last seen, unsmoothed: the smoothed centre lags behind a swimmer.
        last = box_center(track.box)
        inside = point_in_polygon(last, water)
        margin = p.edge_margin * box_size(track.box)
        deep = inside and edge_distance(last, water) > margin
        # Lost at the border of a detection-off zone: it went in there, where no one is watched.
        if p.disappearance and deep and not self.zones.near(last, margin):
            track.disappeared = True
            return True
        if track.state == "alarm":
            # A latched alarm keeps its track until acknowledged.
            return True
        if now_s - track.last_s > p.tracker.forget_after_s or not inside or not deep:
            self.tracker.forget(track.track_id)
        return False

    def _advance(self, track: Track, now_s: float) -> list[Signal]:
        p = self.params
        still_s = track.still_for_s(now_s)
        reason: Literal["still", "disappeared"] = "disappeared" if track.disappeared else "still"
        out: list[Signal] = []
        if track.state == "alarm":
            if track.moved_in_alarm:
                track.moved_in_alarm = False
                out.append(self._signal("alarm_movement", track, still_s, reason))
            return out
        if track.state == "candidate" and still_s < p.candidate_after_s:
            track.state = "tracking"
            out.append(self._signal("candidate_cleared", track, still_s, reason))
        if track.state == "tracking" and still_s >= p.candidate_after_s:
            track.state = "candidate"
            out.append(self._signal("candidate", track, still_s, reason))
        if track.state == "candidate" and still_s >= p.alarm_after_s:
            track.state = "alarm"
            self._alarm_seq += 1
            alarm_id = f"{self.name}-{self._alarm_seq}"
            track.alarm_id = alarm_id
            self.alarms[alarm_id] = Alarm(
                alarm_id, track.track_id, now_s, track.box, reason, track.score
            )
            out.append(self._signal("alarm", track, still_s, reason))
        return out

    @staticmethod
    def _signal(
        kind: SignalKind, track: Track, still_s: float, reason: Literal["still", "disappeared"]
    ) -> Signal:
        return Signal(kind, track.track_id, track.box, still_s, reason, track.score, track.alarm_id)

    def acknowledge(self, alarm_id: str, now_s: float) -> Alarm | None:
        """End an alarm (an operator saw it); its track starts over as a moving person."""
        alarm = self.alarms.pop(alarm_id, None)
        if alarm is None:
            return None
        track = self.tracker.tracks.get(alarm.track_id)
        if track is not None:
            if track.lost:
                # The person it was about is not in view: nothing is left to follow.
                self.tracker.forget(track.track_id)
            else:
                track.state = "tracking"
                track.alarm_id = None
                track.moved_in_alarm = False
                track.movement_reported = False
                track.trail.clear()
                track.still_since_s = now_s
        return alarm

    def tracks_summary(self) -> dict[str, int]:
        tracks = self.tracker.tracks.values()
        return {
            "tracks": sum(1 for t in tracks if t.hits >= self.params.tracker.min_hits),
            "lost": sum(1 for t in tracks if t.lost),
            "candidates": sum(1 for t in tracks if t.state == "candidate"),
            "active_alarms": len(self.alarms),
        }
