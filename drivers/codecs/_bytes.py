"""Byte reading and JavaScript number formatting shared by the codecs.

Every vendor reference decoder is JavaScript that indexes past the end of a short payload without
noticing (``undefined << 8`` is ``0``), so a truncated frame silently decodes to zeros there. The
``Reader`` here refuses instead: a short read raises ``CodecError`` naming the device, the field
and the offset, so no codec ever lets an ``IndexError`` or ``struct.error`` escape.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from decimal import ROUND_HALF_UP, Decimal
from typing import NoReturn

from gateway.errors import CodecError


def fail(device: str, problem: str) -> NoReturn:
    """Raise the codec error every decoder uses: ``"<device>: <problem>"``."""
    raise CodecError(f"{device}: {problem}")


def require_fport(device: str, fport: int, known: tuple[int, ...]) -> None:
    """Reject a port the device does not define, with the vendor decoder's own words.

    The TTN decoders answer ``{"errors": ["unknown FPort"]}``; the message starts with that phrase
    so the negative test vectors can be matched on it.
    """
    if fport not in known:
        ports = ", ".join(str(p) for p in known)
        fail(device, f"unknown FPort {fport} (the device uplinks on {ports})")


def require_length(device: str, payload: bytes, expected: int, what: str) -> None:
    """Fixed-layout frames must have exactly their documented length."""
    if len(payload) != expected:
        fail(device, f"{what} is {expected} bytes, got {len(payload)}")


class Reader:
    """Sequential reads from one payload; big-endian unless the method name ends in ``le``."""

    __slots__ = ("_buf", "_device", "_pos")

    def __init__(self, device: str, payload: bytes) -> None:
        self._device = device
        self._buf = bytes(payload)
        self._pos = 0

    @property
    def pos(self) -> int:
        """Offset of the next byte to read."""
        return self._pos

    @property
    def remaining(self) -> int:
        """Bytes left after the current position."""
        return len(self._buf) - self._pos

    def at_end(self) -> bool:
        """True once every byte has been read."""
        return self._pos >= len(self._buf)

    def take(self, n: int, what: str = "value") -> bytes:
        """The next ``n`` bytes; ``what`` names the field in the error of a short read."""
        if n > self.remaining:
            fail(
                self._device,
                f"payload truncated: {what} needs {n} byte(s) at offset {self._pos}, "
                f"only {self.remaining} left of {len(self._buf)}",
            )
        chunk = self._buf[self._pos : self._pos + n]
        self._pos += n
        return chunk

    def skip(self, n: int, what: str = "reserved bytes") -> None:
        """Advance past ``n`` bytes that carry nothing we decode."""
        self.take(n, what)

    def expect_end(self) -> None:
        """Fail when bytes are left over: the frame is longer than its layout says."""
        if self.remaining:
            fail(
                self._device,
                f"{self.remaining} unexpected trailing byte(s) after offset {self._pos}",
            )

    def _at(self, n: int, what: str) -> int:
        """Offset of the next ``n`` bytes, and advance past them (the fixed-width reads)."""
        pos = self._pos
        if pos + n > len(self._buf):
            self.take(n, what)  # raises, naming the field and the offset
        self._pos = pos + n
        return pos

    # Every uplink's fields go through these: one precompiled struct call each, not a slice and
    # an int.from_bytes behind two more calls (about a third of the time).
    def u8(self, what: str = "value") -> int:
        return self._buf[self._at(1, what)]

    def i8(self, what: str = "value") -> int:
        return _I8(self._buf, self._at(1, what))[0]

    def u16(self, what: str = "value") -> int:
        return _U16(self._buf, self._at(2, what))[0]

    def i16(self, what: str = "value") -> int:
        return _I16(self._buf, self._at(2, what))[0]

    def u24(self, what: str = "value") -> int:
        pos = self._at(3, what)
        return int.from_bytes(self._buf[pos : pos + 3], "big")

    def u32(self, what: str = "value") -> int:
        return _U32(self._buf, self._at(4, what))[0]

    def i32(self, what: str = "value") -> int:
        # Also what JavaScript's ``b0 << 24 | b1 << 16 | b2 << 8 | b3`` yields: bitwise operators
        # work on signed 32-bit integers, so vendors' "unsigned" 32-bit counters come out signed.
        return _I32(self._buf, self._at(4, what))[0]

    def u16le(self, what: str = "value") -> int:
        return _U16LE(self._buf, self._at(2, what))[0]

    def i16le(self, what: str = "value") -> int:
        return _I16LE(self._buf, self._at(2, what))[0]

    def u32le(self, what: str = "value") -> int:
        return _U32LE(self._buf, self._at(4, what))[0]


# Typed for what they return here: one integer each.
_Unpack = Callable[[bytes, int], tuple[int]]
_I8: _Unpack = struct.Struct(">b").unpack_from
_U16: _Unpack = struct.Struct(">H").unpack_from
_I16: _Unpack = struct.Struct(">h").unpack_from
_U32: _Unpack = struct.Struct(">I").unpack_from
_I32: _Unpack = struct.Struct(">i").unpack_from
_U16LE: _Unpack = struct.Struct("<H").unpack_from
_I16LE: _Unpack = struct.Struct("<h").unpack_from
_U32LE: _Unpack = struct.Struct("<I").unpack_from


def js_to_fixed(x: float, digits: int) -> str:
    """JavaScript's ``Number.prototype.toFixed`` for the magnitudes sensors produce (< 1e21).

    ECMA-262 picks the decimal nearest to the exact binary value and, on a tie, the larger
    magnitude (the sign is handled separately), which is ``ROUND_HALF_UP`` on a ``Decimal`` built
    from the float. Python's ``format`` rounds ties to even instead, so it is not used here.
    """
    if x == 0:
        # (-0).toFixed(2) is "0.00": the sign test in the spec is ``x < 0``, false for -0.
        x = 0.0
    quantum = Decimal(1).scaleb(-digits)
    return f"{Decimal(x).quantize(quantum, rounding=ROUND_HALF_UP):f}"


def js_round_fixed(x: float, digits: int) -> float:
    """``parseFloat(x.toFixed(digits))``, the rounding idiom of Dragino's decoders."""
    return float(js_to_fixed(x, digits))
