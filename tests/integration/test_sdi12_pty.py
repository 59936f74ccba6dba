"""The SDI-12 source against a simulated probe on the far end of a real socat pty pair."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from drivers.sdi12 import Sdi12Sensor, Sdi12Source, Sdi12Value
from drivers.serial_port import SerialSettings
from gateway.types import Event, Reading, Severity
from tests.support.sdi12_sim import Probe, Sdi12BusSim
from tests.support.socat import PtyPair

# The CTD probe of the simulator: level in mm (reported in cm here), temperature, conductivity.
CTD_VALUES = (
    Sdi12Value(0, "water_level", "cm", scale=0.1),
    Sdi12Value(1, "water_temperature", "Cel"),
    Sdi12Value(2, "conductivity", "uS/cm"),
)


class Harness:
    """Runs a source, records what it emits and reports, and awaits conditions with deadlines."""

    def __init__(self, source: Sdi12Source) -> None:
        self.source = source
        self.items: list[Reading | Event] = []
        self.errors: list[tuple[str, str]] = []
        self._changed = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    async def emit(
        self, item: Reading | Event, on_stored: Callable[[], None] | None = None
    ) -> None:
        self.items.append(item)
        if on_stored is not None:
            on_stored()
        self._changed.set()

    def report_error(self, kind: str, detail: str) -> None:
        self.errors.append((kind, detail))
        self._changed.set()

    def readings(self, device: str | None = None) -> list[Reading]:
        return [i for i in self.items if isinstance(i, Reading) and device in (None, i.device)]

    def events(self, kind: str) -> list[Event]:
        return [i for i in self.items if isinstance(i, Event) and i.kind == kind]

    def sensor(self, device: str) -> dict[str, Any]:
        stats: dict[str, Any] = self.source.stats()["sensors"][device]
        return stats

    async def until(self, condition: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
        """Wait for ``condition``: re-checked on every emit/report and at least every 20 ms
        (stats change without an emit); fails the test at the deadline or if the source died."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not condition():
            if self.task is not None and self.task.done():
                self.task.result()  # raises what ended the source
                pytest.fail(f"the source stopped while waiting for {what}")
            remaining = deadline - loop.time()
            if remaining <= 0:
                pytest.fail(
                    f"timed out after {timeout} s waiting for {what}; stats: "
                    f"{self.source.stats()}; errors: {self.errors[-3:]}"
                )
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), min(0.02, remaining))


@contextlib.asynccontextmanager
async def running(source: Sdi12Source) -> AsyncIterator[Harness]:
    harness = Harness(source)
    harness.task = asyncio.create_task(source.run(harness.emit, harness.report_error))
    try:
        yield harness
    finally:
        harness.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await harness.task


def make_source(
    pair: PtyPair,
    sensors: list[Sdi12Sensor],
    *,
    retries: int = 2,
    timeout_s: float = 0.25,
    wake_break: bool = False,
) -> Sdi12Source:
    settings = SerialSettings(
        port=str(pair.sensor),
        baud=1200,
        bytesize=7,
        parity="E",
        read_timeout_s=timeout_s,
        reopen_min_s=0.1,
        reopen_max_s=0.3,
    )
    return Sdi12Source("sdi12-bus", settings, sensors, retries, wake_break=wake_break)


def ctd(
    address: str = "0", device: str = "ctd-1", interval_s: float = 0.3, **kw: Any
) -> Sdi12Sensor:
    return Sdi12Sensor(address, device, interval_s, CTD_VALUES, **kw)


def check_ctd_reading(reading: Reading, device: str = "ctd-1") -> None:
    assert reading.source == "sdi12-bus"
    assert reading.device == device
    assert reading.ts.tzinfo is not None
    assert abs(datetime.now(UTC) - reading.ts) < timedelta(seconds=10)
    got = {m.name: (m.value, m.unit) for m in reading.values}
    assert got.keys() == {"water_level", "water_temperature", "conductivity"}
    level, level_unit = got["water_level"]
    assert level == pytest.approx(123.45)
    assert level_unit == "cm"
    assert got["water_temperature"] == (12.34, "Cel")
    assert got["conductivity"] == (456.0, "uS/cm")
    assert reading.quality == ()


async def test_reading_with_values_collected_over_two_data_commands(pty_pair: PtyPair) -> None:
    with Sdi12BusSim(pty_pair.sim, [Probe()]) as sim:
        async with running(make_source(pty_pair, [ctd()])) as h:
            await h.until(lambda: len(h.readings()) >= 2, "two readings")
            await h.until(lambda: h.sensor("ctd-1")["identity"] is not None, "identification")
    check_ctd_reading(h.readings()[0])
    # aM!, then the values across aD0! (two values) and aD1! (the third): §4.4 Send Data.
    assert sim.commands[:3] == ["0M!", "0D0!", "0D1!"]
    assert sim.count("0D2!") == 0
    stats = h.sensor("ctd-1")
    assert stats["identity"] == {
        "sdi12_version": "1.4",
        "vendor": "GWSIM",
        "model": "CTD-10",
        "version": "110",
        "extra": "SN000123",
    }
    assert stats["timeouts"] == stats["parse_errors"] == stats["failures"] == 0
    assert not h.events("device_silent")
    assert h.source.counters["readings"] >= 2


async def test_crc_variant_through_an_echoing_adapter_with_wake_break(pty_pair: PtyPair) -> None:
    # A plain single-wire adapter: it reads back every command, and the gateway makes the break.
    with Sdi12BusSim(pty_pair.sim, [Probe()], echo=True) as sim:
        source = make_source(pty_pair, [ctd(crc=True)], wake_break=True)
        async with running(source) as h:
            await h.until(lambda: len(h.readings()) >= 1, "a reading")
    check_ctd_reading(h.readings()[0])
    assert sim.commands[:3] == ["0MC!", "0D0!", "0D1!"]
    assert h.sensor("ctd-1")["parse_errors"] == 0


async def test_late_answer_is_retried(pty_pair: PtyPair) -> None:
    probe = Probe()
    # The first aM! is answered after the 0.25 s window: the source sends it again (§7 retries).
    probe.delay_next(1, 0.4)
    with Sdi12BusSim(pty_pair.sim, [probe]) as sim:
        async with running(make_source(pty_pair, [ctd()])) as h:
            await h.until(lambda: len(h.readings()) >= 1, "a reading despite the late answer")
    check_ctd_reading(h.readings()[0])
    stats = h.sensor("ctd-1")
    assert stats["timeouts"] >= 1
    assert stats["retries"] >= 1
    assert sim.count("0M!") >= 2
    assert stats["failures"] == 0
    assert not h.events("device_silent")


async def test_silent_sensor_then_back(pty_pair: PtyPair) -> None:
    probe = Probe(silent=True)
    with Sdi12BusSim(pty_pair.sim, [probe]) as sim:
        source = make_source(pty_pair, [ctd(interval_s=0.2)], retries=1, timeout_s=0.15)
        async with running(source) as h:
            await h.until(lambda: bool(h.events("device_silent")), "device_silent")
            await h.until(lambda: h.sensor("ctd-1")["polls"] >= 3, "more polls of the silent one")
            silent = h.events("device_silent")
            assert len(silent) == 1, "device_silent is reported once"
            assert silent[0].severity is Severity.WARNING
            assert silent[0].device == "ctd-1"
            values = {m.name: m.value for m in silent[0].values}
            assert values["reason"] == "no_answer"
            assert values["address"] == "0"
            assert values["attempts"] == 2  # the command and one retry
            # Known silent: one attempt per poll, so a dead sensor costs one window per interval.
            before = sim.count("0M!")
            polls = h.sensor("ctd-1")["polls"]
            await h.until(lambda: h.sensor("ctd-1")["polls"] >= polls + 2, "two more polls")
            assert sim.count("0M!") - before <= h.sensor("ctd-1")["polls"] - polls + 1
            assert h.source.counters["silent_sensors"] == 1

            probe.silent = False
            await h.until(lambda: bool(h.events("device_back")), "device_back")
            await h.until(lambda: len(h.readings()) >= 1, "a reading after the sensor came back")
    back = h.events("device_back")[0]
    assert back.severity is Severity.INFO
    assert h.items.index(back) < h.items.index(h.readings()[0])
    assert len(h.events("device_silent")) == 1
    assert not h.sensor("ctd-1")["silent"]
    check_ctd_reading(h.readings()[0])


@pytest.mark.parametrize(
    ("garbage", "counter"),
    [
        (b"0\xfe?#%x\r\n", "parse_errors"),  # noise (e.g. a wrong baud rate at the adapter)
        (b"0+1.2\r\n", "parse_errors"),  # a data answer where atttn belongs
        (b"0" + b"~" * 300 + b"\r\n", "overlong_lines"),  # a stuck line: bounded, discarded
    ],
)
async def test_garbage_is_counted_and_recovered_from(
    pty_pair: PtyPair, garbage: bytes, counter: str
) -> None:
    probe = Probe(garbage=garbage)
    with Sdi12BusSim(pty_pair.sim, [probe]):
        source = make_source(pty_pair, [ctd(interval_s=0.2)], retries=1, timeout_s=0.15)
        async with running(source) as h:
            await h.until(lambda: bool(h.events("device_silent")), "device_silent")
            if counter == "parse_errors":
                assert h.sensor("ctd-1")["parse_errors"] >= 2  # the command and its retry
                assert any(kind == "sdi12_malformed_answer" for kind, _ in h.errors)
                reason = {m.name: m.value for m in h.events("device_silent")[0].values}["reason"]
                assert reason == "malformed_answer"
            else:
                assert h.source.counters["overlong_lines"] >= 1
            probe.garbage = None
            await h.until(lambda: len(h.readings()) >= 1, "a reading once the line is clean")
    check_ctd_reading(h.readings()[0])


async def test_silent_sensor_does_not_hold_up_the_other(pty_pair: PtyPair) -> None:
    # Two probes on one bus; the one at address 1 is dead from the start.
    probes = [Probe(address="0"), Probe(address="1", silent=True)]
    interval_s, timeout_s, retries = 0.3, 0.2, 1
    sensors = [ctd("0", "ctd-1", interval_s), ctd("1", "ctd-2", interval_s)]
    with Sdi12BusSim(pty_pair.sim, probes):
        source = make_source(pty_pair, sensors, retries=retries, timeout_s=timeout_s)
        async with running(source) as h:
            await h.until(lambda: len(h.readings("ctd-1")) >= 5, "five readings of ctd-1", 8.0)
    assert [e.device for e in h.events("device_silent")] == ["ctd-2"]
    assert not h.readings("ctd-2")
    stamps = [r.ts for r in h.readings("ctd-1")]
    gaps = [(b - a).total_seconds() for a, b in itertools.pairwise(stamps)]
    # A healthy sensor's reading is late by at most the silent one's retry ladder (here
    # (1 + retries) x timeout), plus its own exchange and scheduling slack.
    budget = interval_s + (1 + retries) * timeout_s + 0.25
    assert max(gaps) < budget, gaps
    assert h.sensor("ctd-2")["polls"] >= 2


async def test_unplug_and_replug(pty_pair: PtyPair) -> None:
    with Sdi12BusSim(pty_pair.sim, [Probe()]) as sim:
        async with running(make_source(pty_pair, [ctd(interval_s=0.2)])) as h:
            await h.until(lambda: len(h.readings()) >= 1, "a first reading")
            pty_pair.unplug()  # the adapter is pulled: both ptys hang up, the link disappears
            await h.until(lambda: bool(h.events("serial_lost")), "serial_lost")
            lost = h.events("serial_lost")[0]
            assert lost.severity is Severity.WARNING
            assert lost.device == "sdi12-bus"
            readings_before = len(h.readings())
            pty_pair.replug()  # plugged back in: same by-id style path, a new pts underneath
            await h.until(lambda: bool(h.events("serial_restored")), "serial_restored")
            await h.until(lambda: len(h.readings()) > readings_before, "a reading after the replug")
    assert len(h.events("serial_lost")) == 1
    assert sim.opens >= 2
    restored = h.events("serial_restored")[0]
    assert h.items.index(lost) < h.items.index(restored)
    check_ctd_reading(h.readings()[-1])
    assert h.source.stats()["port"]["state"] == "open" or h.source.stats()["port"]["losses"] == 1
