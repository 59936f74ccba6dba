"""The ASCII line source on a real pseudo-terminal: readings, faults counted, gaps, hot-plug."""

from __future__ import annotations

import asyncio
import os
import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path

import pytest

from drivers.ascii_lines import AsciiLineSource, FieldSpec, Framing, LineParser, nmea_checksum
from drivers.serial_port import SerialSettings
from gateway.types import Event, Measurement, Severity
from tests.support.collect import Collector
from tests.support.socat import PtyPair

FIELDS = [
    FieldSpec("T", "air_temperature", "Cel"),
    FieldSpec("H", "relative_humidity", "%"),
    FieldSpec("P", "air_pressure", "hPa", scale=0.01),
]


def line(t: float, h: int = 50, p: int = 101320, *, checksum: bool = True) -> bytes:
    body = f"T={t},H={h},P={p}"
    return (f"{body}*{nmea_checksum(body):02X}" if checksum else body).encode() + b"\r\n"


def make_source(
    port: Path,
    *,
    gap_after_s: float | None = None,
    read_timeout_s: float = 1.0,
    max_lines: int | None = None,
    max_line_bytes: int = 128,
) -> AsciiLineSource:
    settings = SerialSettings(
        str(port), read_timeout_s=read_timeout_s, reopen_min_s=0.05, reopen_max_s=0.5
    )
    parser = LineParser(FIELDS, format="keyvalue", checksum="nmea")
    return AsciiLineSource(
        "weather",
        "ws-1",
        settings,
        Framing("\n", "ascii", max_line_bytes),
        parser,
        gap_after_s=gap_after_s,
        max_lines=max_lines,
    )


@asynccontextmanager
async def running(source: AsciiLineSource, got: Collector) -> AsyncIterator[asyncio.Task[None]]:
    """The source running in a task group, its port open; cancelled on exit."""
    async with asyncio.TaskGroup() as tg:
        task = tg.create_task(source.run(got.emit, got.report_error), name="source")
        async with asyncio.timeout(10):
            await source.port.opened.wait()
        yield task
        task.cancel()


def temperatures(got: Collector) -> list[float | int | bool | str]:
    return [r.values[0].value for r in got.readings]


def values(event: Event) -> dict[str, object]:
    return {m.name: m.value for m in event.values}


async def test_lines_become_readings_and_faults_are_counted(pty_pair: PtyPair) -> None:
    source = make_source(pty_pair.sensor)
    got = Collector()
    sim = pty_pair.open_sim()
    try:
        async with running(source, got):
            stream = (
                line(21.4)
                + line(21.5).replace(b"21.5", b"71.5")  # checksum mismatch
                + b"\xff\xfe\x00\x13binary\n"  # garbage
                + b"T="
                + b"9" * 300
                + b"\n"  # overlong
                + line(21.6, checksum=False)  # checksum missing
                + b"T=abc,H=1*"
                + f"{nmea_checksum('T=abc,H=1'):02X}".encode()
                + b"\n"
                + line(21.7)
            )
            os.write(sim, stream)
            await got.wait_for(lambda: len(got.readings) == 2)
            await got.wait_for(lambda: source.counters["lines"] == 7)
    finally:
        os.close(sim)
    first = got.readings[0]
    assert first.source == "weather" and first.device == "ws-1"
    assert first.values[:2] == (
        Measurement("air_temperature", 21.4, "Cel"),
        Measurement("relative_humidity", 50.0, "%"),
    )
    assert first.values[2].name == "air_pressure" and first.values[2].unit == "hPa"
    assert first.values[2].value == pytest.approx(1013.2)
    assert first.ts.tzinfo is UTC and abs((datetime.now(UTC) - first.ts).total_seconds()) < 10
    assert temperatures(got) == [21.4, 21.7]
    counters = source.counters
    assert counters["readings"] == 2
    for reason in ("checksum_mismatch", "garbage", "overlong", "checksum_missing", "not_a_number"):
        assert counters[reason] == 1, reason
    assert counters["bytes"] == len(stream)
    assert set(got.error_kinds()) == {
        "checksum_mismatch",
        "garbage",
        "overlong",
        "checksum_missing",
        "not_a_number",
    }
    assert all("ws" not in d or str(pty_pair.sensor) in d for _, d in got.errors)


async def test_noise_from_a_wrong_baud_rate_is_counted_and_valid_lines_survive(
    pty_pair: PtyPair,
) -> None:
    # A pty has no baud rate: what a mismatched rate produces (bytes with the high bit set,
    # stray control characters, lost line ends) is written as such.
    noise = random.Random(4800)
    source = make_source(pty_pair.sensor, max_line_bytes=64)
    got = Collector()
    sim = pty_pair.open_sim()
    sent = 0
    try:
        async with running(source, got):
            for burst in range(40):
                junk = bytes(noise.randrange(256) for _ in range(noise.randrange(1, 300)))
                os.write(sim, junk + b"\n" + line(20 + burst / 10))
                sent += 1
            await got.wait_for(lambda: len(got.readings) >= sent - 2)
            os.write(sim, line(99.0))
            await got.wait_for(lambda: any(r.values[0].value == 99.0 for r in got.readings))
    finally:
        os.close(sim)
    counters = source.counters
    noise_counted = sum(
        counters.get(k, 0)
        for k in (
            "garbage",
            "overlong",
            "no_match",
            "no_values",
            "not_a_number",
            "checksum_missing",
        )
    )
    assert noise_counted >= 30
    # Every valid line after a newline-terminated burst of noise is read. (A burst may end in
    # a byte that starts a line, so at most a couple of valid lines may be spoiled by it.)
    assert len(got.readings) >= sent - 2
    # The log sees each reason once per minute, not once per noisy line.
    assert len(got.errors) <= 6


async def test_an_unfinished_line_is_dropped_after_the_read_timeout(pty_pair: PtyPair) -> None:
    source = make_source(pty_pair.sensor, read_timeout_s=0.2)
    got = Collector()
    sim = pty_pair.open_sim()
    try:
        async with running(source, got):
            os.write(sim, b"T=12.5,H=4")  # the sensor resets in the middle of a line
            await got.wait_for(lambda: source.counters.get("partial", 0) == 1)
            os.write(sim, line(13.0))
            await got.wait_for(lambda: len(got.readings) == 1)
    finally:
        os.close(sim)
    assert temperatures(got) == [13.0]
    assert got.error_kinds() == ["partial"]


async def test_gap_once_per_gap_and_gap_ended(pty_pair: PtyPair) -> None:
    source = make_source(pty_pair.sensor, gap_after_s=0.3)
    got = Collector()
    sim = pty_pair.open_sim()
    try:
        async with running(source, got):
            # Silent from the start: one gap, however long the silence lasts.
            await got.wait_for(lambda: len(got.events("gap")) == 1)
            assert source.in_gap
            silent_since = asyncio.get_running_loop().time()
            await got.wait_for(lambda: asyncio.get_running_loop().time() - silent_since > 0.7)
            assert len(got.events("gap")) == 1
            # Invalid lines do not end a gap: only valid ones do.
            os.write(sim, line(1.0).replace(b"T=1.0", b"T=7.0"))
            await got.wait_for(lambda: source.counters.get("checksum_mismatch", 0) == 1)
            assert not got.events("gap_ended")
            os.write(sim, line(2.0))
            await got.wait_for(lambda: len(got.events("gap_ended")) == 1)
            # The sensor falls silent again: a second gap.
            await got.wait_for(lambda: len(got.events("gap")) == 2)
    finally:
        os.close(sim)
    gap, ended = got.events("gap")[0], got.events("gap_ended")[0]
    assert gap.severity is Severity.WARNING and gap.device == "ws-1"
    silent_for = values(gap)["silent_for"]
    assert isinstance(silent_for, float) and silent_for >= 0.3
    gap_length = values(ended)["gap_length"]
    assert isinstance(gap_length, float) and gap_length >= 1.0
    assert ended.severity is Severity.INFO
    kinds = [e.kind for e in got.events()]
    assert kinds == ["gap", "gap_ended", "gap"]


async def test_unplug_mid_line_then_replug_loses_nothing_accepted(pty_pair: PtyPair) -> None:
    source = make_source(pty_pair.sensor)
    got = Collector()
    sim = pty_pair.open_sim()
    try:
        async with running(source, got):
            os.write(sim, b"".join(line(10 + i) for i in range(20)) + b"T=99")
            await got.wait_for(lambda: len(got.readings) == 20)
            # The fragment is in the framer's buffer before the adapter is pulled.
            await got.wait_for(lambda: source.counters["bytes"] == 20 * len(line(10)) + 4)
            os.close(sim)
            await asyncio.to_thread(pty_pair.unplug)
            await got.wait_for(lambda: len(got.events("serial_lost")) == 1)
            assert source.counters["partial"] == 1
            assert source.port.summary()["state"] in ("missing", "lost")
            await asyncio.to_thread(pty_pair.replug)
            await got.wait_for(lambda: len(got.events("serial_restored")) == 1)
            sim = pty_pair.open_sim()
            os.write(sim, b"".join(line(40 + i) for i in range(5)))
            await got.wait_for(lambda: len(got.readings) == 25)
    finally:
        os.close(sim)
    assert temperatures(got) == [float(10 + i) for i in range(20)] + [
        float(40 + i) for i in range(5)
    ]
    kinds = [i.kind if isinstance(i, Event) else "reading" for i in got.items]
    assert kinds == ["reading"] * 20 + ["serial_lost", "serial_restored"] + ["reading"] * 5
    counters = source.counters
    assert counters["readings"] == 25 and counters["lines"] == 25


async def test_max_lines_ends_the_source(pty_pair: PtyPair) -> None:
    source = make_source(pty_pair.sensor, max_lines=3)
    got = Collector()
    sim = pty_pair.open_sim()
    try:
        async with asyncio.timeout(10), asyncio.TaskGroup() as tg:
            task = tg.create_task(source.run(got.emit, got.report_error))
            await source.port.opened.wait()
            os.write(sim, line(1.0) + b"garbage\x00\n" + line(3.0))
            await task
    finally:
        os.close(sim)
    assert temperatures(got) == [1.0, 3.0]
    assert source.counters["lines"] == 3
    assert not source.port.opened.is_set()
