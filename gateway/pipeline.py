"""The pipeline: a bounded queue of readings and events, stored in the outbox in groups.

Sources hand items to :meth:`Pipeline.submit`: a :class:`Reading` (turned into a ``reading``
event here; analyzers plug in at that point) or an already-made :class:`Event` (a source's health
events). One task takes whatever has queued up and stores it with one ``put_many``, so a burst
costs one commit, not one per item. An optional ``on_stored`` callback runs once the item's event
is committed: the ChirpStack source acknowledges the broker's message only then, so a crash
between receipt and commit loses nothing. It also runs for an item the ``drop_oldest`` policy
evicts: dropping is what that policy was chosen for, and an input never settled would hold its
source's acknowledgements (they leave in order) until the session ends.

The task does not wait for one group's commit before handing over the next: groups that arrive
while the outbox lingers or commits join its next commit (the outbox never splits a group), and
the ``on_stored`` callbacks of committed items still run in the order the items were submitted
(an item ``drop_oldest`` evicts is settled at once, possibly ahead of earlier items still being
committed: a source must not rely on that order; the MQTT intake orders its PUBACKs itself).
At most ``queue_max`` items are handed over and not yet committed; beyond that the task waits,
the queue fills, and the overflow policy applies as before. A group whose commit fails (disk
full, an I/O error) is retried with backoff until it is stored, never dropped: its
``on_stored`` callbacks wait, and so does everything behind it once ``queue_max`` is reached;
committed items' callbacks may then run ahead of it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Callable
from typing import NamedTuple

import structlog
from tenacity import AsyncRetrying, retry_if_exception_type, wait_exponential_jitter

from gateway.config import PipelineSection
from gateway.errors import EventValidationError, OutboxError
from gateway.health import Metrics
from gateway.outbox import Outbox
from gateway.types import Event, Reading, Severity, new_event_id

log = structlog.get_logger(__name__)

# Items taken from the queue per outbox commit.
_MAX_BATCH = 1000
# Backoff between attempts to store a group whose commit failed (see Pipeline._put).
_RETRY_MIN_S = 0.1
_RETRY_MAX_S = 5.0

OnStored = Callable[[], None]


def reading_to_event(reading: Reading) -> Event:
    """A reading forwarded as it is: one ``reading`` event with the same values and flags."""
    return Event(
        kind="reading",
        device=reading.device,
        ts=reading.ts,
        severity=Severity.INFO,
        values=reading.values,
        quality=reading.quality,
        event_id=reading.event_id or new_event_id(),
    )


# One per uplink: a NamedTuple is as immutable as a frozen dataclass and built 2-3x faster.
class _Item(NamedTuple):
    payload: Reading | Event
    on_stored: OnStored | None


class Pipeline:
    """Bounded queue → events → outbox, with an explicit overflow policy."""

    def __init__(self, cfg: PipelineSection, outbox: Outbox, metrics: Metrics) -> None:
        self._cfg = cfg
        self._outbox = outbox
        self._metrics = metrics
        # None marks the end of input (see close()).
        self._queue: asyncio.Queue[_Item | None] = asyncio.Queue(maxsize=cfg.queue_max)
        self.heartbeat: Callable[[], None] = lambda: None

    async def submit(self, item: Reading | Event, on_stored: OnStored | None = None) -> None:
        """Hand an item over; waits (block) or evicts the oldest (drop_oldest) when full.

        An item evicted by drop_oldest is settled: its ``on_stored`` runs, without a commit.
        """
        if self._cfg.overflow == "drop_oldest" and self._queue.full():
            with contextlib.suppress(asyncio.QueueEmpty):
                evicted = self._queue.get_nowait()
                self._metrics.inc("readings_dropped_queue_full")
                if evicted is not None and evicted.on_stored is not None:
                    evicted.on_stored()
        queued = _Item(item, on_stored)
        if self._queue.full():
            await self._queue.put(queued)
        else:
            # What put() does when there is room, without a coroutine per item.
            self._queue.put_nowait(queued)
        # Counted once queued: a source cancelled while blocked on a full queue handed nothing in.
        self._metrics.inc("readings_in" if isinstance(item, Reading) else "source_events_in")

    async def close(self) -> None:
        """No more items will come: :meth:`run` returns once everything queued is stored."""
        await self._queue.put(None)

    def backlog(self) -> int:
        return self._queue.qsize()

    async def run(self) -> None:
        # Groups handed to the outbox and not committed yet, oldest first, with their sizes.
        storing: deque[tuple[asyncio.Task[None], int]] = deque()
        in_flight = 0
        try:
            while True:
                self.heartbeat()
                try:
                    # asyncio.timeout rather than wait_for: 3.11's wait_for can lose a
                    # cancellation that arrives in the same loop turn as the result.
                    async with asyncio.timeout(1.0):
                        first = await self._queue.get()
                except TimeoutError:
                    continue
                batch = [first]
                while len(batch) < _MAX_BATCH and not self._queue.empty():
                    batch.append(self._queue.get_nowait())
                items = [i for i in batch if i is not None]
                if items:
                    # Tasks start in creation order, so the groups reach the outbox in order.
                    task = asyncio.create_task(self._store(items), name="pipeline-store")
                    storing.append((task, len(items)))
                    in_flight += len(items)
                while storing and (storing[0][0].done() or in_flight > self._cfg.queue_max):
                    task, size = storing.popleft()
                    in_flight -= size
                    await task
                if len(items) != len(batch):
                    # The end marker is queued after the last item of the last source.
                    while storing:
                        await storing.popleft()[0]
                    return
        finally:
            # Cancelled (or failed): what was handed over may still commit, but its callbacks
            # must not run after the pipeline is gone; unacknowledged input is redelivered.
            for task, _size in storing:
                task.cancel()

    async def _put(self, events: list[Event], holding: int) -> None:
        """Store ``events``, retrying a failed commit (disk full, an I/O error) until it succeeds.

        Dropping them would lose data a source has not given up: the ChirpStack source
        acknowledges its broker only after the commit, and its de-duplication already counts
        the frames as seen, so a copy the broker delivers again would be taken for a duplicate.
        Waiting instead holds everything behind (the queue fills, sources block or apply their
        overflow policy) and is named in the log and the metrics on every attempt.
        """
        try:
            await self._outbox.put_many(events, holding=holding)
        except OutboxError as exc:
            # The first failure is counted and named like every later one; tenacity (tens of
            # microseconds per call) only once a commit has failed, not on every group.
            self._retrying(len(events), 1, exc, _RETRY_MIN_S)
            await asyncio.sleep(_RETRY_MIN_S)
        else:
            return
        retrying = AsyncRetrying(
            wait=wait_exponential_jitter(
                multiplier=_RETRY_MIN_S, max=_RETRY_MAX_S, jitter=_RETRY_MIN_S
            ),
            retry=retry_if_exception_type(OutboxError),
            before_sleep=lambda state: self._retrying(
                len(events),
                state.attempt_number + 1,
                state.outcome.exception() if state.outcome is not None else None,
                state.upcoming_sleep,
            ),
        )
        async for attempt in retrying:
            with attempt:
                await self._outbox.put_many(events, holding=holding)

    def _retrying(self, n: int, attempt: int, error: BaseException | None, wait_s: float) -> None:
        self._metrics.inc("outbox_put_retries")
        log.error(
            "events_not_stored_retrying",
            n=n,
            attempt=attempt,
            retry_in_s=round(wait_s, 2),
            error=str(error),
        )

    async def _store(self, items: list[_Item]) -> None:
        events: list[Event] = []
        for item in items:
            if isinstance(item.payload, Event):
                events.append(item.payload)
                continue
            try:
                events.append(reading_to_event(item.payload))
            except EventValidationError as exc:
                # One bad reading never stops the loop; it is named and counted.
                self._metrics.inc("readings_invalid")
                log.warning("reading_invalid", device=item.payload.device, error=str(exc))
        if events:
            holding = sum(1 for item in items if item.on_stored is not None)
            await self._put(events, holding)
            self._metrics.inc("events_in", len(events))
        for item in items:
            if item.on_stored is not None:
                item.on_stored()
