"""The pool monitor end to end on the bundled synthetic clip: camera → detector → alarms, commands.

Real onnxruntime through the InferenceEngine on the shipped generic detector (FastestDet), the
real OpenCV camera source on the bundled video, events collected where the pipeline would take
them.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
from importlib import resources
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from gateway.analyzers.pool_config import PoolConfig
from gateway.analyzers.pool_runtime import PoolMonitor, pool_commands
from gateway.commands import CommandError
from gateway.config import InferenceSection
from gateway.health import Metrics
from gateway.inference import InferenceEngine
from gateway.types import Event, Reading, Severity
from models.card import dump_card, load_card
from models.pool.synth import read_video

ROOT = Path(__file__).resolve().parents[1]
GENERIC = ROOT / "models" / "generic" / "fastestdet" / "fastestdet.toml"
CLIP = Path(str(resources.files("gateway.demo").joinpath("pool-demo.mp4")))
WATER = [(16.0, 16.0), (304.0, 16.0), (304.0, 224.0), (16.0, 224.0)]


def pool_config(url: Path, **overrides: Any) -> PoolConfig:
    data: dict[str, Any] = {
        "camera": {"url": str(url), "pace": "fast", "analysis_fps": 4.0},
        "detector_card": str(GENERIC),
        "water_area": WATER,
        **overrides,
    }
    return PoolConfig.model_validate(data)


class Collect:
    def __init__(self) -> None:
        self.events: list[Event] = []
        self.errors: list[tuple[str, str]] = []

    async def emit(self, item: Reading | Event, on_stored: Any = None) -> None:
        assert isinstance(item, Event)
        self.events.append(item)

    def report(self, kind: str, detail: str) -> None:
        self.errors.append((kind, detail))

    def kinds(self) -> list[str]:
        return [e.kind for e in self.events]

    def values(self, kind: str) -> list[dict[str, Any]]:
        return [{m.name: m.value for m in e.values} for e in self.events if e.kind == kind]


async def run_monitor(cfg: PoolConfig, **kw: Any) -> tuple[PoolMonitor, Collect]:
    out = Collect()
    async with InferenceEngine(InferenceSection(threads=1)) as engine:
        monitor = PoolMonitor("main", cfg, engine, InferenceSection(), Metrics(), **kw)
        await monitor.run(out.emit, out.report)
    return monitor, out


async def test_the_still_swimmer_raises_candidate_then_alarm_and_the_other_does_not() -> None:
    monitor, out = await run_monitor(pool_config(CLIP))
    assert out.errors == []
    assert out.kinds()[0] == "pool_status"
    assert out.values("pool_status")[0] == {"pool": "main", "state": "monitoring", "reasons": "ok"}
    history = [(kind, track) for _t, kind, track in monitor.history]
    assert history == [("candidate", history[0][1]), ("alarm", history[0][1])]
    (t_candidate, _, _), (t_alarm, _, _) = monitor.history
    # The clip's person stops at 3.0 s (models/pool/synth.py, scenario "demo"), swimming at
    # 27 px/s with a 60 px box: the last 0.67 s before the stop already count as still.
    assert 3.0 + 10.0 - 0.75 <= t_candidate <= 3.0 + 10.0 + 1.0
    assert t_alarm - t_candidate == 5.0
    alarm = next(e for e in out.events if e.kind == "pool_alarm")
    assert alarm.severity is Severity.ALARM
    values = out.values("pool_alarm")[0]
    assert values["alarm_id"] == "main-1"
    assert values["reason"] == "still"
    assert values["still_s"] >= 15.0
    assert 0 <= values["box_x1"] < values["box_x2"] <= 320
    assert alarm.model is not None
    assert alarm.model.model_id == "fastestdet_coco"
    assert alarm.model.threshold == 0.65
    assert monitor.summary()["alarms"] == [
        {"alarm": "main-1", "track": history[0][1], "repeats": 0}
    ]


async def test_operator_commands_ack_false_alarm_and_zones() -> None:
    monitor, out = await run_monitor(pool_config(CLIP))
    handlers = pool_commands({"main": monitor})
    with pytest.raises(CommandError, match="operator"):
        await handlers["ack"]({"alarm": "main-1"})
    with pytest.raises(CommandError, match="not active"):
        await handlers["ack"]({"alarm": "main-9", "operator": "lg-1"})
    reply = await handlers["ack"]({"alarm": "main-1", "operator": "lg-1"})
    assert {m.name: m.value for m in reply}["acknowledged"] == "main-1"
    assert out.values("pool_alarm_ack") == [
        {"pool": "main", "alarm_id": "main-1", "operator": "lg-1", "repeats": 0}
    ]
    assert monitor.summary()["alarms"] == []
    # Feedback after the fact is still recorded against the alarm.
    await handlers["false_alarm"]({"alarm": "main-1", "operator": "lg-1", "note": "sitting"})
    assert out.values("pool_false_alarm") == [
        {"pool": "main", "alarm_id": "main-1", "operator": "lg-1", "note": "sitting"}
    ]
    with pytest.raises(CommandError, match="unknown"):
        await handlers["false_alarm"]({"alarm": "x-1", "operator": "lg-1"})

    square = [[10, 10], [100, 10], [100, 100], [10, 100]]
    with pytest.raises(CommandError, match="duration_s"):
        await handlers["detection_off"](
            {"zone": "lesson", "polygon": square, "duration_s": 1e9, "operator": "lg-2"}
        )
    with pytest.raises(CommandError, match="polygon"):
        await handlers["detection_off"](
            {"zone": "lesson", "polygon": [[1, 2]], "duration_s": 60, "operator": "lg-2"}
        )
    await handlers["detection_off"](
        {"zone": "lesson", "polygon": square, "duration_s": 600, "operator": "lg-2"}
    )
    zones = monitor.summary()["off_zones"]
    assert [z["zone"] for z in zones] == ["lesson"]
    assert 599 <= zones[0]["remaining_s"] <= 600
    assert out.values("pool_zone")[-1]["action"] == "off"
    await handlers["detection_on"]({"zone": "lesson", "operator": "lg-2"})
    assert monitor.summary()["off_zones"] == []
    assert out.values("pool_zone")[-1]["action"] == "on"


async def test_an_off_zone_over_the_still_swimmer_prevents_the_alarm() -> None:
    out = Collect()
    cfg = pool_config(CLIP)
    async with InferenceEngine(InferenceSection(threads=1)) as engine:
        monitor = PoolMonitor("main", cfg, engine, InferenceSection(), Metrics())
        # The still person floats around (140, 150) in the clip.
        zone = ((90.0, 110.0), (190.0, 110.0), (190.0, 200.0), (90.0, 200.0))
        await monitor.switch_off("steps", zone, 3600, "lg-3")
        await monitor.run(out.emit, out.report)
    assert "pool_alarm" not in out.kinds()
    assert "pool_candidate" not in out.kinds()
    assert monitor.analyzer.ignored_off_zone > 40


async def test_alarm_repeats_until_acknowledged_and_reaches_the_local_output() -> None:
    class Output:
        def __init__(self) -> None:
            self.calls: list[tuple[str, dict[str, Any]]] = []
            from collections import Counter

            self.counters: Counter[str] = Counter()

        async def run(self) -> None:
            await asyncio.Event().wait()

        async def alarm(self, payload: dict[str, Any]) -> None:
            self.calls.append(("alarm", payload))

        async def clear(self, payload: dict[str, Any]) -> None:
            self.calls.append(("clear", payload))

        async def status(self, payload: dict[str, Any]) -> None:
            self.calls.append(("status", payload))

    now = [1000.0]
    output = Output()
    monitor, out = await run_monitor(
        pool_config(CLIP, alarm_repeat_s=5), output=output, clock=lambda: now[0]
    )
    assert [c for c, _ in output.calls] == ["status", "alarm"]
    assert output.calls[1][1]["alarm"] == "main-1"
    # Housekeeping later on: the alarm is repeated every alarm_repeat_s until acknowledged.
    now[0] += 5
    await monitor.tick()
    now[0] += 2
    await monitor.tick()
    now[0] += 3
    await monitor.tick()
    repeats = out.values("pool_alarm")
    assert [r["repeat"] for r in repeats] == [0, 1, 2]
    assert [c for c, _ in output.calls].count("alarm") == 3
    await monitor.acknowledge("main-1", "lg-1")
    now[0] += 60
    await monitor.tick()
    assert [c for c, _ in output.calls][-1] == "clear"
    assert len(out.values("pool_alarm")) == 3


async def test_a_missing_detector_means_not_monitoring(tmp_path: Path) -> None:
    _monitor, out = await run_monitor(pool_config(CLIP, detector_card=str(tmp_path / "no.toml")))
    assert [k for k, _d in out.errors] == ["pool_detector"]
    statuses = out.values("pool_status")
    assert statuses[0]["state"] == "not_monitoring"
    assert statuses[0]["reasons"] == "detector_unavailable"
    assert next(e for e in out.events if e.kind == "pool_status").severity is Severity.ALARM
    assert "pool_alarm" not in out.kinds()


async def test_a_camera_going_dark_is_reported_and_recovery_too(tmp_path: Path) -> None:
    # 8 s of the clip, 8 s dark, 8 s of the clip again.
    frames = read_video(CLIP, limit=32)
    assert len(frames) == 32
    video = tmp_path / "dark.mp4"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"mp4v"), 4.0, (320, 240))
    rng = np.random.default_rng(0)
    for frame in frames:
        writer.write(frame)
    for _ in range(32):
        writer.write(rng.integers(0, 12, (240, 320, 3), dtype=np.uint8))
    for frame in frames:
        writer.write(frame)
    writer.release()
    _monitor, out = await run_monitor(pool_config(video))
    states = [(v["state"], v["reasons"]) for v in out.values("pool_status")]
    assert states == [("monitoring", "ok"), ("not_monitoring", "dark"), ("monitoring", "ok")]


async def test_the_gateway_runs_the_demo_pool_into_the_outbox(tmp_path: Path) -> None:
    from gateway.app import Gateway
    from gateway.config import config_from_dict
    from gateway.demo import pool as demo_pool
    from gateway.wire import Encoding, decode

    out = tmp_path / "out.jsonl"
    cfg = config_from_dict(
        {
            "gateway": {"id": "t", "state_dir": str(tmp_path / "state")},
            "uplink": {"type": "file", "path": str(out), "fsync": False},
            **demo_pool.config(),
        },
        "test",
    )
    gateway = Gateway(cfg, {})
    assert await gateway.run(stop_when_sources_done=True) == 0
    events = [decode(line, Encoding.JSON) for line in out.read_bytes().splitlines()]
    kinds = [e.kind for e in events]
    assert kinds == ["pool_status", "pool_candidate", "pool_alarm"]
    assert events[2].lane.name == "ALARM"
    assert gateway.metrics.counters["pool_alarm"] == 1


async def test_an_unwatched_pool_is_named_in_the_systemd_status(tmp_path: Path) -> None:
    import socket

    from gateway.app import Gateway
    from gateway.config import config_from_dict

    cfg = config_from_dict(
        {
            "gateway": {"id": "t", "state_dir": str(tmp_path / "state")},
            "uplink": {"type": "file", "path": str(tmp_path / "out.jsonl"), "fsync": False},
            "pools": {
                "main": {
                    "camera": {"url": str(CLIP), "pace": "fast"},
                    "detector_card": str(tmp_path / "missing.toml"),
                }
            },
        },
        "test",
    )
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(tmp_path / "notify.sock"))
        sock.settimeout(10)
        gateway = Gateway(cfg, {"NOTIFY_SOCKET": str(tmp_path / "notify.sock")})
        assert await gateway.run(stop_when_sources_done=True) == 0
        messages = []
        sock.settimeout(0.5)
        while True:
            try:
                messages.append(sock.recv(4096).decode())
            except TimeoutError:
                break
    assert messages[0].startswith("READY=1\nSTATUS=")
    assert "; pool main NOT monitoring (" in messages[0]
    assert "pool main NOT monitoring (detector_unavailable" in messages[-1]


async def test_a_detector_card_with_tta_runs_the_model_on_each_frame_and_its_mirror(
    tmp_path: Path,
) -> None:
    card = load_card(GENERIC)
    shutil.copy(GENERIC.with_name(card.file), tmp_path / card.file)
    tta_card = tmp_path / "fastestdet_tta.toml"
    tta_card.write_text(
        dump_card(card.model_copy(update={"params": {**card.params, "tta": "hflip"}}))
    )
    out = Collect()
    async with InferenceEngine(InferenceSection(threads=1)) as engine:
        monitor = PoolMonitor(
            "main",
            pool_config(CLIP, detector_card=str(tta_card)),
            engine,
            InferenceSection(),
            Metrics(),
        )
        await monitor.run(out.emit, out.report)
        (lane,) = engine.stats()["models"].values()
    assert out.errors == []
    assert monitor.counters["frames"] > 0
    assert lane["calls"] == 2 * monitor.counters["frames"]
    assert [kind for _t, kind, _track in monitor.history] == ["candidate", "alarm"]


async def test_a_frame_is_finished_without_waiting_for_the_next_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The detector runs one frame ahead, but a live camera that delivers one frame and then
    nothing must still get that frame judged: its verdict comes, the next frame does not."""
    from drivers.camera import Frame

    first = read_video(CLIP)[0]
    taken = asyncio.Event()
    out = Collect()
    judged = asyncio.Event()

    async def emit(item: Reading | Event, on_stored: Any = None) -> None:
        await out.emit(item)
        judged.set()

    async def one_frame_then_silence() -> Any:
        yield Frame(first, 0.0, 1)
        taken.set()
        await asyncio.Event().wait()  # the camera's next frame never comes
        yield None

    async with InferenceEngine(InferenceSection(threads=1)) as engine:
        monitor = PoolMonitor("main", pool_config(CLIP), engine, InferenceSection(), Metrics())
        monkeypatch.setattr(monitor.camera, "frames", one_frame_then_silence)
        task = asyncio.create_task(monitor.run(emit, out.report))
        async with asyncio.timeout(30):
            await taken.wait()
            await judged.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert out.values("pool_status") == [{"pool": "main", "state": "monitoring", "reasons": "ok"}]
    assert monitor.counters["frames"] == 1
    assert out.errors == []


async def test_frames_are_judged_in_camera_order_with_one_running_ahead(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The tracker and the state machine see every frame of the clip once, in order, although
    the next frame's detection starts before the previous one is finished."""
    out = Collect()
    seen: list[float] = []
    async with InferenceEngine(InferenceSection(threads=1)) as engine:
        monitor = PoolMonitor("main", pool_config(CLIP), engine, InferenceSection(), Metrics())
        step = monitor.analyzer.step

        def spy(t_s: float, *args: Any) -> Any:
            seen.append(t_s)
            return step(t_s, *args)

        monkeypatch.setattr(monitor.analyzer, "step", spy)
        await monitor.run(out.emit, out.report)
    frames = len(read_video(CLIP))
    assert seen == [i / 4.0 for i in range(frames)]  # the clip is 4 frames/s, analysed at 4
    assert monitor.counters["frames"] == frames
    assert out.errors == []


async def test_a_failure_while_finishing_a_frame_ends_the_monitor_with_it() -> None:
    """An error in the tracker/event half (here: the pipeline refusing the candidate event,
    which only a finished frame emits) must surface from run(), as before the detector ran
    ahead, not leave the camera loop waiting for a slot forever."""

    class RefusedError(Exception):
        pass

    async def emit(item: Reading | Event, on_stored: Any = None) -> None:
        if isinstance(item, Event) and item.kind == "pool_candidate":
            raise RefusedError(item.kind)

    async with InferenceEngine(InferenceSection(threads=1)) as engine:
        monitor = PoolMonitor("main", pool_config(CLIP), engine, InferenceSection(), Metrics())
        run = asyncio.create_task(monitor.run(emit, Collect().report))
        done, _ = await asyncio.wait({run}, timeout=30)
        if not done:
            run.cancel()
            with contextlib.suppress(BaseException):
                await run
            pytest.fail("the monitor still ran 30 s after the error")
        error = run.exception()
    assert isinstance(error, ExceptionGroup) and error.subgroup(RefusedError) is not None


async def test_three_failed_frames_in_a_row_are_reported_although_the_next_ran_ahead(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The failure streak that means "detector unavailable" is counted in camera order. A frame
    the detector refuses (here grey frames, which preprocessing rejects) fails at once, while the
    good frame before it is still in the model: counted as its detection ended, that good frame's
    reset came after the failures and three failures in a row were never reported."""
    from drivers.camera import Frame

    clip = read_video(CLIP, limit=12)

    async def three_grey_frames() -> Any:
        for i, image in enumerate(clip):
            grey = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
            yield Frame(grey if i in (1, 2, 3) else image, i / 4.0, i + 1)

    out = Collect()
    async with InferenceEngine(InferenceSection(threads=1)) as engine:
        monitor = PoolMonitor("main", pool_config(CLIP), engine, InferenceSection(), Metrics())
        monkeypatch.setattr(monitor.camera, "frames", three_grey_frames)
        await monitor.run(out.emit, out.report)
    assert monitor.counters["detector_errors"] == 3
    states = [(v["state"], v["reasons"]) for v in out.values("pool_status")]
    assert states == [
        ("monitoring", "ok"),
        ("not_monitoring", "detector_unavailable"),
        ("monitoring", "ok"),
    ]
