"""What the worker process (drivers.jsworker) costs per decode against the in-process JsCodec.

    .venv/bin/python bench/js_codec.py [--calls N] [--rounds R] [--quick]

One small TTN-style decoder written here (7 bytes -> 4 fields, one warning branch) is decoded by:

* in-process JsCodec   the reference: drivers.jscodec on the calling thread (fresh QuickJS context
                       per decode, the file evaluated again, the call, JSON out)
* JsWorker             the same JsCodec in the worker process: + JSON request, pipe, poll, reply
* bare pipe echo       the floor of any process boundary: the same request bytes echoed by a child
                       interpreter over the same kind of pipe, no decoding

The rows are interleaved in R rounds (this 2-core machine is shared and noisy) and each row's
latencies pooled; the ratio column is p50 relative to the in-process row of the same run. Then:
the time to open a worker (interpreter start, hello, file loaded), a hanging call (cut at its
deadline) and the call after it, at once (it waits for the replacement to start) and 1 s later
(the replacement started meanwhile), and the worker's memory (RSS, and PSS: its share of pages
also mapped by other processes).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from multiprocessing.connection import Pipe
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from drivers.jscodec import JsCodec  # noqa: E402
from drivers.jsworker import JsWorker  # noqa: E402
from gateway.errors import CodecError  # noqa: E402

DECODER = r"""
function decodeUplink(input) {
  var b = input.bytes;
  if (b[0] === 255) { return {data: {re: /^(a+)+$/.test("a".repeat(40) + "b")}}; }
  var data = {
    distance_mm: b[0] << 8 | b[1],
    temperature_c: ((b[2] << 8 | b[3]) << 16 >> 16) / 100,
    battery_v: (b[4] << 8 | b[5]) / 1000,
    status: b[6] & 1 ? "ok" : "fault",
  };
  var out = {data: data};
  if (data.battery_v < 3.1) { out.warnings = ["battery low"]; }
  return out;
}
"""
PAYLOAD = bytes.fromhex("0c1c08660bb801")

ECHO = """\
import sys
from multiprocessing.connection import Connection
conn = Connection(int(sys.argv[1]))
while True:
    try:
        conn.send_bytes(conn.recv_bytes())
    except EOFError:
        break
"""


def timed(fn: Callable[[], object], calls: int) -> list[float]:
    out = []
    for _ in range(calls):
        started = time.perf_counter()
        fn()
        out.append(time.perf_counter() - started)
    return out


def row(name: str, latencies_s: list[float], reference_p50: float | None) -> float:
    us = sorted(x * 1e6 for x in latencies_s)
    p50 = statistics.median(us)
    p99 = us[min(len(us) - 1, int(len(us) * 0.99))]
    ratio = "" if reference_p50 is None else f"{p50 / reference_p50:6.2f}x"
    print(f"{name:<22} p50 {p50:8.1f} us  p99 {p99:8.1f} us  {1e6 / p50:8.0f} calls/s  {ratio}")
    return p50


def memory_kb(pid: int) -> tuple[int, int]:
    """(RSS, PSS) of a process in kB, from smaps_rollup."""
    fields = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        key, value = line.split(":", 1)
        fields[key] = int(value.split()[0])
    return fields["Rss"], fields["Pss"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=1000, help="calls per row per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="100 calls x 2 rounds")
    args = parser.parse_args()
    calls, rounds = (100, 2) if args.quick else (args.calls, args.rounds)

    local = JsCodec(DECODER, "bench.js")
    request = json.dumps(
        {"op": "decode", "fPort": 1, "hex": PAYLOAD.hex(), "recvTime": None, "variables": {}}
    ).encode()
    parent_end, child_end = Pipe(duplex=True)
    echo = subprocess.Popen(
        [sys.executable, "-I", "-c", ECHO, str(child_end.fileno())],
        pass_fds=(child_end.fileno(),),
    )
    child_end.close()

    def echo_once() -> None:
        parent_end.send_bytes(request)
        parent_end.poll(1.0)
        parent_end.recv_bytes()

    pooled: dict[str, list[float]] = {
        "in-process JsCodec": [],
        "JsWorker": [],
        "bare pipe echo": [],
    }
    with JsWorker(DECODER, "bench.js") as worker:
        assert worker.decode_uplink(1, PAYLOAD) == local.decode_uplink(1, PAYLOAD)
        print(f"decoder: {len(DECODER)} chars, payload {PAYLOAD.hex()}, {calls} calls x {rounds}")
        for _ in range(rounds):
            pooled["in-process JsCodec"] += timed(lambda: local.decode_uplink(1, PAYLOAD), calls)
            pooled["JsWorker"] += timed(lambda: worker.decode_uplink(1, PAYLOAD), calls)
            pooled["bare pipe echo"] += timed(echo_once, calls)
        reference = row("in-process JsCodec", pooled["in-process JsCodec"], None)
        worker_p50 = row("JsWorker", pooled["JsWorker"], reference)
        row("bare pipe echo", pooled["bare pipe echo"], reference)
        print(f"worker overhead per decode (p50 difference): {worker_p50 - reference:.1f} us")
        assert worker.pid is not None
        rss, pss = memory_kb(worker.pid)
        print(f"worker memory: RSS {rss / 1024:.1f} MiB, PSS {pss / 1024:.1f} MiB")

        for pause_s in (0.0, 1.0):
            started = time.perf_counter()
            try:
                worker.decode_uplink(1, b"\xff")
            except CodecError as exc:
                hang_ms = (time.perf_counter() - started) * 1000
                print(f"hanging call: {hang_ms:.0f} ms (deadline {worker.deadline_ms} ms): {exc}")
            # The replacement starts at once; a frame that comes later finds it ready.
            time.sleep(pause_s)
            started = time.perf_counter()
            worker.decode_uplink(1, PAYLOAD)
            print(
                f"next call, {pause_s:g} s after the kill:"
                f" {(time.perf_counter() - started) * 1000:.1f} ms"
            )
    parent_end.close()
    echo.wait()

    opens = []
    for _ in range(5 if args.quick else 10):
        started = time.perf_counter()
        with JsWorker(DECODER, "bench.js"):
            opens.append(time.perf_counter() - started)
    print(
        f"open (start + hello + load), {len(opens)} times: median"
        f" {statistics.median(opens) * 1000:.1f} ms, max {max(opens) * 1000:.1f} ms"
    )


if __name__ == "__main__":
    main()
