"""Lines/s through the ASCII line driver to the outbox, over a real pty, with the gateway's CPU%.

Usage::

    .venv/bin/python bench/serial_ascii.py            # 200,000 lines per mode (~1 min on 2 cores)
    .venv/bin/python bench/serial_ascii.py --quick    # 20,000 lines per mode (smoke run)
    .venv/bin/python bench/serial_ascii.py --lines 50000 --only bare,outbox --sync normal

For each mode the parent starts a socat pty pair, a reader child on the ``sensor`` end (the
"gateway process", whose CPU is measured with getrusage, all its threads included) and a
simulator child on the ``sim`` end that writes the lines as fast as the pty takes them (it has
them all encoded before the clock starts). A weather-station line with an NMEA checksum, 41 bytes:
``T=21.43,H=55.2,P=1013.25,WS=3.4,WD=270*5A\\r\\n``.

Modes (the reader child):

* ``bare``: the reference. ``os.read`` on the pty in a loop, counting line ends; no asyncio, no
  framing, no parsing, no outbox: what a Python process can take from this pty at all.
* ``parse``: ``AsciiLineSource`` (port supervisor, framer, parser, a ``Reading`` per line) with
  an ``emit`` that only counts: the driver's own cost.
* ``outbox``: ``AsciiLineSource`` → ``Pipeline`` → ``Outbox`` (SQLite WAL, ``--sync``): the issue's
  "to the outbox"; done when the last line's event is committed.
* ``gateway``: ``gateway.app.Gateway`` from a config (the serial_ascii source, the outbox, a file
  uplink to a temp file without fsync): the whole daemon; done when the last event is committed,
  and the time until the uplink wrote it is reported too.

Every mode must receive every line (a pty has flow control: the simulator blocks, nothing is
dropped) and the source modes must reject none: otherwise the run fails (exit 1). Figures are
printed, never judged: see bench/README.md for what they mean and the measured results.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

SCRIPT = Path(__file__).resolve()
ROOT = SCRIPT.parent.parent
sys.path.insert(0, str(ROOT))

from drivers.ascii_lines import (  # noqa: E402
    AsciiLineSource,
    FieldSpec,
    Framing,
    LineParser,
    nmea_checksum,
)
from drivers.serial_port import SerialSettings  # noqa: E402
from gateway.types import Event, Reading  # noqa: E402

MODES = ("bare", "parse", "outbox", "gateway")
DEFAULT_LINES = 200_000
QUICK_LINES = 20_000
FIELDS = [
    FieldSpec("T", "air_temperature", "Cel"),
    FieldSpec("H", "relative_humidity", "%"),
    FieldSpec("P", "air_pressure", "hPa"),
    FieldSpec("WS", "wind_speed", "m/s"),
    FieldSpec("WD", "wind_direction", "deg"),
]
CHILD_TIMEOUT_S = 300.0


def make_lines(n: int) -> bytes:
    out = []
    for i in range(n):
        body = (
            f"T={15 + (i % 1000) / 100:.2f},H={40 + (i % 500) / 10:.1f},"
            f"P={1000 + (i % 3000) / 100:.2f},WS={(i % 200) / 10:.1f},WD={i % 360}"
        )
        out.append(f"{body}*{nmea_checksum(body):02X}\r\n")
    return "".join(out).encode("ascii")


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def proc_cpu_seconds(pid: int) -> float:
    """CPU seconds (user + system) a process has used so far, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


def ready() -> None:
    """Tell the parent the port is open (the pty flushes its input when opened)."""
    sys.stdout.write("ready\n")
    sys.stdout.flush()


# -- reader children -----------------------------------------------------------------------------


def run_bare(port: str, n: int) -> dict[str, Any]:
    fd = os.open(port, os.O_RDWR | os.O_NOCTTY)
    ready()
    lines = 0
    nbytes = 0
    t0, c0 = time.monotonic(), cpu_seconds()
    try:
        while lines < n:
            data = os.read(fd, 65536)
            if not data:
                break
            nbytes += len(data)
            lines += data.count(b"\n")
    finally:
        os.close(fd)
    return {"lines": lines, "bytes": nbytes, "s": time.monotonic() - t0, "cpu": cpu_seconds() - c0}


def make_source(port: str) -> AsciiLineSource:
    return AsciiLineSource(
        "bench",
        "ws-bench",
        SerialSettings(port, baud=115200),
        Framing("\n", "ascii", 512),
        LineParser(FIELDS, format="keyvalue", checksum="nmea"),
    )


async def until(condition: Callable[[], bool]) -> None:
    async with asyncio.timeout(CHILD_TIMEOUT_S):
        while not condition():  # noqa: ASYNC110 -- counters change without a callback
            await asyncio.sleep(0.002)


def source_result(source: AsciiLineSource, t0: float, c0: float, **extra: Any) -> dict[str, Any]:
    counters = dict(source.counters)
    return {
        "lines": counters.get("lines", 0),
        "readings": source.readings,
        "bytes": counters.get("bytes", 0),
        "rejected": {
            k: v for k, v in counters.items() if k not in ("lines", "bytes", "readings") and v
        },
        "s": time.monotonic() - t0,
        "cpu": cpu_seconds() - c0,
        **extra,
    }


async def run_parse(port: str, n: int) -> dict[str, Any]:
    source = make_source(port)
    count = 0

    async def emit(item: Reading | Event, on_stored: Callable[[], None] | None = None) -> None:
        nonlocal count
        count += 1

    def report_error(kind: str, detail: str) -> None:
        print(f"source_error {kind}: {detail}", file=sys.stderr)

    async with asyncio.TaskGroup() as tg:
        task = tg.create_task(source.run(emit, report_error))
        await source.port.opened.wait()
        ready()
        t0, c0 = time.monotonic(), cpu_seconds()
        await until(lambda: source.counters.get("lines", 0) >= n)
        result = source_result(source, t0, c0)
        task.cancel()
    return result


async def run_outbox(port: str, n: int, work: Path, sync: str) -> dict[str, Any]:
    from gateway.config import OutboxSection, PipelineSection
    from gateway.health import Metrics
    from gateway.outbox import Outbox
    from gateway.pipeline import Pipeline
    from gateway.wire import Encoding

    metrics = Metrics()
    source = make_source(port)

    def report_error(kind: str, detail: str) -> None:
        print(f"source_error {kind}: {detail}", file=sys.stderr)

    cfg = OutboxSection(synchronous=sync)  # type: ignore[arg-type]
    async with Outbox(work / "outbox.sqlite3", cfg, Encoding.JSON) as outbox:
        pipeline = Pipeline(PipelineSection(), outbox, metrics)
        async with asyncio.TaskGroup() as tg:
            pipe = tg.create_task(pipeline.run())
            task = tg.create_task(source.run(pipeline.submit, report_error))
            await source.port.opened.wait()
            ready()
            t0, c0 = time.monotonic(), cpu_seconds()
            await until(
                lambda: metrics.counters["events_in"] >= n or source.counters.get("lines", 0) > n
            )
            result = source_result(source, t0, c0, stored=metrics.counters["events_in"])
            task.cancel()
            await pipeline.close()
            await pipe
    return result


async def run_gateway(port: str, n: int, work: Path, sync: str) -> dict[str, Any]:
    from gateway.app import Gateway
    from gateway.config import config_from_dict

    cfg = config_from_dict(
        {
            "gateway": {"id": "bench", "state_dir": str(work), "log_level": "error"},
            "outbox": {"synchronous": sync},
            "uplink": {"type": "file", "path": str(work / "uplink.jsonl"), "fsync": False},
            "sources": [
                {
                    "type": "serial_ascii",
                    "name": "bench",
                    "device": "ws-bench",
                    "port": port,
                    "baud": 115200,
                    "format": "keyvalue",
                    "checksum": "nmea",
                    "fields": [{"key": f.key, "name": f.name, "unit": f.unit} for f in FIELDS],
                }
            ],
        },
        "bench",
    )
    gateway = Gateway(cfg, {})
    async with asyncio.TaskGroup() as tg:
        run = tg.create_task(gateway.run())
        await gateway.ready.wait()
        source = gateway.source("bench")
        assert isinstance(source, AsciiLineSource)
        await source.port.opened.wait()
        ready()
        t0, c0 = time.monotonic(), cpu_seconds()
        counters = gateway.metrics.counters
        await until(lambda: counters["events_in"] >= n or source.counters.get("lines", 0) > n)
        result = source_result(source, t0, c0, stored=counters["events_in"])
        await until(lambda: counters["events_out"] >= n)
        result["uplink_s"] = time.monotonic() - t0
        gateway.request_stop()
        await run
    return result


def run_sim(port: str, n: int) -> dict[str, Any]:
    data = make_lines(n)
    fd = os.open(port, os.O_RDWR | os.O_NOCTTY)
    ready()
    sys.stdin.readline()  # go
    t0, c0 = time.monotonic(), cpu_seconds()
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view[:65536]) :]
    result = {"bytes": len(data), "s": time.monotonic() - t0, "cpu": cpu_seconds() - c0}
    # Stay until told: closing the pty before the reader took everything is not the point here.
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()
    sys.stdin.readline()
    os.close(fd)
    return result


def child_main(args: argparse.Namespace) -> int:
    from gateway.logs import configure_logging

    # stdout carries "ready" and the result; the driver's log lines go to stderr.
    configure_logging("warning", "console", sys.stderr)
    work = Path(args.work_dir)
    if args.mode == "sim":
        run_sim(args.port, args.lines)
        return 0
    if args.mode == "bare":
        result = run_bare(args.port, args.lines)
    elif args.mode == "parse":
        result = asyncio.run(run_parse(args.port, args.lines))
    elif args.mode == "outbox":
        result = asyncio.run(run_outbox(args.port, args.lines, work, args.sync))
    else:
        result = asyncio.run(run_gateway(args.port, args.lines, work, args.sync))
    sys.stdout.write(json.dumps(result) + "\n")
    return 0


# -- parent --------------------------------------------------------------------------------------


def _start(args: list[str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(SCRIPT), *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )


def _expect_ready(proc: subprocess.Popen[str], what: str) -> None:
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if line.strip() != "ready":
        _, err = proc.communicate(timeout=10)
        raise RuntimeError(f"{what} did not start: {line!r} {err}")


def run_mode(mode: str, lines: int, sync: str) -> dict[str, Any]:
    from tests.support.socat import PtyPair

    with tempfile.TemporaryDirectory(prefix=f"bench-serial-{mode}-") as tmp:
        work = Path(tmp)
        with PtyPair(work / "pty") as pair:
            common = ["--lines", str(lines), "--work-dir", tmp, "--sync", sync]
            reader = _start(["--mode", mode, "--port", str(pair.sensor), *common])
            sim = _start(["--mode", "sim", "--port", str(pair.sim), *common])
            try:
                _expect_ready(reader, mode)
                _expect_ready(sim, "simulator")
                socat0 = proc_cpu_seconds(pair.pid)
                assert sim.stdin is not None and sim.stdout is not None
                sim.stdin.write("go\n")
                sim.stdin.flush()
                out, err = reader.communicate(timeout=CHILD_TIMEOUT_S)
                socat_cpu = proc_cpu_seconds(pair.pid) - socat0
                sim_result = json.loads(sim.stdout.readline())
                sim.stdin.write("done\n")
                sim.stdin.flush()
                sim.wait(timeout=30)
            finally:
                for proc in (reader, sim):
                    if proc.poll() is None:
                        proc.kill()
                        proc.wait()
            if reader.returncode != 0:
                raise RuntimeError(f"{mode} failed ({reader.returncode}): {err}")
            result: dict[str, Any] = json.loads(out.splitlines()[-1])
            result.update(mode=mode, sim=sim_result, socat_cpu=socat_cpu, stderr=err.strip())
            return result


def ratio(rate: float, bare: dict[str, Any] | None) -> str:
    return f"{rate / (bare['lines'] / bare['s']):.2f}" if bare else "-"


def report(results: list[dict[str, Any]], lines: int, sync: str) -> bool:
    ok = True
    bare = next((r for r in results if r["mode"] == "bare"), None)
    header = (
        f"{'mode':<9}{'lines':>9}{'lines/s':>11}{'MB/s':>7}{'x bare':>8}{'gw CPU %':>10}"
        f"{'us CPU/line':>13}{'socat CPU %':>13}{'sim CPU %':>11}  notes"
    )
    print(header)
    print("-" * len(header))
    for r in results:
        seconds = r["s"]
        rate = r["lines"] / seconds
        notes = []
        if r["mode"] != "bare":
            if r["readings"] != lines or r["lines"] != lines:
                ok = False
                notes.append(f"FAIL: {r['readings']} readings of {lines}")
            if r["rejected"]:
                ok = False
                notes.append(f"FAIL: rejected {r['rejected']}")
            if "stored" in r:
                notes.append(f"stored {r['stored']}")
                if r["stored"] != lines:
                    ok = False
            if "uplink_s" in r:
                notes.append(f"uplink wrote all after {r['uplink_s']:.2f} s")
        elif r["lines"] != lines:
            ok = False
            notes.append(f"FAIL: {r['lines']} lines of {lines}")
        print(
            f"{r['mode']:<9}{r['lines']:>9}{rate:>11,.0f}{r['bytes'] / seconds / 1e6:>7.1f}"
            f"{ratio(rate, bare):>8}"
            f"{100 * r['cpu'] / seconds:>10.0f}{1e6 * r['cpu'] / max(r['lines'], 1):>13.1f}"
            f"{100 * r['socat_cpu'] / seconds:>13.0f}{100 * r['sim']['cpu'] / seconds:>11.0f}"
            f"  {'; '.join(notes)}"
        )
        if r["stderr"]:
            print(f"  stderr of {r['mode']}: {r['stderr'][:500]}")
    print(
        f"lines/s: lines taken by the reader / time from the simulator's start to the last line "
        f"handled (outbox, gateway: committed, sync={sync}).\n"
        "gw CPU %: the reader process's CPU (all threads) over that time; 100 = one core. "
        "socat relays every byte between the two ptys; sim writes them."
    )
    return ok


def parent_main(args: argparse.Namespace) -> int:
    lines = args.lines or (QUICK_LINES if args.quick else DEFAULT_LINES)
    modes = [m for m in MODES if m in args.only.split(",")] if args.only else list(MODES)
    print(
        f"edge-gateway serial ASCII benchmark: {lines:,} lines per mode, "
        f"{len(make_lines(1))}-byte NMEA-checksummed lines, outbox sync={args.sync}, "
        f"{os.cpu_count()} CPUs, Python {sys.version.split()[0]}, "
        f"load average {os.getloadavg()[0]:.2f}"
    )
    results = []
    for mode in modes:
        result = run_mode(mode, lines, args.sync)
        print(f"  {mode}: {result['lines'] / result['s']:,.0f} lines/s ({result['s']:.2f} s)")
        results.append(result)
    print()
    return 0 if report(results, lines, args.sync) else 1


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_LINES:,} lines per mode")
    parser.add_argument("--lines", type=int, default=0, help=f"default {DEFAULT_LINES:,}")
    parser.add_argument("--only", default="", help=f"comma-separated subset of {','.join(MODES)}")
    parser.add_argument("--sync", choices=("full", "normal"), default="full")
    parser.add_argument("--mode", choices=(*MODES, "sim"), help=argparse.SUPPRESS)
    parser.add_argument("--port", help=argparse.SUPPRESS)
    parser.add_argument("--work-dir", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.mode:
        return child_main(args)
    return parent_main(args)


if __name__ == "__main__":
    sys.exit(main())
