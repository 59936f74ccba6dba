"""The Modbus RTU source against a real pymodbus RTU server on the far end of a socat pty pair.

The server (``tests.support.modbus_peer``) serves several slave ids with registers written by
pymodbus's own encoder; a dead slave is one whose answers the server drops, line noise is a
damaged CRC on its answers, and an unplugged adapter is socat stopped (its links vanish) and
started again. Every wait has a deadline; nothing sleeps and hopes.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import statistics
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path

import pytest

from drivers.modbus import ModbusRegister, ModbusRtuSource, ModbusSlave, scan
from drivers.serial_port import SerialSettings
from gateway.types import Event, Reading, Severity
from tests.support.collect import Collector
from tests.support.modbus_peer import ModbusPeer, SlaveImage, encode
from tests.support.socat import PtyPair, require_socat

ROOT = Path(__file__).resolve().parents[2]


def _settings(pair: PtyPair) -> SerialSettings:
    # Short re-open backoff: the unplug test waits for serial_restored.
    return SerialSettings(str(pair.sensor), baud=115200, reopen_min_s=0.05, reopen_max_s=0.3)


class Run:
    """A running source and what it emitted; ``until`` waits for a condition with a deadline."""

    def __init__(self, source: ModbusRtuSource, task: asyncio.Task[None], seen: Collector) -> None:
        self.source = source
        self.task = task
        self.seen = seen

    def readings(self, device: str) -> list[Reading]:
        return [r for r in self.seen.readings if r.device == device]

    def events(self, kind: str, device: str | None = None) -> list[Event]:
        return [e for e in self.seen.events(kind) if device in (None, e.device)]

    async def until(self, condition: Callable[[], bool], timeout: float = 5.0) -> None:
        def done_or_met() -> bool:
            return self.task.done() or condition()

        await self.seen.wait_for(done_or_met, timeout)
        if self.task.done():
            self.task.result()  # raises what ended the source
            pytest.fail("the source stopped")


@contextlib.asynccontextmanager
async def running(
    pair: PtyPair, slaves: Sequence[ModbusSlave], name: str = "bus"
) -> AsyncIterator[Run]:
    source = ModbusRtuSource(name, _settings(pair), slaves)
    seen = Collector()
    task = asyncio.create_task(source.run(seen.emit, seen.report_error), name=f"{name}:test")
    try:
        yield Run(source, task, seen)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def _value(reading: Reading, name: str) -> object:
    return next(m.value for m in reading.values if m.name == name)


async def test_live_slaves_keep_their_schedule_while_a_dead_slave_is_silent(
    pty_pair: PtyPair,
) -> None:
    interval, timeout, retries = 0.2, 0.15, 1

    def meter(device_id: int, device: str, register: ModbusRegister) -> ModbusSlave:
        return ModbusSlave(
            device_id,
            device,
            (register,),
            poll_interval_s=interval,
            timeout_s=timeout,
            retries=retries,
            backoff_max_s=0.8,
        )

    slaves = [
        meter(1, "meter_a", ModbusRegister("energy", 0, data_type="uint32")),
        meter(2, "meter_b", ModbusRegister("flow", 0)),
        meter(7, "meter_dead", ModbusRegister("flow", 0)),
    ]
    images = {
        1: SlaveImage(holding=encode(70000, "uint32")),
        2: SlaveImage(holding=[20]),
        7: SlaveImage(holding=[70]),
    }
    async with (
        ModbusPeer(str(pty_pair.sim), images, dead=[7]) as peer,
        running(pty_pair, slaves) as run,
    ):
        await run.until(lambda: bool(run.events("device_silent", "meter_dead")))
        silent = run.events("device_silent", "meter_dead")[0]
        assert silent.severity is Severity.WARNING
        assert {m.name: m.value for m in silent.values}["reason"] == "timeout"
        assert {m.name: m.value for m in silent.values}["tries"] == retries + 1
        start = len(run.readings("meter_a"))
        await run.until(lambda: len(run.readings("meter_a")) >= start + 12)

        for device in ("meter_a", "meter_b"):
            ts = [r.ts for r in run.readings(device)[start:]]
            gaps = [(b - a).total_seconds() for a, b in itertools.pairwise(ts)]
            # On schedule: the phase is kept, so the mean gap is the interval, and one poll is
            # late by at most one probe of the dead slave (one timeout, no retry, once silent).
            assert statistics.mean(gaps) == pytest.approx(interval, rel=0.2), gaps
            assert max(gaps) < interval + timeout + 0.12, gaps
        assert _value(run.readings("meter_a")[-1], "energy") == 70000
        assert not run.readings("meter_dead")
        dead = run.source.slave_counters("meter_dead")
        # Backed off: probed far less often than the live slaves are polled.
        assert dead["polls"] * 2 < run.source.slave_counters("meter_a")["polls"]
        assert dead["timeouts"] == retries + 1 + (dead["polls"] - 1)
        assert run.source.counters["silent_slaves"] == 1
        assert run.source.stats()["slaves"][2]["state"] == "silent"

        peer.dead.discard(7)
        await run.until(lambda: bool(run.readings("meter_dead")), timeout=3.0)
        back = run.events("device_back", "meter_dead")
        assert len(back) == 1
        assert back[0].severity is Severity.INFO
        silent_for = {m.name: m.value for m in back[0].values}["silent_for"]
        assert isinstance(silent_for, float)
        assert silent_for > 0
        assert len(run.events("device_silent")) == 1
        assert _value(run.readings("meter_dead")[-1], "flow") == 70
        assert run.source.counters["silent_slaves"] == 0


async def test_a_saturated_bus_still_probes_a_silent_slave(pty_pair: PtyPair) -> None:
    # Two slaves with a 1 ms interval keep the bus busy: one of them is always due. Without a
    # bound on how long a silent slave yields to live ones, meter_dead would never be probed
    # again and its return never seen.
    slaves = [
        ModbusSlave(1, "meter_fast", (ModbusRegister("flow", 0),), poll_interval_s=0.001),
        ModbusSlave(3, "meter_fast_2", (ModbusRegister("flow", 0),), poll_interval_s=0.001),
        ModbusSlave(
            2,
            "meter_dead",
            (ModbusRegister("flow", 0),),
            poll_interval_s=0.05,
            timeout_s=0.05,
            backoff_max_s=0.1,
        ),
    ]
    images = {i: SlaveImage(holding=[i]) for i in (1, 2, 3)}
    async with (
        ModbusPeer(str(pty_pair.sim), images, dead=[2]) as peer,
        running(pty_pair, slaves) as run,
    ):
        await run.until(lambda: bool(run.events("device_silent", "meter_dead")))
        probes = run.source.slave_counters("meter_dead")["polls"]
        await run.until(lambda: run.source.slave_counters("meter_dead")["polls"] >= probes + 3)
        peer.dead.discard(2)
        await run.until(lambda: bool(run.readings("meter_dead")), timeout=3.0)
        assert run.events("device_back", "meter_dead")


# name, value, data type, word order, byte order
TYPED = [
    ("i16", -1234, "int16", "big", "big"),
    ("u16", 54321, "uint16", "big", "big"),
    ("u16_swapped", 0x1234, "uint16", "big", "little"),
    ("i32_abcd", -123456789, "int32", "big", "big"),
    ("i32_cdab", -123456789, "int32", "little", "big"),
    ("u32_abcd", 3_000_000_000, "uint32", "big", "big"),
    ("u32_cdab", 3_000_000_000, "uint32", "little", "big"),
    ("f32_abcd", 21.5, "float32", "big", "big"),
    ("f32_cdab", -3.14159, "float32", "little", "big"),
    ("f32_badc", 1013.25, "float32", "big", "little"),
    ("f32_dcba", 0.001, "float32", "little", "little"),
]


async def test_decodes_every_type_and_order_and_counts_an_exception(pty_pair: PtyPair) -> None:
    holding: list[int] = []
    registers: list[ModbusRegister] = []
    for name, value, data_type, word_order, byte_order in TYPED:
        registers.append(
            ModbusRegister(name, len(holding), "holding", data_type, word_order, byte_order)  # type: ignore[arg-type]
        )
        holding += encode(value, data_type, word_order, byte_order)  # type: ignore[arg-type]
    registers.append(ModbusRegister("level", len(holding), unit="cm", scale=0.1, offset=-10.0))
    holding.append(2345)
    registers.append(ModbusRegister("pump_state", 1, table="input"))
    # Beyond the device's register map: "illegal address" (exception 2) at every poll.
    registers.append(ModbusRegister("not_there", 300))
    slave = ModbusSlave(1, "station", tuple(registers), poll_interval_s=0.05, timeout_s=0.2)
    images = {1: SlaveImage(holding=holding, input=[0, 3])}
    async with ModbusPeer(str(pty_pair.sim), images), running(pty_pair, [slave]) as run:
        await run.until(lambda: len(run.readings("station")) >= 3)
        reading = run.readings("station")[0]
        got = {m.name: m.value for m in reading.values}
        assert got == {name: value for name, value, *_ in TYPED} | {"level": 224.5, "pump_state": 3}
        assert next(m.unit for m in reading.values if m.name == "level") == "cm"
        assert reading.quality == ("incomplete",)
        assert reading.source == "bus"

        counters = run.source.slave_counters("station")
        assert counters["exceptions"] >= 3
        assert counters["exception_illegal_address"] == counters["exceptions"]
        assert counters["timeouts"] == counters["crc_errors"] == 0
        # Reported once, not at every poll.
        assert run.seen.error_kinds() == ["modbus_exception"]
        assert "holding registers 300..300" in run.seen.errors[0][1]
        assert run.source.stats()["slaves"][0]["exception_codes"] == {
            "illegal_address": counters["exceptions"]
        }


async def test_damaged_answers_are_counted_retried_and_make_a_slave_silent(
    pty_pair: PtyPair,
) -> None:
    slave = ModbusSlave(
        3, "meter", (ModbusRegister("flow", 0),), poll_interval_s=0.1, timeout_s=0.2, retries=1
    )
    async with (
        ModbusPeer(str(pty_pair.sim), {3: SlaveImage(holding=[33])}) as peer,
        running(pty_pair, [slave]) as run,
    ):
        await run.until(lambda: bool(run.readings("meter")))
        peer.corrupt(3, 1)
        await run.until(lambda: any("retried" in r.quality for r in run.readings("meter")))
        retried = next(r for r in run.readings("meter") if "retried" in r.quality)
        assert _value(retried, "flow") == 33
        assert run.source.slave_counters("meter")["crc_errors"] == 1
        assert run.seen.error_kinds() == ["modbus_crc_error"]

        peer.corrupt(3, 1_000_000)
        await run.until(lambda: bool(run.events("device_silent")))
        reason = {m.name: m.value for m in run.events("device_silent")[0].values}["reason"]
        assert reason == "crc_error"
        counters = run.source.slave_counters("meter")
        assert counters["crc_errors"] >= 3
        assert counters["timeouts"] == 0

        peer.corrupt(3, 0)
        await run.until(lambda: bool(run.events("device_back")), timeout=3.0)


async def test_unplugged_adapter_is_reported_and_polling_resumes(pty_pair: PtyPair) -> None:
    slave = ModbusSlave(1, "meter", (ModbusRegister("flow", 0),), poll_interval_s=0.05)
    peer = ModbusPeer(str(pty_pair.sim), {1: SlaveImage(holding=[11])})
    await peer.start()
    try:
        async with running(pty_pair, [slave]) as run:
            await run.until(lambda: len(run.readings("meter")) >= 2)
            await asyncio.to_thread(pty_pair.unplug)
            await peer.stop()
            await run.until(lambda: bool(run.events("serial_lost")))
            lost = run.events("serial_lost")[0]
            assert lost.severity is Severity.WARNING
            assert str(pty_pair.sensor) in str({m.name: m.value for m in lost.values}["port"])
            assert run.source.port.status.state != "open"
            before = len(run.readings("meter"))

            await asyncio.to_thread(pty_pair.replug)
            await peer.start()
            await run.until(lambda: bool(run.events("serial_restored")))
            await run.until(lambda: len(run.readings("meter")) >= before + 3)
            restored = run.events("serial_restored")[0]
            assert all(r.ts >= restored.ts for r in run.readings("meter")[before:])
            assert run.source.stats()["losses"] == 1
            assert run.source.stats()["state"] == "open"
            # The port went away, not the slave: no device health event for it.
            assert not run.events("device_silent")
    finally:
        await peer.stop()


async def test_scan_lists_the_ids_that_answer(pty_pair: PtyPair) -> None:
    images = {
        1: SlaveImage(holding=[1]),
        # No holding register 0: answers "illegal address", which still proves it is there.
        4: SlaveImage(holding=[4], holding_address=100),
        5: SlaveImage(holding=[5]),
    }
    async with ModbusPeer(str(pty_pair.sim), images, dead=[5]) as peer:
        found = await scan(_settings(pty_pair), [1, 2, 3, 4, 5, 6], 0.1)
        assert found == [1, 4]
        assert peer.answers[4] == 1


@pytest.mark.slow
def test_benchmark_quick_run(tmp_path: Path) -> None:
    require_socat()
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "modbus_rtu.py"), "--quick"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "registers/s" in result.stdout
    assert "every reading stored in the outbox: PASS" in result.stdout
