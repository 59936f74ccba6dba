"""The pool-safety analyzer in the running gateway: camera → detector → tracker → alarms.

A :class:`PoolMonitor` is one of the gateway's sources: it reads its camera
(:mod:`drivers.camera`), checks the camera's health, runs the person detector through the
:class:`~gateway.inference.InferenceEngine` (off the event loop), feeds the pure analyzer
(:mod:`gateway.analyzers.pool`) and emits compact events into the pipeline:

``pool_status``             ``monitoring`` / ``not_monitoring`` with the reasons (camera health,
                            detector unavailable); alarm lane when not monitoring
``pool_candidate``          a person still (or gone under) for T1: warning
``pool_candidate_cleared``  the person moved again before T2
``pool_alarm``              still for T2: alarm lane, repeated every ``alarm_repeat_s`` until an
                            ``ack`` command; also sent to the local alarm output
``pool_alarm_movement``     the person of a latched alarm moved (the alarm stays until ack)
``pool_alarm_ack``          acknowledged (operator id)
``pool_false_alarm``        an operator's "false alarm" feedback (operator id, note)
``pool_zone``               a detection-off zone switched off / back on / expired

Frames exist only from :meth:`PoolMonitor._begin` to the end of their detection; the events carry
numbers and short strings.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections import Counter, deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import structlog

from drivers.camera import CameraSettings, CameraSource
from gateway.analyzers.pool import (
    Alarm,
    OffZone,
    PoolAnalyzer,
    PoolParams,
    Signal,
    TrackerParams,
    ZoneBook,
)
from gateway.analyzers.pool_config import PoolConfig
from gateway.analyzers.pool_health import CameraHealth, HealthParams, small_grey
from gateway.analyzers.pool_health import frame_stats as compute_stats
from gateway.analyzers.pool_output import AlarmOutput
from gateway.commands import CommandError, Handler
from gateway.config import InferenceSection
from gateway.errors import GatewayError, ModelError
from gateway.health import Metrics
from gateway.inference import InferenceEngine, LoadedModel
from gateway.types import (
    Emit,
    Event,
    Measurement,
    Provenance,
    ReportError,
    Severity,
    utc_now,
)
from models.card import load_card
from models.detection import (
    Detection,
    DetectorSpec,
    Transform,
    decode_views,
    preprocess,
    views,
)

__all__ = ["PoolMonitor", "pool_commands"]

log = structlog.get_logger(__name__)

# Time between housekeeping passes (health without frames, zone expiry, alarm repeats).
_TICK_S = 0.5
# Camera health is checked at most this often (frame time).
_HEALTH_PERIOD_S = 0.5
# A detector failing this many frames in a row means the pool is not being watched.
_DETECTOR_FAILURES = 3
# Alarm ids remembered after acknowledgement, so late "false alarm" feedback can name them.
_RECENT_ALARMS = 64

_SIGNAL_KIND = {
    "candidate": ("pool_candidate", Severity.WARNING),
    "candidate_cleared": ("pool_candidate_cleared", Severity.INFO),
    "alarm": ("pool_alarm", Severity.ALARM),
    "alarm_movement": ("pool_alarm_movement", Severity.WARNING),
}


@dataclass(frozen=True, slots=True)
class _InFlight:
    """A frame being analysed: its time and size, and its detection (which holds the image)."""

    t_s: float
    width: int
    height: int
    detections: asyncio.Task[list[Detection] | None]


# Frames held at once: one being finished on the event loop, one in the detector.
_FRAMES_IN_FLIGHT = 2
# The camera's frames have ended (anext's default).
_END: Any = object()


@dataclass(frozen=True, slots=True)
class _Prepared:
    """A frame's detector input, made in the camera's reader thread."""

    spec: DetectorSpec
    tensor: npt.NDArray[np.float32]
    transform: Transform


def _prepare(spec: DetectorSpec, image: npt.NDArray[np.uint8]) -> _Prepared | None:
    try:
        tensor, transform = preprocess(image, spec)
    except ValueError:
        return None  # the analysis runs preprocess again and reports the problem
    return _Prepared(spec, tensor, transform)


def _box_values(box: Sequence[float]) -> tuple[Measurement, ...]:
    return tuple(
        Measurement(name, round(float(v), 1), "px")
        for name, v in zip(("box_x1", "box_y1", "box_x2", "box_y2"), box, strict=True)
    )


class PoolMonitor:
    """One pool camera, watched; a gateway source (``run(emit, report_error)``)."""

    def __init__(
        self,
        name: str,
        cfg: PoolConfig,
        engine: InferenceEngine | None,
        inference: InferenceSection,
        metrics: Metrics,
        *,
        output: AlarmOutput | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.name = name
        self.cfg = cfg
        self.device = cfg.device or name
        self._engine = engine
        self._inference = inference
        self._metrics = metrics
        self._output = output
        self._clock = clock
        self.camera = CameraSource(
            name,
            CameraSettings(
                url=cfg.camera.url,
                analysis_fps=cfg.camera.analysis_fps,
                pace=cfg.camera.pace,
                loop=cfg.camera.loop,
                open_timeout_s=cfg.camera.open_timeout_s,
                read_timeout_s=cfg.camera.read_timeout_s,
                reconnect_min_s=cfg.camera.reconnect_min_s,
                reconnect_max_s=cfg.camera.reconnect_max_s,
            ),
        )
        self.zones = ZoneBook(clock)
        self.analyzer = PoolAnalyzer(
            PoolParams(
                candidate_after_s=cfg.candidate_after_s,
                alarm_after_s=cfg.alarm_after_s,
                still_displacement=cfg.still_displacement,
                edge_margin=cfg.edge_margin,
                disappearance=cfg.disappearance,
                water_area=tuple((float(x), float(y)) for x, y in cfg.water_area),
                tracker=TrackerParams(min_hits=cfg.min_hits),
            ),
            self.zones,
            name=name,
        )
        h = cfg.health
        self.health = CameraHealth(
            HealthParams(
                no_frames_after_s=h.no_frames_after_s,
                frozen_after_s=h.frozen_after_s,
                frozen_change_max=h.frozen_change_max,
                dark_brightness_max=h.dark_brightness_max,
                low_visibility_contrast_max=h.low_visibility_contrast_max,
                blurred_sharpness_max=h.blurred_sharpness_max,
                persist_s=h.persist_s,
                recover_s=h.recover_s,
            )
        )
        self.counters: Counter[str] = Counter()
        self._model_name: str | None = None
        self._spec: DetectorSpec | None = None
        self._model_problem: str | None = None
        self._detector_failures = 0
        self._emit: Emit | None = None
        self._last_arrival = clock()
        self._last_frame_t = 0.0
        self._recent: deque[str] = deque(maxlen=_RECENT_ALARMS)
        # (frame time, signal kind, track id): what happened when, in the camera's time (the
        # alarm-timing evaluation reads it; bounded).
        self.history: deque[tuple[float, str, int]] = deque(maxlen=256)
        self._grey: npt.NDArray[np.uint8] | None = None
        self._health_t: float | None = None
        self._camera_problem: str | None = None
        self._reported: tuple[bool, tuple[str, ...]] | None = None

    # -- status ---------------------------------------------------------------------------------

    @property
    def monitoring(self) -> bool:
        return self._reported is not None and self._reported[0]

    def reasons(self) -> tuple[str, ...]:
        reasons = list(self.health.reasons)
        if self._model_problem is not None or self._detector_failures >= _DETECTOR_FAILURES:
            reasons.append("detector_unavailable")
        return tuple(sorted(reasons))

    def summary(self) -> dict[str, Any]:
        """For the stats message: state, reasons, detection-off zones, alarms, camera."""
        return {
            "pool": self.name,
            "device": self.device,
            "state": "monitoring" if self.monitoring else "not_monitoring",
            "reasons": list(self.reasons()),
            "model": self._model_name,
            "off_zones": [
                {
                    "zone": z.zone_id,
                    "remaining_s": round(self.zones.remaining_s(z), 1),
                    "operator": z.operator,
                    "polygon": [list(p) for p in z.polygon],
                }
                for z in self.zones.active()
            ],
            "alarms": [
                {"alarm": a.alarm_id, "track": a.track_id, "repeats": a.repeats}
                for a in self.analyzer.alarms.values()
            ],
            **self.analyzer.tracks_summary(),
            "camera": self.camera.summary(),
            "counters": dict(self.counters),
        }

    # -- run ------------------------------------------------------------------------------------

    async def run(self, emit: Emit, report_error: ReportError) -> None:
        self._emit = emit
        await self._load_detector(report_error)
        self._last_arrival = self._clock()
        await self._report_status()  # a detector refused at start is said at once
        async with asyncio.TaskGroup() as tg:
            ticker = tg.create_task(self._tick_forever(), name=f"pool:{self.name}:tick")
            output = (
                tg.create_task(self._output.run(), name=f"pool:{self.name}:alarm-output")
                if self._output is not None
                else None
            )
            try:
                await self._analyse_frames()
                if self.cfg.camera.pace != "fast":
                    # A camera stream that ended for good (a realtime file without loop):
                    # the pool is not watched any more, which must be said, and a raised alarm
                    # keeps repeating until acknowledged. Only a fast replay (tests, the demo)
                    # ends the monitor with its file.
                    await ticker
            finally:
                ticker.cancel()
                if output is not None:
                    output.cancel()
        log.info("pool_camera_ended", pool=self.name, **self.counters)

    async def _load_detector(self, report_error: ReportError) -> None:
        path = self._inference.card_path(self.cfg.detector_card)
        try:
            name = load_card(path).name
            if self._engine is None:
                raise ModelError("no inference engine")
            model = (
                self._engine.active(name)
                if self._engine.available(name)
                else await self._engine.load(path)
            )
            spec = self._spec = DetectorSpec.from_card(model.card, str(path))
            self._model_name = name
            # The camera's reader thread prepares the detector input of each frame it delivers,
            # while the previous frame is being analysed.
            self.camera.prepare = functools.partial(_prepare, spec)
        except (ModelError, GatewayError) as exc:
            self._model_problem = str(exc)[:250]
            report_error("pool_detector", f"pool {self.name}: {exc}")
            log.error("pool_detector_unavailable", pool=self.name, error=str(exc))

    async def _tick_forever(self) -> None:
        while True:
            await self.tick()
            await asyncio.sleep(_TICK_S)

    async def tick(self) -> None:
        """Housekeeping: a silent camera, expired zones, alarm repeats."""
        now = self._clock()
        problem = self.camera.problem
        if problem != self._camera_problem:
            # The camera driver does not log; its state changes are said here, once each.
            self._camera_problem = problem
            if problem is None:
                log.info("pool_camera_open", pool=self.name, camera=self.camera.summary()["camera"])
            else:
                log.error("pool_camera_problem", pool=self.name, problem=problem)
        self.health.tick(now - self._last_arrival)
        await self._report_status()
        for zone in self.zones.expire():
            await self._zone_event(zone, "expired", zone.operator)
        for alarm in list(self.analyzer.alarms.values()):
            if now - alarm.last_sent_s >= self.cfg.alarm_repeat_s:
                alarm.repeats += 1
                await self._send_alarm(alarm, now)

    async def _analyse_frames(self) -> None:
        """Analyse the camera's frames in order, one frame's detection running ahead.

        While the event loop finishes a frame (box decoding, tracker, state machine, events),
        the detector already runs on the next one: the model is not left idle for that time
        (about 2 ms a frame at 1280x720 on this machine; the pool pipeline's overhead over a
        bare run went from +15 % to +10 %, bench/README.md). At most ``_FRAMES_IN_FLIGHT`` frames
        are held: the next frame is taken from the camera only when a slot is free, so a live
        camera still hands over its newest frame, and a frame is finished as soon as its
        detection is done, not when the next frame comes.
        """
        in_flight: asyncio.Queue[_InFlight] = asyncio.Queue()
        slots = asyncio.Semaphore(_FRAMES_IN_FLIGHT)
        # A task group: an error while finishing a frame ends the camera loop too (it would
        # otherwise wait for a slot forever) and comes out of run().
        async with asyncio.TaskGroup() as tg:
            finisher = tg.create_task(
                self._finish_in_order(in_flight, slots), name=f"pool:{self.name}:finish"
            )
            try:
                async with contextlib.aclosing(self.camera.frames()) as frames:
                    while True:
                        await slots.acquire()
                        frame = await anext(frames, _END)
                        if frame is None or frame is _END:
                            slots.release()
                            if frame is _END:
                                break
                            continue  # the ticker notices a silent camera
                        self._last_arrival = self._clock()
                        in_flight.put_nowait(self._begin(frame.image, frame.t_s, frame.prepared))
                        # The frame is dropped here: its detection task holds the last reference.
                        del frame
                await in_flight.join()
            finally:
                finisher.cancel()
                while not in_flight.empty():
                    in_flight.get_nowait().detections.cancel()

    async def _finish_in_order(
        self, in_flight: asyncio.Queue[_InFlight], slots: asyncio.Semaphore
    ) -> None:
        while True:
            frame = await in_flight.get()
            try:
                await self._finish(frame)
            finally:
                slots.release()
                in_flight.task_done()

    def _begin(
        self, image: npt.NDArray[np.uint8], t_s: float, prepared: object = None
    ) -> _InFlight:
        """Camera health (twice a second) and the detector started on one frame."""
        self.counters["frames"] += 1
        if self._health_t is None or t_s - self._health_t >= _HEALTH_PERIOD_S:
            # Camera health changes over seconds: two looks a second are plenty, and the
            # detector's frames/s do not pay for it on every frame.
            self._health_t = t_s
            grey = small_grey(image)
            stats = compute_stats(grey, self._grey)
            self._grey = grey
            self.health.observe(t_s, stats)
        height, width = image.shape[:2]
        task = asyncio.create_task(self._detect(image, prepared), name=f"pool:{self.name}:detect")
        return _InFlight(t_s, width, height, task)

    async def _finish(self, frame: _InFlight) -> None:
        """The frame's detections through the tracker and the state machine, in frame order."""
        detections = await frame.detections
        self._last_frame_t = frame.t_s
        # The failure streak is kept here, in camera order, not where detections end: a frame
        # the detector refuses fails at once, while the frame before it may still be in the
        # model, and that frame's success must not reset a streak that comes after it.
        if detections is None:
            if self._spec is not None:  # a detector was there to fail
                self._detector_failures += 1
        else:
            self._detector_failures = 0
        await self._report_status()
        if detections is None:
            return
        for signal in self.analyzer.step(frame.t_s, detections, frame.width, frame.height):
            await self._on_signal(signal)

    async def _detect(
        self, image: npt.NDArray[np.uint8], prepared: object = None
    ) -> list[Detection] | None:
        engine, spec, name = self._engine, self._spec, self._model_name
        if engine is None or spec is None or name is None:
            return None
        try:
            if isinstance(prepared, _Prepared) and prepared.spec is spec:
                tensor, transform = prepared.tensor, prepared.transform
            else:
                tensor, transform = preprocess(image, spec)
            # With the card's tta = "hflip" the model runs on the frame and its mirror image.
            # Both views are queued at once: they run back to back (or as one batch where the
            # card's batch dim is free), with no trip through the event loop in between.
            outputs = await asyncio.gather(
                *(engine.run(name, {spec.input_name: view}) for view in views(tensor, spec))
            )
            found = decode_views(outputs, spec, transform, score_threshold=self.cfg.score_threshold)
        except (ModelError, ValueError) as exc:
            self.counters["detector_errors"] += 1
            self._metrics.inc("pool_detector_errors")
            log.warning("pool_detector_failed", pool=self.name, error=str(exc)[:200])
            return None
        self.counters["detections"] += len(found)
        return [d for d in found if d.label == "person"]

    def _provenance(self, score: float) -> Provenance | None:
        if self._engine is None or self._model_name is None or self._spec is None:
            return None
        try:
            model: LoadedModel = self._engine.active(self._model_name)
        except ModelError:
            return None
        threshold = self.cfg.score_threshold or self._spec.score_threshold
        return model.provenance(round(score, 4), threshold)

    # -- events ---------------------------------------------------------------------------------

    async def _put(self, event: Event) -> None:
        if self._emit is not None:
            await self._emit(event)

    async def _report_status(self) -> None:
        # The verdict is recomputed from the camera's health and the detector's state, and said
        # only when it changed.
        reasons = self.reasons()
        if self.health.monitoring is None and not reasons:
            return  # no frame judged yet and nothing known to be wrong: no verdict
        monitoring = not reasons and self.health.monitoring is True
        state = (monitoring, reasons)
        if state == self._reported:
            return
        self._reported = state
        text = "monitoring" if monitoring else "not_monitoring"
        listed = ",".join(reasons) or "ok"
        self._metrics.inc(f"pool_{text}")
        log.warning("pool_status", pool=self.name, state=text, reasons=listed)
        await self._put(
            Event(
                kind="pool_status",
                device=self.device,
                ts=utc_now(),
                # A pool nobody watches must never look like a quiet one: alarm lane.
                severity=Severity.INFO if monitoring else Severity.ALARM,
                values=(
                    Measurement("pool", self.name[:64]),
                    Measurement("state", text),
                    Measurement("reasons", listed),
                ),
            )
        )
        if self._output is not None:
            await self._output.status({"pool": self.name, "state": text, "reasons": listed})

    async def _on_signal(self, signal: Signal) -> None:
        kind, severity = _SIGNAL_KIND[signal.kind]
        self.history.append((self._last_frame_t, signal.kind, signal.track_id))
        self.counters[kind] += 1
        self._metrics.inc(kind)
        if signal.kind == "alarm" and signal.alarm_id is not None:
            alarm = self.analyzer.alarms[signal.alarm_id]
            self._recent.append(alarm.alarm_id)
            log.error("pool_alarm", pool=self.name, alarm=alarm.alarm_id, track=alarm.track_id)
            await self._send_alarm(alarm, self._clock())
            return
        log.warning(kind, pool=self.name, track=signal.track_id, still_s=round(signal.still_s, 1))
        await self._put(self._signal_event(kind, severity, signal))

    def _signal_event(self, kind: str, severity: Severity, signal: Signal) -> Event:
        values = [
            Measurement("pool", self.name[:64]),
            Measurement("track_id", signal.track_id),
            Measurement("reason", signal.reason),
            Measurement("still_s", round(signal.still_s, 1), "s"),
            *_box_values(signal.box),
            Measurement("candidate_after_s", self.cfg.candidate_after_s, "s"),
            Measurement("alarm_after_s", self.cfg.alarm_after_s, "s"),
        ]
        if signal.alarm_id is not None:
            values.insert(1, Measurement("alarm_id", signal.alarm_id))
        return Event(
            kind=kind,
            device=self.device,
            ts=utc_now(),
            severity=severity,
            values=tuple(values),
            model=self._provenance(signal.score),
        )

    async def _send_alarm(self, alarm: Alarm, now: float) -> None:
        alarm.last_sent_s = now
        track = self.analyzer.tracker.tracks.get(alarm.track_id)
        still_s = track.still_for_s(self._last_frame_t) if track is not None else 0.0
        signal = Signal(
            "alarm", alarm.track_id, alarm.box, still_s, alarm.reason, alarm.score, alarm.alarm_id
        )
        event = self._signal_event("pool_alarm", Severity.ALARM, signal)
        event = Event(
            kind=event.kind,
            device=event.device,
            ts=event.ts,
            severity=event.severity,
            values=(*event.values, Measurement("repeat", alarm.repeats)),
            model=event.model,
        )
        # Local output first: it does not depend on the outbox or the uplink.
        if self._output is not None:
            await self._output.alarm(
                {
                    "pool": self.name,
                    "alarm": alarm.alarm_id,
                    "state": "alarm",
                    "track": alarm.track_id,
                    "reason": alarm.reason,
                    "repeat": alarm.repeats,
                    "box": [round(v, 1) for v in alarm.box],
                }
            )
        await self._put(event)

    async def _zone_event(self, zone: OffZone, action: str, operator: str) -> None:
        log.info("pool_zone", pool=self.name, zone=zone.zone_id, action=action, operator=operator)
        await self._put(
            Event(
                kind="pool_zone",
                device=self.device,
                ts=utc_now(),
                severity=Severity.WARNING if action == "off" else Severity.INFO,
                values=(
                    Measurement("pool", self.name[:64]),
                    Measurement("zone", zone.zone_id),
                    Measurement("action", action),
                    Measurement("operator", operator),
                    Measurement("remaining_s", round(self.zones.remaining_s(zone), 1), "s"),
                ),
            )
        )

    # -- operator actions (commands) ------------------------------------------------------------

    async def acknowledge(self, alarm_id: str, operator: str) -> list[str]:
        ids = list(self.analyzer.alarms) if alarm_id == "all" else [alarm_id]
        done = []
        for one in ids:
            alarm = self.analyzer.acknowledge(one, self._last_frame_t)
            if alarm is None:
                continue
            done.append(one)
            self.counters["acknowledged"] += 1
            log.warning("pool_alarm_acknowledged", pool=self.name, alarm=one, operator=operator)
            await self._put(
                Event(
                    kind="pool_alarm_ack",
                    device=self.device,
                    ts=utc_now(),
                    values=(
                        Measurement("pool", self.name[:64]),
                        Measurement("alarm_id", one),
                        Measurement("operator", operator),
                        Measurement("repeats", alarm.repeats),
                    ),
                )
            )
        if done and not self.analyzer.alarms and self._output is not None:
            await self._output.clear({"pool": self.name, "state": "clear", "operator": operator})
        return done

    def knows_alarm(self, alarm_id: str) -> bool:
        return alarm_id in self.analyzer.alarms or alarm_id in self._recent

    async def false_alarm(self, alarm_id: str, operator: str, note: str) -> None:
        self.counters["false_alarms"] += 1
        self._metrics.inc("pool_false_alarms")
        log.warning(
            "pool_false_alarm", pool=self.name, alarm=alarm_id, operator=operator, note=note
        )
        await self._put(
            Event(
                kind="pool_false_alarm",
                device=self.device,
                ts=utc_now(),
                values=(
                    Measurement("pool", self.name[:64]),
                    Measurement("alarm_id", alarm_id),
                    Measurement("operator", operator),
                    Measurement("note", note),
                ),
            )
        )
        if alarm_id in self.analyzer.alarms:
            await self.acknowledge(alarm_id, operator)

    async def switch_off(
        self,
        zone_id: str,
        polygon: tuple[tuple[float, float], ...],
        duration_s: float,
        operator: str,
    ) -> OffZone:
        zone = self.zones.switch_off(zone_id, polygon, duration_s, operator)
        await self._zone_event(zone, "off", operator)
        return zone

    async def switch_on(self, zone_id: str, operator: str) -> OffZone | None:
        zone = self.zones.switch_on(zone_id)
        if zone is not None:
            await self._zone_event(zone, "on", operator)
        return zone


# -- commands -------------------------------------------------------------------------------


def _text(args: Mapping[str, Any], key: str, *, default: str | None = None, limit: int = 64) -> str:
    value = args.get(key, default)
    if not isinstance(value, str) or not value or len(value) > limit:
        raise CommandError(f"{key}: a non-empty string of at most {limit} characters is required")
    return value


def _pool(monitors: Mapping[str, PoolMonitor], args: Mapping[str, Any]) -> PoolMonitor:
    if "pool" not in args and len(monitors) == 1:
        return next(iter(monitors.values()))
    name = args.get("pool")
    if not isinstance(name, str) or name not in monitors:
        raise CommandError(f"pool: one of {', '.join(sorted(monitors))} (got: {name!r})"[:200])
    return monitors[name]


def _polygon(raw: Any) -> tuple[tuple[float, float], ...]:
    points: list[tuple[float, float]] = []
    if isinstance(raw, list) and 3 <= len(raw) <= 64:
        for point in raw:
            if (
                isinstance(point, list)
                and len(point) == 2
                and all(isinstance(v, int | float) and not isinstance(v, bool) for v in point)
            ):
                points.append((float(point[0]), float(point[1])))
    if len(points) < 3 or len(points) != len(raw):
        raise CommandError("polygon: 3 to 64 points [[x, y], ...] in image pixels")
    return tuple(points)


def pool_commands(monitors: Mapping[str, PoolMonitor]) -> dict[str, Handler]:
    """``ack``, ``false_alarm``, ``detection_off`` and ``detection_on`` for the pools."""

    async def ack(args: Mapping[str, Any]) -> tuple[Measurement, ...]:
        pool = _pool(monitors, args)
        alarm = _text(args, "alarm", default="all")
        operator = _text(args, "operator")
        done = await pool.acknowledge(alarm, operator)
        if not done and alarm != "all":
            raise CommandError(f"alarm {alarm!r} is not active in pool {pool.name}"[:200])
        return (
            Measurement("pool", pool.name[:64]),
            Measurement("acknowledged", ",".join(done)[:256]),
            Measurement("operator", operator),
        )

    async def false_alarm(args: Mapping[str, Any]) -> tuple[Measurement, ...]:
        pool = _pool(monitors, args)
        alarm = _text(args, "alarm")
        operator = _text(args, "operator")
        note = args.get("note", "")
        if not isinstance(note, str) or len(note) > 200:
            raise CommandError("note: a string of at most 200 characters")
        if not pool.knows_alarm(alarm):
            raise CommandError(f"alarm {alarm!r} is unknown in pool {pool.name}"[:200])
        await pool.false_alarm(alarm, operator, note)
        return (Measurement("pool", pool.name[:64]), Measurement("recorded", alarm))

    async def detection_off(args: Mapping[str, Any]) -> tuple[Measurement, ...]:
        pool = _pool(monitors, args)
        zone = _text(args, "zone")
        operator = _text(args, "operator")
        duration = args.get("duration_s")
        if (
            isinstance(duration, bool)
            or not isinstance(duration, int | float)
            or not 0 < duration <= pool.cfg.max_off_zone_s
        ):
            raise CommandError(
                f"duration_s: seconds, more than 0 and at most {pool.cfg.max_off_zone_s:g} "
                f"(it switches back on by itself)"
            )
        try:
            off = await pool.switch_off(zone, _polygon(args.get("polygon")), duration, operator)
        except ValueError as exc:
            raise CommandError(str(exc)) from exc
        return (
            Measurement("pool", pool.name[:64]),
            Measurement("zone", off.zone_id),
            Measurement("duration_s", float(duration), "s"),
        )

    async def detection_on(args: Mapping[str, Any]) -> tuple[Measurement, ...]:
        pool = _pool(monitors, args)
        zone = _text(args, "zone")
        operator = _text(args, "operator", default="unknown")
        if await pool.switch_on(zone, operator) is None:
            raise CommandError(f"zone {zone!r} is not switched off in pool {pool.name}"[:200])
        return (Measurement("pool", pool.name[:64]), Measurement("zone", zone))

    return {
        "ack": ack,
        "false_alarm": false_alarm,
        "detection_off": detection_off,
        "detection_on": detection_on,
    }
