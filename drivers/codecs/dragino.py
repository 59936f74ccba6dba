"""Dragino uplink decoders: LDDS20, LDDS20/LDDS75 firmware v1.1.4+, LMDS200, LHT65.

Each ``decode_*`` returns the ``data`` object of the decoder Dragino publishes in TTN's device
repository (``vendor/dragino/<codec>.js``), field names, units-in-strings and quirks included, so
a reading decoded here is the one an operator sees in TTN. Layouts are those of the uplink payload
sections of Dragino's user manuals; all multi-byte fields are big-endian.

Where the vendor decoder cannot fail (it reads ``undefined`` bytes as 0), these raise
``CodecError`` instead: a wrong length or an unknown fPort never yields a made-up reading.
"""

from __future__ import annotations

from typing import Any

from drivers.codecs._bytes import (
    Reader,
    fail,
    js_round_fixed,
    js_to_fixed,
    require_fport,
    require_length,
)

# Dragino's battery word: bits 15..14 are a status (LHT65: 0b11 good ... 0b00 ultra low),
# bits 13..0 the voltage in mV.
_BAT_MV_MASK = 0x3FFF

# The LDDS decoders report a distance word of exactly 0x0014 (20 mm) as "Invalid Reading", the
# sensor's code for a target it cannot measure; they compare for equality, not "less than".
_LDDS_INVALID_MM = 20


def decode_ldds20(fport: int, payload: bytes) -> dict[str, Any]:
    """LDDS20 ultrasonic liquid level sensor, TTN codec ``ldds20`` (early firmware, fPort 2).

    Early firmware sends 5 bytes: battery (2), distance mm (2), interrupt (1). The TTN example is a
    4-byte frame that the vendor decoder reports as ``{"distance": "No Sensor"}`` (it says so for
    every length but 5); that answer is reproduced for 4 bytes only. An 8-byte frame is the layout
    of firmware v1.1.4 and later, which ``decode_ldds20_114`` decodes.

    Deliberate difference from the vendor file for 5-byte frames: it stores the distance under
    ``value`` but fills ``distance`` from the *battery* word (a variable mix-up). Here ``value``
    is the same and ``distance`` is the distance too, so a water level is never computed from a
    battery voltage.
    """
    device = "Dragino LDDS20"
    require_fport(device, fport, (2,))
    if len(payload) == 4:
        return {"distance": "No Sensor"}
    if len(payload) == 8:
        fail(device, "8-byte frames are the firmware v1.1.4+ layout: use codec dragino-ldds20-114")
    require_length(device, payload, 5, "an fPort 2 frame of early firmware")
    reader = Reader(device, payload)
    reader.skip(2, "battery")
    distance_mm = reader.u16("distance")
    # The early decoder's test is "below 20", unlike the v1.1.4 decoders' "exactly 20".
    return {
        "value": distance_mm,
        "distance": "Invalid Reading" if distance_mm < _LDDS_INVALID_MM else distance_mm,
    }


def _decode_ldds_114(device: str, fport: int, payload: bytes) -> dict[str, Any]:
    # 8 bytes: BAT(2) | Distance mm(2) | Interrupt flag(1) |
    # DS18B20 temperature 0.1 degC, signed(2) | Sensor flag(1).
    require_fport(device, fport, (2,))
    require_length(device, payload, 8, "an fPort 2 frame")
    reader = Reader(device, payload)
    battery_mv = reader.u16("battery") & _BAT_MV_MASK
    distance_mm = reader.u16("distance")
    if distance_mm == 0:
        distance: str = "No Sensor"
    elif distance_mm == _LDDS_INVALID_MM:
        distance = "Invalid Reading"
    else:
        distance = f"{distance_mm} mm"
    interrupt_flag = reader.u8("interrupt flag")
    temp_dc = reader.i16("DS18B20 temperature")
    return {
        "Bat": battery_mv / 1000,
        "Distance": distance,
        "Interrupt_flag": interrupt_flag,
        # A string in the vendor decoder (``toFixed(2)``); kept so outputs compare equal.
        "TempC_DS18B20": js_to_fixed(temp_dc / 10, 2),
        "Sensor_flag": reader.u8("sensor flag"),
    }


def decode_ldds20_114(fport: int, payload: bytes) -> dict[str, Any]:
    """LDDS20 liquid level sensor with firmware v1.1.4+ (TTN codec ``ldds20-114``)."""
    return _decode_ldds_114("Dragino LDDS20 (v1.1.4+)", fport, payload)


def decode_ldds75_114(fport: int, payload: bytes) -> dict[str, Any]:
    """LDDS75 distance detection sensor with firmware v1.1.4+ (TTN codec ``ldds75-114``)."""
    return _decode_ldds_114("Dragino LDDS75 (v1.1.4+)", fport, payload)


# Frequency band codes of the LMDS200 device status frame (fPort 5).
_LMDS200_BANDS = {
    0x01: "EU868",
    0x02: "US915",
    0x03: "IN865",
    0x04: "AU915",
    0x05: "KZ865",
    0x06: "RU864",
    0x07: "AS923",
    0x08: "AS923_1",
    0x09: "AS923_2",
    0x0A: "AS923_3",
    0x0B: "CN470",
    0x0C: "EU433",
    0x0D: "KR920",
    0x0E: "MA869",
}
_LMDS200_MODEL = 0x0C


def _bcd_version(device: str, word: int) -> int:
    # Dragino encodes firmware versions as BCD (0x0110 is v1.1.0); the decoders print the word in
    # hex and read that back as a decimal number. A hex digit above 9 is not a version.
    digits = f"{word:x}"
    if not digits.isdigit():
        fail(device, f"firmware version 0x{word:04x} is not BCD")
    return int(digits)


def decode_lmds200(fport: int, payload: bytes) -> dict[str, Any]:
    """LMDS200 microwave radar distance sensor (two targets), TTN codec ``lmds200``.

    fPort 2 is the measurement, 4 the configuration reply, 5 the device status.
    """
    device = "Dragino LMDS200"
    require_fport(device, fport, (2, 4, 5))
    reader = Reader(device, payload)
    data: dict[str, Any] = {}
    if fport == 2:
        # BAT mV(2) | distance 1 cm(2) | distance 2 cm(2) | alarm count(6 bits), distance alarm,
        # interrupt alarm (1). The battery word carries no status bits here, so no mask.
        require_length(device, payload, 7, "an fPort 2 frame")
        data["Bat"] = reader.u16("battery") / 1000
        data["dis1"] = reader.u16("distance 1")
        data["dis2"] = reader.u16("distance 2")
        flags = reader.u8("alarm flags")
        data["DALARM_count"] = (flags >> 2) & 0x3F
        data["Distance_alarm"] = (flags >> 1) & 0x01
        data["Interrupt_alarm"] = flags & 0x01
    elif fport == 4:
        # TDC s(3) | ATDC min(1) | alarm min(2) | alarm max(2) | interrupt mode(1).
        require_length(device, payload, 9, "an fPort 4 configuration frame")
        data["TDC"] = reader.u24("TDC")
        data["ATDC"] = reader.u8("ATDC")
        data["Alarm_min"] = reader.u16("alarm min")
        data["Alarm_max"] = reader.u16("alarm max")
        data["Interrupt"] = reader.u8("interrupt mode")
    else:
        # Model(1) | firmware version BCD(2) | band(1) | sub-band(1) | BAT mV(2).
        require_length(device, payload, 7, "an fPort 5 status frame")
        if reader.u8("model") == _LMDS200_MODEL:
            data["SENSOR_MODEL"] = "LMDS200"
        data["Ver"] = _bcd_version(device, reader.u16("firmware version"))
        band = reader.u8("frequency band")
        if band in _LMDS200_BANDS:
            data["FREQUENCY_BAND"] = _LMDS200_BANDS[band]
        data["Sub_band"] = reader.u8("sub-band")
        data["BAT"] = reader.u16("battery") / 1000
    return data


# LHT65 uplink byte 6: bit 7 external sensor disconnected, bit 6 poll (datalog) reply, bits 3..0
# the external sensor type.
_LHT65_NO_CONNECT = 0x80
_LHT65_POLL_REPLY = 0x40
_LHT65_WORK_MODES = {
    0x04: "Interrupt Sensor send",
    0x05: "Illumination Sensor",
    0x06: "ADC Sensor",
    0x07: "Interrupt Sensor count",
    0x08: "Interrupt Sensor count",
    0x09: "DS18B20 & timestamp",
    0x0F: "DS18B20ID",
}
_EXT_NONE = 0x00
_EXT_TEMPERATURE = 0x01
_EXT_TIMESTAMP = 0x09
_EXT_DS18B20_ID = 0x0F


def _lht65_external(ext: int, b: bytes, data: dict[str, Any]) -> None:
    # Bytes 7..10 belong to the external sensor named by ``ext``.
    if ext == _EXT_NONE:
        data["Ext_sensor"] = "No external sensor"
    elif ext == _EXT_TEMPERATURE:
        data["Ext_sensor"] = "Temperature Sensor"
        data["TempC_DS"] = js_round_fixed(int.from_bytes(b[7:9], "big", signed=True) / 100, 2)
    elif ext in _LHT65_WORK_MODES:
        data["Work_mode"] = _LHT65_WORK_MODES[ext]
        if ext == 0x04:
            data["Exti_pin_level"] = "High" if b[7] else "Low"
            data["Exti_status"] = "True" if b[8] else "False"
        elif ext == 0x05:
            data["ILL_lx"] = int.from_bytes(b[7:9], "big")
        elif ext == 0x06:
            data["ADC_V"] = int.from_bytes(b[7:9], "big") / 1000
        elif ext == 0x07:
            data["Exit_count"] = int.from_bytes(b[7:9], "big")
        elif ext == 0x08:
            # 32-bit built with JS ``<<``: signed, as the vendor decoder reports it.
            data["Exit_count"] = int.from_bytes(b[7:11], "big", signed=True)
        elif ext == _EXT_TIMESTAMP:
            data["Systimestamp"] = int.from_bytes(b[7:11], "big", signed=True)
        else:
            # The DS18B20 ROM id spans bytes 2..5 and 7..10; the vendor prints each byte as two
            # hex digits followed by a space, trailing space included.
            data["ID"] = "".join(f"{x:02x} " for x in (*b[2:6], *b[7:11]))
    # Types 2, 3 and 10..14 are not defined by the manual; the vendor adds nothing for them.


def decode_lht65(fport: int, payload: bytes) -> dict[str, Any]:
    """LHT65 temperature and humidity sensor with external probe port, TTN codec ``lht65``.

    11 bytes on fPort 2: BAT(2) | SHT20 temperature 0.01 degC signed(2) | humidity 0.1 %RH(2, low
    12 bits) | ext type and flags(1) | external sensor(4). Poll replies (datalog, byte 6 bit 6) are
    not decoded by the vendor decoder either.
    """
    device = "Dragino LHT65"
    require_fport(device, fport, (2,))
    require_length(device, payload, 11, "an fPort 2 frame")
    b = bytes(payload)
    if b[6] & _LHT65_POLL_REPLY:
        fail(device, "poll (datalog) reply frames are not decoded")
    ext = b[6] & 0x0F
    data: dict[str, Any] = {}
    if ext == _EXT_TIMESTAMP:
        # In timestamp mode bytes 0..1 carry the DS18B20 temperature, and the battery status
        # moves to the top bits of byte 4 (above the 12-bit humidity).
        data["TempC_DS"] = js_round_fixed(int.from_bytes(b[0:2], "big", signed=True) / 100, 2)
        data["Bat_status"] = b[4] >> 6
    else:
        data["BatV"] = (int.from_bytes(b[0:2], "big") & _BAT_MV_MASK) / 1000
        data["Bat_status"] = b[0] >> 6
    if ext != _EXT_DS18B20_ID:
        # In DS18B20-ID mode bytes 2..5 are part of the ROM id, not SHT20 readings.
        data["TempC_SHT"] = js_round_fixed(int.from_bytes(b[2:4], "big", signed=True) / 100, 2)
        data["Hum_SHT"] = js_round_fixed((int.from_bytes(b[4:6], "big") & 0x0FFF) / 10, 1)
    if b[6] & _LHT65_NO_CONNECT:
        data["No_connect"] = "Sensor no connection"
    _lht65_external(ext, b, data)
    return data
