"""The pipeline with a real outbox: batching, overflow policy, invalid readings, draining."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from pathlib import Path

from gateway.config import OutboxSection, PipelineSection
from gateway.health import Metrics
from gateway.outbox import Outbox
from gateway.pipeline import Pipeline
from gateway.types import Measurement, Reading
from gateway.wire import Encoding, decode


def _reading(i: int) -> Reading:
    return Reading("test", "gauge-1", datetime(2024, 1, 1, tzinfo=UTC), (Measurement("n", i),))


async def _drain(outbox: Outbox) -> list[int]:
    values: list[int] = []
    while rows := await outbox.fetch(1000, timeout_s=0.05):
        values += [int(decode(r.payload, Encoding.JSON).values[0].value) for r in rows]
        outbox.ack(r.seq for r in rows)
    return values


async def test_every_reading_becomes_an_event_in_order(tmp_path: Path) -> None:
    metrics = Metrics()
    async with Outbox(tmp_path / "o.db", OutboxSection()) as outbox:
        pipeline = Pipeline(PipelineSection(queue_max=10), outbox, metrics)
        runner = asyncio.create_task(pipeline.run())
        for i in range(500):
            await pipeline.submit(_reading(i))
        await pipeline.close()
        await asyncio.wait_for(runner, 10)
        assert await _drain(outbox) == list(range(500))
    assert metrics.counters["events_in"] == 500


async def test_drop_oldest_keeps_the_newest_and_counts(tmp_path: Path) -> None:
    metrics = Metrics()
    async with Outbox(tmp_path / "o.db", OutboxSection()) as outbox:
        pipeline = Pipeline(PipelineSection(queue_max=5, overflow="drop_oldest"), outbox, metrics)
        settled: list[int] = []
        # The consumer is not running yet, so the queue overflows.
        for i in range(12):
            await pipeline.submit(_reading(i), lambda i=i: settled.append(i))
        assert metrics.counters["readings_dropped_queue_full"] == 7
        # The evicted are settled at once (a source acknowledges them: dropping is the policy).
        assert settled == list(range(7))
        runner = asyncio.create_task(pipeline.run())
        await pipeline.close()
        await asyncio.wait_for(runner, 10)
        assert await _drain(outbox) == list(range(7, 12))
        assert settled == list(range(12))


async def test_a_commit_that_fails_is_retried_and_nothing_is_settled_before_it(
    tmp_path: Path,
) -> None:
    # A real SQLITE_FULL ("database or disk is full"): the file may not grow past its pages.
    metrics = Metrics()
    settled: list[int] = []
    async with Outbox(tmp_path / "o.db", OutboxSection()) as outbox:
        db = outbox._db
        assert db is not None
        pages = await outbox._run(lambda: db.execute("PRAGMA page_count").fetchone()[0])
        await outbox._run(lambda: db.execute(f"PRAGMA max_page_count={pages}"))
        pipeline = Pipeline(PipelineSection(queue_max=100), outbox, metrics)
        runner = asyncio.create_task(pipeline.run())
        for i in range(200):
            await pipeline.submit(_reading(i), lambda i=i: settled.append(i))
        async with asyncio.timeout(10):
            while metrics.counters["outbox_put_retries"] < 3:  # noqa: ASYNC110 -- a counter, no event
                await asyncio.sleep(0.01)
        # Nothing was dropped, and no source was told its input is safe.
        assert settled == []
        assert outbox.depth() == 0
        await outbox._run(lambda: db.execute("PRAGMA max_page_count=1073741823"))
        await pipeline.close()
        await asyncio.wait_for(runner, 30)
        assert sorted(await _drain(outbox)) == list(range(200))
    assert sorted(settled) == list(range(200))
    assert metrics.counters["events_in"] == 200
