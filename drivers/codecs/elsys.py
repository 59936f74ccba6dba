"""Elsys uplink decoder: one type-length-value format for every Elsys sensor.

Elsys documents a single payload format for its sensor data, shared by the ERS family (ERS,
ERS CO2, ERS CO2 Lite, ERS Lite, ERS Eye, ERS Sound, ERS VOC), the ELT family (ELT-2, ELT
Ultrasonic, ELT Lite) and the EMS family: a sequence of one type byte followed by a value whose
length the type fixes. Big-endian throughout. Field names and scaling follow
Elsys's decoder in TTN's device repository (``vendor/elsys/elsys.js``), so the ``data`` objects
compare equal to TTN's, including how that decoder reads each value: 24-bit GPS coordinates as
unsigned, 32-bit counters and pressure as signed (JavaScript's ``<<`` works on signed 32-bit
integers), pressure divided by 1000.

The payload has no length header: an unknown type makes the rest undecodable. Like the vendor
decoder, decoding then stops and what came before is returned. A payload whose very first type is
unknown (nothing decodable), an empty payload, or a value cut short raises ``CodecError``. The
devices' uplink port is configurable, so ``fport`` is not checked (the vendor does not check it).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from drivers.codecs._bytes import Reader, fail

Codec = Callable[[int, bytes], dict[str, Any]]

_Field = Callable[[Reader, dict[str, Any]], None]


def _scalar(key: str, read: Callable[[Reader, str], float]) -> _Field:
    # ``read`` gets the key too, so a short read names the field.
    def field(reader: Reader, out: dict[str, Any]) -> None:
        out[key] = read(reader, key)

    return field


def _acceleration(reader: Reader, out: dict[str, Any]) -> None:
    # Three signed bytes, X, Y, Z; 63 = 1 g.
    out["x"] = reader.i8("acceleration x")
    out["y"] = reader.i8("acceleration y")
    out["z"] = reader.i8("acceleration z")


def _gps(reader: Reader, out: dict[str, Any]) -> None:
    # Latitude(3) and longitude(3) as the vendor decoder reads them: unsigned 24-bit.
    out["lat"] = reader.u24("gps latitude")
    out["long"] = reader.u24("gps longitude")


def _ir_temperature(reader: Reader, out: dict[str, Any]) -> None:
    # Internal then external temperature, each signed 0.1 degC.
    out["irInternalTemperature"] = reader.i16("ir internal temperature") / 10
    out["irExternalTemperature"] = reader.i16("ir external temperature") / 10


def _grideye(reader: Reader, out: dict[str, Any]) -> None:
    # Reference temperature (1 byte, whole degC) then 64 pixels of tenths above it.
    ref = reader.u8("grideye reference")
    out["grideye"] = [ref + pixel / 10.0 for pixel in reader.take(64, "grideye pixels")]


def _sound(reader: Reader, out: dict[str, Any]) -> None:
    # Peak then average level, dB, one byte each.
    out["soundPeak"] = reader.u8("sound peak")
    out["soundAvg"] = reader.u8("sound average")


def _external_temperature2(reader: Reader, out: dict[str, Any]) -> None:
    # The only type that may repeat meaningfully (several probes): the first value is a number,
    # from the second on they are collected in a list, as in the vendor decoder.
    value = reader.i16("external temperature 2") / 10
    previous = out.get("externalTemperature2")
    if isinstance(previous, list):
        previous.append(value)
    elif previous is None:
        out["externalTemperature2"] = value
    else:
        out["externalTemperature2"] = [previous, value]


def _tenths(reader: Reader, what: str) -> float:
    # Signed 0.1 degC.
    return reader.i16(what) / 10


# Type byte -> value decoder. Every other type ends decoding (see module docstring); 0x3D (debug)
# is named in Elsys's decoder but not decoded by it, so it ends decoding too.
_TYPES: dict[int, _Field] = {
    0x01: _scalar("temperature", _tenths),
    0x02: _scalar("humidity", Reader.u8),
    0x03: _acceleration,
    0x04: _scalar("light", Reader.u16),
    0x05: _scalar("motion", Reader.u8),
    0x06: _scalar("co2", Reader.u16),
    0x07: _scalar("vdd", Reader.u16),
    0x08: _scalar("analog1", Reader.u16),
    0x09: _gps,
    0x0A: _scalar("pulse1", Reader.u16),
    0x0B: _scalar("pulseAbs", Reader.i32),
    0x0C: _scalar("externalTemperature", _tenths),
    0x0D: _scalar("digital", Reader.u8),
    0x0E: _scalar("distance", Reader.u16),
    0x0F: _scalar("accMotion", Reader.u8),
    0x10: _ir_temperature,
    0x11: _scalar("occupancy", Reader.u8),
    0x12: _scalar("waterleak", Reader.u8),
    0x13: _grideye,
    0x14: _scalar("pressure", lambda r, what: r.i32(what) / 1000),
    0x15: _sound,
    0x16: _scalar("pulse2", Reader.u16),
    0x17: _scalar("pulseAbs2", Reader.i32),
    0x18: _scalar("analog2", Reader.u16),
    0x19: _external_temperature2,
    0x1A: _scalar("digital2", Reader.u8),
    0x1B: _scalar("analogUv", Reader.i32),
    0x1C: _scalar("tvoc", Reader.u16),
}


def decode_tlv(device: str, payload: bytes) -> dict[str, Any]:
    """Decode an Elsys sensor-data payload; ``device`` names the model in error messages."""
    if not payload:
        fail(device, "empty payload")
    reader = Reader(device, payload)
    out: dict[str, Any] = {}
    while not reader.at_end():
        offset = reader.pos
        kind = reader.u8("type")
        field = _TYPES.get(kind)
        if field is None:
            if offset == 0:
                fail(device, f"unknown data type 0x{kind:02x} at offset 0: not an Elsys payload")
            break
        field(reader, out)
    return out


def _model(device: str, name: str) -> Codec:
    def decode(fport: int, payload: bytes) -> dict[str, Any]:
        del fport  # the uplink port is configurable on Elsys devices
        return decode_tlv(device, payload)

    decode.__name__ = decode.__qualname__ = name
    decode.__doc__ = f"{device}: Elsys sensor-data payload (see ``decode_tlv``)."
    return decode


# One decoder per model so that errors name the device; all of them are ``decode_tlv``.
decode_elsys = _model("Elsys", "decode_elsys")
decode_ers = _model("Elsys ERS", "decode_ers")
decode_ers_co2 = _model("Elsys ERS CO2", "decode_ers_co2")
decode_ers_co2_lite = _model("Elsys ERS CO2 Lite", "decode_ers_co2_lite")
decode_ers_lite = _model("Elsys ERS Lite", "decode_ers_lite")
decode_ers_eye = _model("Elsys ERS Eye", "decode_ers_eye")
decode_ers_sound = _model("Elsys ERS Sound", "decode_ers_sound")
decode_ers_voc = _model("Elsys ERS VOC", "decode_ers_voc")
decode_elt_2 = _model("Elsys ELT-2", "decode_elt_2")
decode_elt_ultrasonic = _model("Elsys ELT Ultrasonic", "decode_elt_ultrasonic")
decode_ems = _model("Elsys EMS", "decode_ems")
decode_ems_desk = _model("Elsys EMS Desk", "decode_ems_desk")
decode_ems_door = _model("Elsys EMS Door", "decode_ems_door")
decode_ems_lite = _model("Elsys EMS Lite", "decode_ems_lite")
