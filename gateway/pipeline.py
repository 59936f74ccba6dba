"""The pipeline: a bounded queue of readings, turned into events and stored in the outbox.

Sources hand readings to :meth:`Pipeline.submit`. One task takes whatever has queued up, turns
each reading into events and stores them with one ``put_many`` (so a burst costs one commit, not
one per reading). Later analyzers plug in between; for now every reading becomes one telemetry
event.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

import structlog

from gateway.config import PipelineSection
from gateway.errors import EventValidationError, OutboxError
from gateway.health import Metrics
from gateway.outbox import Outbox
from gateway.types import Event, Reading, Severity

log = structlog.get_logger(__name__)

# Readings taken from the queue per outbox commit.
_MAX_BATCH = 1000


def reading_to_event(reading: Reading) -> Event:
    """A reading forwarded as it is: one ``reading`` event with the same values and flags."""
    return Event(
        kind="reading",
        device=reading.device,
        ts=reading.ts,
        severity=Severity.INFO,
        values=reading.values,
        quality=reading.quality,
    )


class Pipeline:
    """Bounded queue → events → outbox, with an explicit overflow policy."""

    def __init__(self, cfg: PipelineSection, outbox: Outbox, metrics: Metrics) -> None:
        self._cfg = cfg
        self._outbox = outbox
        self._metrics = metrics
        # None marks the end of input (see close()).
        self._queue: asyncio.Queue[Reading | None] = asyncio.Queue(maxsize=cfg.queue_max)
        self.heartbeat: Callable[[], None] = lambda: None

    async def submit(self, reading: Reading) -> None:
        """Hand a reading over; waits (block) or evicts the oldest (drop_oldest) when full."""
        self._metrics.inc("readings_in")
        if self._cfg.overflow == "drop_oldest" and self._queue.full():
            with contextlib.suppress(asyncio.QueueEmpty):
                self._queue.get_nowait()
                self._metrics.inc("readings_dropped_queue_full")
        await self._queue.put(reading)

    async def close(self) -> None:
        """No more readings will come: :meth:`run` returns once everything queued is stored."""
        await self._queue.put(None)

    def backlog(self) -> int:
        return self._queue.qsize()

    async def run(self) -> None:
        while True:
            self.heartbeat()
            try:
                first = await asyncio.wait_for(self._queue.get(), timeout=1.0)
            except TimeoutError:
                continue
            batch = [first]
            while len(batch) < _MAX_BATCH and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            readings = [r for r in batch if r is not None]
            if readings:
                await self._store(readings)
            if len(readings) != len(batch):
                # The end marker is queued after the last reading of the last source.
                return

    async def _store(self, readings: list[Reading]) -> None:
        events: list[Event] = []
        for reading in readings:
            try:
                events.append(reading_to_event(reading))
            except EventValidationError as exc:
                # One bad reading never stops the loop; it is named and counted.
                self._metrics.inc("readings_invalid")
                log.warning("reading_invalid", device=reading.device, error=str(exc))
        if not events:
            return
        try:
            await self._outbox.put_many(events)
        except OutboxError as exc:
            self._metrics.inc("events_lost_outbox_error", len(events))
            log.error("events_not_stored", n=len(events), error=str(exc))
            return
        self._metrics.inc("events_in", len(events))
