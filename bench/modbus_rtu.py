"""Modbus RTU registers/s over a pseudo-terminal: the source into the outbox, and references.

Usage::

    .venv/bin/python bench/modbus_rtu.py            # 5 s per mode and baud rate
    .venv/bin/python bench/modbus_rtu.py --quick    # 1 s each (smoke run)
    .venv/bin/python bench/modbus_rtu.py --seconds 10 --bauds 115200

For each baud rate a socat pty pair is made and a pymodbus RTU server (``tests.support.
modbus_peer``, in a child process so its CPU is not the gateway's) serves ``--slaves`` slaves of
``--registers`` holding registers each. Then, in this process, one mode after the other reads as
fast as the bus allows (every slave's whole block in one request, polled back to back):

* ``pymodbus client``: a bare ``AsyncModbusSerialClient`` loop with the same reads, decoding the
  values with ``convert_from_registers``: the reference, with no source and no outbox.
* ``rtu link, no gap``: the gateway's transaction layer alone (``drivers.modbus.RtuLink``), same
  reads, with the inter-frame silence set to 0 as the pymodbus client has it: the software cost.
* ``rtu link``: the same with the specification's silence (3.5 characters, 1.75 ms above 19200
  baud) before each request, as the source runs it.
* ``source -> outbox``: ``ModbusRtuSource`` with ``poll_interval_s`` 1 ms (so the bus never
  idles), its readings through the real ``Pipeline`` into a real ``Outbox`` (SQLite WAL,
  ``synchronous=full``) in a temporary directory. Afterwards every reading must be in the
  outbox.

Figures: requests/s and registers/s (16-bit registers read) in the timed window (after a warm-up),
CPU % of this process (all threads, % of one core) and of the server process, and the CPU time per
request. A pty has no line timing: bytes arrive at memory speed whatever the baud rate, so the
line's own ceiling is printed for comparison (frame bytes x 10 or 11 bits / baud plus the 3.5
character silence after each frame, no slave turnaround), with the CPU the source would use at
that rate. The gateway keeps the specification's inter-frame silence (``RtuLink.silence_s``) even
on a pty; the bare pymodbus client does not wait at all.

Exit status 0 when every mode ran and every reading reached the outbox, 1 otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

SCRIPT = Path(__file__).resolve()
ROOT = SCRIPT.parent.parent
sys.path.insert(0, str(ROOT))

import structlog  # noqa: E402
from pymodbus.client import AsyncModbusSerialClient  # noqa: E402

from drivers.modbus import (  # noqa: E402
    ModbusRegister,
    ModbusRtuSource,
    ModbusSlave,
    RtuLink,
    read_request,
)
from drivers.serial_port import SerialSettings, open_port  # noqa: E402
from gateway.config import OutboxSection, PipelineSection  # noqa: E402
from gateway.health import Metrics  # noqa: E402
from gateway.outbox import Outbox  # noqa: E402
from gateway.pipeline import Pipeline  # noqa: E402
from gateway.types import Event, Reading  # noqa: E402
from tests.support.socat import PtyPair, socat_path  # noqa: E402

WARMUP_S = 0.3
CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True, slots=True)
class Result:
    baud: int
    mode: str
    requests: int
    seconds: float
    cpu_s: float
    peer_cpu_s: float
    registers_per_request: int
    values_per_request: int

    @property
    def requests_per_s(self) -> float:
        return self.requests / self.seconds

    @property
    def registers_per_s(self) -> float:
        return self.requests_per_s * self.registers_per_request

    @property
    def cpu_percent(self) -> float:
        return 100 * self.cpu_s / self.seconds

    @property
    def peer_percent(self) -> float:
        return 100 * self.peer_cpu_s / self.seconds

    @property
    def cpu_us_per_request(self) -> float:
        return 1e6 * self.cpu_s / max(self.requests, 1)


def slave_registers(registers: int) -> tuple[ModbusRegister, ...]:
    """Half the block as uint16 values, the other half as float32 pairs."""
    half = registers // 2
    regs = [ModbusRegister(f"u{a}", a) for a in range(half)]
    regs += [ModbusRegister(f"f{a}", a, data_type="float32") for a in range(half, registers - 1, 2)]
    return tuple(regs)


def peer_cpu_s(pid: int) -> float:
    """utime + stime of a process from /proc (the server child)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


class Window:
    """Wall time, this process' CPU time and the peer's, between start() and stop()."""

    def __init__(self, peer_pid: int) -> None:
        self._pid = peer_pid
        self._t = self._cpu = self._peer = 0.0

    def start(self) -> None:
        self._t, self._cpu, self._peer = (
            time.perf_counter(),
            time.process_time(),
            peer_cpu_s(self._pid),
        )

    def stop(self) -> tuple[float, float, float]:
        return (
            time.perf_counter() - self._t,
            time.process_time() - self._cpu,
            peer_cpu_s(self._pid) - self._peer,
        )


async def run_pymodbus(
    settings: SerialSettings, ids: list[int], registers: int, seconds: float, peer: int
) -> Result:
    client = AsyncModbusSerialClient(
        settings.port, baudrate=settings.baud, timeout=1.0, retries=0, reconnect_delay=0
    )
    if not await client.connect():
        raise RuntimeError(f"pymodbus could not open {settings.port}")
    floats = client.DATATYPE.FLOAT32
    window = Window(peer)
    half = registers // 2
    try:
        requests = 0
        end = time.perf_counter() + WARMUP_S
        timed = False
        while True:
            for device_id in ids:
                rr = await client.read_holding_registers(0, count=registers, device_id=device_id)
                if rr.isError():
                    raise RuntimeError(f"pymodbus read failed: {rr}")
                client.convert_from_registers(rr.registers[: 2 * half], floats)
                requests += 1
            if time.perf_counter() >= end:
                if timed:
                    break
                timed = True
                requests = 0
                window.start()
                end = time.perf_counter() + seconds
        wall, cpu, peer_cpu = window.stop()
    finally:
        client.close()
    return Result(
        settings.baud, "pymodbus client", requests, wall, cpu, peer_cpu, registers, registers
    )


async def run_link(
    settings: SerialSettings,
    ids: list[int],
    registers: int,
    seconds: float,
    peer: int,
    *,
    silence: bool = True,
) -> Result:
    reader, writer = await open_port(settings)
    window = Window(peer)
    requests_by_id = {i: read_request(i, "holding", 0, registers) for i in ids}
    try:
        link = RtuLink(reader, writer, settings)
        if not silence:
            # Like the pymodbus client: the next request goes out as soon as the answer is in.
            link.silence_s = 0.0
        requests = 0
        end = time.perf_counter() + WARMUP_S
        timed = False
        while True:
            for device_id, request in requests_by_id.items():
                await link.transact(request, device_id, 3, registers, 1.0)
                requests += 1
            if time.perf_counter() >= end:
                if timed:
                    break
                timed = True
                requests = 0
                window.start()
                end = time.perf_counter() + seconds
        wall, cpu, peer_cpu = window.stop()
    finally:
        writer.close()
    mode = "rtu link" if silence else "rtu link, no gap"
    return Result(settings.baud, mode, requests, wall, cpu, peer_cpu, registers, registers)


async def run_source(
    settings: SerialSettings,
    *,
    ids: list[int],
    registers: int,
    seconds: float,
    peer: int,
    directory: Path,
) -> tuple[Result, bool]:
    regs = slave_registers(registers)
    slaves = [ModbusSlave(i, f"meter_{i}", regs, poll_interval_s=0.001, timeout_s=1.0) for i in ids]
    source = ModbusRtuSource("bench", settings, slaves)
    metrics = Metrics()
    emitted = 0
    window = Window(peer)
    async with Outbox(directory / f"outbox-{settings.baud}.sqlite3", OutboxSection()) as outbox:
        pipeline = Pipeline(PipelineSection(), outbox, metrics)

        async def emit(item: Reading | Event, on_stored: Callable[[], None] | None = None) -> None:
            nonlocal emitted
            if isinstance(item, Reading):
                emitted += 1
            await pipeline.submit(item, on_stored)

        def report_error(kind: str, detail: str) -> None:
            print(f"  error {kind}: {detail}")

        async with asyncio.TaskGroup() as tg:
            storing = tg.create_task(pipeline.run(), name="bench:pipeline")
            polling = tg.create_task(
                source.run(emit, report_error),
                name="bench:source",
            )
            # This is a benchmark window, not a test: the source runs freely for this long.
            await asyncio.sleep(WARMUP_S)
            before = source.counters["readings"]
            window.start()
            await asyncio.sleep(seconds)
            requests = source.counters["readings"] - before
            wall, cpu, peer_cpu = window.stop()
            polling.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await polling
            await pipeline.close()
            await storing
        await outbox.flush()
        stored = outbox.depth()
        counters = source.counters
    complete = (
        stored == emitted == counters["readings"]
        and counters["failed_polls"] == 0
        and counters["exceptions"] == 0
    )
    if not complete:
        print(f"  source: emitted {emitted}, outbox rows {stored}, counters {dict(counters)}")
    result = Result(
        settings.baud, "source -> outbox", requests, wall, cpu, peer_cpu, registers, len(regs)
    )
    return result, complete


def line_ceiling(baud: int, registers: int) -> tuple[float, float]:
    """(requests/s, registers/s) the line allows at 8N1: frames plus the 3.5-char silences."""
    char_s = 10 / baud
    silence_s = 3.5 * char_s if baud <= 19200 else 0.00175
    frame_chars = 8 + 5 + 2 * registers
    per_request = frame_chars * char_s + 2 * silence_s
    return 1 / per_request, registers / per_request


async def bench_baud(
    baud: int, ids: list[int], registers: int, seconds: float, directory: Path
) -> tuple[list[Result], bool]:
    with PtyPair(directory / f"pty-{baud}") as pair:
        server = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "tests.support.modbus_peer",
            str(pair.sim),
            "--baud",
            str(baud),
            "--ids",
            ",".join(map(str, ids)),
            "--registers",
            str(registers),
            cwd=ROOT,
            stdout=asyncio.subprocess.PIPE,
        )
        try:
            assert server.stdout is not None
            if (await server.stdout.readline()).strip() != b"serving":
                raise RuntimeError("the Modbus server did not start")
            settings = SerialSettings(str(pair.sensor), baud=baud)
            results = [
                await run_pymodbus(settings, ids, registers, seconds, server.pid),
                await run_link(settings, ids, registers, seconds, server.pid, silence=False),
                await run_link(settings, ids, registers, seconds, server.pid),
            ]
            source_result, complete = await run_source(
                settings,
                ids=ids,
                registers=registers,
                seconds=seconds,
                peer=server.pid,
                directory=directory,
            )
            results.append(source_result)
        finally:
            if server.returncode is None:
                server.terminate()
            await server.wait()
    return results, complete


def print_results(results: list[Result], registers: int, slaves: int) -> None:
    header = (
        f"{'baud':>7}  {'mode':<17} {'requests/s':>10} {'registers/s':>11} {'values/s':>9} "
        f"{'CPU %':>6} {'CPU us/req':>10} {'server CPU %':>12}"
    )
    print(header)
    print("-" * len(header))
    for r in results:
        print(
            f"{r.baud:>7}  {r.mode:<17} {r.requests_per_s:>10,.0f} {r.registers_per_s:>11,.0f} "
            f"{r.requests_per_s * r.values_per_request:>9,.0f} {r.cpu_percent:>6.1f} "
            f"{r.cpu_us_per_request:>10.0f} {r.peer_percent:>12.1f}"
        )
    print(
        f"{slaves} slaves x {registers} holding registers, one read each per poll; CPU % is of "
        f"one core, this process with all its threads (outbox writer included)."
    )
    print("\nOn a real line (8N1, no slave turnaround time), a pty has no line timing:")
    for baud in sorted({r.baud for r in results}, reverse=True):
        per_s, regs_s = line_ceiling(baud, registers)
        source = next(r for r in results if r.baud == baud and r.mode == "source -> outbox")
        at_line = source.cpu_us_per_request * per_s / 1e4
        print(
            f"  {baud:>7} baud: at most {per_s:,.0f} requests/s = {regs_s:,.0f} registers/s; "
            f"the source would use about {at_line:.1f} % of a core at that rate"
        )


async def main_async(args: argparse.Namespace) -> int:
    ids = list(range(1, args.slaves + 1))
    results: list[Result] = []
    ok = True
    with tempfile.TemporaryDirectory(prefix="modbus-bench-") as tmp:
        for baud in args.bauds:
            print(f"baud {baud}: {len(ids)} slaves x {args.registers} registers, {args.seconds} s")
            baud_results, complete = await bench_baud(
                baud, ids, args.registers, args.seconds, Path(tmp)
            )
            for r in baud_results:
                print(
                    f"  {r.mode}: {r.registers_per_s:,.0f} registers/s, CPU {r.cpu_percent:.0f} %"
                )
            results += baud_results
            ok = ok and complete
    print()
    print_results(results, args.registers, len(ids))
    print(f"\nevery reading stored in the outbox: {'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 s per mode (smoke run)")
    parser.add_argument("--seconds", type=float, default=5.0, help="timed window per mode")
    parser.add_argument("--bauds", default="115200,9600", help="comma-separated baud rates")
    parser.add_argument("--slaves", type=int, default=4)
    parser.add_argument("--registers", type=int, default=16, help="per slave, 1 to 125")
    args = parser.parse_args()
    args.bauds = [int(b) for b in args.bauds.split(",")]
    if args.quick:
        args.seconds = 1.0
    if not 1 <= args.registers <= 125:
        parser.error("--registers is 1 to 125")
    if socat_path() is None:
        print("socat is not installed (apt-get install socat)", file=sys.stderr)
        return 1
    # The gateway's own log lines (port opened, ...) would interleave with the figures.
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(40))
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    sys.exit(main())
