"""Input held unacknowledged until the commit is not kept waiting by the outbox's linger.

The ChirpStack source acknowledges its broker's messages only after their events are committed,
and a broker sends only so many unacknowledged messages (mosquitto: max_inflight_messages 20).
The outbox therefore commits a group holding enough of them at once, and the pipeline hands the
next group over while one commits, keeping the callbacks in order.
"""

from __future__ import annotations

import asyncio
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest

from gateway.app import sender_window
from gateway.config import OutboxSection, PipelineSection, config_from_dict
from gateway.health import Metrics
from gateway.outbox import DEFAULT_SENDER_WINDOW, Outbox
from gateway.pipeline import Pipeline
from gateway.types import Event, Measurement, Reading

TS = datetime(2024, 6, 1, tzinfo=UTC)


def _event(i: int) -> Event:
    return Event(kind="reading", device="gauge-1", ts=TS, values=(Measurement("n", i),))


async def _timed_put(outbox: Outbox, n: int, holding: int) -> float:
    started = time.monotonic()
    await outbox.put_many([_event(i) for i in range(n)], holding=holding)
    return time.monotonic() - started


async def test_a_group_holding_upstream_messages_commits_without_lingering(
    tmp_path: Path,
) -> None:
    async with Outbox(tmp_path / "o.db", OutboxSection(commit_linger_ms=1000)) as outbox:
        assert await _timed_put(outbox, 10, holding=10) < 0.5
        # Fewer held messages (or none) still linger for company, as before.
        assert await _timed_put(outbox, 3, holding=3) >= 0.5
        assert await _timed_put(outbox, 10, holding=0) >= 0.5


async def test_the_threshold_is_half_the_senders_window(tmp_path: Path) -> None:
    """A sender that may have 1000 messages in flight is not stalled by 10 of them waiting: the
    group lingers (and grows: one commit per ten uplinks cost CPU under load) until half of
    the window waits on it."""
    cfg = OutboxSection(commit_linger_ms=1000)
    async with Outbox(tmp_path / "o.db", cfg, sender_window=1000) as outbox:
        assert await _timed_put(outbox, 10, holding=10) >= 0.5
        assert await _timed_put(outbox, 500, holding=500) < 0.5


def test_the_senders_window_comes_from_the_chirpstack_sources(tmp_path: Path) -> None:
    def window(*sources: dict[str, object]) -> int:
        raw = {
            "gateway": {"id": "gw", "state_dir": str(tmp_path)},
            "uplink": {"type": "file", "path": str(tmp_path / "events.jsonl")},
            "sources": list(sources),
        }
        return sender_window(config_from_dict(raw, "test"))

    v5 = {"type": "chirpstack", "name": "a", "max_unacked": 600}
    v311 = {"type": "chirpstack", "name": "b", "mqtt_version": "3.1.1"}
    assert window(v5) == 600
    assert window(v5, v311) == DEFAULT_SENDER_WINDOW
    assert window({"type": "chirpstack"}) == 1000
    # A Receive Maximum below the source's own window is what the broker holds to.
    assert window({"type": "chirpstack", "name": "c", "receive_maximum": 400}) == 400
    assert window() == DEFAULT_SENDER_WINDOW


async def test_a_large_group_commits_on_the_loop_thread_a_small_one_on_the_worker(
    tmp_path: Path,
) -> None:
    """Under load (large groups) the worker thread cannot get the GIL from the busy loop; small
    groups (a trickle, an alarm) stay on the worker, where a slow fsync cannot stall the loop."""
    committed_on: list[int] = []

    def trace(sql: str) -> None:
        if sql == "COMMIT":
            committed_on.append(threading.get_ident())

    async with Outbox(tmp_path / "o.db", OutboxSection(commit_linger_ms=0)) as outbox:
        db = outbox._db  # observing the real connection; set while the writer is idle
        assert db is not None
        db.set_trace_callback(trace)
        await outbox.put_many([_event(i) for i in range(3)])
        await outbox.put_many([_event(i) for i in range(200)])
        await outbox.put_many([_event(i) for i in range(3)])
    loop_thread = threading.get_ident()
    assert committed_on[:3] == [committed_on[0], loop_thread, committed_on[0]]
    assert committed_on[0] != loop_thread


@pytest.mark.parametrize("worker_s", [0.05, 0.6])
async def test_work_on_the_loop_thread_waits_for_the_workers(
    tmp_path: Path, worker_s: float
) -> None:
    """One connection, one transaction at a time: never the loop's thread and the worker. A
    worker stuck long (a stalled disk) is waited for without blocking the loop."""
    spans: list[tuple[str, float, float]] = []
    ticks = 0

    def slow() -> None:
        started = time.monotonic()
        time.sleep(worker_s)
        spans.append(("worker", started, time.monotonic()))

    def quick() -> None:
        spans.append(("loop", time.monotonic(), time.monotonic()))

    async def tick() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    async with Outbox(tmp_path / "o.db", OutboxSection()) as outbox:
        ticker = asyncio.create_task(tick())
        on_worker = asyncio.create_task(outbox._run(slow))
        await asyncio.sleep(0)  # handed to the worker now
        await outbox._run_here_if(True, quick)
        await on_worker
        ticker.cancel()
    assert [name for name, *_ in spans] == ["worker", "loop"]
    assert spans[1][1] >= spans[0][2]
    if worker_s > 0.5:
        assert ticks >= 10, "the loop stood still while the worker was stuck"


async def test_a_cancelled_wait_for_the_worker_leaves_its_jobs_alone(tmp_path: Path) -> None:
    """Waiting for another caller's job on the worker, then being cancelled, cancels only the
    waiter: the job still runs and its caller gets its result."""
    async with Outbox(tmp_path / "o.db", OutboxSection()) as outbox:
        stuck = asyncio.create_task(outbox._run(lambda: time.sleep(0.4)))
        queued = asyncio.create_task(outbox._run(lambda: "done"))
        await asyncio.sleep(0)  # both handed to the worker: one running, one queued
        waiter = asyncio.create_task(outbox._run_here_if(True, lambda: "ran here"))
        await asyncio.sleep(0.2)  # past the blocking part: awaiting the queued job now
        waiter.cancel()
        await asyncio.gather(waiter, return_exceptions=True)
        assert waiter.cancelled()
        assert await queued == "done"
        await stuck


async def test_the_pipeline_does_not_wait_for_a_commit_to_hand_over_more(tmp_path: Path) -> None:
    """With a 20-message window, every item waits for a commit: the commits must not take a full
    linger each, and the callbacks (the broker acks) run in submission order."""
    window = 20
    n = 400
    acked: list[int] = []
    free = asyncio.Semaphore(window)
    cfg = OutboxSection(commit_linger_ms=200)
    async with Outbox(tmp_path / "o.db", cfg) as outbox:
        pipeline = Pipeline(PipelineSection(queue_max=100), outbox, Metrics())
        runner = asyncio.create_task(pipeline.run())

        def on_stored(i: int) -> None:
            acked.append(i)
            free.release()

        started = time.monotonic()
        for i in range(n):
            await free.acquire()
            reading = Reading("test", "gauge-1", TS, (Measurement("n", i),), event_id=f"id-{i}")
            await pipeline.submit(reading, lambda i=i: on_stored(i))
        await pipeline.close()
        await asyncio.wait_for(runner, 30)
        elapsed = time.monotonic() - started
    assert acked == list(range(n))
    # Lingering 200 ms per window of 20 would take 4 s.
    assert elapsed < 2.0, f"{n} uplinks through a window of {window} took {elapsed:.1f} s"
