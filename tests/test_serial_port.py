"""The serial port layer on real pseudo-terminals: open, faults and their messages, hot-plug.

socat makes the pty pairs (``tests.support.socat``); unplugging stops socat, which removes the
links the way udev removes a ``/dev/serial/by-id`` link, and replugging starts a new pair under
the same names, on other ``/dev/pts/N`` nodes.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import grp
import itertools
import os
import pwd
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from drivers.serial_port import (
    PortLostError,
    PortProblemError,
    PortSupervisor,
    SerialSettings,
    classify,
    open_port,
    port_problem,
)
from gateway.types import Event, Severity
from tests.support.collect import Collector
from tests.support.privileges import run_as_nobody
from tests.support.socat import PtyPair, require_socat


def fast(port: Path | str, **kw: float) -> SerialSettings:
    return SerialSettings(str(port), reopen_min_s=0.05, reopen_max_s=0.5, **kw)


def values(event: Event) -> dict[str, object]:
    return {m.name: m.value for m in event.values}


async def read_exactly(fd: int, n: int) -> bytes:
    data = b""
    async with asyncio.timeout(5):
        while len(data) < n:
            data += await asyncio.to_thread(os.read, fd, n - len(data))
    return data


# -- opening -------------------------------------------------------------------------------------


async def test_open_reads_and_writes(pty_pair: PtyPair) -> None:
    reader, writer = await open_port(fast(pty_pair.sensor))
    sim = pty_pair.open_sim()
    try:
        os.write(sim, b"hello\r\n")
        async with asyncio.timeout(5):
            assert await reader.readuntil(b"\n") == b"hello\r\n"
        writer.write(b"0M!")
        await writer.drain()
        assert await read_exactly(sim, 3) == b"0M!"
        # The pyserial object is there for modem lines and break (SDI-12 wakes sensors so).
        assert writer.transport.get_extra_info("serial") is not None
    finally:
        writer.close()
        os.close(sim)


async def test_large_writes_are_buffered_and_drained_then_a_lost_port_fails_them(
    pty_pair: PtyPair,
) -> None:
    # More than the pty holds: the transport buffers, pauses the writer and resumes it as the
    # far end reads (what a Modbus or SDI-12 master's drain() relies on).
    reader, writer = await open_port(fast(pty_pair.sensor))
    sim = pty_pair.open_sim()
    payload = bytes(range(256)) * 1024
    try:
        received = asyncio.create_task(read_exactly(sim, len(payload)))
        writer.write(payload)
        assert writer.transport.get_write_buffer_size() > 0
        async with asyncio.timeout(10):
            await writer.drain()
            assert await received == payload
        assert writer.transport.get_write_buffer_size() == 0
    finally:
        os.close(sim)
    await asyncio.to_thread(pty_pair.unplug)
    with pytest.raises(PortLostError):
        async with asyncio.timeout(10):
            await reader.read(1024)
    writer.write(b"ignored after the loss")
    with pytest.raises(OSError):
        await writer.drain()
    writer.close()


async def test_a_second_open_is_busy(pty_pair: PtyPair) -> None:
    _reader, writer = await open_port(fast(pty_pair.sensor))
    try:
        with pytest.raises(PortProblemError) as caught:
            await open_port(fast(pty_pair.sensor))
    finally:
        writer.close()
    assert caught.value.kind == "busy"
    assert str(pty_pair.sensor) in str(caught.value)
    assert "busy" in str(caught.value)
    # Closing releases the port at once (no executor, no background task in between).
    _reader, writer = await open_port(fast(pty_pair.sensor))
    writer.close()


async def test_a_regular_file_is_not_a_serial_device(tmp_path: Path) -> None:
    path = tmp_path / "ttyUSB0"
    path.write_text("not a tty")
    assert (problem := port_problem(str(path))) is not None
    assert problem.kind == "not_a_tty"
    with pytest.raises(PortProblemError) as caught:
        await open_port(fast(path))
    assert caught.value.kind == "not_a_tty"
    assert f"{path} is not a serial device" in str(caught.value)


async def test_a_character_device_that_is_not_a_tty() -> None:
    assert port_problem("/dev/null") is None  # a character device, readable: looks usable
    with pytest.raises(PortProblemError) as caught:
        await open_port(fast("/dev/null"))
    assert caught.value.kind == "not_a_tty"
    assert "/dev/null is not a serial device" in str(caught.value)


async def test_a_missing_port(tmp_path: Path) -> None:
    path = tmp_path / "by-id" / "usb-FTDI_FT232R-if00-port0"
    with pytest.raises(PortProblemError) as caught:
        await open_port(fast(path))
    assert caught.value.kind == "missing"
    assert f"serial port {path} does not exist" in str(caught.value)
    assert "/dev/serial/by-id/" in str(caught.value)


def test_eperm_from_the_unit_device_policy_is_named() -> None:
    # systemd's DevicePolicy=closed refuses open() with EPERM although the mode allows it; only
    # the exception is made up here (it needs a cgroup), the port is a real tty.
    require_socat()
    with tempfile.TemporaryDirectory() as tmp, PtyPair(Path(tmp)) as pair:
        refusal = PermissionError(errno.EPERM, "Operation not permitted")
        problem = classify(str(pair.sensor), refusal)
    assert problem.kind == "device_policy"
    assert "DeviceAllow=" in str(problem)


# -- permission, checked as an unprivileged user -------------------------------------------------


@contextlib.contextmanager
def refused(pair: PtyPair) -> Iterator[tuple[Callable[[Callable[[], str]], str], str, str]]:
    """A way to run code that the port's permissions refuse: (runner, user, group).

    As root: the device is given group dialout (as udev does for ttyUSB) and the code runs as
    nobody in a child. Otherwise: the device (ours, socat runs as us) is made mode 000.
    """
    node = Path(os.path.realpath(pair.sensor))
    if os.geteuid() == 0:
        os.chown(node, -1, grp.getgrnam("dialout").gr_gid)
        node.chmod(0o660)
        yield run_as_nobody, "nobody", "dialout"
        return
    st = node.stat()
    node.chmod(0)
    try:
        user = pwd.getpwuid(os.geteuid()).pw_name
        yield (lambda fn: fn()), user, grp.getgrgid(st.st_gid).gr_name
    finally:
        node.chmod(st.st_mode)


@pytest.fixture
def shared_pty_pair() -> Iterator[PtyPair]:
    """A pty pair whose links are in a directory every user may search (not pytest's 0700)."""
    require_socat()
    with tempfile.TemporaryDirectory(prefix="edge-gateway-pty-") as tmp:
        Path(tmp).chmod(0o755)
        with PtyPair(Path(tmp)) as pair:
            yield pair


def test_permission_denied_names_the_port_the_user_and_the_fix(shared_pty_pair: PtyPair) -> None:
    port = str(shared_pty_pair.sensor)

    def check() -> str:
        problem = port_problem(port)
        assert problem is not None
        try:
            import serial

            from drivers.serial_port import _open_serial

            _open_serial(SerialSettings(port)).close()
        except (OSError, serial.SerialException) as exc:
            opened = classify(port, exc)
        else:
            return "opened?!"
        return f"{problem.kind}|{problem}|{opened.kind}|{opened}"

    with refused(shared_pty_pair) as (run, user, group):
        output = run(check)
    kind, message, open_kind, open_message = output.split("|")
    assert kind == open_kind == "permission"
    assert message == open_message
    assert f"permission denied on serial port {port} for user {user}" in message
    assert f"usermod -aG {group} {user}" in message


# -- hot-plug ------------------------------------------------------------------------------------


async def test_unplug_and_replug_under_another_device_node(pty_pair: PtyPair) -> None:
    supervisor = PortSupervisor("ws", "ws-1", fast(pty_pair.sensor))
    got = Collector()
    sessions = 0

    async def session(reader: asyncio.StreamReader, _writer: asyncio.StreamWriter) -> None:
        nonlocal sessions
        sessions += 1
        while await reader.read(1024):
            pass

    first_node = pty_pair.device_node()
    # Holding a pty keeps the old node number taken: the new pair gets another, like a USB
    # adapter that comes back as ttyUSB1 behind the same /dev/serial/by-id link.
    spare_master, spare_slave = os.openpty()
    async with asyncio.TaskGroup() as tg:
        task = tg.create_task(supervisor.run(session, got.emit, got.report_error))
        async with asyncio.timeout(10):
            await supervisor.opened.wait()
        assert supervisor.status.state == "open"
        assert got.items == []

        await asyncio.to_thread(pty_pair.unplug)
        await got.wait_for(lambda: len(got.events("serial_lost")) == 1)
        lost = got.events("serial_lost")[0]
        assert lost.severity is Severity.WARNING
        assert values(lost)["port"] == str(pty_pair.sensor)
        assert supervisor.status.state in ("lost", "missing")
        assert ("serial_lost" in got.error_kinds()) is True

        os.close(spare_master)
        os.close(spare_slave)
        spare_master, spare_slave = os.openpty()
        await asyncio.to_thread(pty_pair.replug)
        # The bound: restored within 10 s of the adapter coming back.
        await got.wait_for(lambda: len(got.events("serial_restored")) == 1, timeout=10)
        assert pty_pair.device_node() != first_node
        restored = got.events("serial_restored")[0]
        down_for = values(restored)["down_for"]
        assert isinstance(down_for, float) and 0 < down_for < 10
        assert supervisor.status.state == "open" and supervisor.status.problem is None
        assert supervisor.opens == 2 and supervisor.losses == 1
        assert sessions == 2
        task.cancel()
    os.close(spare_master)
    os.close(spare_slave)
    # One lost, one restored: the re-open attempts in between add no events.
    assert [e.kind for e in got.events()] == ["serial_lost", "serial_restored"]


async def test_a_port_missing_at_start_is_reported_once_and_found_later(tmp_path: Path) -> None:
    require_socat()
    pair = PtyPair(tmp_path / "late")
    supervisor = PortSupervisor("ws", "ws-1", fast(pair.sensor))
    got = Collector()

    async def session(reader: asyncio.StreamReader, _writer: asyncio.StreamWriter) -> None:
        while await reader.read(1024):
            pass

    try:
        async with asyncio.TaskGroup() as tg:
            task = tg.create_task(supervisor.run(session, got.emit, got.report_error))
            await got.wait_for(lambda: len(got.events("serial_lost")) == 1)
            assert values(got.events("serial_lost")[0])["problem"] == "missing"
            # Several re-open attempts (50 ms doubling to 0.5 s) fail the same way ...
            await got.wait_for(lambda: supervisor.summary()["for_s"] >= 1.0)
            assert supervisor.status.state == "missing"
            assert "does not exist" in (supervisor.status.problem or "")
            # ... and were reported once: a sensor missing for a week is one log line.
            assert got.error_kinds() == ["serial_missing"]
            await asyncio.to_thread(pair.start)
            await got.wait_for(lambda: len(got.events("serial_restored")) == 1)
            task.cancel()
    finally:
        pair.stop()


async def test_cancelling_closes_the_port_at_once(pty_pair: PtyPair) -> None:
    supervisor = PortSupervisor("ws", "ws-1", fast(pty_pair.sensor))
    got = Collector()

    async def session(reader: asyncio.StreamReader, _writer: asyncio.StreamWriter) -> None:
        await reader.read(1024)

    task = asyncio.create_task(supervisor.run(session, got.emit, got.report_error))
    async with asyncio.timeout(10):
        await supervisor.opened.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    # The exclusive lock went with the port: a new open succeeds right away.
    _reader, writer = await open_port(fast(pty_pair.sensor))
    writer.close()


async def test_a_session_that_returns_ends_the_supervision(pty_pair: PtyPair) -> None:
    supervisor = PortSupervisor("ws", "ws-1", fast(pty_pair.sensor))
    got = Collector()
    sim = pty_pair.open_sim()

    async def session(reader: asyncio.StreamReader, _writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\n")

    try:
        task = asyncio.create_task(supervisor.run(session, got.emit, got.report_error))
        async with asyncio.timeout(10):
            await supervisor.opened.wait()
            os.write(sim, b"done\n")
            await task
    finally:
        os.close(sim)
    assert got.items == [] and got.errors == []
    assert not supervisor.opened.is_set()


async def test_a_port_that_fails_at_once_backs_off(pty_pair: PtyPair) -> None:
    # A session that fails right after each open (a flapping adapter): the waits double up to
    # reopen_max_s instead of opening and failing in a tight loop.
    supervisor = PortSupervisor("ws", "ws-1", fast(pty_pair.sensor))
    got = Collector()
    opened_at: list[float] = []

    async def session(_reader: asyncio.StreamReader, _writer: asyncio.StreamWriter) -> None:
        opened_at.append(asyncio.get_running_loop().time())
        raise PortLostError(errno.EIO, "read failed: Input/output error")

    async with asyncio.TaskGroup() as tg:
        task = tg.create_task(supervisor.run(session, got.emit, got.report_error))
        await got.wait_for(lambda: len(opened_at) >= 5)
        task.cancel()
    waits = [b - a for a, b in itertools.pairwise(opened_at)]
    # Jitter takes the wait to between half and all of 0.05, 0.1, 0.2, 0.4 s.
    assert waits[-1] >= 0.2 > waits[0]
    assert supervisor.losses >= 4
    assert all(values(e)["problem"] == "lost" for e in got.events("serial_lost"))
