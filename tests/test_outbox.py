"""The durable outbox against real SQLite files: delivery, order, bounds, age, recovery.

Nothing here is mocked: every test opens a real database in ``tmp_path``. Age tests use a fake
clock through the constructor; a few tests count the writer's loop turns through the public
``heartbeat`` hook, which runs once per commit (an upper bound on the number of commits).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import sqlite3
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from gateway.config import OutboxSection
from gateway.errors import OutboxError
from gateway.outbox import Outbox, OutboxRow
from gateway.types import Event, Lane, Measurement, Severity
from gateway.wire import Encoding, decode, encode

T0 = 1_700_000_000.0


class FakeClock:
    """Wall-clock seconds that move only when the test says so."""

    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def cfg(**overrides: Any) -> OutboxSection:
    """Outbox settings for tests: no linger unless a test is about lingering."""
    fields: dict[str, Any] = {"commit_linger_ms": 0}
    fields.update(overrides)
    return OutboxSection(**fields)


def tel(i: int, device: str = "gauge-1") -> Event:
    return Event(
        kind="reading",
        device=device,
        ts=datetime(2024, 5, 17, 6, 30, tzinfo=UTC),
        values=(Measurement("level", 100 + i, "cm"), Measurement("i", i)),
    )


def alarm(i: int) -> Event:
    return Event(
        kind="pool_safety",
        device="pool-cam-1",
        ts=datetime(2024, 5, 17, 6, 30, tzinfo=UTC),
        severity=Severity.ALARM if i % 2 else Severity.CRITICAL,
        values=(Measurement("person_in_water", True), Measurement("i", i)),
    )


CLOSE_DEADLINE_S = 10.0


async def close_within(outbox: Outbox, seconds: float = CLOSE_DEADLINE_S) -> None:
    """Run ``Outbox.__aexit__``; fail (rather than hang the run) if it does not return."""
    closing = asyncio.create_task(outbox.__aexit__(None, None, None))
    done, _ = await asyncio.wait({closing}, timeout=seconds)
    if not done:
        closing.cancel()
        with contextlib.suppress(BaseException):
            await closing
        pytest.fail(f"Outbox.__aexit__ still waiting after {seconds} s: the writer never stopped")
    closing.result()


@contextlib.asynccontextmanager
async def opened(path: Path, config: OutboxSection, **kwargs: Any) -> AsyncIterator[Outbox]:
    """``async with Outbox(...)``, except that a close that hangs fails the test."""
    outbox = Outbox(path, config, **kwargs)
    await outbox.__aenter__()
    try:
        yield outbox
    finally:
        await close_within(outbox)


async def drain(outbox: Outbox, limit: int = 100_000) -> list[OutboxRow]:
    """Everything fetch() will hand out now (without waiting for more)."""
    rows: list[OutboxRow] = []
    while batch := await outbox.fetch(limit, timeout_s=0):
        rows.extend(batch)
    return rows


def corrupt_files(directory: Path) -> list[Path]:
    """What the outbox moved aside as corrupt."""
    return sorted(p for p in directory.iterdir() if ".corrupt-" in p.name)


def stored_ids(path: Path) -> list[str]:
    """Event ids in the file, read by an independent connection (what a restart would see)."""
    with sqlite3.connect(path) as db:
        return [eid for (eid,) in db.execute("SELECT event_id FROM events ORDER BY seq")]


class Beats:
    """Counts the outbox writer's loop turns (one per commit, plus idle ticks)."""

    def __init__(self) -> None:
        self.count = 0
        self.event = asyncio.Event()

    def __call__(self) -> None:
        self.count += 1
        self.event.set()

    async def next(self) -> None:
        self.event.clear()
        await asyncio.wait_for(self.event.wait(), 5)


# -- put, fetch, ack, restart -----------------------------------------------------------------


@pytest.mark.parametrize("encoding", list(Encoding))
async def test_put_fetch_ack_and_redelivery_after_restart(
    tmp_path: Path, encoding: Encoding
) -> None:
    path = tmp_path / "outbox.sqlite3"
    events = [tel(0), tel(1), alarm(2), tel(3)]
    async with opened(path, cfg(), encoding=encoding) as outbox:
        assert outbox.encoding is encoding
        for e in events:
            await outbox.put(e)
        assert outbox.depth() == 4
        rows = await outbox.fetch(10)
        # Alarm lane first, then telemetry in put order.
        assert [r.event_id for r in rows] == [events[i].event_id for i in (2, 0, 1, 3)]
        for row in rows:
            original = next(e for e in events if e.event_id == row.event_id)
            assert decode(row.payload, encoding) == original
            assert row.payload == encode(original, encoding)
            assert row.kind == original.kind
            assert row.lane is original.lane
        outbox.ack([rows[0].seq, rows[1].seq])
        await outbox.flush()
        assert outbox.depth() == 2
        assert set(stored_ids(path)) == {events[1].event_id, events[3].event_id}

    # Restart: acked rows are gone, unacked ones are handed out again with their event_id.
    async with opened(path, cfg(), encoding=encoding) as outbox:
        assert outbox.depth() == 2
        rows = await outbox.fetch(10)
        assert [r.event_id for r in rows] == [events[1].event_id, events[3].event_id]
        assert [decode(r.payload, encoding) for r in rows] == [events[1], events[3]]
        outbox.ack(r.seq for r in rows)
    async with opened(path, cfg()) as outbox:
        assert outbox.depth() == 0
        assert await outbox.fetch(10, timeout_s=0) == []


async def test_put_returns_only_once_committed(tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite3"
    async with opened(path, cfg(commit_linger_ms=20)) as outbox:
        e = tel(1)
        await outbox.put(e)
        # A second, independent connection already sees it: it is in the file, not in memory.
        assert stored_ids(path) == [e.event_id]
        batch = [tel(i) for i in range(5)]
        await outbox.put_many(batch)
        assert stored_ids(path) == [e.event_id, *(b.event_id for b in batch)]


async def test_ack_is_not_redelivered_and_unknown_seqs_are_harmless(tmp_path: Path) -> None:
    async with opened(tmp_path / "o.sqlite3", cfg()) as outbox:
        await outbox.put_many([tel(i) for i in range(3)])
        rows = await outbox.fetch(10)
        outbox.ack([rows[1].seq, 999_999])
        outbox.ack([rows[1].seq])  # a duplicate ack deletes nothing else
        await outbox.flush()
        outbox.rewind()
        again = await outbox.fetch(10)
        assert [r.seq for r in again] == [rows[0].seq, rows[2].seq]
        assert outbox.depth() == 2


# -- order ------------------------------------------------------------------------------------


async def test_order_per_lane_concurrent_puts(tmp_path: Path) -> None:
    async with opened(tmp_path / "o.sqlite3", cfg(commit_linger_ms=5)) as outbox:
        events = [tel(i) for i in range(500)]
        await asyncio.gather(*(outbox.put(e) for e in events))
        rows = await outbox.fetch(1000)
        assert [r.event_id for r in rows] == [e.event_id for e in events]
        seqs = [r.seq for r in rows]
        assert seqs == sorted(seqs)


async def test_order_per_lane_sequential_puts(tmp_path: Path) -> None:
    async with opened(tmp_path / "o.sqlite3", cfg()) as outbox:
        events = [tel(i) for i in range(500)]
        for e in events:
            await outbox.put(e)
        got: list[str] = []
        # Small fetches: the cursor carries on where the last one stopped.
        while rows := await outbox.fetch(37, timeout_s=0):
            got.extend(r.event_id for r in rows)
        assert got == [e.event_id for e in events]


async def test_alarms_are_fetched_before_telemetry_even_when_put_later(tmp_path: Path) -> None:
    async with opened(tmp_path / "o.sqlite3", cfg()) as outbox:
        telemetry = [tel(i) for i in range(20)]
        alarms = [alarm(i) for i in range(5)]
        await outbox.put_many(telemetry)
        for a in alarms:
            await outbox.put(a)
        rows = await outbox.fetch(100)
        assert [r.event_id for r in rows] == [e.event_id for e in (*alarms, *telemetry)]
        assert [r.lane for r in rows] == [Lane.ALARM] * 5 + [Lane.TELEMETRY] * 20

        # With telemetry half handed out, a new alarm still comes next.
        outbox.rewind()
        first = await outbox.fetch(10)
        assert [r.lane for r in first] == [Lane.ALARM] * 5 + [Lane.TELEMETRY] * 5
        late = alarm(99)
        await outbox.put(late)
        nxt = await outbox.fetch(3)
        assert [r.event_id for r in nxt] == [
            late.event_id,
            telemetry[5].event_id,
            telemetry[6].event_id,
        ]


async def test_mixed_concurrent_producers_keep_per_lane_order(tmp_path: Path) -> None:
    rng = random.Random(3)
    events = [alarm(i) if rng.random() < 0.3 else tel(i) for i in range(400)]
    async with opened(tmp_path / "o.sqlite3", cfg(commit_linger_ms=2)) as outbox:
        await asyncio.gather(*(outbox.put(e) for e in events))
        rows = await outbox.fetch(1000)
    want_alarms = [e.event_id for e in events if e.lane is Lane.ALARM]
    want_tel = [e.event_id for e in events if e.lane is Lane.TELEMETRY]
    assert [r.event_id for r in rows] == want_alarms + want_tel


# -- rewind -----------------------------------------------------------------------------------


async def test_rewind_hands_out_unacked_rows_again(tmp_path: Path) -> None:
    async with opened(tmp_path / "o.sqlite3", cfg()) as outbox:
        events = [tel(i) for i in range(6)]
        await outbox.put_many(events)
        rows = await outbox.fetch(10)
        assert await outbox.fetch(10, timeout_s=0) == []  # handed out once, not twice
        outbox.ack([rows[0].seq, rows[2].seq, rows[4].seq])
        await outbox.flush()
        outbox.rewind()
        again = await outbox.fetch(10)
        assert [r.event_id for r in again] == [events[i].event_id for i in (1, 3, 5)]
        assert [r.seq for r in again] == [rows[i].seq for i in (1, 3, 5)]


async def test_rewind_skips_acks_not_yet_committed(tmp_path: Path) -> None:
    # The acks are still waiting for the writer; they must not be handed out again either.
    async with opened(tmp_path / "o.sqlite3", cfg(commit_linger_ms=50)) as outbox:
        events = [tel(i) for i in range(6)]
        await outbox.put_many(events)
        rows = await outbox.fetch(10)
        outbox.ack([rows[0].seq, rows[1].seq])
        outbox.rewind()
        again = await outbox.fetch(10, timeout_s=2)
        assert [r.event_id for r in again] == [e.event_id for e in events[2:]]


async def test_rewind_when_the_first_page_is_all_uncommitted_acks(tmp_path: Path) -> None:
    """After a session loss, fetch() must not return [] while unacked rows wait behind acks.

    The uplink acks a page, loses the session and rewinds before the writer has committed those
    acks. The first `limit` rows from seq 0 are then all acked-but-not-deleted and filtered out;
    fetch() must look past them instead of waiting for a put that may never come.
    """
    async with opened(tmp_path / "o.sqlite3", cfg()) as outbox:
        events = [tel(i) for i in range(20)]
        await outbox.put_many(events)
        rows = await outbox.fetch(10)
        outbox.ack(r.seq for r in rows)
        outbox.rewind()
        started = time.monotonic()
        again = await outbox.fetch(10, timeout_s=1.0)
        waited = time.monotonic() - started
        assert [r.event_id for r in again] == [e.event_id for e in events[10:]], (
            f"fetch returned {len(again)} rows after waiting {waited:.2f} s"
        )


# -- group commit and put_many ----------------------------------------------------------------


async def test_group_commit_of_concurrent_puts(tmp_path: Path) -> None:
    beats = Beats()
    async with opened(tmp_path / "o.sqlite3", cfg(commit_linger_ms=0)) as outbox:
        outbox.heartbeat = beats
        events = [tel(i) for i in range(1000)]
        await asyncio.gather(*(outbox.put(e) for e in events))
        commits = beats.count
        assert outbox.depth() == 1000
        assert len(await drain(outbox)) == 1000
    # Every commit is one turn of the writer loop, and each turn calls heartbeat once.
    assert 1 <= commits <= 10, f"{commits} commits for 1000 puts"


async def test_group_commit_respects_max_commit_rows(tmp_path: Path) -> None:
    beats = Beats()
    async with opened(tmp_path / "o.sqlite3", cfg(max_commit_rows=100)) as outbox:
        outbox.heartbeat = beats
        await asyncio.gather(*(outbox.put(tel(i)) for i in range(1000)))
        assert outbox.depth() == 1000
    assert beats.count >= 10


async def test_alarm_cuts_the_linger_short(tmp_path: Path) -> None:
    beats = Beats()
    async with opened(tmp_path / "o.sqlite3", cfg(commit_linger_ms=1000)) as outbox:
        outbox.heartbeat = beats
        started = time.monotonic()
        telemetry = asyncio.create_task(outbox.put(tel(1)))
        # The writer has woken for the telemetry and is now lingering (up to 1 s) for more.
        await beats.next()
        assert not telemetry.done()
        # An alarm arriving during the linger is committed at once, with the telemetry.
        await asyncio.wait_for(outbox.put(alarm(1)), timeout=0.5)
        await asyncio.wait_for(telemetry, timeout=0.5)
        assert time.monotonic() - started < 0.9
        assert outbox.depth() == 2


async def test_telemetry_lingers_to_coalesce(tmp_path: Path) -> None:
    beats = Beats()
    async with opened(tmp_path / "o.sqlite3", cfg(commit_linger_ms=50)) as outbox:
        outbox.heartbeat = beats
        first = asyncio.create_task(outbox.put(tel(0)))
        await beats.next()  # lingering now
        # Puts arriving during the linger join the same commit.
        await asyncio.gather(first, *(outbox.put(tel(i)) for i in range(1, 20)))
        assert beats.count <= 2
        assert outbox.depth() == 20


async def test_telemetry_arriving_during_the_linger_does_not_end_it(tmp_path: Path) -> None:
    """Only an alarm (or a full batch, or closing) cuts the linger short.

    That is what the writer's comment and the module docstring promise, and a trickle of
    telemetry is exactly what the linger exists for: one commit per linger window, not one per
    arrival. Both puts must still be answered by a single commit.
    """
    beats = Beats()
    async with opened(tmp_path / "o.sqlite3", cfg(commit_linger_ms=300)) as outbox:
        outbox.heartbeat = beats
        started = time.monotonic()
        first = asyncio.create_task(outbox.put(tel(0)))
        await beats.next()  # the writer has woken for the first put and lingers
        second = asyncio.create_task(outbox.put(tel(1)))
        await asyncio.wait_for(asyncio.gather(first, second), 5)
        elapsed = time.monotonic() - started
        assert beats.count == 1
        assert elapsed >= 0.15, f"committed after {elapsed * 1000:.0f} ms of a 300 ms linger"


async def test_put_many_is_one_atomic_unit(tmp_path: Path) -> None:
    path = tmp_path / "o.sqlite3"
    beats = Beats()
    async with opened(path, cfg(max_commit_rows=100)) as outbox:
        outbox.heartbeat = beats
        await outbox.put(tel(-1))
        before = beats.count
        events = [alarm(i) if i % 10 == 0 else tel(i) for i in range(5000)]
        await outbox.put_many(events)
        # Larger than max_commit_rows, yet never split: one commit, all rows there on return.
        assert beats.count - before == 1
        assert stored_ids(path)[1:] == [e.event_id for e in events]
        with sqlite3.connect(path) as db:
            seqs = [s for (s,) in db.execute("SELECT seq FROM events ORDER BY seq")][1:]
        assert seqs == list(range(seqs[0], seqs[0] + 5000))


async def test_put_many_of_nothing_is_a_no_op(tmp_path: Path) -> None:
    async with opened(tmp_path / "o.sqlite3", cfg()) as outbox:
        await outbox.put_many([])
        await outbox.put_many(iter(()))
        assert outbox.depth() == 0
        assert (await outbox.stats()).put_total == 0


async def test_put_after_close_raises(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path / "o.sqlite3", cfg())
    with pytest.raises(OutboxError, match="not open"):
        await outbox.put(tel(1))
    async with outbox:
        await outbox.put(tel(1))
    with pytest.raises(OutboxError, match="not open"):
        await outbox.put(tel(2))


# -- bounds -----------------------------------------------------------------------------------


@pytest.mark.parametrize("batched", [False, True], ids=["put", "put_many"])
async def test_max_rows_keeps_the_newest_telemetry(tmp_path: Path, batched: bool) -> None:
    async with opened(tmp_path / "o.sqlite3", cfg(max_rows=10)) as outbox:
        events = [tel(i) for i in range(25)]
        if batched:
            await outbox.put_many(events)
        else:
            for e in events:
                await outbox.put(e)
        stats = await outbox.stats()
        assert stats.drops == {"telemetry_full_rows": 15}
        assert stats.rows == {"alarm": 0, "telemetry": 10}
        assert stats.put_total == 25
        rows = await drain(outbox)
        assert [r.event_id for r in rows] == [e.event_id for e in events[15:]]


async def test_max_bytes_keeps_the_newest_telemetry(tmp_path: Path) -> None:
    path = tmp_path / "o.sqlite3"
    async with opened(path, cfg(max_bytes=4096)) as outbox:
        events = [tel(i) for i in range(100)]
        for e in events:
            await outbox.put(e)
        stats = await outbox.stats()
        rows = await drain(outbox)
        kept = len(rows)
        assert [r.event_id for r in rows] == [e.event_id for e in events[-kept:]]
        total = sum(len(r.payload) for r in rows)
        assert stats.bytes == {"alarm": 0, "telemetry": total}
        assert total <= 4096
        # Only as much as needed went: one more (the newest dropped) would not have fit.
        newest_dropped = len(encode(events[-kept - 1], Encoding.JSON))
        assert total + newest_dropped > 4096
        assert stats.drops == {"telemetry_full_bytes": 100 - kept}
    with sqlite3.connect(path) as db:
        (on_disk,) = db.execute("SELECT SUM(LENGTH(payload)) FROM events").fetchone()
    assert on_disk == total


async def test_alarms_are_never_dropped_while_telemetry_exists(tmp_path: Path) -> None:
    async with opened(tmp_path / "o.sqlite3", cfg(max_rows=10)) as outbox:
        alarms = [alarm(i) for i in range(15)]
        for a in alarms[:5]:
            await outbox.put(a)
        telemetry = [tel(i) for i in range(20)]
        for t in telemetry:
            await outbox.put(t)
        stats = await outbox.stats()
        assert stats.rows == {"alarm": 5, "telemetry": 5}
        assert stats.drops == {"telemetry_full_rows": 15}

        for n, a in enumerate(alarms[5:], start=6):
            await outbox.put(a)
            stats = await outbox.stats()
            # The invariant, after every single put.
            if stats.drops.get("alarm_full_rows", 0):
                assert stats.rows["telemetry"] == 0
            assert sum(stats.rows.values()) == 10
            assert stats.rows["alarm"] == min(n, 10)
        assert stats.drops == {"telemetry_full_rows": 20, "alarm_full_rows": 5}

        # Only now, with no telemetry left, did the oldest alarms go.
        rows = await drain(outbox)
        assert [r.event_id for r in rows] == [a.event_id for a in alarms[5:]]

        # Telemetry arriving at a full alarm lane is what gets dropped.
        await outbox.put(tel(100))
        stats = await outbox.stats()
        assert stats.rows == {"alarm": 10, "telemetry": 0}
        assert stats.drops["telemetry_full_rows"] == 21
        assert stats.drops["alarm_full_rows"] == 5


async def test_alarms_survive_byte_pressure_from_telemetry(tmp_path: Path) -> None:
    async with opened(tmp_path / "o.sqlite3", cfg(max_bytes=4096)) as outbox:
        alarms = [alarm(i) for i in range(5)]
        await outbox.put_many(alarms)
        await outbox.put_many([tel(i) for i in range(200)])
        stats = await outbox.stats()
        assert stats.rows["alarm"] == 5
        assert "alarm_full_bytes" not in stats.drops
        assert stats.drops["telemetry_full_bytes"] > 150
        # Many alarms: telemetry goes entirely, then the oldest alarms.
        more = [alarm(i) for i in range(100, 200)]
        await outbox.put_many(more)
        stats = await outbox.stats()
        assert stats.rows["telemetry"] == 0
        assert stats.drops["alarm_full_bytes"] > 0
        assert sum(stats.bytes.values()) <= 4096
        rows = await drain(outbox)
        assert [r.event_id for r in rows] == [a.event_id for a in more[-len(rows) :]]


async def test_bounds_apply_to_what_is_already_on_disk(tmp_path: Path) -> None:
    path = tmp_path / "o.sqlite3"
    async with opened(path, cfg()) as outbox:
        await outbox.put_many([tel(i) for i in range(30)])
    # Reopened with a smaller bound (config change): the next commit trims to it.
    async with opened(path, cfg(max_rows=10)) as outbox:
        assert (await outbox.stats()).rows["telemetry"] == 30
        await outbox.put(tel(30))
        stats = await outbox.stats()
        assert stats.rows["telemetry"] == 10
        assert stats.drops == {"telemetry_full_rows": 21}


# -- age --------------------------------------------------------------------------------------


async def test_old_telemetry_expires_and_alarms_do_not(tmp_path: Path) -> None:
    clock = FakeClock()
    async with opened(tmp_path / "o.sqlite3", cfg(max_age_s=60), clock=clock) as outbox:
        old_tel, old_alarm = tel(1), alarm(1)
        await outbox.put(old_tel)
        await outbox.put(old_alarm)
        clock.advance(30)
        young = tel(2)
        await outbox.put(young)
        assert (await outbox.stats()).drops == {}

        clock.advance(31)  # old_tel is now 61 s old, young 31 s
        fresh = tel(3)
        await outbox.put(fresh)  # this commit runs the age check
        stats = await outbox.stats()
        assert stats.drops == {"telemetry_expired": 1}
        assert stats.rows == {"alarm": 1, "telemetry": 2}
        rows = await drain(outbox)
        assert [r.event_id for r in rows] == [
            old_alarm.event_id,
            young.event_id,
            fresh.event_id,
        ]

        clock.advance(10 * 24 * 3600)  # ten days on, the alarm is still there
        await outbox.put(tel(4))
        stats = await outbox.stats()
        assert stats.rows == {"alarm": 1, "telemetry": 1}
        assert stats.drops == {"telemetry_expired": 3}
        assert stats.oldest_age_s["alarm"] == pytest.approx(10 * 24 * 3600 + 61)


async def test_age_is_also_checked_on_the_idle_tick(tmp_path: Path) -> None:
    clock = FakeClock()
    beats = Beats()
    async with opened(tmp_path / "o.sqlite3", cfg(max_age_s=60), clock=clock) as outbox:
        outbox.heartbeat = beats
        await outbox.put(tel(1))
        await outbox.put(alarm(1))
        clock.advance(120)
        # No put, no ack: the writer's idle tick (once a second) must notice on its own.
        await beats.next()
        stats = await outbox.stats()
        assert stats.drops == {"telemetry_expired": 1}
        assert stats.rows == {"alarm": 1, "telemetry": 0}


# -- stats ------------------------------------------------------------------------------------


async def test_stats_per_lane(tmp_path: Path) -> None:
    clock = FakeClock()
    path = tmp_path / "o.sqlite3"
    async with opened(path, cfg(), clock=clock) as outbox:
        empty = await outbox.stats()
        assert empty.rows == {"alarm": 0, "telemetry": 0}
        assert empty.bytes == {"alarm": 0, "telemetry": 0}
        assert empty.oldest_age_s == {"alarm": None, "telemetry": None}
        assert empty.drops == {}
        assert (empty.put_total, empty.acked_total) == (0, 0)

        telemetry = [tel(i) for i in range(3)]
        await outbox.put_many(telemetry)
        clock.advance(5)
        alarms = [alarm(1), alarm(2)]
        await outbox.put_many(alarms)
        clock.advance(5.5)

        stats = await outbox.stats()
        assert stats.rows == {"alarm": 2, "telemetry": 3}
        assert stats.bytes == {
            "alarm": sum(len(encode(a, Encoding.JSON)) for a in alarms),
            "telemetry": sum(len(encode(t, Encoding.JSON)) for t in telemetry),
        }
        assert stats.oldest_age_s == {"alarm": 5.5, "telemetry": 10.5}
        assert stats.put_total == 5
        assert outbox.depth() == 5

        rows = await outbox.fetch(10)
        outbox.ack([rows[0].seq, rows[2].seq])  # the older alarm and the oldest telemetry
        await outbox.flush()
        stats = await outbox.stats()
        assert stats.rows == {"alarm": 1, "telemetry": 2}
        assert stats.bytes["alarm"] == len(encode(alarms[1], Encoding.JSON))
        assert stats.oldest_age_s == {"alarm": 5.5, "telemetry": 10.5}
        assert stats.acked_total == 2

    # Totals are rebuilt from the file on open.
    async with opened(path, cfg(), clock=clock) as outbox:
        again = await outbox.stats()
        assert again.rows == stats.rows
        assert again.bytes == stats.bytes
        assert outbox.depth() == 3


# -- fetch waiting ----------------------------------------------------------------------------


async def test_fetch_times_out_empty(tmp_path: Path) -> None:
    async with opened(tmp_path / "o.sqlite3", cfg()) as outbox:
        started = time.monotonic()
        assert await outbox.fetch(10, timeout_s=0.05) == []
        assert 0.04 <= time.monotonic() - started < 1.0
        assert await outbox.fetch(10, timeout_s=0) == []


async def test_fetch_wakes_up_when_a_put_commits(tmp_path: Path) -> None:
    async with opened(tmp_path / "o.sqlite3", cfg(commit_linger_ms=20)) as outbox:
        waiting = asyncio.create_task(outbox.fetch(10))
        # stats() runs on the same worker thread after fetch's first (empty) query, so once it
        # returns, fetch has found nothing and is waiting.
        await outbox.stats()
        assert not waiting.done()
        e = tel(1)
        await outbox.put(e)
        rows = await asyncio.wait_for(waiting, 5)
        assert [r.event_id for r in rows] == [e.event_id]


async def test_fetch_with_timeout_also_wakes_early(tmp_path: Path) -> None:
    async with opened(tmp_path / "o.sqlite3", cfg()) as outbox:
        started = time.monotonic()
        waiting = asyncio.create_task(outbox.fetch(10, timeout_s=30))
        await outbox.stats()
        await outbox.put(alarm(1))
        rows = await asyncio.wait_for(waiting, 5)
        assert len(rows) == 1
        assert time.monotonic() - started < 5


async def test_flush_returns_after_pending_acks_are_committed(tmp_path: Path) -> None:
    path = tmp_path / "o.sqlite3"
    async with opened(path, cfg(commit_linger_ms=100)) as outbox:
        events = [tel(i) for i in range(10)]
        await outbox.put_many(events)
        rows = await outbox.fetch(10)
        outbox.ack(r.seq for r in rows[:7])
        assert len(stored_ids(path)) == 10  # not yet: the writer is lingering
        await outbox.flush()
        assert stored_ids(path) == [e.event_id for e in events[7:]]
        await outbox.flush()  # nothing pending: returns at once


async def test_close_commits_pending_acks_without_lingering(tmp_path: Path) -> None:
    path = tmp_path / "o.sqlite3"
    async with opened(path, cfg(commit_linger_ms=1000)) as outbox:
        # Alarms commit at once; the ack alone would wait up to the 1 s linger.
        await outbox.put_many([alarm(i) for i in range(4)])
        rows = await outbox.fetch(10)
        outbox.ack([rows[0].seq])
        closing = time.monotonic()
    assert time.monotonic() - closing < 0.5
    assert len(stored_ids(path)) == 3


async def test_close_returns_when_a_flush_just_woke_the_writer(tmp_path: Path) -> None:
    """Closing must stop the writer even if it is being woken at that very moment.

    Here the close's flush() wakes the writer while it commits the last ack; the writer then
    re-enters ``asyncio.wait_for(self._wake.wait(), 1.0)`` with the event already set, and the
    cancel from ``__aexit__`` arrives in the same loop turn. Python 3.11's wait_for then returns
    the inner result instead of raising CancelledError, the writer loops on, and ``__aexit__``
    awaits it forever (on SIGTERM: until systemd's stop timeout kills the gateway).
    """
    outbox = Outbox(tmp_path / "o.sqlite3", cfg())
    await outbox.__aenter__()
    try:
        await outbox.put(tel(0))
        rows = await outbox.fetch(10)
        outbox.ack(r.seq for r in rows)
        await outbox.flush()
        outbox.ack([rows[0].seq + 1000])  # a late ack, committed while the close begins
        await outbox.stats()
    finally:
        await close_within(outbox, 2.0)


# -- the file ---------------------------------------------------------------------------------


async def test_corrupt_file_is_moved_aside_and_kept(tmp_path: Path) -> None:
    path = tmp_path / "state" / "outbox.sqlite3"
    path.parent.mkdir()
    garbage = random.Random(5).randbytes(16384)
    path.write_bytes(garbage)
    async with opened(path, cfg(), clock=FakeClock(1234.0)) as outbox:
        e = alarm(1)
        await outbox.put(e)
        assert [r.event_id for r in await outbox.fetch(10)] == [e.event_id]
    aside = corrupt_files(path.parent)
    assert [p.name for p in aside] == ["outbox.sqlite3.corrupt-1234"]
    assert aside[0].read_bytes() == garbage
    assert stored_ids(path) == [e.event_id]


async def test_two_corrupt_files_in_the_same_second_are_both_kept(tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite3"
    clock = FakeClock(1234.0)
    blobs = [random.Random(n).randbytes(8192) for n in (1, 2)]
    for blob in blobs:
        path.write_bytes(blob)
        async with opened(path, cfg(), clock=clock) as outbox:
            await outbox.put(tel(1))
    aside = sorted(p.read_bytes() for p in corrupt_files(tmp_path))
    assert aside == sorted(blobs), "a corrupt outbox was overwritten, not kept"


async def test_truncated_header_is_treated_as_corrupt(tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite3"
    async with opened(path, cfg()) as outbox:
        await outbox.put_many([tel(i) for i in range(100)])
    data = path.read_bytes()
    path.write_bytes(b"\x00" * 100 + data[100:])  # the 100-byte header wiped
    for suffix in ("-wal", "-shm"):
        path.with_name(path.name + suffix).unlink(missing_ok=True)
    async with opened(path, cfg()) as outbox:
        await outbox.put(tel(1))
        assert outbox.depth() == 1
    assert corrupt_files(tmp_path)


@pytest.mark.parametrize("below", ["file", "file/sub"])
async def test_directory_under_a_regular_file_raises_outbox_error(
    tmp_path: Path, below: str
) -> None:
    (tmp_path / "file").write_text("not a directory")
    path = tmp_path / below / "outbox.sqlite3"
    with pytest.raises(OutboxError) as info:
        async with Outbox(path, cfg()):
            pass
    assert str(path) in str(info.value)


async def test_path_that_is_a_directory_raises_outbox_error(tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite3"
    path.mkdir()
    with pytest.raises(OutboxError, match="cannot open outbox") as info:
        async with Outbox(path, cfg()):
            pass
    assert str(path) in str(info.value)
    assert path.is_dir()  # not "moved aside as corrupt"


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
async def test_read_only_directory_raises_outbox_error(tmp_path: Path) -> None:
    directory = tmp_path / "ro"
    directory.mkdir(mode=0o500)
    path = directory / "outbox.sqlite3"
    with pytest.raises(OutboxError) as info:
        async with Outbox(path, cfg()):
            pass
    assert str(path) in str(info.value)


async def test_newer_schema_is_refused_and_left_alone(tmp_path: Path) -> None:
    # As a newer gateway would have left it: WAL mode, its own tables, a higher user_version.
    path = tmp_path / "outbox.sqlite3"
    db = sqlite3.connect(path)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("CREATE TABLE events_v2 (x)")
    db.execute("INSERT INTO events_v2 VALUES ('keep me')")
    db.execute("PRAGMA user_version=99")
    db.commit()
    db.close()
    with pytest.raises(OutboxError, match="newer") as info:
        async with Outbox(path, cfg()):
            pass
    assert str(path) in str(info.value)
    db = sqlite3.connect(path)
    try:
        assert db.execute("PRAGMA user_version").fetchone() == (99,)
        assert db.execute("SELECT x FROM events_v2").fetchall() == [("keep me",)]
        tables = {name for (name,) in db.execute("SELECT name FROM sqlite_master")}
        assert "events" not in tables
    finally:
        db.close()
    assert not corrupt_files(tmp_path)


async def test_creates_missing_directories(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "outbox.sqlite3"
    async with opened(path, cfg()) as outbox:
        await outbox.put(tel(1))
    assert stored_ids(path)


@pytest.mark.parametrize("synchronous", ["full", "normal"])
async def test_synchronous_modes(tmp_path: Path, synchronous: str) -> None:
    path = tmp_path / "o.sqlite3"
    events = [tel(i) for i in range(50)] + [alarm(i) for i in range(5)]
    async with opened(path, cfg(synchronous=synchronous)) as outbox:
        await asyncio.gather(*(outbox.put(e) for e in events))
        rows = await outbox.fetch(100)
        acked = {r.event_id for r in rows[:10]}
        outbox.ack(r.seq for r in rows[:10])
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        assert db.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    async with opened(path, cfg(synchronous=synchronous)) as outbox:
        assert outbox.depth() == 45
        rows = await outbox.fetch(100)
        assert {r.event_id for r in rows} == {e.event_id for e in events} - acked


# -- fetch, ack, rewind and restart at random -------------------------------------------------


@pytest.mark.parametrize("seed", range(12))
async def test_fetch_ack_rewind_restart_against_a_model(tmp_path: Path, seed: int) -> None:
    """Random puts (both lanes, one or many per commit), fetches of random size, acks, rewinds
    and restarts: every fetch hands out exactly what a plain reading of the lanes would."""
    rng = random.Random(seed)
    path = tmp_path / "o.sqlite3"
    stored: dict[Lane, list[str]] = {Lane.ALARM: [], Lane.TELEMETRY: []}  # live, in order
    handed_upto: dict[Lane, int] = dict.fromkeys(Lane, 0)  # how many of stored[lane] are out
    out: dict[str, int] = {}  # handed out and not acked: event id -> seq
    n = 0
    outbox = Outbox(path, cfg())
    await outbox.__aenter__()
    try:
        for _step in range(120):
            op = rng.random()
            if op < 0.4:
                batch = []
                for _ in range(rng.randint(1, 6)):
                    n += 1
                    batch.append(alarm(n) if rng.random() < 0.2 else tel(n))
                if rng.random() < 0.5:
                    await outbox.put_many(batch)
                else:
                    await asyncio.gather(*(outbox.put(e) for e in batch))
                    batch.sort(key=lambda e: stored_ids(path).index(e.event_id))
                for e in batch:
                    stored[e.lane].append(e.event_id)
            elif op < 0.75:
                limit = rng.randint(1, 12)
                rows = await outbox.fetch(limit, timeout_s=0)
                expected: list[str] = []
                for lane in Lane:
                    take = stored[lane][handed_upto[lane] :][: limit - len(expected)]
                    expected += take
                    handed_upto[lane] += len(take)
                assert [r.event_id for r in rows] == expected
                out.update((r.event_id, r.seq) for r in rows)
            elif op < 0.9:
                acked = [eid for eid in out if rng.random() < 0.6]
                outbox.ack(out.pop(eid) for eid in acked)
                await outbox.flush()
                for lane in Lane:
                    for eid in acked:
                        if eid in stored[lane]:
                            i = stored[lane].index(eid)
                            del stored[lane][i]
                            handed_upto[lane] -= int(i < handed_upto[lane])
            else:
                if rng.random() < 0.5:
                    outbox.rewind()
                else:
                    await close_within(outbox)
                    outbox = Outbox(path, cfg())
                    await outbox.__aenter__()
                handed_upto = dict.fromkeys(Lane, 0)
                out.clear()
        assert sorted(stored_ids(path)) == sorted(stored[Lane.ALARM] + stored[Lane.TELEMETRY])
    finally:
        await close_within(outbox)


async def test_commits_of_any_size_use_a_few_statement_shapes(tmp_path: Path) -> None:
    """The sqlite3 module keeps every distinct statement prepared; one shape per group size
    held megabytes under load. Rows go in (and acks out) in power-of-two pieces."""
    inserts: list[int] = []
    deletes: list[int] = []

    def trace(sql: str) -> None:
        if sql.startswith("INSERT INTO events"):
            inserts.append(sql.count("),(") + 1)
        elif sql.startswith("DELETE FROM events WHERE seq IN"):
            deletes.append(sql.split("IN (", 1)[1].split(")", 1)[0].count(",") + 1)

    async with opened(tmp_path / "o.sqlite3", cfg()) as outbox:
        db = outbox._db  # observing the real connection; set while the writer is idle
        assert db is not None
        db.set_trace_callback(trace)
        n = 0
        for size in (1, 3, 7, 100, 199, 255, 300):
            await outbox.put_many([tel(n + i) for i in range(size)])
            n += size
        rows = await drain(outbox)
        outbox.ack(r.seq for r in rows)
        await outbox.flush()
        assert stored_ids(tmp_path / "o.sqlite3") == []
    powers = {2**k for k in range(10)}
    assert sum(inserts) == n == len(rows)
    assert set(inserts) <= powers and max(inserts) == 128
    assert sum(deletes) == n and set(deletes) <= powers
