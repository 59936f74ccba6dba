"""Decentlab uplink decoders: DL-PR26, DL-PR36, DL-PR21 (pressure / liquid level), DL-CTD10.

All Decentlab devices share one frame format, protocol version 2 (big-endian):

    version(1) = 2 | device id(2) | flags(2) | 16-bit words of each group whose flag bit is set

Bit ``i`` of ``flags`` says whether sensor group ``i`` is present; a group is a fixed number of
words from which its values are computed. Groups are listed per device below, with the
conversions Decentlab publishes for the device. The output matches the vendor's TTN decoders:
device fields plus one ``{"displayName", "value", "unit"}`` object per value. Unlike them, a frame
with bytes left over after the announced groups is refused (it belongs to another device type).
The vendor decoders do not look at the fPort, and neither do these.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from drivers.codecs._bytes import Reader, fail

_PROTOCOL_VERSION = 2


@dataclass(frozen=True, slots=True)
class _Value:
    name: str
    display_name: str
    convert: Callable[[Sequence[int]], float]
    unit: str | None = None


@dataclass(frozen=True, slots=True)
class _Group:
    words: int
    values: tuple[_Value, ...]


def _decode(device: str, groups: tuple[_Group, ...], payload: bytes) -> dict[str, Any]:
    reader = Reader(device, payload)
    version = reader.u8("protocol version")
    if version != _PROTOCOL_VERSION:
        # The vendor decoder's own error text.
        fail(device, f"protocol version {version} doesn't match v2")
    result: dict[str, Any] = {"protocol_version": version, "device_id": reader.u16("device id")}
    flags = reader.u16("flags")
    # Flag bits above the device's groups are ignored, as the vendor decoders ignore them.
    for index, group in enumerate(groups):
        if not flags & (1 << index):
            continue
        words = [reader.u16(f"sensor group {index}") for _ in range(group.words)]
        for value in group.values:
            entry: dict[str, Any] = {
                "displayName": value.display_name,
                "value": value.convert(words),
            }
            if value.unit is not None:
                entry["unit"] = value.unit
            result[value.name] = entry
    # The flags say exactly how many words follow; more bytes mean a frame of another device.
    reader.expect_end()
    return result


# Every battery-powered Decentlab device ends with this group: supply voltage in mV.
_BATTERY = _Group(1, (_Value("battery_voltage", "Battery voltage", lambda x: x[0] / 1000, "V"),))


def _keller_pressure_group(pmin_bar: float, pmax_bar: float) -> _Group:
    # Keller transmitters (DL-PR21, DL-PR26): pressure maps 16384..49152 onto Pmin..Pmax; the
    # temperature word maps 384..64384 onto -50..150 degC (0.003125 degC per count). The
    # arithmetic keeps the vendor's operation order so the doubles come out bit-identical.
    return _Group(
        2,
        (
            _Value(
                "pressure",
                "Pressure",
                lambda x: (x[0] - 16384) / 32768 * (pmax_bar - pmin_bar) + pmin_bar,
                "bar",
            ),
            _Value("temperature", "Temperature", lambda x: (x[1] - 384) * 0.003125 - 50, "°C"),
        ),
    )


# DL-PR26, variant 0..1 bar (TTN codec ``dl-pr26-0-1``).
_PR26_0_1 = (_keller_pressure_group(0.0, 1.0), _BATTERY)

# DL-PR21, variant -1..10 bar (TTN codec ``dl-pr21-1-10``).
_PR21_1_10 = (_keller_pressure_group(-1.0, 10.0), _BATTERY)

# DL-PR36, kp = 8192 counts per bar (TTN codec ``dl-pr36-8192``): both words are offset by 32768;
# the temperature has 1/256 degC resolution.
_PR36_KP = 8192
_PR36_8192 = (
    _Group(
        2,
        (
            _Value("pressure", "Pressure", lambda x: (x[0] - 32768) / _PR36_KP, "bar"),
            _Value("temperature", "Temperature", lambda x: (x[1] - 32768) / 256, "°C"),
        ),
    ),
    _BATTERY,
)

# DL-CTD10: water depth mm and temperature 0.1 degC (offset 32768), conductivity uS/cm, and a
# freezing flag (no unit).
_CTD10 = (
    _Group(
        4,
        (
            _Value("water_depth", "Water depth", lambda x: x[0] - 32768, "mm"),
            _Value("temperature", "Temperature", lambda x: (x[1] - 32768) / 10, "°C"),
            _Value("electrical_conductivity", "Electrical conductivity", lambda x: x[2], "µS⋅cm⁻¹"),
            _Value("freezing_flag", "Freezing flag", lambda x: x[3]),
        ),
    ),
    _BATTERY,
)


def decode_dl_pr26_0_1(fport: int, payload: bytes) -> dict[str, Any]:
    """DL-PR26 pressure / liquid level and temperature sensor, 0..1 bar."""
    del fport  # not looked at, as in the vendor decoder
    return _decode("Decentlab DL-PR26 (0-1 bar)", _PR26_0_1, payload)


def decode_dl_pr21_1_10(fport: int, payload: bytes) -> dict[str, Any]:
    """DL-PR21 pressure / liquid level and temperature sensor with G1/4 thread, -1..10 bar."""
    del fport
    return _decode("Decentlab DL-PR21 (-1-10 bar)", _PR21_1_10, payload)


def decode_dl_pr36_8192(fport: int, payload: bytes) -> dict[str, Any]:
    """DL-PR36 high-precision pressure / liquid level and temperature sensor, kp 8192."""
    del fport
    return _decode("Decentlab DL-PR36 (kp 8192)", _PR36_8192, payload)


def decode_dl_ctd10(fport: int, payload: bytes) -> dict[str, Any]:
    """DL-CTD10 water depth, temperature and electrical conductivity sensor."""
    del fport
    return _decode("Decentlab DL-CTD10", _CTD10, payload)
