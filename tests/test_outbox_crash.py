"""Crash safety: what put() confirmed survives SIGKILL at an arbitrary point.

A child process writes to a real outbox from several concurrent tasks and prints every event id
only after its put() returned. The parent kills it with SIGKILL at a seeded random point, then
checks the file: every confirmed id is there, the database is intact, and a put_many is all or
nothing even when the kill lands in the middle of its transaction.
"""

from __future__ import annotations

import asyncio
import os
import random
import select
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import gateway
from gateway.config import OutboxSection
from gateway.outbox import Outbox
from gateway.wire import Encoding, decode

REPO = Path(gateway.__file__).resolve().parent.parent

CHILD = r"""
import asyncio
import logging
import random
import sys
from datetime import UTC, datetime
from pathlib import Path

import structlog

# stdout carries the protocol; the outbox's own log lines go to stderr.
structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))

from gateway.config import OutboxSection
from gateway.outbox import Outbox
from gateway.types import Event, Measurement, Severity
from gateway.wire import Encoding

path, seed, mode, synchronous, linger_ms = sys.argv[1:6]
seed = int(seed)


def emit(tag, ids=()):
    # One write per line, well under PIPE_BUF, flushed before the next put starts.
    sys.stdout.write(" ".join((tag, *ids)) + "\n")
    sys.stdout.flush()


def make(task, i, severity):
    return Event(
        kind="reading" if severity is Severity.INFO else "pool_safety",
        device=f"dev-{task}",
        ts=datetime.now(UTC),
        severity=severity,
        values=(Measurement("task", task), Measurement("i", i), Measurement("v", i * 0.5, "cm")),
    )


async def single(outbox, task, severity):
    for i in range(10**9):
        event = make(task, i, severity)
        await outbox.put(event)
        emit("P", [event.event_id])


async def many(outbox, task):
    rng = random.Random(seed * 1000 + task)
    for i in range(10**9):
        events = [
            make(task, i * 100 + j, Severity.ALARM if rng.random() < 0.2 else Severity.INFO)
            for j in range(rng.randint(1, 40))
        ]
        await outbox.put_many(events)
        emit("P", [e.event_id for e in events])


async def acker(outbox):
    rng = random.Random(seed)
    while True:
        rows = await outbox.fetch(rng.randint(1, 60))
        # Announced before ack(): from here on the row may or may not be deleted.
        emit("A", [row.event_id for row in rows])
        outbox.ack(row.seq for row in rows)


async def big(outbox):
    for i in range(5):
        event = make(0, i, Severity.INFO)
        await outbox.put(event)
        emit("P", [event.event_id])
    events = [make(1, i, Severity.INFO) for i in range(10_000)]
    emit("B", [events[0].event_id, events[-1].event_id])
    await outbox.put_many(events)
    emit("D")
    await asyncio.Event().wait()


async def main():
    cfg = OutboxSection(commit_linger_ms=float(linger_ms), synchronous=synchronous)
    async with Outbox(Path(path), cfg, encoding=Encoding.CBOR) as outbox:
        emit("READY")
        async with asyncio.TaskGroup() as tg:
            if mode == "big":
                tg.create_task(big(outbox))
                return
            for task in range(6):
                tg.create_task(single(outbox, task, Severity.INFO))
            for task in range(6, 8):
                tg.create_task(single(outbox, task, Severity.CRITICAL))
            for task in range(8, 12):
                tg.create_task(many(outbox, task))
            if mode == "ack":
                tg.create_task(acker(outbox))


asyncio.run(main())
"""

DEADLINE_S = 20.0


class Child:
    """The writer process, its stdout read line by line without threads (select + os.read)."""

    def __init__(self, tmp_path: Path, db: Path, *args: str) -> None:
        script = tmp_path / "child.py"
        script.write_text(CHILD)
        self.stderr_path = tmp_path / "child.stderr"
        # The child imports the same gateway package as this test run.
        paths = [str(REPO), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}
        with self.stderr_path.open("wb") as stderr:
            self.proc = subprocess.Popen(
                [sys.executable, str(script), str(db), *args],
                stdout=subprocess.PIPE,
                stderr=stderr,
                env=env,
                cwd=tmp_path,
            )
        assert self.proc.stdout is not None
        self.fd = self.proc.stdout.fileno()
        self.buffer = b""
        self.deadline = time.monotonic() + DEADLINE_S

    def _fill(self, timeout: float) -> bool:
        """Read what is available within timeout; False at end of stream."""
        ready, _, _ = select.select([self.fd], [], [], max(0.0, timeout))
        if not ready:
            return True
        chunk = os.read(self.fd, 1 << 16)
        self.buffer += chunk
        return bool(chunk)

    def lines(self, *, block: bool = True) -> Iterator[tuple[str, list[str]]]:
        """Complete lines as (tag, ids); partial trailing lines are left for later."""
        while True:
            while b"\n" in self.buffer:
                line, self.buffer = self.buffer.split(b"\n", 1)
                tag, *ids = line.decode().split()
                yield tag, ids
            if not block:
                if not self._fill(0):
                    return
                if b"\n" not in self.buffer:
                    return
                continue
            remaining = self.deadline - time.monotonic()
            if remaining <= 0:
                self.kill()
                pytest.fail(f"child too slow; stderr:\n{self.stderr()}")
            if not self._fill(remaining) and b"\n" not in self.buffer:
                pytest.fail(f"child exited {self.proc.wait()}; stderr:\n{self.stderr()}")

    def stderr(self) -> str:
        return self.stderr_path.read_text()[-4000:]

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)
        assert self.proc.returncode == -signal.SIGKILL

    def rest(self) -> Iterator[tuple[str, list[str]]]:
        """After the kill: the complete lines the child managed to write before it died."""
        deadline = time.monotonic() + 10
        while self._fill(deadline - time.monotonic()) and time.monotonic() < deadline:
            pass
        yield from self.lines(block=False)


def check_file(db: Path) -> dict[str, bytes]:
    """Integrity check, then every row as event_id -> payload (ids must be unique)."""
    con = sqlite3.connect(db)
    try:
        assert con.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        rows = con.execute("SELECT event_id, payload FROM events ORDER BY seq").fetchall()
    finally:
        con.close()
    stored = dict(rows)
    assert len(stored) == len(rows), "an event was stored twice"
    return stored


# Each kill point: seed, mode, synchronous, commit_linger_ms.
KILL_POINTS = [
    (11, "put", "full", 0),
    (12, "put", "full", 5),
    (13, "put", "normal", 2),
    (14, "ack", "full", 0),
    (15, "ack", "normal", 5),
]


@pytest.mark.parametrize(
    ("seed", "mode", "synchronous", "linger_ms"),
    KILL_POINTS,
    ids=[f"{m}-{s}-linger{lg}-seed{sd}" for sd, m, s, lg in KILL_POINTS],
)
def test_every_confirmed_put_survives_sigkill(
    tmp_path: Path, seed: int, mode: str, synchronous: str, linger_ms: int
) -> None:
    db = tmp_path / "outbox.sqlite3"
    kill_after = random.Random(seed).randint(200, 2000)
    child = Child(tmp_path, db, str(seed), mode, synchronous, str(linger_ms))
    put: list[str] = []
    acked: set[str] = set()
    try:
        for tag, ids in child.lines():
            if tag == "P":
                put.extend(ids)
            elif tag == "A":
                acked.update(ids)
            if len(put) >= kill_after:
                break
    finally:
        child.kill()
    for tag, ids in child.rest():
        if tag == "P":
            put.extend(ids)
        elif tag == "A":
            acked.update(ids)
    assert len(put) >= kill_after
    assert len(set(put)) == len(put)

    stored = check_file(db)
    must_survive = set(put) - acked
    missing = must_survive - stored.keys()
    assert not missing, f"{len(missing)} of {len(must_survive)} confirmed events lost"
    if mode == "ack":
        assert acked, "the acking task never ran"
    for event_id, payload in stored.items():
        assert decode(payload, Encoding.CBOR).event_id == event_id

    # The gateway itself reopens the crashed file and hands out exactly what is stored.
    async def redeliver() -> list[str]:
        async with Outbox(db, OutboxSection(), encoding=Encoding.CBOR) as outbox:
            assert outbox.depth() == len(stored)
            out: list[str] = []
            while rows := await outbox.fetch(5000, timeout_s=0):
                out.extend(r.event_id for r in rows)
            return out

    fetched = asyncio.run(asyncio.wait_for(redeliver(), 30))
    assert sorted(fetched) == sorted(stored)


@pytest.mark.parametrize(
    "fraction", [0.1, 0.5, 0.9, None], ids=["wal10%", "wal50%", "wal90%", "after-return"]
)
def test_put_many_is_all_or_nothing_when_killed_mid_commit(
    tmp_path: Path, fraction: float | None
) -> None:
    """SIGKILL while the 10k-row transaction is being written to the WAL.

    The parent watches the WAL file grow (it only grows while SQLite writes the transaction's
    pages) and kills the child once a fraction of the expected growth is there. If put_many were
    split into several commits (max_commit_rows is 2000), a kill past the first would leave a
    partial batch behind. ``None``: killed after put_many returned, so all 10k must be there.
    """
    expected_growth = _wal_growth_of_a_10k_put_many(tmp_path / "calibrate")
    db = tmp_path / "outbox.sqlite3"
    wal = db.with_name(db.name + "-wal")
    child = Child(tmp_path, db, "7", "big", "full", "0")
    first: list[str] = []
    batch: list[str] = []
    done = False
    try:
        for tag, ids in child.lines():
            if tag == "P":
                first.extend(ids)
            elif tag == "B":
                batch = ids
                break
        baseline = wal.stat().st_size
        if fraction is None:
            done = any(tag == "D" for tag, _ in child.lines())
        else:
            target = baseline + int(fraction * expected_growth)
            # Spin on the WAL's size: the one outside sign that the commit is under way.
            while wal.stat().st_size < target and not done:
                for tag, _ in child.lines(block=False):
                    done = done or tag == "D"
                if time.monotonic() > child.deadline:
                    pytest.fail(f"WAL never grew to {target}; stderr:\n{child.stderr()}")
    finally:
        child.kill()
    done = done or any(tag == "D" for tag, _ in child.rest())

    stored = check_file(db)
    assert set(first) <= stored.keys()
    batch_rows = [
        eid for eid, payload in stored.items() if decode(payload, Encoding.CBOR).device == "dev-1"
    ]
    assert len(batch_rows) in (0, 10_000), f"put_many half stored: {len(batch_rows)} rows"
    if batch_rows:
        assert batch[0] in stored
        assert batch[1] in stored
    if done:
        assert len(batch_rows) == 10_000
    if fraction is not None and fraction <= 0.5:
        # Otherwise this case would not have tested a kill inside the transaction at all.
        assert not done, "the kill landed after put_many returned"


_calibrated: dict[str, int] = {}


def _wal_growth_of_a_10k_put_many(directory: Path) -> int:
    """How many bytes the child's 10k-row put_many adds to the WAL (measured in process)."""
    if "growth" in _calibrated:
        return _calibrated["growth"]
    from datetime import UTC, datetime

    from gateway.types import Event, Measurement, Severity

    def make(task: int, i: int) -> Event:
        return Event(
            kind="reading",
            device=f"dev-{task}",
            ts=datetime.now(UTC),
            severity=Severity.INFO,
            values=(
                Measurement("task", task),
                Measurement("i", i),
                Measurement("v", i * 0.5, "cm"),
            ),
        )

    async def measure() -> int:
        db = directory / "outbox.sqlite3"
        cfg = OutboxSection(commit_linger_ms=0)
        async with Outbox(db, cfg, encoding=Encoding.CBOR) as outbox:
            for i in range(5):
                await outbox.put(make(0, i))
            before = db.with_name(db.name + "-wal").stat().st_size
            await outbox.put_many([make(1, i) for i in range(10_000)])
            return db.with_name(db.name + "-wal").stat().st_size - before

    _calibrated["growth"] = asyncio.run(asyncio.wait_for(measure(), 30))
    assert _calibrated["growth"] > 500_000
    return _calibrated["growth"]
