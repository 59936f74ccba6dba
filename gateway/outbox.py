"""Durable store-and-forward outbox in SQLite (WAL), owned by one component.

Guarantees:

* ``put()`` returns only after the event's row is committed, so it survives ``kill -9`` (and, with
  ``synchronous = "full"``, a power cut).
* Rows leave only through ``ack()``, which the uplink calls after the broker's PUBACK: delivery is
  at-least-once, in order per lane, and a redelivered event keeps its ``event_id``.
* Bounded by rows, bytes and age. When full, telemetry is evicted oldest-first; alarms are never
  evicted to make room for telemetry. Every eviction is counted by lane and reason.

Write pattern (what the SD card sees): one SQLite transaction per batch of puts and acks. The
writer
commits whatever has gathered while the previous commit ran (group commit), waiting up to
``commit_linger_ms`` for telemetry to coalesce; an alarm commits at once. Each commit appends the
changed pages to the WAL file and, with ``synchronous = "full"``, fsyncs it once; SQLite copies the
WAL back into the database every ~1000 pages (checkpoint), and the WAL is truncated to
``journal_size_limit``.

Threads: SQLite calls run on one dedicated worker thread, so a slow fsync (an SD card can take
tens of ms) never stalls the event loop. Except under load: a commit group of ``_INLINE_ROWS`` or
more rows (and the reads that feed the uplink meanwhile) runs on the event loop's own thread. A
group that large forms only when the loop is busy, and then the worker hardly gets the GIL.
Measured in the ChirpStack benchmark: commits handed to the worker waited 4 ms (median) to 63 ms
(p90) to start, while the ChirpStack source, whose acknowledgements wait for those commits, ran
out of its broker's window and sat idle. (As far as we can tell from CPython's take_gil: the busy
thread gives the GIL up at each of its system calls, which wakes the waiting worker, and takes it
back before the worker runs, so the worker's timed wait never expires to force a switch; and the
sqlite3 module gives the GIL up around every statement, so the worker needs it many times per
commit.) On the loop's thread a commit of 300 rows takes about 2 ms here, and the ChirpStack
source's 12,000 uplinks/s stopped stalling; the peak RSS also fell by 1-2 MB.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import sqlite3
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from concurrent import futures
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, NamedTuple, Self, TypeVar

import structlog

from gateway.config import OutboxSection
from gateway.errors import OutboxError
from gateway.types import Event, Lane
from gateway.wire import Encoding, encode

log = structlog.get_logger(__name__)

_T = TypeVar("_T")
_I = TypeVar("_I")

SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    -- AUTOINCREMENT: a seq is never reused, so a late ack can never delete a newer row.
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    lane INTEGER NOT NULL,
    kind TEXT NOT NULL,
    event_id TEXT NOT NULL,
    created_ms INTEGER NOT NULL,
    payload BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS events_lane_seq ON events (lane, seq);
"""
# Age eviction scans the head of the telemetry lane; once a second is plenty.
_AGE_CHECK_INTERVAL_S = 1.0
_EVICT_CHUNK = 1000
# Rows per INSERT (5 parameters each) and seqs per DELETE: powers of two, so that whatever the
# size of a commit only a few distinct statements exist. The sqlite3 module keeps every distinct
# statement prepared (128 by default), and one for each group size from 1 to 199 rows held about
# 4 MB in the ChirpStack benchmark. The largest stay under the 999 host parameters old SQLite
# builds allow.
_INSERT_CHUNKS = (128, 64, 32, 16, 8, 4, 2, 1)
_ACK_CHUNKS = (512, 256, 128, 64, 32, 16, 8, 4, 2, 1)
# SQLite's page cache for the outbox connection, in KiB. The default (2 MiB) only adds RSS: the
# queue touches a few pages at its head (acks) and its tail (puts).
_CACHE_KIB = 512
# A commit group of at least this many rows is written at once, without lingering. Under load a
# group this size gathers within the linger anyway; cut at a few dozen rows, the commits cost
# more CPU per uplink (the ChirpStack benchmark's drain: ~10 % more at 200 rows than at 400).
_LINGER_BELOW_ROWS = 256
# ... and so is a group that holds half of the senders' in-flight window in upstream messages
# left unacknowledged until it commits (see put_many's ``holding`` and ``sender_window``): the
# sender cannot send more, so no company worth waiting for can arrive, and lingering would only
# stall it. A trickle (a few messages per linger window) still lingers and coalesces.
DEFAULT_SENDER_WINDOW = 20  # mosquitto's max_inflight_messages, what an MQTT 3.1.1 client gets
# A commit group this large runs on the event loop's thread (see the module's docstring).
_INLINE_ROWS = 64
# How long the loop's thread blocks for a job the worker still has before it awaits it instead.
_BLOCK_FOR_WORKER_S = 0.1


def _chunks(items: list[_I], sizes: tuple[int, ...]) -> Iterator[list[_I]]:
    """``items`` in consecutive pieces whose lengths are all in ``sizes`` (largest first; the
    last size must be 1)."""
    start = 0
    for size in sizes:
        while len(items) - start >= size:
            yield items[start : start + size]
            start += size


@functools.lru_cache(maxsize=len(_INSERT_CHUNKS))
def _insert_sql(rows: int) -> str:
    values = ",".join(["(?, ?, ?, ?, ?)"] * rows)
    # Only placeholders are repeated into the statement; the values are bound.
    return f"INSERT INTO events (lane, kind, event_id, created_ms, payload) VALUES {values}"  # noqa: S608


# One per forwarded event: a NamedTuple (see _Row).
class OutboxRow(NamedTuple):
    """One stored event, as the uplink sees it."""

    seq: int
    lane: Lane
    kind: str
    event_id: str
    created_ms: int
    payload: bytes


@dataclass(slots=True)
class _LaneTotals:
    rows: int = 0
    bytes: int = 0


@dataclass(frozen=True, slots=True)
class OutboxStats:
    """A snapshot for the stats message and STATUS=."""

    rows: dict[str, int]
    bytes: dict[str, int]
    oldest_age_s: dict[str, float | None]
    drops: dict[str, int]
    put_total: int
    acked_total: int


# One per uplink: a NamedTuple is as immutable as a frozen dataclass and built 2-3x faster.
class _Row(NamedTuple):
    lane: Lane
    kind: str
    event_id: str
    created_ms: int
    payload: bytes


@dataclass(slots=True)
class _PendingPut:
    """Rows from one put call: committed together, so one future answers for all of them."""

    rows: list[_Row]
    done: asyncio.Future[None]
    # Upstream messages left unacknowledged until this put commits (see put_many).
    holding: int = 0
    # Whether it carries an alarm (which commits at once).
    urgent: bool = False


class Outbox:
    """The durable outbox. Use as ``async with Outbox(...) as outbox``."""

    def __init__(
        self,
        path: Path,
        cfg: OutboxSection,
        encoding: Encoding = Encoding.JSON,
        clock: Callable[[], float] = time.time,
        *,
        sender_window: int = DEFAULT_SENDER_WINDOW,
    ) -> None:
        """``sender_window``: the smallest in-flight window among the senders whose messages
        are acknowledged only once their events commit (the ChirpStack source's broker)."""
        self._path = path
        self._linger_below_held = max(1, sender_window // 2)
        self._cfg = cfg
        self._encoding = encoding
        self._clock = clock
        self._executor: ThreadPoolExecutor | None = None
        self._db: sqlite3.Connection | None = None
        self._writer: asyncio.Task[None] | None = None
        self._pending: list[_PendingPut] = []
        # Totals over _pending, kept as puts come and go: the writer asks after every put.
        self._pending_rows = 0
        self._pending_held = 0
        self._pending_urgent = 0
        # While the writer lingers for company, only a put that completes the group wakes it.
        self._lingering = False
        self._pending_acks: list[int] = []
        self._acked: set[int] = set()
        self._wake = asyncio.Event()
        self._ready = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._cursor: dict[Lane, int] = dict.fromkeys(Lane, 0)
        self._totals: dict[Lane, _LaneTotals] = {lane: _LaneTotals() for lane in Lane}
        self._drops: Counter[str] = Counter()
        self._put_total = 0
        self._acked_total = 0
        self._last_age_check = 0.0
        self._closing = False
        # The last call handed to the worker: SQLite work on the loop's thread waits for it.
        self._thread_job: Future[Any] | None = None
        # Whether the last commit group ran on the loop's thread (the gateway is under load).
        self._loaded = False
        self.heartbeat: Callable[[], None] = lambda: None

    @property
    def encoding(self) -> Encoding:
        return self._encoding

    # -- lifecycle -------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="outbox")
        try:
            await self._run(self._open)
        except BaseException:
            self._executor.shutdown(wait=True)
            raise
        self._writer = asyncio.create_task(self._write_loop(), name="outbox-writer")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._closing = True
        try:
            # Whatever put() is still waiting for gets committed before the file is closed.
            if self._writer is not None and not self._writer.done():
                await self.flush()
        finally:
            if self._writer is not None:
                self._writer.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._writer
            await self._run(self._close)
            assert self._executor is not None
            self._executor.shutdown(wait=True)

    async def _run(self, fn: Callable[[], _T]) -> _T:
        assert self._executor is not None
        job = self._thread_job = self._executor.submit(fn)
        return await asyncio.wrap_future(job)

    async def _run_here_if(self, here: bool, fn: Callable[[], _T]) -> _T:
        """``fn`` on the loop's thread when ``here``, else on the worker.

        Never both at once (one connection, one transaction at a time): on the loop's thread it
        first waits, blocking, for what the worker still has. Blocking, because an await would
        leave the loop busy and the worker starved of the GIL (see the module's docstring).
        """
        if not here:
            return await self._run(fn)
        while (job := self._thread_job) is not None and not job.done():
            if futures.wait([job], timeout=_BLOCK_FOR_WORKER_S).done:
                continue
            # A worker this slow is stuck on the disk, not starved: wait without blocking the
            # loop, which has other work (a local alarm output, say). A new job may have come.
            # Shielded: the job is another caller's, and this caller's cancellation is not its.
            with contextlib.suppress(Exception):
                await asyncio.shield(asyncio.wrap_future(job))
        return fn()

    def _open(self) -> None:
        try:
            self._path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutboxError(f"cannot create the directory of outbox {self._path}: {exc}") from exc
        try:
            self._db = self._connect()
        except sqlite3.DatabaseError as exc:
            if isinstance(exc, sqlite3.OperationalError) and "unable to open" in str(exc):
                raise OutboxError(f"cannot open outbox {self._path}: {exc}") from exc
            # A corrupt file is kept for inspection, never deleted; the gateway goes on with a
            # fresh outbox rather than refusing to forward anything ever again.
            stamp = int(self._clock())
            aside = self._path.with_name(f"{self._path.name}.corrupt-{stamp}")
            n = 0
            while aside.exists():
                # rename() would silently replace an earlier corrupt file from the same second.
                n += 1
                aside = self._path.with_name(f"{self._path.name}.corrupt-{stamp}-{n}")
            self._path.rename(aside)
            for suffix in ("-wal", "-shm"):
                side = self._path.with_name(self._path.name + suffix)
                if side.exists():
                    side.rename(aside.with_name(aside.name + suffix))
            log.error("outbox_corrupt", path=str(self._path), moved_to=str(aside), error=str(exc))
            self._db = self._connect()
        for lane_value, rows, nbytes in self._db.execute(
            "SELECT lane, COUNT(*), COALESCE(SUM(LENGTH(payload)), 0) FROM events GROUP BY lane"
        ):
            self._totals[Lane(lane_value)] = _LaneTotals(rows, nbytes)
        log.info(
            "outbox_opened",
            path=str(self._path),
            rows={lane.name.lower(): t.rows for lane, t in self._totals.items()},
        )

    def _connect(self) -> sqlite3.Connection:
        try:
            db = sqlite3.connect(
                self._path, isolation_level=None, check_same_thread=False, timeout=5.0
            )
        except sqlite3.OperationalError as exc:
            raise OutboxError(f"cannot open outbox {self._path}: {exc}") from exc
        try:
            # Checked before anything changes the file (journal mode included).
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise OutboxError(
                    f"outbox {self._path} has schema {version}, newer than this gateway's "
                    f"{SCHEMA_VERSION}: refusing to touch it"
                )
            db.execute("PRAGMA journal_mode=WAL")
            db.execute(f"PRAGMA synchronous={self._cfg.synchronous.upper()}")
            # Keeps the WAL from staying at its high-water mark after a burst.
            db.execute("PRAGMA journal_size_limit=16777216")
            db.execute(f"PRAGMA cache_size=-{_CACHE_KIB}")
            db.executescript(_SCHEMA)
            db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        except BaseException:
            db.close()
            raise
        return db

    def _close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    # -- producer side ---------------------------------------------------------------------

    async def put(self, event: Event) -> None:
        """Store an event durably; returns once it is committed."""
        await self.put_many([event])

    async def put_many(self, events: Iterable[Event], *, holding: int = 0) -> None:
        """Store events durably in one commit; returns once they are committed.

        ``holding``: how many upstream messages the caller leaves unacknowledged until this
        commit (the ChirpStack source acknowledges its broker's QoS 1 messages only then). Their
        sender cannot send more than its in-flight window, so a group holding many of them is
        committed without lingering for company that cannot come.
        """
        now_ms = int(self._clock() * 1000)
        encoding = self._encoding
        rows = [_Row(e.lane, e.kind, e.event_id, now_ms, encode(e, encoding)) for e in events]
        await self._submit(rows, holding)

    async def put_encoded(self, lane: Lane, kind: str, event_id: str, payload: bytes) -> None:
        """Store one already-encoded event durably (benchmarks use it to skip encoding)."""
        await self._submit([_Row(lane, kind, event_id, int(self._clock() * 1000), payload)])

    async def _submit(self, rows: list[_Row], holding: int = 0) -> None:
        if self._writer is None or self._writer.done():
            raise OutboxError(f"outbox {self._path} is not open")
        if not rows:
            return
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        urgent = any(row.lane is Lane.ALARM for row in rows)
        self._pending.append(_PendingPut(rows, done, holding, urgent))
        self._pending_rows += len(rows)
        self._pending_held += holding
        self._pending_urgent += urgent
        self._idle.clear()
        if not self._lingering or self._group_ready():
            self._wake.set()
        await done

    async def flush(self) -> None:
        """Wait until every put and ack so far is committed."""
        while self._pending or self._pending_acks or not self._idle.is_set():
            if self._writer is None or self._writer.done():
                raise OutboxError(f"outbox {self._path}: writer is not running")
            self._wake.set()
            await self._idle.wait()

    # -- consumer side (the uplink) --------------------------------------------------------

    async def fetch(self, limit: int, timeout_s: float | None = None) -> list[OutboxRow]:
        """The next rows not yet handed out, alarm lane first.

        Waits while there are none; after ``timeout_s`` returns an empty list so the caller's
        loop can report its heartbeat.
        """
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            self._ready.clear()
            cursor = dict(self._cursor)
            selected = await self._run_here_if(
                self._loaded, functools.partial(self._select, cursor, limit)
            )
            # Acked rows whose delete is not committed yet are stepped over, not waited on:
            # after a rewind() they can fill a whole page while newer rows are ready behind it.
            for row in selected:
                self._cursor[row.lane] = max(self._cursor[row.lane], row.seq)
            rows = [r for r in selected if r.seq not in self._acked]
            if rows:
                return rows
            if selected:
                continue
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return []
            try:
                async with asyncio.timeout(remaining):
                    await self._ready.wait()
            except TimeoutError:
                return []

    def ack(self, seqs: Iterable[int]) -> None:
        """The broker has the events with these seqs: delete them in the next commit."""
        seqs = list(seqs)
        self._acked.update(seqs)
        self._pending_acks.extend(seqs)
        self._acked_total += len(seqs)
        self._idle.clear()
        if not self._lingering:  # acks alone never end a linger
            self._wake.set()

    def rewind(self) -> None:
        """Hand out every unacknowledged row again (after the uplink lost its session)."""
        self._cursor = dict.fromkeys(Lane, 0)
        self._ready.set()

    def depth(self) -> int:
        """Rows stored and not yet acknowledged."""
        return sum(t.rows for t in self._totals.values())

    async def stats(self) -> OutboxStats:
        """Depth, oldest age and drops per lane."""
        oldest = await self._run(self._oldest)
        now_ms = self._clock() * 1000
        return OutboxStats(
            rows={lane.name.lower(): t.rows for lane, t in self._totals.items()},
            bytes={lane.name.lower(): t.bytes for lane, t in self._totals.items()},
            oldest_age_s={
                lane.name.lower(): None if ms is None else round(max(0.0, (now_ms - ms) / 1000), 3)
                for lane, ms in oldest.items()
            },
            drops=dict(self._drops),
            put_total=self._put_total,
            acked_total=self._acked_total,
        )

    # -- the writer ------------------------------------------------------------------------

    async def _write_loop(self) -> None:
        linger_s = self._cfg.commit_linger_ms / 1000
        while True:
            try:
                # asyncio.timeout, not wait_for: on Python 3.11 wait_for returns the inner result
                # when it completes in the same loop turn as a cancel, and the cancel is lost.
                async with asyncio.timeout(1.0):
                    await self._wake.wait()
            except TimeoutError:
                self.heartbeat()
                if not self._pending and not self._pending_acks:
                    self._idle.set()
                    await self._run(self._expire_if_due)
                    continue
            self.heartbeat()
            self._wake.clear()
            # Linger only while the group is small: rows that piled up while the previous commit
            # ran are a good group already (a producer awaiting put() adds nothing until it
            # commits), so waiting would only add latency. A small group waits up to linger_s
            # for company; an alarm, closing, the group reaching _LINGER_BELOW_ROWS, or it holding
            # half the senders' window of upstream messages (the sender waits for us) ends it.
            deadline = time.monotonic() + linger_s
            self._lingering = True
            try:
                while not self._group_ready() and (remaining := deadline - time.monotonic()) > 0:
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(remaining):
                            await self._wake.wait()
                    self._wake.clear()
            finally:
                self._lingering = False
            batch = self._take_batch()
            acks, self._pending_acks = self._pending_acks, []
            self._loaded = sum(len(put.rows) for put in batch) >= _INLINE_ROWS
            try:
                inserted = await self._run_here_if(
                    self._loaded, functools.partial(self._commit, batch, acks)
                )
            except (sqlite3.Error, OSError) as exc:
                error = OutboxError(f"outbox {self._path}: commit failed: {exc}")
                log.error("outbox_commit_failed", path=str(self._path), error=str(exc))
                for item in batch:
                    if not item.done.done():
                        item.done.set_exception(error)
                # The acks are not lost: the rows stay and are redelivered, as at-least-once allows.
                self._acked.difference_update(acks)
                self._wake.set()
                continue
            self._acked.difference_update(acks)
            self._put_total += sum(len(put.rows) for put in batch)
            for item in batch:
                if not item.done.done():
                    item.done.set_result(None)
            if inserted:
                self._ready.set()
            if self._pending or self._pending_acks:
                self._wake.set()
            else:
                self._idle.set()

    def _group_ready(self) -> bool:
        """Whether the pending group commits now rather than lingering for company."""
        return bool(
            self._closing
            or self._pending_urgent
            or self._pending_rows >= _LINGER_BELOW_ROWS
            or self._pending_held >= self._linger_below_held
        )

    def _take_batch(self) -> list[_PendingPut]:
        # A put_many is never split across commits, so its single future is honest.
        taken = 0
        count = 0
        for put in self._pending:
            if count and taken + len(put.rows) > self._cfg.max_commit_rows:
                break
            taken += len(put.rows)
            count += 1
        batch = self._pending[:count]
        del self._pending[:count]
        for put in batch:
            self._pending_rows -= len(put.rows)
            self._pending_held -= put.holding
            self._pending_urgent -= put.urgent
        return batch

    def _commit(self, batch: list[_PendingPut], acks: list[int]) -> bool:
        db = self._db
        assert db is not None
        db.execute("BEGIN IMMEDIATE")
        try:
            # Chunked: some SQLite builds allow only 999 host parameters per statement.
            for chunk in _chunks(acks, _ACK_CHUNKS):
                for lane_value, size in db.execute(
                    f"DELETE FROM events WHERE seq IN ({','.join('?' * len(chunk))}) "  # noqa: S608 -- only placeholders are interpolated
                    "RETURNING lane, LENGTH(payload)",
                    chunk,
                ).fetchall():
                    totals = self._totals[Lane(lane_value)]
                    totals.rows -= 1
                    totals.bytes -= size
            rows = [row for put in batch for row in put.rows]
            # Many rows per statement, not executemany's one step per row: the sqlite3 module
            # releases and re-takes the GIL around every step, and re-taking it waits for the
            # event loop thread (up to the 5 ms switch interval) each time.
            for inserting in _chunks(rows, _INSERT_CHUNKS):
                params = [
                    value
                    for r in inserting
                    for value in (int(r.lane), r.kind, r.event_id, r.created_ms, r.payload)
                ]
                db.execute(_insert_sql(len(inserting)), params)
            if rows:
                for row in rows:
                    totals = self._totals[row.lane]
                    totals.rows += 1
                    totals.bytes += len(row.payload)
                self._enforce_bounds(db)
            self._expire_if_due(db, in_transaction=True)
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            self._reload_totals(db)
            raise
        return bool(rows)

    def _reload_totals(self, db: sqlite3.Connection) -> None:
        self._totals = {lane: _LaneTotals() for lane in Lane}
        for lane_value, rows, nbytes in db.execute(
            "SELECT lane, COUNT(*), COALESCE(SUM(LENGTH(payload)), 0) FROM events GROUP BY lane"
        ):
            self._totals[Lane(lane_value)] = _LaneTotals(rows, nbytes)

    def _over_bounds(self) -> str | None:
        rows = sum(t.rows for t in self._totals.values())
        nbytes = sum(t.bytes for t in self._totals.values())
        if rows > self._cfg.max_rows:
            return "full_rows"
        if nbytes > self._cfg.max_bytes:
            return "full_bytes"
        return None

    def _enforce_bounds(self, db: sqlite3.Connection) -> None:
        # Telemetry goes first; the alarm lane is only cut into when no telemetry is left, so an
        # alarm is never lost to make room for telemetry.
        for lane in (Lane.TELEMETRY, Lane.ALARM):
            while (reason := self._over_bounds()) is not None and self._totals[lane].rows > 0:
                excess_rows = max(
                    0, sum(t.rows for t in self._totals.values()) - self._cfg.max_rows
                )
                excess_bytes = max(
                    0, sum(t.bytes for t in self._totals.values()) - self._cfg.max_bytes
                )
                candidates = db.execute(
                    "SELECT seq, LENGTH(payload) FROM events WHERE lane = ? ORDER BY seq LIMIT ?",
                    (int(lane), _EVICT_CHUNK),
                ).fetchall()
                last_seq = candidates[-1][0]
                freed_bytes = 0
                for freed_rows, (seq, size) in enumerate(candidates, start=1):
                    freed_bytes += size
                    last_seq = seq
                    if freed_rows >= excess_rows and freed_bytes >= excess_bytes:
                        break
                self._evict(db, lane, "seq <= ?", (last_seq,), reason)

    def _evict(
        self, db: sqlite3.Connection, lane: Lane, where: str, args: tuple[int, ...], reason: str
    ) -> None:
        deleted = db.execute(
            f"DELETE FROM events WHERE lane = ? AND {where} RETURNING LENGTH(payload)",  # noqa: S608 -- fixed clauses only
            (int(lane), *args),
        ).fetchall()
        if not deleted:
            return
        totals = self._totals[lane]
        totals.rows -= len(deleted)
        totals.bytes -= sum(size for (size,) in deleted)
        key = f"{lane.name.lower()}_{reason}"
        self._drops[key] += len(deleted)
        log.warning("outbox_dropped", lane=lane.name.lower(), reason=reason, n=len(deleted))

    def _expire_if_due(
        self, db: sqlite3.Connection | None = None, *, in_transaction: bool = False
    ) -> None:
        now = self._clock()
        if now - self._last_age_check < _AGE_CHECK_INTERVAL_S:
            return
        self._last_age_check = now
        db = db or self._db
        assert db is not None
        cutoff_ms = int((now - self._cfg.max_age_s) * 1000)
        # Alarms do not expire: an old alarm is still an alarm the platform has not seen.
        if self._totals[Lane.TELEMETRY].rows == 0:
            return
        if in_transaction:
            self._evict(db, Lane.TELEMETRY, "created_ms < ?", (cutoff_ms,), "expired")
            return
        db.execute("BEGIN IMMEDIATE")
        try:
            self._evict(db, Lane.TELEMETRY, "created_ms < ?", (cutoff_ms,), "expired")
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            self._reload_totals(db)
            raise

    def _select(self, cursor: dict[Lane, int], limit: int) -> list[OutboxRow]:
        db = self._db
        assert db is not None
        rows: list[OutboxRow] = []
        for lane in Lane:
            if len(rows) >= limit:
                break
            for seq, kind, event_id, created_ms, payload in db.execute(
                "SELECT seq, kind, event_id, created_ms, payload FROM events "
                "WHERE lane = ? AND seq > ? ORDER BY seq LIMIT ?",
                (int(lane), cursor[lane], limit - len(rows)),
            ):
                rows.append(OutboxRow(seq, lane, kind, event_id, created_ms, payload))
        return rows

    def _oldest(self) -> dict[Lane, int | None]:
        db = self._db
        assert db is not None
        out: dict[Lane, int | None] = {}
        for lane in Lane:
            row = db.execute(
                "SELECT created_ms FROM events WHERE lane = ? ORDER BY seq LIMIT 1", (int(lane),)
            ).fetchone()
            out[lane] = None if row is None else int(row[0])
        return out
