"""Milesight uplink decoders: EM400-UDL (ultrasonic) and EM410-RDL (radar) distance/level sensors.

Milesight frames are a sequence of channels: channel id(1) | channel type(1) | value, with the
value's length fixed by the (id, type) pair and multi-byte values little-endian ("Payload
Definition" tables of each device in Milesight's SensorDecoders repository). Field names, enum
strings and scaling follow Milesight's reference decoders (``EM400-UDL_Decoder.js``,
``EM410-RDL_Decoder.js``; TTN ships the same as ``em400-tld.js`` and ``em410-rdl.js``), so the
``data`` objects compare equal to TTN's.

There is no length header: an unknown channel makes the rest undecodable, and like the vendor
decoders decoding stops there and returns what came before. That includes the echoes of
configuration downlinks (channels 0xFE/0xFF other than the device information below), which are
not decoded here. A frame whose first channel is unknown, an empty frame, or a value cut short
raises ``CodecError``. The application port is configurable (default 85), so ``fport`` is not
checked, as in the vendor decoders.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from drivers.codecs._bytes import Reader, fail

_Handler = Callable[[Reader, dict[str, Any]], None]
_Channels = Mapping[tuple[int, int], _Handler]


def _decode(device: str, channels: _Channels, payload: bytes) -> dict[str, Any]:
    if not payload:
        fail(device, "empty payload")
    reader = Reader(device, payload)
    out: dict[str, Any] = {}
    while not reader.at_end():
        offset = reader.pos
        key = (reader.u8("channel id"), reader.u8("channel type"))
        handler = channels.get(key)
        if handler is None:
            if offset == 0:
                fail(
                    device,
                    f"unknown channel 0x{key[0]:02x} type 0x{key[1]:02x} at offset 0: "
                    "not a Milesight telemetry frame",
                )
            break
        handler(reader, out)
    return out


def _lookup(table: Mapping[int, str], value: int) -> str:
    # The vendor's getValue(): a code outside the table reads "unknown".
    return table.get(value, "unknown")


_LORAWAN_CLASS = {0: "Class A", 1: "Class B", 2: "Class C", 3: "Class CtoB"}
_POSITION = {0: "normal", 1: "tilt"}


def _device_info(*, hex_versions: bool) -> dict[tuple[int, int], _Handler]:
    """Channels 0xFF xx sent after join and on request ("Attribute" table).

    The two reference decoders print hardware/firmware version bytes differently: EM410-RDL in
    hex (so 0x14 reads "14"), EM400-UDL in decimal; ``hex_versions`` keeps each device's form.
    """

    def number(byte: int) -> str:
        return f"{byte:x}" if hex_versions else str(byte)

    def ipso_version(r: Reader, out: dict[str, Any]) -> None:
        v = r.u8("ipso version")
        out["ipso_version"] = f"v{v >> 4}.{v & 0x0F}"

    def hardware_version(r: Reader, out: dict[str, Any]) -> None:
        major, minor = r.take(2, "hardware version")
        out["hardware_version"] = f"v{number(major)}.{minor >> 4}"

    def firmware_version(r: Reader, out: dict[str, Any]) -> None:
        major, minor = r.take(2, "firmware version")
        out["firmware_version"] = f"v{number(major)}.{number(minor)}"

    def tsl_version(r: Reader, out: dict[str, Any]) -> None:
        major, minor = r.take(2, "tsl version")
        out["tsl_version"] = f"v{major}.{minor}"

    def serial_number(r: Reader, out: dict[str, Any]) -> None:
        out["sn"] = r.take(8, "serial number").hex()

    def lorawan_class(r: Reader, out: dict[str, Any]) -> None:
        out["lorawan_class"] = _lookup(_LORAWAN_CLASS, r.u8("lorawan class"))

    def reset_event(r: Reader, out: dict[str, Any]) -> None:
        # The byte's value carries no information: its presence is the event.
        r.skip(1, "reset event")
        out["reset_event"] = "reset"

    def device_status(r: Reader, out: dict[str, Any]) -> None:
        # Sent once when the device is switched on; again presence is the message.
        r.skip(1, "device status")
        out["device_status"] = "on"

    return {
        (0xFF, 0x01): ipso_version,
        (0xFF, 0x09): hardware_version,
        (0xFF, 0x0A): firmware_version,
        (0xFF, 0xFF): tsl_version,
        (0xFF, 0x16): serial_number,
        (0xFF, 0x0F): lorawan_class,
        (0xFF, 0xFE): reset_event,
        (0xFF, 0x0B): device_status,
    }


def _battery(r: Reader, out: dict[str, Any]) -> None:
    out["battery"] = r.u8("battery")  # percent


def _temperature(r: Reader, out: dict[str, Any]) -> None:
    out["temperature"] = r.i16le("temperature") / 10  # signed 0.1 degC


def _position(r: Reader, out: dict[str, Any]) -> None:
    out["position"] = _lookup(_POSITION, r.u8("position"))


# --- EM400-UDL ----------------------------------------------------------------------------------

_EM400_ALARM = {0: "threshold_alarm_release", 1: "threshold_alarm"}


def _em400_distance(r: Reader, out: dict[str, Any]) -> None:
    out["distance"] = r.u16le("distance")  # mm, unsigned on the EM400


def _em400_temperature_alarm(r: Reader, out: dict[str, Any]) -> None:
    _temperature(r, out)
    out["temperature_alarm"] = _lookup(_EM400_ALARM, r.u8("temperature alarm"))


def _em400_distance_alarm(r: Reader, out: dict[str, Any]) -> None:
    _em400_distance(r, out)
    out["distance_alarm"] = _lookup(_EM400_ALARM, r.u8("distance alarm"))


_EM400_UDL: _Channels = {
    **_device_info(hex_versions=False),
    (0x01, 0x75): _battery,
    (0x03, 0x67): _temperature,
    (0x04, 0x82): _em400_distance,
    (0x05, 0x00): _position,
    (0x83, 0x67): _em400_temperature_alarm,
    (0x84, 0x82): _em400_distance_alarm,
}


def decode_em400_udl(fport: int, payload: bytes) -> dict[str, Any]:
    """EM400-UDL ultrasonic distance/level sensor (TTN codec ``em400-udl``)."""
    del fport  # configurable application port
    return _decode("Milesight EM400-UDL", _EM400_UDL, payload)


# --- EM410-RDL ----------------------------------------------------------------------------------

_EM410_DISTANCE_ALARM = {0: "threshold alarm release", 1: "threshold alarm", 2: "mutation alarm"}
_EM410_DISTANCE_EXCEPTION = {
    0: "blind spot alarm release",
    1: "blind spot alarm",
    2: "no target",
    3: "sensor exception",
}
# Historical record event byte, bit -> event ("HISTORICAL DATA (EVENT)"); bits 7..6 reserved.
_EM410_HISTORY_EVENTS = (
    "threshold alarm",
    "threshold alarm release",
    "blind spot alarm",
    "blind spot alarm release",
    "mutation alarm",
    "tilt alarm",
)
# Raw distance words that are status codes, not distances.
_NO_TARGET = 0xFFFD
_DISABLED = 0xFFFE
_SENSOR_EXCEPTION = 0xFFFF


def _em410_distance(r: Reader, out: dict[str, Any]) -> None:
    out["distance"] = r.i16le("distance")  # mm, signed on the EM410


def _em410_radar_rssi(r: Reader, out: dict[str, Any]) -> None:
    out["radar_signal_rssi"] = r.i16le("radar signal strength") / 100


def _events(out: dict[str, Any]) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = out.setdefault("event", [])
    return events


def _em410_distance_alarm(r: Reader, out: dict[str, Any]) -> None:
    # distance(2) + alarm(1); the distance also updates the reading's current distance.
    distance = r.i16le("alarm distance")
    alarm = _lookup(_EM410_DISTANCE_ALARM, r.u8("distance alarm"))
    out["distance"] = distance
    _events(out).append({"distance": distance, "distance_alarm": alarm})


def _em410_mutation_alarm(r: Reader, out: dict[str, Any]) -> None:
    # distance(2) + mutation, the change that triggered it, mm(2) + alarm(1).
    distance = r.i16le("alarm distance")
    mutation = r.i16le("distance mutation")
    alarm = _lookup(_EM410_DISTANCE_ALARM, r.u8("distance alarm"))
    out["distance"] = distance
    _events(out).append(
        {"distance": distance, "distance_mutation": mutation, "distance_alarm": alarm}
    )


def _em410_distance_exception(r: Reader, out: dict[str, Any]) -> None:
    # distance(2) + exception(1); "no target" and "sensor exception" words carry no distance.
    raw = r.u16le("exception distance")
    exception = _lookup(_EM410_DISTANCE_EXCEPTION, r.u8("distance exception"))
    event: dict[str, Any] = {}
    if raw not in (_NO_TARGET, _SENSOR_EXCEPTION):
        event["distance"] = raw - 0x10000 if raw > 0x7FFF else raw
    event["distance_exception"] = exception
    _events(out).append(event)


def _em410_history(r: Reader, out: dict[str, Any]) -> None:
    # timestamp s(4) + distance(2) + temperature(2) + mutation(2) + event bits(1).
    record: dict[str, Any] = {"timestamp": r.u32le("history timestamp")}
    distance = r.u16le("history distance")
    temperature = r.u16le("history temperature")
    mutation = r.i16le("history mutation")
    event_bits = r.u8("history event")
    if distance == _NO_TARGET:
        record["distance_sensor_status"] = "no target"
    elif distance == _SENSOR_EXCEPTION:
        record["distance_sensor_status"] = "sensor exception"
    elif distance == _DISABLED:
        record["distance_sensor_status"] = "disabled"
    else:
        record["distance"] = distance - 0x10000 if distance > 0x7FFF else distance
    if temperature == _DISABLED:
        record["temperature_sensor_status"] = "disabled"
    elif temperature == _SENSOR_EXCEPTION:
        record["temperature_sensor_status"] = "sensor exception"
    else:
        signed = temperature - 0x10000 if temperature > 0x7FFF else temperature
        record["temperature"] = signed / 10
    events = [name for bit, name in enumerate(_EM410_HISTORY_EVENTS) if event_bits >> bit & 1]
    if events:
        record["event"] = events
    if "mutation alarm" in events:
        record["distance_mutation"] = mutation
    history: list[dict[str, Any]] = out.setdefault("history", [])
    history.append(record)


_EM410_RDL: _Channels = {
    **_device_info(hex_versions=True),
    (0x01, 0x75): _battery,
    (0x03, 0x67): _temperature,
    (0x04, 0x82): _em410_distance,
    (0x05, 0x00): _position,
    (0x06, 0xC7): _em410_radar_rssi,
    (0x84, 0x82): _em410_distance_alarm,
    (0x94, 0x82): _em410_mutation_alarm,
    (0xB4, 0x82): _em410_distance_exception,
    (0x20, 0xCE): _em410_history,
}


def decode_em410_rdl(fport: int, payload: bytes) -> dict[str, Any]:
    """EM410-RDL radar distance/level sensor (TTN codec ``em410-rdl``)."""
    del fport  # configurable application port
    return _decode("Milesight EM410-RDL", _EM410_RDL, payload)
