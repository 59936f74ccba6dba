"""A real Modbus RTU bus for tests and benchmarks: pymodbus's serial server on a pseudo-terminal.

``ModbusPeer`` serves several slave ids on the device side of a socat pty pair (see
``tests.support.socat.PtyPair``), with the register values each test writes into it. Faults are
made at the outermost edge, in pymodbus's ``trace_packet`` hook on the server's outgoing bytes:

- ``dead``: ids whose answers are dropped: the slave is on the bus but says nothing (pymodbus
  3.16 answers an unknown id with an exception despite ``ignore_missing_devices``, so a dead slave
  is served and silenced instead; ids not in ``slaves`` are silenced the same way). Removing an
  id from ``dead`` brings the slave back.
- ``corrupt(id, n)``: the next ``n`` answers of ``id`` go out with a damaged CRC (line noise);
  ``corrupt(id, 0)`` ends that.

``encode()`` turns a value into registers with pymodbus's own encoder, independently of the
decoder under test. Run as a script (``python -m tests.support.modbus_peer PORT ...``) it serves
until killed, for the benchmark.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Literal, Self

from pymodbus.client.mixin import ModbusClientMixin
from pymodbus.framer import FramerType
from pymodbus.server import ModbusSerialServer
from pymodbus.simulator import DataType, SimData, SimDevice

__all__ = ["ModbusPeer", "SlaveImage", "encode"]

_DATATYPES = {
    "int16": ModbusClientMixin.DATATYPE.INT16,
    "uint16": ModbusClientMixin.DATATYPE.UINT16,
    "int32": ModbusClientMixin.DATATYPE.INT32,
    "uint32": ModbusClientMixin.DATATYPE.UINT32,
    "float32": ModbusClientMixin.DATATYPE.FLOAT32,
}


def encode(
    value: float,
    data_type: str,
    word_order: Literal["big", "little"] = "big",
    byte_order: Literal["big", "little"] = "big",
) -> list[int]:
    """The registers a device would hold for ``value`` (pymodbus's encoder, then byte swap)."""
    words = ModbusClientMixin.convert_to_registers(
        value, _DATATYPES[data_type], word_order=word_order
    )
    if byte_order == "little":
        words = [((w & 0xFF) << 8) | (w >> 8) for w in words]
    return words


@dataclass
class SlaveImage:
    """The register contents of one slave: each table from its start address (default 0).

    Addresses outside what is written are undefined: reading them draws "illegal address" (2).
    """

    holding: Sequence[int]
    input: Sequence[int] = (0,)
    holding_address: int = 0
    input_address: int = 0


def _device(device_id: int, image: SlaveImage) -> SimDevice:
    # Separate tables (coils, discrete inputs, holding, input); pymodbus wants an entry in each.
    return SimDevice(
        id=device_id,
        simdata=(
            [SimData(address=0, values=[False] * 16, datatype=DataType.BITS)],
            [SimData(address=0, values=[False] * 16, datatype=DataType.BITS)],
            [
                SimData(
                    address=image.holding_address,
                    values=list(image.holding),
                    datatype=DataType.REGISTERS,
                )
            ],
            [
                SimData(
                    address=image.input_address,
                    values=list(image.input),
                    datatype=DataType.REGISTERS,
                )
            ],
        ),
    )


class ModbusPeer:
    """pymodbus RTU server for ``slaves`` on ``port``; ``async with`` or start()/stop()."""

    def __init__(
        self,
        port: str,
        slaves: Mapping[int, SlaveImage],
        *,
        baud: int = 115200,
        dead: Sequence[int] = (),
    ) -> None:
        self.port = port
        self.baud = baud
        self._slaves = dict(slaves)
        self.dead: set[int] = set(dead)
        self._corrupt: Counter[int] = Counter()
        self.answers: Counter[int] = Counter()  # answers sent (or dropped) per id
        self._server: ModbusSerialServer | None = None

    def corrupt(self, device_id: int, count: int) -> None:
        """Damage the CRC of the next ``count`` answers of ``device_id`` (0: no more damage)."""
        self._corrupt[device_id] = count

    def _outgoing(self, sending: bool, data: bytes) -> bytes:
        if not sending or not data:
            return data
        device_id = data[0]
        self.answers[device_id] += 1
        if device_id in self.dead or device_id not in self._slaves:
            return b""
        if self._corrupt[device_id] > 0:
            self._corrupt[device_id] -= 1
            return data[:-1] + bytes([data[-1] ^ 0x5A])
        return data

    async def start(self) -> Self:
        if self._server is not None:
            raise RuntimeError("already serving")
        devices = [_device(i, image) for i, image in self._slaves.items()]
        # Id 0 is pymodbus's catch-all: it answers every id not listed, and _outgoing drops
        # those answers, so an absent slave is silent as on a real bus (and pymodbus does not
        # log a KeyError traceback for it).
        devices.append(_device(0, SlaveImage(holding=(0,))))
        server = ModbusSerialServer(
            devices,
            framer=FramerType.RTU,
            port=self.port,
            baudrate=self.baud,
            trace_packet=self._outgoing,
        )
        await server.serve_forever(background=True)
        self._server = server
        return self

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            await server.shutdown()  # type: ignore[no-untyped-call]  # unannotated in pymodbus

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()


def bench_image(registers: int) -> SlaveImage:
    """Holding registers 0..n-1 holding 1000 + address (what the benchmark reads)."""
    return SlaveImage(holding=[1000 + a for a in range(registers)])


async def _serve(port: str, baud: int, ids: Sequence[int], registers: int) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    async with ModbusPeer(port, dict.fromkeys(ids, bench_image(registers)), baud=baud):
        print("serving", flush=True)  # noqa: T201 -- the parent waits for this line
        await stop.wait()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Serve Modbus RTU slaves on a serial port.")
    parser.add_argument("port")
    parser.add_argument("--baud", type=int, default=115200)
    parser.add_argument("--ids", default="1", help="comma-separated slave ids")
    parser.add_argument("--registers", type=int, default=16)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    ids = [int(i) for i in args.ids.split(",")]
    asyncio.run(_serve(args.port, args.baud, ids, args.registers))
    return 0


if __name__ == "__main__":
    sys.exit(main())
