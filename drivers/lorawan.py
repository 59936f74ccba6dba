"""LoRaWAN device knowledge that needs no I/O: ChirpStack message parsing, link tracking, profiles.

* :func:`parse_message` turns a ChirpStack v4 MQTT integration message (topic + payload, JSON or
  binary protobuf marshaler) into the ``chirpstack-api`` message it carries.
* :class:`LinkTracker` de-duplicates frames, follows frame counters (gaps, resets) and per-device
  link health, and notices silent devices. It takes the time as an argument: no clock inside.
* :class:`Profile` decodes an uplink's payload with a codec and maps the result to named
  measurements with UCUM units, including the distance → water level conversion of river gauges.
"""

from __future__ import annotations

import math
import re
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from chirpstack_api import integration
from google.protobuf import json_format
from google.protobuf.message import DecodeError, Message

from gateway.errors import CodecError
from gateway.types import Measurement

EVENT_TYPES: dict[str, type[Message]] = {
    "up": integration.UplinkEvent,
    "join": integration.JoinEvent,
    "status": integration.StatusEvent,
    "ack": integration.AckEvent,
    "txack": integration.TxAckEvent,
    "log": integration.LogEvent,
}

# LoRaWAN 1.0.x/1.1 frame counters are 32 bit on the network server's side.
_FCNT_MODULO = 1 << 32
# A jump backwards larger than this is a reset (re-join), not a late duplicate.
_FCNT_WRAP_SLACK = 1 << 16

Codec = Callable[[int, bytes], dict[str, Any]]

_LEADING_NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")


@dataclass(frozen=True, slots=True)
class ChirpStackMessage:
    """One parsed integration message."""

    event_type: str
    application_id: str
    dev_eui: str
    message: Any  # the chirpstack-api integration message for event_type


def parse_topic(topic: str) -> tuple[str, str, str]:
    """``application/{app}/device/{devEui}/event/{type}`` → (app, devEui, type)."""
    parts = topic.split("/")
    if len(parts) != 6 or parts[0] != "application" or parts[2] != "device" or parts[4] != "event":
        raise CodecError(f"not a ChirpStack event topic: {topic[:120]!r}")
    return parts[1], parts[3].lower(), parts[5]


def parse_message(topic: str, payload: bytes, marshaler: str = "auto") -> ChirpStackMessage:
    """Parse a message of ChirpStack's MQTT integration; raises CodecError when malformed."""
    application_id, dev_eui, event_type = parse_topic(topic)
    message_cls = EVENT_TYPES.get(event_type)
    if message_cls is None:
        raise CodecError(f"device {dev_eui}: unsupported event type {event_type!r}")
    message = message_cls()
    as_json = payload.lstrip()[:1] == b"{" if marshaler == "auto" else marshaler == "json"
    try:
        if as_json:
            json_format.Parse(payload, message, ignore_unknown_fields=True)
        else:
            message.ParseFromString(payload)
    except (json_format.ParseError, DecodeError, UnicodeDecodeError, ValueError) as exc:
        kind = "JSON" if as_json else "protobuf"
        raise CodecError(f"device {dev_eui}: malformed {kind} {event_type} event: {exc}") from exc
    info_eui = message.device_info.dev_eui.lower() if message.HasField("device_info") else ""
    if info_eui and info_eui != dev_eui:
        raise CodecError(f"device {dev_eui}: topic and deviceInfo.devEui ({info_eui}) disagree")
    return ChirpStackMessage(event_type, application_id, dev_eui, message)


def message_time(message: Any, fallback: datetime) -> datetime:
    """The event's own time, or ``fallback`` when ChirpStack left it out."""
    if message.HasField("time") and (message.time.seconds or message.time.nanos):
        return datetime.fromtimestamp(message.time.seconds + message.time.nanos / 1e9, UTC)
    return fallback


# -- link tracking ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Finding:
    """Something the tracker noticed about a device, to be turned into a health event."""

    kind: str  # uplink_gap, fcnt_reset, device_silent, device_back
    dev_eui: str
    values: tuple[Measurement, ...] = ()


@dataclass(slots=True)
class DeviceLink:
    """What is known about one device's radio link."""

    last_fcnt: int | None = None
    last_seen: float | None = None
    expected_interval_s: float | None = None
    intervals: list[float] = field(default_factory=list)
    rssi: float | None = None
    snr: float | None = None
    rssi_trend: float = 0.0
    battery_level: float | None = None
    margin: int | None = None
    silent: bool = False
    uplinks: int = 0
    missed: int = 0
    application_id: str | None = None


class LinkTracker:
    """De-duplication, frame-counter tracking and link health for every device."""

    def __init__(self, dedup_window_s: float = 600.0, silent_factor: float = 2.5) -> None:
        self._window_s = dedup_window_s
        self._silent_factor = silent_factor
        self._seen: OrderedDict[str, float] = OrderedDict()
        self.devices: dict[str, DeviceLink] = {}

    def device(self, dev_eui: str) -> DeviceLink:
        return self.devices.setdefault(dev_eui, DeviceLink())

    def is_duplicate(self, key: str, now: float) -> bool:
        """True when ``key`` was seen within the window; remembers it otherwise."""
        while self._seen:
            oldest_key, t = next(iter(self._seen.items()))
            if now - t <= self._window_s:
                break
            del self._seen[oldest_key]
        if key in self._seen:
            return True
        self._seen[key] = now
        return False

    def uplink(
        self, dev_eui: str, fcnt: int, rssi: float | None, snr: float | None, now: float
    ) -> list[Finding]:
        """Record an uplink (already de-duplicated); returns gap/reset/back findings."""
        link = self.device(dev_eui)
        findings: list[Finding] = []
        if link.silent:
            link.silent = False
            findings.append(Finding("device_back", dev_eui))
        if link.last_fcnt is not None:
            expected = (link.last_fcnt + 1) % _FCNT_MODULO
            ahead = (fcnt - expected) % _FCNT_MODULO
            if ahead == 0:
                pass
            elif ahead < _FCNT_MODULO - _FCNT_WRAP_SLACK:
                link.missed += ahead
                findings.append(
                    Finding(
                        "uplink_gap",
                        dev_eui,
                        (Measurement("missed_frames", ahead), Measurement("f_cnt", fcnt)),
                    )
                )
            else:
                findings.append(
                    Finding(
                        "fcnt_reset",
                        dev_eui,
                        (Measurement("f_cnt", fcnt), Measurement("previous_f_cnt", link.last_fcnt)),
                    )
                )
        if link.last_seen is not None:
            link.intervals = [*link.intervals[-15:], now - link.last_seen]
        link.last_fcnt = fcnt
        link.last_seen = now
        link.uplinks += 1
        if rssi is not None:
            # Exponentially weighted: a falling trend (antenna, vegetation, battery) shows
            # long before frames are lost.
            link.rssi_trend = (
                0.0 if link.rssi is None else 0.8 * link.rssi_trend + 0.2 * (rssi - link.rssi)
            )
            link.rssi = rssi
        if snr is not None:
            link.snr = snr
        return findings

    def joined(self, dev_eui: str) -> None:
        """A (re-)join restarts the frame counter: the next uplink is not a gap."""
        self.device(dev_eui).last_fcnt = None

    def status(self, dev_eui: str, battery_level: float | None, margin: int) -> None:
        link = self.device(dev_eui)
        link.battery_level = battery_level
        link.margin = margin

    def check_silent(self, now: float) -> list[Finding]:
        """Devices that missed ``silent_factor`` x their expected interval, reported once."""
        findings = []
        for dev_eui, link in self.devices.items():
            interval = link.expected_interval_s or _median(link.intervals)
            if link.silent or link.last_seen is None or interval is None:
                continue
            overdue = now - link.last_seen
            if overdue > self._silent_factor * interval:
                link.silent = True
                findings.append(
                    Finding(
                        "device_silent",
                        dev_eui,
                        (
                            Measurement("silent_for", round(overdue, 1), "s"),
                            Measurement("expected_interval", round(interval, 1), "s"),
                        ),
                    )
                )
        return findings


def _median(values: list[float]) -> float | None:
    # Learned intervals need a few samples before they mean anything.
    if len(values) < 3:
        return None
    ordered = sorted(values)
    return ordered[len(ordered) // 2]


# -- profiles --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FieldMap:
    """One codec output field → one measurement."""

    field: str  # dotted path into the decoder's output, e.g. "Distance" or "sensor.temp"
    name: str
    unit: str | None = None
    scale: float = 1.0
    offset: float = 0.0
    valid_min: float | None = None
    valid_max: float | None = None


@dataclass(frozen=True, slots=True)
class WaterLevel:
    """A distance sensor over water: level = mounting height - distance (both in cm)."""

    distance: str  # the measurement name holding the distance in cm
    mounting_height_param: str = "mounting_height_cm"
    sensor_min_cm: float = 0.0
    sensor_max_cm: float = math.inf


@dataclass(frozen=True, slots=True)
class Profile:
    """How a device model's payload becomes measurements."""

    name: str
    codec: Codec | None  # None: only ChirpStack's decoded `object` is used
    prefer_object: bool = False
    fields: tuple[FieldMap, ...] = ()
    water_level: WaterLevel | None = None
    # Named downlinks a technician or platform can ask for: name → (fPort, payload, confirmed).
    actions: Mapping[str, tuple[int, bytes, bool]] = field(default_factory=dict)

    def decode(
        self, fport: int, data: bytes, obj: Mapping[str, Any] | None, params: Mapping[str, float]
    ) -> tuple[tuple[Measurement, ...], tuple[str, ...]]:
        """Measurements and quality flags of one uplink; raises CodecError."""
        if (self.prefer_object or self.codec is None) and obj:
            decoded: Mapping[str, Any] = obj
        elif self.codec is not None:
            decoded = self.codec(fport, data)
        else:
            raise CodecError(f"profile {self.name}: no codec and ChirpStack sent no object")
        values: list[Measurement] = []
        flags: set[str] = set()
        for spec in self.fields:
            raw = _lookup(decoded, spec.field)
            if raw is None:
                continue
            if isinstance(raw, bool) or not isinstance(raw, int | float | str):
                raise CodecError(
                    f"profile {self.name}: field {spec.field} is {type(raw).__name__}, not a value"
                )
            if isinstance(raw, str):
                # Several vendor decoders format numbers as text ("2799 mm", "0.00").
                number = _LEADING_NUMBER.match(raw)
                if number is None:
                    values.append(Measurement(spec.name, raw[:256], spec.unit))
                    continue
                raw = float(number.group(0))
            value = raw * spec.scale + spec.offset
            if (spec.valid_min is not None and value < spec.valid_min) or (
                spec.valid_max is not None and value > spec.valid_max
            ):
                flags.add("out_of_range")
            values.append(Measurement(spec.name, _tidy(value), spec.unit))
        if self.water_level is not None:
            flags |= self._water_level(values, params)
        if not values:
            raise CodecError(f"profile {self.name}: no mapped field in {sorted(decoded)[:12]}")
        return tuple(values), tuple(sorted(flags))

    def _water_level(self, values: list[Measurement], params: Mapping[str, float]) -> set[str]:
        spec = self.water_level
        assert spec is not None
        distance = next((m.value for m in values if m.name == spec.distance), None)
        height = params.get(spec.mounting_height_param)
        if not isinstance(distance, int | float) or height is None:
            return {"no_level"}
        flags: set[str] = set()
        # 0 is what several ultrasonic sensors report when no echo came back: a sentinel, not
        # a river at the sensor's face.
        if distance == 0 or not spec.sensor_min_cm <= distance <= spec.sensor_max_cm:
            flags.add("invalid_distance")
        values.append(Measurement("water_level", _tidy(height - distance), "cm"))
        return flags


def _lookup(data: Mapping[str, Any], path: str) -> Any:
    node: Any = data
    for part in path.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


def _tidy(value: float) -> float | int:
    rounded = round(value, 6)
    return int(rounded) if float(rounded).is_integer() and abs(rounded) < 2**53 else rounded
