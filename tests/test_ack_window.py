"""Input held unacknowledged until the commit is not kept waiting by the outbox's linger.

The ChirpStack source acknowledges its broker's messages only after their events are committed,
and a broker sends only so many unacknowledged messages (mosquitto: max_inflight_messages 20).
The outbox therefore commits a group holding enough of them at once, and the pipeline hands the
next group over while one commits, keeping the callbacks in order.
"""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from pathlib import Path

from gateway.config import OutboxSection, PipelineSection
from gateway.health import Metrics
from gateway.outbox import Outbox
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
