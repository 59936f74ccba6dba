"""Modbus RTU master: register decoding, RTU framing, a polling source and a bus scan.

References: *MODBUS Application Protocol Specification V1.1b3* (function codes 3 and 4, §6.3/§6.4:
1 to 125 registers per read; exception responses, §7) and *MODBUS over Serial Line Specification
and Implementation Guide V1.02* (RTU framing, §2.5.1: frames separated by at least 3.5 character
times of silence, a fixed 1.75 ms above 19200 baud; CRC-16 sent low byte first).

Why not pymodbus's ``AsyncModbusSerialClient`` for the transactions
--------------------------------------------------------------------
pymodbus (3.16) builds the requests and computes the CRC here, and a real pymodbus server is the
peer in the tests; its client is the reference in ``bench/modbus_rtu.py``. Its transaction layer
does not fit a bus with one dead slave among live ones:

- one timeout and one retry count per client, where each slave needs its own;
- an answer with a bad CRC is dropped silently and surfaces as a timeout, so noise on the line
  cannot be told from a dead slave, and there is nothing to count;
- it opens and re-opens the port itself, with no event on loss and no way to share the gateway's
  hot-plug handling (``serial_lost``/``serial_restored``, exclusive open, error messages that
  name the fix).

So the master here is small and of our own: :class:`RtuLink` runs one request/response
transaction at a time on the stream that :class:`drivers.serial_port.PortSupervisor` opened,
keeps the inter-frame silence, hunts for the answer in what arrives (skipping stray bytes such as
a late answer to an earlier request), and tells timeouts, damaged answers (CRC) and exception
responses apart.

Bus scheduling (:class:`ModbusRtuSource`)
-----------------------------------------
An RS-485 bus is half-duplex with one master: requests are strictly serialised, by one task that
owns the port. Each slave has its own next-due time, and the task polls the slave that is due
earliest. A poll reads the slave's register blocks, each request tried up to ``retries + 1``
times, so the first failed poll of a slave that has just died holds the bus for at most
``timeout_s x (retries + 1)``. The slave is then ``silent``: it is probed with a single try per
poll (at most ``timeout_s`` of bus time) and its interval doubles after each failed probe, up to
``backoff_max_s``. Among slaves that are due, live ones go first (a silent slave yields for at
most one poll interval, so a saturated bus still probes it). A live slave's poll is therefore late
by at most one such attempt, plus up to 20 ms after a failed try for the line to go quiet. Polls
keep their phase (next = due + interval); when the bus cannot keep up, missed slots are skipped
rather than polled in a burst.

Decoding is pure (:func:`decode_registers`, :func:`scale_value`, :func:`register_value`) and so is
the RTU framing (:func:`read_request`, :func:`find_response`).
"""

from __future__ import annotations

import asyncio
import errno
import math
import struct
import time
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Literal, get_args

import structlog
from pymodbus.constants import ExcCodes
from pymodbus.framer.rtu import FramerRTU
from pymodbus.pdu import DecodePDU
from pymodbus.pdu.register_message import (
    ReadHoldingRegistersRequest,
    ReadInputRegistersRequest,
)

from drivers.serial_port import (
    PortLostError,
    PortSupervisor,
    SerialSettings,
    classify,
    open_port,
)
from gateway.types import Emit, Event, Measurement, Reading, ReportError, Severity, utc_now

log = structlog.get_logger(__name__)

__all__ = [
    "MAX_READ_REGISTERS",
    "DataType",
    "ModbusExceptionError",
    "ModbusRegister",
    "ModbusRtuSource",
    "ModbusSlave",
    "NoAnswerError",
    "Order",
    "RegisterBlock",
    "RtuLink",
    "RtuResponse",
    "Table",
    "decode_registers",
    "exception_name",
    "find_response",
    "plan_blocks",
    "read_request",
    "register_value",
    "retry_delay_s",
    "scale_value",
    "scan",
]

DataType = Literal["int16", "uint16", "int32", "uint32", "float32"]
Order = Literal["big", "little"]
Table = Literal["holding", "input"]

# struct format (big-endian bytes as they come off the wire once ordered) and width in registers.
_FORMATS: Final[dict[str, tuple[str, int]]] = {
    "int16": (">h", 1),
    "uint16": (">H", 1),
    "int32": (">i", 2),
    "uint32": (">I", 2),
    "float32": (">f", 2),
}
_FUNCTION: Final[dict[str, int]] = {"holding": 3, "input": 4}

# Application protocol §6.3/§6.4: a read returns 1 to 125 registers (250 data bytes; the RTU
# frame, with address, function, byte count and CRC, stays within its 256-byte limit).
MAX_READ_REGISTERS: Final = 125

# A USB serial adapter hands bytes over in bursts (the FTDI latency timer defaults to 16 ms), so
# a quiet line is only believed after this long, whatever the baud rate says.
_USB_QUIET_S: Final = 0.02
# After a failed transaction the line is drained until quiet, for at most this long: a line that
# never goes quiet (a babbling device, a wrong baud rate) must not stop the polling.
_DRAIN_MAX_S: Final = 0.25
_READ_CHUNK: Final = 4096
# A failed probe backs off by doubling; 2**_MAX_DOUBLINGS bounds the arithmetic, not the delay.
_MAX_DOUBLINGS: Final = 20


# -- decoding (pure) ----------------------------------------------------------------------------


def decode_registers(
    words: Sequence[int],
    data_type: DataType,
    word_order: Order = "big",
    byte_order: Order = "big",
) -> int | float:
    """The value held by 1 (16-bit types) or 2 (32-bit types) registers.

    ``word_order="little"``: the low word comes first (the "CDAB" layout of many meters).
    ``byte_order="little"``: each register carries its two bytes swapped ("BADC"). Both little:
    "DCBA". Float32 values come back as the shortest decimal that is the same float32 (21.5, not
    21.499999046325684); NaN and infinities are returned as they are.
    """
    try:
        fmt, width = _FORMATS[data_type]
    except KeyError:
        raise ValueError(f"unknown data type {data_type!r}") from None
    if len(words) != width:
        raise ValueError(f"{data_type} takes {width} register(s) (got: {len(words)})")
    ordered = words if word_order == "big" else list(reversed(words))
    endian: Literal["big", "little"] = "big" if byte_order == "big" else "little"
    try:
        raw = b"".join(int(word).to_bytes(2, endian) for word in ordered)
    except OverflowError:
        raise ValueError(f"registers are 0 to 65535 (got: {list(words)})") from None
    (value,) = struct.unpack(fmt, raw)
    if data_type == "float32":
        return _shortest_float32(float(value))
    return int(value)


def _shortest_float32(value: float) -> float:
    if not math.isfinite(value):
        return value
    exact = struct.pack(">f", value)
    # 9 significant digits always identify a float32; most values need far fewer.
    for digits in range(6, 10):
        candidate = float(f"{value:.{digits}g}")
        try:
            if struct.pack(">f", candidate) == exact:
                return candidate
        except OverflowError:
            break
    return value


def scale_value(raw: int | float, scale: float = 1.0, offset: float = 0.0) -> int | float:
    """``raw x scale + offset``; integers stay integers when there is nothing to apply.

    The result is rounded to 12 significant digits: 234 x 0.1 is 23.4 on the wire, not
    23.400000000000002, and no sensor on a 16/32-bit register has more resolution than that.
    """
    if scale == 1 and offset == 0:
        return raw
    value = raw * scale + offset
    if not math.isfinite(value):
        return value
    return float(f"{value:.12g}")


# -- configuration (plain data, mirrors gateway.config's Modbus models) ---------------------------


@dataclass(frozen=True, slots=True)
class ModbusRegister:
    """One value read from a slave: 0-based ``address`` (the PDU address, not 4xxxx)."""

    name: str
    address: int
    table: Table = "holding"
    data_type: DataType = "uint16"
    word_order: Order = "big"
    byte_order: Order = "big"
    unit: str | None = None
    scale: float = 1.0
    offset: float = 0.0

    def __post_init__(self) -> None:
        if self.data_type not in _FORMATS:
            raise ValueError(f"register {self.name}: unknown data type {self.data_type!r}")
        if self.table not in _FUNCTION:
            raise ValueError(f"register {self.name}: table is holding or input ({self.table!r})")
        for what, order in (("word_order", self.word_order), ("byte_order", self.byte_order)):
            if order not in get_args(Order):
                raise ValueError(f"register {self.name}: {what} is big or little ({order!r})")
        if not 0 <= self.address <= 65536 - self.width:
            raise ValueError(
                f"register {self.name}: address {self.address} + {self.width} register(s) "
                f"leaves 0..65535"
            )
        # The same checks a Reading will apply, at build time instead of at every poll.
        Measurement(self.name, 0, self.unit)

    @property
    def width(self) -> int:
        """Registers this value occupies."""
        return _FORMATS[self.data_type][1]


def register_value(register: ModbusRegister, words: Sequence[int]) -> int | float:
    """Decode a register's words and apply its scale and offset."""
    raw = decode_registers(words, register.data_type, register.word_order, register.byte_order)
    return scale_value(raw, register.scale, register.offset)


@dataclass(frozen=True, slots=True)
class ModbusSlave:
    """One slave on the bus, polled on its own schedule.

    ``timeout_s`` is the slave's turnaround allowance: the time the request and the answer take
    on the wire at the port's baud rate is added to it. After a failed poll the slave is probed
    with a single try every ``poll_interval_s x 2**n`` seconds, at most every ``backoff_max_s``
    (or ``poll_interval_s`` when that is longer).
    """

    device_id: int
    device: str
    registers: tuple[ModbusRegister, ...]
    poll_interval_s: float = 10.0
    timeout_s: float = 1.0
    retries: int = 1
    backoff_max_s: float = 60.0

    def __post_init__(self) -> None:
        # 0 is broadcast (no answer) and 248..255 are reserved (serial line spec §2.2).
        if not 1 <= self.device_id <= 247:
            raise ValueError(f"slave {self.device}: device_id is 1 to 247 (got: {self.device_id})")
        if not self.registers:
            raise ValueError(f"slave {self.device}: no registers to read")
        if self.poll_interval_s <= 0 or self.timeout_s <= 0 or self.backoff_max_s <= 0:
            raise ValueError(f"slave {self.device}: intervals and timeouts must be > 0")
        if self.retries < 0:
            raise ValueError(f"slave {self.device}: retries must be >= 0")
        names = [r.name for r in self.registers]
        if len(set(names)) != len(names):
            twice = sorted({n for n in names if names.count(n) > 1})
            raise ValueError(f"slave {self.device}: register names used twice: {twice}")


@dataclass(frozen=True, slots=True)
class RegisterBlock:
    """One read request: ``count`` registers of one table from ``address``."""

    table: Table
    address: int
    count: int
    registers: tuple[ModbusRegister, ...]

    @property
    def function(self) -> int:
        """Function code: 3 (read holding registers) or 4 (read input registers)."""
        return _FUNCTION[self.table]

    def words(self, register: ModbusRegister, block_words: Sequence[int]) -> Sequence[int]:
        """The words of ``register`` within an answer to this block."""
        start = register.address - self.address
        return block_words[start : start + register.width]


def plan_blocks(registers: Iterable[ModbusRegister]) -> tuple[RegisterBlock, ...]:
    """Group registers into as few reads as possible.

    Only registers that touch or overlap are merged: reading the unused registers in a gap can
    draw an "illegal data address" exception from devices with holes in their register map.
    """
    blocks: list[RegisterBlock] = []
    for reg in sorted(registers, key=lambda r: (r.table, r.address)):
        end = reg.address + reg.width
        if blocks:
            last = blocks[-1]
            last_end = last.address + last.count
            new_end = max(last_end, end)
            if (
                last.table == reg.table
                and reg.address <= last_end
                and new_end - last.address <= MAX_READ_REGISTERS
            ):
                blocks[-1] = RegisterBlock(
                    last.table, last.address, new_end - last.address, (*last.registers, reg)
                )
                continue
        blocks.append(RegisterBlock(reg.table, reg.address, reg.width, (reg,)))
    return tuple(blocks)


# -- RTU framing (pure) ---------------------------------------------------------------------------

_FRAMER: Final = FramerRTU(DecodePDU(False))


def read_request(device_id: int, table: Table, address: int, count: int) -> bytes:
    """The RTU frame of a read-holding (3) or read-input (4) registers request."""
    pdu = (ReadHoldingRegistersRequest if table == "holding" else ReadInputRegistersRequest)(
        dev_id=device_id, address=address, count=count
    )
    return _FRAMER.buildFrame(pdu)


def _crc_ok(frame: bytes | bytearray) -> bool:
    # compute_CRC returns the CRC byte-swapped, so that big-endian bytes are the wire order.
    return FramerRTU.compute_CRC(bytes(frame[:-2])) == int.from_bytes(frame[-2:], "big")


@dataclass(frozen=True, slots=True)
class RtuResponse:
    """An answer found in the receive buffer at ``start:end``: registers or an exception code."""

    start: int
    end: int
    registers: tuple[int, ...] = ()
    exception_code: int | None = None


def find_response(
    buffer: bytes | bytearray, device_id: int, function: int, count: int
) -> tuple[RtuResponse | None, int]:
    """The first valid answer to a read of ``count`` registers, and the damaged candidates seen.

    RTU frames carry no length or start marker, so this hunts: at each offset where the slave
    address and function code (or the exception code, function | 0x80) of the expected answer
    appear, with the right byte count, a frame of the expected length is checked against its
    CRC. Bytes before the frame are stray (noise, a late answer to an earlier request).
    Returns ``(None, n)`` when no valid answer is complete yet; ``n`` counts frames of the
    right shape with a wrong CRC.
    """
    size = 5 + 2 * count
    damaged = 0
    last = len(buffer) - 1
    start = buffer.find(device_id)
    while 0 <= start < last:
        code = buffer[start + 1]
        end = -1
        if code == function:
            if start + 2 > last or buffer[start + 2] == 2 * count:
                end = start + size
        elif code == function | 0x80:
            end = start + 5
        if 0 < end <= len(buffer):
            frame = buffer[start:end]
            if _crc_ok(frame):
                if code == function:
                    words = struct.unpack(f">{count}H", frame[3:-2])
                    return RtuResponse(start, end, registers=words), damaged
                return RtuResponse(start, end, exception_code=frame[2]), damaged
            damaged += 1
        start = buffer.find(device_id, start + 1)
    return None, damaged


def exception_name(code: int) -> str:
    """``illegal_address`` for 2, ``code_12`` for codes the specification does not name."""
    try:
        return ExcCodes(code).name.lower()
    except ValueError:
        return f"code_{code}"


# -- the link: one transaction at a time on an open port -------------------------------------------


class NoAnswerError(Exception):
    """No valid answer within the timeout; ``reason`` is ``timeout`` or ``crc_error``."""

    def __init__(self, reason: Literal["timeout", "crc_error"]) -> None:
        super().__init__(reason)
        self.reason: Literal["timeout", "crc_error"] = reason


class ModbusExceptionError(Exception):
    """The slave answered with a Modbus exception response (application protocol §7)."""

    def __init__(self, code: int) -> None:
        super().__init__(f"{exception_name(code)} ({code})")
        self.code = code


def _char_time_s(settings: SerialSettings) -> float:
    # start bit + data bits + parity bit + stop bits
    bits = 1 + settings.bytesize + (0 if settings.parity == "N" else 1) + settings.stopbits
    return bits / settings.baud


class RtuLink:
    """A Modbus RTU master on an open stream: serialised request/response transactions.

    Port failures surface as ``OSError`` from :meth:`transact` and :meth:`idle_for` (for the
    supervisor to handle); a slave's failure as :class:`NoAnswerError` or
    :class:`ModbusExceptionError`. ``counters`` (shared with the owner) gets ``requests`` and
    ``stray_bytes``.
    """

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        settings: SerialSettings,
        counters: Counter[str] | None = None,
    ) -> None:
        self._reader = reader
        self._writer = writer
        self.char_s = _char_time_s(settings)
        # Serial line spec §2.5.1.1: 3.5 character times between frames, 1.75 ms above 19200.
        self.silence_s = 3.5 * self.char_s if settings.baud <= 19200 else 0.00175
        self.counters: Counter[str] = Counter() if counters is None else counters
        self._buffer = bytearray()
        self._last_rx = 0.0
        # False after a failed transaction: a late or partial answer may still be on its way.
        self._clean = True

    async def transact(
        self, request: bytes, device_id: int, function: int, count: int, timeout_s: float
    ) -> tuple[int, ...]:
        """Send a read request and return the registers of its answer."""
        loop = asyncio.get_running_loop()
        await self._settle(loop)
        self._writer.write(request)
        await self._writer.drain()
        self.counters["requests"] += 1
        # The time both frames take on the wire is added: a 125-register answer at 9600 baud
        # takes 266 ms, which must not eat a timeout meant for the slave's turnaround.
        deadline = loop.time() + timeout_s + self.char_s * (len(request) + 5 + 2 * count)
        while True:
            found, damaged = find_response(self._buffer, device_id, function, count)
            if found is not None:
                self.counters["stray_bytes"] += found.start
                del self._buffer[: found.end]
                if found.exception_code is not None:
                    raise ModbusExceptionError(found.exception_code)
                return found.registers
            if damaged:
                # A slave answers once: a complete frame with a bad CRC followed by a quiet
                # line is a damaged answer, not worth waiting out the whole timeout for.
                deadline = min(deadline, self._last_rx + max(self.silence_s, _USB_QUIET_S))
            if not await self._receive(loop, deadline):
                self._clean = False
                raise NoAnswerError("crc_error" if damaged else "timeout")

    async def idle_for(self, seconds: float) -> None:
        """Wait, discarding whatever arrives; raises if the port fails.

        Reading while idle is what notices an unplugged adapter between polls, at once.
        """
        loop = asyncio.get_running_loop()
        until = loop.time() + seconds
        while await self._receive(loop, until):
            self._discard()

    async def _receive(self, loop: asyncio.AbstractEventLoop, deadline: float) -> bool:
        """Append what arrives before ``deadline`` to the buffer; False when nothing did."""
        try:
            async with asyncio.timeout_at(deadline):
                data = await self._reader.read(_READ_CHUNK)
        except TimeoutError:
            return False
        if not data:
            raise PortLostError(errno.EIO, "the port closed")
        self._buffer += data
        self._last_rx = loop.time()
        return True

    def _discard(self) -> None:
        if self._buffer:
            self.counters["stray_bytes"] += len(self._buffer)
            self._buffer.clear()

    async def _settle(self, loop: asyncio.AbstractEventLoop) -> None:
        """Make the line ready for a request: silence since the last byte, nothing buffered.

        Whatever is buffered or arrives before the request goes out is no answer to it, so the
        answer hunt only ever sees bytes that came after the request.
        """
        self._discard()
        if self._clean:
            quiet = self.silence_s
            # At least one look (a deadline already passed still returns buffered bytes).
            until = max(self._last_rx + quiet, loop.time())
        else:
            # After a timeout or a damaged answer a late answer may still be on its way: wait
            # for the line to go quiet, or it would be taken for the answer to the next request
            # (RTU has no transaction id).
            quiet = max(self.silence_s, _USB_QUIET_S)
            until = loop.time() + quiet
        give_up = loop.time() + _DRAIN_MAX_S
        while await self._receive(loop, min(until, give_up)):
            self._discard()
            until = self._last_rx + quiet
        self._clean = True


# -- the source -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Job:
    block: RegisterBlock
    request: bytes


@dataclass(slots=True)
class _Outcome:
    """What one block's request(s) gave: words, an exception code, or no answer."""

    words: tuple[int, ...] | None = None
    exception_code: int | None = None
    failure: Literal["timeout", "crc_error"] | None = None
    retried: bool = False


@dataclass(slots=True)
class _SlaveState:
    slave: ModbusSlave
    jobs: tuple[_Job, ...]
    due: float = 0.0
    silent: bool = False
    silent_since: float = 0.0
    failures: int = 0  # consecutive failed polls
    last_ok: float | None = None
    counts: Counter[str] = field(default_factory=Counter)
    exception_codes: Counter[str] = field(default_factory=Counter)
    # Conditions already reported (logged) that have not cleared since: one line per episode.
    reported: set[str] = field(default_factory=set)


_SLAVE_COUNTERS: Final = (
    "polls",
    "readings",
    "failed_polls",
    "timeouts",
    "crc_errors",
    "exceptions",
)


class ModbusRtuSource:
    """Polls the slaves of one Modbus RTU bus; see the module docstring for the scheduling.

    Emits one :class:`Reading` per answered poll of a slave (all its registers; quality
    ``incomplete`` when some are missing, ``invalid_value`` for a NaN/infinite float,
    ``retried`` when the answer came only after a retry), ``device_silent`` (warning) when a
    slave stops answering, ``device_back`` (info) when it answers again, and the port's
    ``serial_lost``/``serial_restored`` through :class:`PortSupervisor`.
    """

    def __init__(self, name: str, settings: SerialSettings, slaves: Sequence[ModbusSlave]) -> None:
        if not slaves:
            raise ValueError(f"modbus source {name}: no slaves")
        ids = [s.device_id for s in slaves]
        if len(set(ids)) != len(ids):
            twice = sorted({i for i in ids if ids.count(i) > 1})
            # Two slaves with one address answer together and garble each other's frames.
            raise ValueError(f"modbus source {name}: device_id used twice on one bus: {twice}")
        self.name = name
        self.port = PortSupervisor(name, name, settings)
        self._settings = settings
        self._bus: Counter[str] = Counter()
        self._slaves = [
            _SlaveState(
                slave,
                tuple(
                    _Job(b, read_request(slave.device_id, b.table, b.address, b.count))
                    for b in plan_blocks(slave.registers)
                ),
            )
            for slave in slaves
        ]

    @property
    def counters(self) -> Mapping[str, int]:
        """Totals over every slave, the bus' requests and stray bytes, and slaves silent now."""
        totals: Counter[str] = Counter(dict.fromkeys(_SLAVE_COUNTERS, 0))
        for st in self._slaves:
            totals.update(st.counts)
        totals["requests"] = self._bus["requests"]
        totals["stray_bytes"] = self._bus["stray_bytes"]
        totals["silent_slaves"] = sum(st.silent for st in self._slaves)
        return dict(totals)

    def stats(self) -> dict[str, Any]:
        """The port, the totals and every slave's counters, for the stats message."""
        now = time.monotonic()
        slaves = []
        for st in self._slaves:
            if st.silent:
                state = "silent"
            elif st.last_ok is None:
                state = "pending"
            else:
                state = "ok"
            entry: dict[str, Any] = {
                "device": st.slave.device,
                "device_id": st.slave.device_id,
                "state": state,
                **{name: st.counts[name] for name in _SLAVE_COUNTERS},
                "exception_codes": dict(st.exception_codes),
                "last_ok_age_s": None if st.last_ok is None else round(now - st.last_ok, 1),
            }
            slaves.append(entry)
        return {
            "source": self.name,
            **self.port.summary(),
            "counters": dict(self.counters),
            "slaves": slaves,
        }

    def slave_counters(self, device: str) -> Mapping[str, int]:
        """One slave's counters (by its device name), including ``exception_<name>`` counts."""
        st = next(s for s in self._slaves if s.slave.device == device)
        result = {name: st.counts[name] for name in _SLAVE_COUNTERS}
        result.update({f"exception_{k}": v for k, v in st.exception_codes.items()})
        return result

    async def run(self, emit: Emit, report_error: ReportError) -> None:
        """Poll until cancelled, surviving the port going away and coming back."""

        async def session(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await self._session(
                RtuLink(reader, writer, self._settings, self._bus), emit, report_error
            )

        await self.port.run(session, emit, report_error)

    async def _session(self, link: RtuLink, emit: Emit, report_error: ReportError) -> None:
        while True:
            now = time.monotonic()
            st = min(self._slaves, key=lambda s: _priority(s, now))
            if st.due > now:
                await link.idle_for(st.due - now)
            await self._poll(st, link, emit, report_error)

    async def _poll(
        self, st: _SlaveState, link: RtuLink, emit: Emit, report_error: ReportError
    ) -> None:
        slave = st.slave
        st.counts["polls"] += 1
        crc_before = st.counts["crc_errors"]
        # A slave known to be silent gets one try: retrying a dead slave only holds the bus.
        tries = 1 if st.silent else slave.retries + 1
        values: list[Measurement] = []
        flags: set[str] = set()
        answered = False
        failure: Literal["timeout", "crc_error"] | None = None
        for job in st.jobs:
            outcome = await self._read(st, job, link, tries)
            if outcome.failure is not None:
                # No answer: the remaining blocks would most likely cost a timeout each too.
                failure = outcome.failure
                break
            answered = True
            if outcome.retried:
                flags.add("retried")
            if outcome.exception_code is not None:
                flags.add("incomplete")
                self._report_exception(st, job.block, outcome.exception_code, report_error)
                continue
            st.reported.discard(_block_key(job.block))
            assert outcome.words is not None
            for reg in job.block.registers:
                value = register_value(reg, job.block.words(reg, outcome.words))
                if isinstance(value, float) and not math.isfinite(value):
                    # Many devices mark a failed sensor with NaN; an event cannot carry it.
                    flags.update(("incomplete", "invalid_value"))
                    continue
                values.append(Measurement(reg.name, value, reg.unit))
        self._report_noise(st, crc_before, report_error)
        now = time.monotonic()
        if not answered:
            assert failure is not None
            await self._failed(st, failure, tries, now, emit)
            return
        if failure is not None:
            flags.add("incomplete")
        await self._answered(st, now, emit)
        if values:
            st.counts["readings"] += 1
            await emit(
                Reading(
                    source=self.name,
                    device=slave.device,
                    ts=utc_now(),
                    values=tuple(values),
                    quality=tuple(sorted(flags)),
                )
            )

    async def _read(self, st: _SlaveState, job: _Job, link: RtuLink, tries: int) -> _Outcome:
        slave = st.slave
        outcome = _Outcome()
        for attempt in range(tries):
            try:
                words = await link.transact(
                    job.request,
                    slave.device_id,
                    job.block.function,
                    job.block.count,
                    slave.timeout_s,
                )
            except NoAnswerError as exc:
                st.counts["timeouts" if exc.reason == "timeout" else "crc_errors"] += 1
                outcome.failure = exc.reason
                continue
            except ModbusExceptionError as exc:
                # A definite answer: asking again gives the same one.
                st.counts["exceptions"] += 1
                st.exception_codes[exception_name(exc.code)] += 1
                return _Outcome(exception_code=exc.code, retried=attempt > 0)
            return _Outcome(words=words, retried=attempt > 0)
        return outcome

    async def _failed(
        self,
        st: _SlaveState,
        reason: Literal["timeout", "crc_error"],
        tries: int,
        now: float,
        emit: Emit,
    ) -> None:
        slave = st.slave
        st.counts["failed_polls"] += 1
        st.failures += 1
        delay = retry_delay_s(slave, st.failures)
        st.due = now + delay
        if st.silent:
            return
        st.silent = True
        st.silent_since = now
        log.warning(
            "modbus_device_silent",
            source=self.name,
            device=slave.device,
            device_id=slave.device_id,
            reason=reason,
            tries=tries,
            retry_in_s=round(delay, 3),
        )
        await emit(
            Event(
                kind="device_silent",
                device=slave.device,
                ts=utc_now(),
                severity=Severity.WARNING,
                values=(
                    Measurement("device_id", slave.device_id),
                    Measurement("port", self._settings.port[:256]),
                    Measurement("reason", reason),
                    Measurement("tries", tries),
                    Measurement("retry_in", round(delay, 3), "s"),
                ),
            )
        )

    async def _answered(self, st: _SlaveState, now: float, emit: Emit) -> None:
        slave = st.slave
        st.failures = 0
        st.last_ok = now
        # Keep the phase; skip the slots a busy bus or a lost port missed instead of bursting.
        following = st.due + slave.poll_interval_s
        st.due = following if following > now else now + slave.poll_interval_s
        if not st.silent:
            return
        st.silent = False
        silent_for = round(now - st.silent_since, 2)
        log.info(
            "modbus_device_back",
            source=self.name,
            device=slave.device,
            device_id=slave.device_id,
            silent_for_s=silent_for,
        )
        await emit(
            Event(
                kind="device_back",
                device=slave.device,
                ts=utc_now(),
                severity=Severity.INFO,
                values=(
                    Measurement("device_id", slave.device_id),
                    Measurement("port", self._settings.port[:256]),
                    Measurement("silent_for", silent_for, "s"),
                ),
            )
        )

    def _report_noise(self, st: _SlaveState, crc_before: int, report_error: ReportError) -> None:
        if st.counts["crc_errors"] == crc_before:
            st.reported.discard("crc_error")
            return
        if "crc_error" in st.reported:
            return
        st.reported.add("crc_error")
        report_error(
            "modbus_crc_error",
            f"{st.slave.device} (id {st.slave.device_id}) on {self._settings.port}: damaged "
            f"answers (bad CRC), {st.counts['crc_errors']} so far: check wiring, termination, "
            f"baud rate and parity",
        )

    def _report_exception(
        self, st: _SlaveState, block: RegisterBlock, code: int, report_error: ReportError
    ) -> None:
        key = _block_key(block)
        if key in st.reported:
            return
        st.reported.add(key)
        last = block.address + block.count - 1
        report_error(
            "modbus_exception",
            f"{st.slave.device} (id {st.slave.device_id}) answered {exception_name(code)} "
            f"({code}) to a read of {block.table} registers {block.address}..{last} "
            f"(0-based): check the register map of the device",
        )


def retry_delay_s(slave: ModbusSlave, failures: int) -> float:
    """When to try a slave again after ``failures`` consecutive failed polls (1 or more).

    The poll interval, doubled after each further failure, at most ``backoff_max_s`` (or the
    poll interval when that is longer: a slave polled hourly is not probed more often when dead).
    """
    ceiling = max(slave.poll_interval_s, slave.backoff_max_s)
    doublings = min(max(failures - 1, 0), _MAX_DOUBLINGS)
    return min(slave.poll_interval_s * (1 << doublings), ceiling)


def _block_key(block: RegisterBlock) -> str:
    return f"exception:{block.table}:{block.address}"


def _priority(st: _SlaveState, now: float) -> tuple[int, int, float]:
    # Due slaves first, live before silent among them, then by due time. A silent slave is
    # deferred for at most one poll interval: on a bus too busy to ever be idle it would
    # otherwise never be probed again, and its return never noticed.
    if st.due <= now:
        deferred = st.silent and now - st.due < st.slave.poll_interval_s
        return (0, int(deferred), st.due)
    return (1, 0, st.due)


# -- technician scan ------------------------------------------------------------------------------


async def scan(settings: SerialSettings, ids: Sequence[int], timeout_s: float) -> list[int]:
    """The slave ids that answer a read of holding register 0 (an exception answer counts).

    Raises :class:`drivers.serial_port.PortProblemError` when the port cannot be opened or
    fails during the scan (the message names the fix).
    """
    for device_id in ids:
        if not 1 <= device_id <= 247:
            raise ValueError(f"Modbus slave ids are 1 to 247 (got: {device_id})")
    reader, writer = await open_port(settings)
    answered: list[int] = []
    try:
        link = RtuLink(reader, writer, settings)
        for device_id in ids:
            try:
                await link.transact(
                    read_request(device_id, "holding", 0, 1), device_id, 3, 1, timeout_s
                )
            except ModbusExceptionError:
                pass  # "illegal address" and friends: a slave is there and speaks Modbus
            except NoAnswerError:
                continue
            answered.append(device_id)
    except OSError as exc:
        raise classify(settings.port, exc) from exc
    finally:
        writer.close()
    return answered
