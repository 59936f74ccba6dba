"""drivers.jsworker: real worker processes running real QuickJS, with decoders written here."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import resource
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest

from drivers.jscodec import DecoderReportedError, JsCodec
from drivers.jsworker import JsWorker, WorkerStartError
from gateway.app import Gateway
from gateway.config import config_from_dict
from gateway.errors import CodecError
from gateway.wire import Encoding, decode

REPO = Path(__file__).parent.parent
# A hang guard, not a timing check: a call that is cut at its deadline (150 ms by default) returns
# long before this; one that is not cut would run for many seconds (regex) or forever.
HANG_GUARD_S = 5.0

# Exercises the input (bytes, fPort, recvTime, variables), floats, strings and warnings.
CLIMATE = r"""
function decodeUplink(input) {
  var b = input.bytes;
  if (input.fPort !== 1) {
    return {errors: ["unknown fPort " + input.fPort], warnings: ["checked the port"],
            data: {port: input.fPort}};
  }
  var t = ((b[0] << 8 | b[1]) << 16 >> 16) / 100;
  var out = {data: {temperature: t, humidity: b[2] / 2, site: input.variables.site || null,
                    seen: input.recvTime, label: "Füllstand \u2028 ok", raw: b}};
  if (b[2] < 20) { out.warnings = ["dry air"]; }
  return out;
}
"""

# Byte 0 chooses the behaviour, so one worker can hang and then decode normally.
MISBEHAVES = r"""
function decodeUplink(input) {
  var mode = input.bytes[0];
  if (mode === 1) {
    // Catastrophic backtracking: QuickJS never polls its interrupt handler inside one regex.
    return {data: {match: /^(a+)+$/.test("a".repeat(40) + "b")}};
  }
  if (mode === 2) {
    // Heavy native work per iteration: the handler is polled only every 10,000 calls or jumps.
    var s = "a".repeat(1 << 22);
    var n = 0;
    for (;;) { n += s.indexOf("b"); }
  }
  if (mode === 3) { for (;;) {} }  // a plain loop: QuickJS's own limit stops it
  if (mode === 4) { throw new RangeError("frame type " + input.bytes[1] + " unsupported"); }
  if (mode === 5) { return 42; }
  return {data: {mode: mode}};
}
"""


def frames() -> list[tuple[int, bytes]]:
    return [(1, bytes.fromhex("0866 6f".replace(" ", ""))), (1, bytes.fromhex("fe0c10")), (2, b"")]


def child_pids() -> set[int]:
    """This process's children, including zombies that nobody reaped."""
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # exited while we looked
        # The command name is in parentheses and may contain spaces: split after it.
        ppid = int(stat.rpartition(")")[2].split()[1])
        if ppid == os.getpid():
            found.add(int(entry.name))
    return found


@pytest.fixture
def no_leftover_children() -> Iterator[None]:
    before = child_pids()
    yield
    assert child_pids() - before == set()


def wait_exited(pid: int, timeout_s: float) -> None:
    """Wait until ``pid`` has exited (without reaping it), or fail."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        ready, _, _ = select.select([fd], [], [], timeout_s)
        assert ready, f"process {pid} still runs after {timeout_s} s"
    finally:
        os.close(fd)


def call_time(worker: JsWorker, fport: int, payload: bytes) -> tuple[CodecError, float]:
    started = time.monotonic()
    with pytest.raises(CodecError) as caught:
        worker.decode_uplink(fport, payload)
    return caught.value, time.monotonic() - started


# --- Same results as in process


def test_results_equal_the_in_process_codec(no_leftover_children: None) -> None:
    local = JsCodec(CLIMATE, "climate.js")
    recv = datetime(2024, 5, 6, 9, 8, 9, 500000, tzinfo=UTC)
    with JsWorker(CLIMATE, "climate.js") as worker:
        assert worker.entry_point == "decodeUplink"
        for fport, payload in frames()[:2]:
            for variables in (None, {"site": "weir 3"}):
                expected = local.decode_uplink(fport, payload, recv, variables)
                got = worker.decode_uplink(fport, payload, recv, variables)
                assert got == expected
                assert json.dumps(got) == json.dumps(expected)  # floats and order too
        assert worker.decode_uplink(1, bytes.fromhex("fe0c10"), recv)["warnings"] == ["dry air"]
        # A naive recvTime is UTC in both.
        naive = datetime(2024, 5, 6, 9, 8, 9)
        assert worker.decode_uplink(1, b"\0\0\x30", naive) == local.decode_uplink(
            1, b"\0\0\x30", naive
        )


def test_decoder_reported_errors_keep_their_result(no_leftover_children: None) -> None:
    local = JsCodec(CLIMATE, "climate.js")
    with pytest.raises(DecoderReportedError) as in_process:
        local.decode_uplink(2, b"")
    with JsWorker(CLIMATE, "climate.js") as worker, pytest.raises(DecoderReportedError) as caught:
        worker.decode_uplink(2, b"")
    assert str(caught.value) == str(in_process.value)
    assert (caught.value.errors, caught.value.warnings, caught.value.data) == (
        ["unknown fPort 2"],
        ["checked the port"],
        {"port": 2},
    )


def test_throwing_and_garbage_decoders_fail_like_in_process(no_leftover_children: None) -> None:
    local = JsCodec(MISBEHAVES, "misbehaves.js")
    with JsWorker(MISBEHAVES, "misbehaves.js") as worker:
        pid = worker.pid
        for payload, needle in [
            (b"\x04\x07", "misbehaves.js: decodeUplink threw RangeError: frame type 7 unsupported"),
            (b"\x05", "misbehaves.js: decodeUplink returned invalid output: got a number"),
        ]:
            with pytest.raises(CodecError) as in_process:
                local.decode_uplink(1, payload)
            with pytest.raises(CodecError) as caught:
                worker.decode_uplink(1, payload)
            assert str(caught.value) == str(in_process.value)
            assert str(caught.value).startswith(needle)
        with pytest.raises(CodecError, match=r"fPort must be 0\.\.255"):
            worker.decode_uplink(256, b"")
        # Failures the codec reports itself do not cost the worker.
        assert (worker.pid, worker.restarts) == (pid, 0)
        assert worker.decode_uplink(1, b"\x00") == {"data": {"mode": 0}}


def test_quickjs_limit_is_the_first_line(no_leftover_children: None) -> None:
    # QuickJS counts CPU time: on a loaded machine 100 ms of it can take longer than the default
    # 150 ms deadline of wall time. A wide margin keeps this about which limit acts, not load.
    with JsWorker(MISBEHAVES, "misbehaves.js", margin_ms=10_000) as worker:
        pid = worker.pid
        with pytest.raises(CodecError, match=r"decodeUplink timed out after \d+ ms \(limit 100"):
            worker.decode_uplink(1, b"\x03")
        assert (worker.pid, worker.restarts) == (pid, 0)


# --- The hard deadline


@pytest.mark.parametrize(("what", "payload"), [("regex", b"\x01"), ("native loop", b"\x02")])
def test_a_hang_is_cut_at_the_deadline_and_the_next_call_works(
    what: str, payload: bytes, no_leftover_children: None
) -> None:
    with JsWorker(MISBEHAVES, "misbehaves.js") as worker:
        old = worker.pid
        assert old is not None
        error, elapsed = call_time(worker, 1, payload)
        assert str(error) == (
            "misbehaves.js: decodeUplink exceeded its time limit of 100 ms wall clock (hard"
            " deadline 150 ms with the worker round trip); the worker process was killed and"
            " restarted"
        ), what
        assert elapsed < HANG_GUARD_S
        assert old not in child_pids()  # killed and reaped
        assert worker.decode_uplink(1, b"\x09") == {"data": {"mode": 9}}
        assert worker.pid not in (None, old)
        assert worker.restarts == 1
        # And again: every hang costs one worker, never the caller.
        error, elapsed = call_time(worker, 1, payload)
        assert "exceeded its time limit" in str(error)
        assert elapsed < HANG_GUARD_S
        assert worker.decode_uplink(1, b"\x00") == {"data": {"mode": 0}}


def test_custom_limits_are_in_the_message(no_leftover_children: None) -> None:
    with JsWorker(MISBEHAVES, "m.js", timeout_ms=30, margin_ms=20) as worker:
        assert worker.deadline_ms == 50
        error, elapsed = call_time(worker, 1, b"\x01")
        assert "time limit of 30 ms wall clock (hard deadline 50 ms" in str(error)
        assert elapsed < HANG_GUARD_S


def test_a_hang_at_top_level_fails_the_load(no_leftover_children: None) -> None:
    source = 'var x = /^(a+)+$/.test("a".repeat(40) + "b");\nfunction decodeUplink(i) {}'
    started = time.monotonic()
    with pytest.raises(CodecError) as caught, JsWorker(source, "top.js"):
        pass
    assert str(caught.value).startswith(
        "top.js: evaluating the file exceeded its time limit of 100 ms wall clock"
    )
    assert time.monotonic() - started < HANG_GUARD_S


# --- Dead workers


def test_a_worker_killed_between_calls_is_replaced(no_leftover_children: None) -> None:
    with JsWorker(CLIMATE, "climate.js") as worker:
        expected = worker.decode_uplink(1, b"\x08\x66\x6f", datetime(2024, 1, 1, tzinfo=UTC))
        old = worker.pid
        assert old is not None
        os.kill(old, signal.SIGKILL)
        wait_exited(old, HANG_GUARD_S)
        # Nothing was in flight: the call goes to a fresh worker and succeeds.
        got = worker.decode_uplink(1, b"\x08\x66\x6f", datetime(2024, 1, 1, tzinfo=UTC))
        assert got == expected
        assert worker.pid not in (None, old)
        assert worker.restarts == 1
        assert old not in child_pids()


def test_a_worker_that_dies_during_a_call_is_an_error_and_restarted(
    no_leftover_children: None,
) -> None:
    # The kernel ends the worker mid-decode: at its CPU limit (one second more than it used to
    # start), while a plain loop runs that QuickJS's own limit (60 s here) would stop much later.
    with JsWorker(MISBEHAVES, "misbehaves.js", timeout_ms=60_000) as worker:
        pid = worker.pid
        assert pid is not None
        resource.prlimit(pid, resource.RLIMIT_CORE, (0, 0))
        resource.prlimit(pid, resource.RLIMIT_CPU, (1, 1))
        error, elapsed = call_time(worker, 1, b"\x03")
        assert str(error).startswith("misbehaves.js: the JavaScript worker process died (killed")
        assert str(error).endswith("while running decodeUplink; it was restarted")
        assert elapsed < 30  # a hang guard: one CPU second, on a busy machine
        assert pid not in child_pids()
        assert worker.decode_uplink(1, b"\x07") == {"data": {"mode": 7}}
        assert worker.restarts == 1


def test_ctrl_c_is_for_the_parent(no_leftover_children: None) -> None:
    with JsWorker(CLIMATE, "climate.js") as worker:
        pid = worker.pid
        assert pid is not None
        os.kill(pid, signal.SIGINT)
        assert worker.decode_uplink(1, b"\0\0\x30")["data"]["humidity"] == 24
        assert worker.pid == pid


def test_an_orphaned_worker_ends_itself(tmp_path: Path) -> None:
    # A parent that is killed while its worker hangs in a regex cannot kill the worker; the
    # worker's own alarm (2 x 150 ms + 1 s) must. The parent is a separate interpreter here.
    script = tmp_path / "parent.py"
    script.write_text(
        "import sys\n"
        "from drivers.jsworker import JsWorker, _send\n"
        f"w = JsWorker({MISBEHAVES!r}, 'm.js')\n"
        "w.open()\n"
        "_send(w._worker.conn, {'op': 'decode', 'fPort': 1, 'hex': '01', 'recvTime': None,"
        " 'variables': {}})\n"
        "print(w.pid, flush=True)\n"
        "sys.stdin.read()\n"
    )
    with subprocess.Popen(
        [sys.executable, str(script)],
        cwd=REPO,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    ) as parent:
        assert parent.stdout is not None
        worker_pid = int(parent.stdout.readline())
        parent.kill()
        parent.wait()
    try:
        wait_exited(worker_pid, 30)
    finally:
        # When the test fails, do not leave a worker spinning in the regex behind.
        with contextlib.suppress(ProcessLookupError):
            os.kill(worker_pid, signal.SIGKILL)


# --- Starting


def test_a_file_the_codec_refuses_fails_the_open(no_leftover_children: None) -> None:
    source = "function decodeUplink(input) {\n  return {data: {}};\n}}\n"
    with pytest.raises(CodecError) as in_process:
        JsCodec(source, "bad.js")
    worker = JsWorker(source, "bad.js")
    with pytest.raises(CodecError) as caught:
        worker.open()
    assert str(caught.value) == str(in_process.value)
    assert str(caught.value).startswith("bad.js:3: SyntaxError")
    assert worker.pid is None
    with (
        pytest.raises(ValueError, match="memory_limit_bytes must be at least"),
        JsWorker(CLIMATE, "c.js", memory_limit_bytes=10),
    ):
        pass
    with pytest.raises(ValueError, match="timeout_ms must be at least 1"):
        JsWorker(CLIMATE, "c.js", timeout_ms=0)


def test_no_interpreter_is_a_clear_error(no_leftover_children: None) -> None:
    with (
        pytest.raises(WorkerStartError) as caught,
        JsWorker(CLIMATE, "c.js", executable="/nonexistent/python3"),
    ):
        pass
    assert str(caught.value).startswith(
        "c.js: cannot start the JavaScript worker process (/nonexistent/python3):"
    )
    with (
        pytest.raises(WorkerStartError) as caught,
        JsWorker(CLIMATE, "c.js", executable="/bin/false"),
    ):
        pass
    assert str(caught.value) == (
        "c.js: the JavaScript worker process exited while starting (exit status 1)"
    )


def test_a_worker_that_cannot_import_says_why(tmp_path: Path, no_leftover_children: None) -> None:
    # An interpreter that sees only the standard library: the bootstrap cannot import drivers.
    stdlib = [p for p in sys.path if p.startswith(sys.base_prefix) and "site-packages" not in p]
    wrapper = tmp_path / "python-without-drivers"
    wrapper.write_text(
        f'#!/bin/sh\nexec {sys.executable} "$1" "$2" "$3" \'{json.dumps(stdlib)}\' "$5"\n'
    )
    wrapper.chmod(0o755)
    worker = JsWorker(CLIMATE, "c.js", executable=str(wrapper))
    with pytest.raises(WorkerStartError) as caught:
        worker.decode_uplink(1, b"")  # opens lazily
    assert str(caught.value) == (
        "c.js: the JavaScript worker process could not start:"
        " ModuleNotFoundError: No module named 'drivers'"
    )
    worker.close()


def test_a_reply_too_long_for_the_protocol_is_refused_unread(
    tmp_path: Path, no_leftover_children: None
) -> None:
    # A worker whose sandbox was broken could answer anything; a reply far beyond what a decode
    # can produce must not be read into the parent's memory.
    fake = tmp_path / "fake_worker.py"
    fake.write_text(
        "import json, os, sys\n"
        "from multiprocessing.connection import Connection\n"
        "conn = Connection(int(sys.argv[2]))\n"
        "send = lambda m: conn.send_bytes(json.dumps(m).encode())\n"
        "send({'ready': os.getpid()})\n"
        "conn.recv_bytes()\n"
        "send({'entry_point': 'decodeUplink'})\n"
        "conn.recv_bytes()\n"
        "send({'result': {'data': {'x': 'a' * 4_000_000}}})\n"
        "conn.recv_bytes()\n"
    )
    wrapper = tmp_path / "python-fake-worker"
    wrapper.write_text(f'#!/bin/sh\nexec {sys.executable} {fake} "$4" "$5"\n')
    wrapper.chmod(0o755)
    with JsWorker(CLIMATE, "c.js", executable=str(wrapper)) as worker:
        with pytest.raises(CodecError) as caught:
            worker.decode_uplink(1, b"")
        assert "sent a malformed reply" in str(caught.value)
        assert "longer than 1114112 bytes" in str(caught.value)


def test_the_worker_imports_only_what_it_needs(no_leftover_children: None) -> None:
    # The parent (this test process) has numpy loaded; a worker that re-ran the parent's
    # imports (multiprocessing's spawn re-runs __main__) would map it too.
    assert np.__name__ == "numpy"
    with JsWorker(CLIMATE, "c.js") as worker:
        maps = Path(f"/proc/{worker.pid}/maps").read_text()
    assert "quickjs" in maps
    for heavy in ("numpy", "onnxruntime", "pydantic_core", "orjson"):
        assert heavy not in maps


# --- Closing


def test_close_is_idempotent_and_final(no_leftover_children: None) -> None:
    worker = JsWorker(CLIMATE, "climate.js")
    assert worker.pid is None  # the constructor starts nothing
    worker.open()
    worker.open()
    pid = worker.pid
    assert pid in child_pids()
    worker.close()
    worker.close()
    assert pid not in child_pids()
    assert worker.pid is None
    with pytest.raises(CodecError, match=r"climate\.js: the JavaScript worker is closed"):
        worker.decode_uplink(1, b"")


def test_close_after_a_kill_leaves_nothing(no_leftover_children: None) -> None:
    with JsWorker(MISBEHAVES, "m.js") as worker:
        first = worker.pid
        call_time(worker, 1, b"\x01")
        second = worker.pid  # started at once, not loaded yet
        assert second is not None
        assert second != first
    assert {first, second} & child_pids() == set()


# --- In the daemon


def uplink_line(fcnt: int, data: bytes) -> str:
    dev_eui = "0004a30b001c0530"
    payload = {
        "deduplicationId": f"{dev_eui}-{fcnt:05d}",
        "time": f"2024-05-06T09:{fcnt:02d}:00Z",
        "deviceInfo": {
            "applicationId": "5e1a0c2b-8d1f-4a6e-9c3b-2f7d4e6a1b00",
            "deviceProfileName": "JS-GAUGE",
            "devEui": dev_eui,
        },
        "fCnt": fcnt,
        "fPort": 1,
        "data": base64.b64encode(data).decode(),
        "rxInfo": [{"gatewayId": "0016c001f153a14c", "rssi": -97, "snr": 6.5}],
    }
    topic = f"application/5e1a0c2b-8d1f-4a6e-9c3b-2f7d4e6a1b00/device/{dev_eui}/event/up"
    return json.dumps({"topic": topic, "payload": payload})


async def test_the_daemon_decodes_in_workers_and_closes_them(
    tmp_path: Path, no_leftover_children: None
) -> None:
    decoder = tmp_path / "gauge.js"
    decoder.write_text(MISBEHAVES)
    capture = tmp_path / "capture.jsonl"
    # A normal frame, one that hangs the decoder in a regex, then normal frames again.
    capture.write_text(
        "\n".join(uplink_line(n, bytes([mode])) for n, mode in enumerate([7, 1, 8, 9], start=1))
    )
    out = tmp_path / "published.jsonl"
    cfg = {
        "gateway": {"id": "t", "state_dir": str(tmp_path / "state"), "log_level": "error"},
        "uplink": {"type": "file", "path": str(out), "fsync": False},
        "sources": [{"type": "chirpstack", "name": "lorawan", "replay_file": str(capture)}],
        "profiles": {
            "js-gauge": {
                "codec": f"js:{decoder}",
                "fields": [{"field": "mode", "name": "mode"}],
            }
        },
        "devices": [{"device_profile": "JS-GAUGE", "profile": "js-gauge"}],
    }
    gateway = Gateway(config_from_dict(cfg, "test"), {})
    started = time.monotonic()
    assert await gateway.run(stop_when_sources_done=True) == 0
    assert time.monotonic() - started < 30  # a hang guard
    events = [decode(line, Encoding.JSON) for line in out.read_bytes().splitlines()]
    modes = [m.value for e in events if e.kind == "reading" for m in e.values if m.name == "mode"]
    assert modes == [7, 8, 9]
    [failed] = [e for e in events if e.kind == "decode_error"]
    error = next(m.value for m in failed.values if m.name == "error")
    assert isinstance(error, str)
    assert error.startswith(f"{decoder}: decodeUplink exceeded its time limit of 100 ms wall")
