"""LoRaWAN device knowledge that needs no I/O: ChirpStack message parsing, link tracking, profiles.

* :func:`parse_message` turns a ChirpStack v4 MQTT integration message (topic + payload, JSON or
  binary protobuf marshaler) into the ``chirpstack-api`` message it carries.
* :class:`LinkTracker` de-duplicates frames, follows frame counters (gaps, resets) and per-device
  link health, and notices silent devices. It takes the time as an argument: no clock inside.
* :class:`Profile` decodes an uplink's payload with a codec and maps the result to named
  measurements with UCUM units, including the distance → water level conversion of river gauges.
"""

from __future__ import annotations

import base64
import functools
import json
import math
import re
import struct
import sys
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, NamedTuple

import orjson
from chirpstack_api import integration
from google.protobuf import duration_pb2, json_format, struct_pb2
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import DecodeError, Message

from gateway.errors import CodecError, EventValidationError
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
# Frames remembered per device for de-duplication (see LinkTracker.is_duplicate).
_RECENT_FRAMES = 16
# Gaps remembered per device, so that a frame from one that arrives late is known as such.
_RECENT_GAPS = 8

Codec = Callable[[int, bytes], dict[str, Any]]

_DEV_EUI = re.compile(r"[0-9A-Fa-f]{16}")
_LEADING_NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")


@dataclass(frozen=True, slots=True)
class ChirpStackMessage:
    """One parsed integration message."""

    event_type: str
    application_id: str
    dev_eui: str
    message: Any  # the chirpstack-api integration message for event_type


# Topics up to this long are memoised (see parse_topic); a longer one (the application id and
# event type may be any string) would let a publisher pin up to 64 KiB per cache entry.
_CACHED_TOPIC_CHARS = 160


def parse_topic(topic: str) -> tuple[str, str, str]:
    """``application/{app}/device/{devEui}/event/{type}`` → (app, devEui, type)."""
    # Memoised: a site's few hundred devices send the same few topics over and over (a hit costs
    # a third of the split and the match). An invalid topic raises, and is not kept.
    if len(topic) <= _CACHED_TOPIC_CHARS:
        return _parse_topic_cached(topic)
    return _parse_topic(topic)


@functools.lru_cache(maxsize=1024)
def _parse_topic_cached(topic: str) -> tuple[str, str, str]:
    return _parse_topic(topic)


def _parse_topic(topic: str) -> tuple[str, str, str]:
    parts = topic.split("/")
    if len(parts) != 6 or parts[0] != "application" or parts[2] != "device" or parts[4] != "event":
        raise CodecError(f"not a ChirpStack event topic: {topic[:120]!r}")
    # ChirpStack writes the EUI-64 as 16 hex digits. Anything else is not a device: tracked, it
    # would take a place in the link state and the stats message for every new string.
    if not _DEV_EUI.fullmatch(parts[3]):
        raise CodecError(f"not a devEUI (16 hex digits) in topic {topic[:120]!r}")
    return parts[1], parts[3].lower(), parts[5]


def parse_message(topic: str, payload: bytes, marshaler: str = "auto") -> ChirpStackMessage:
    """Parse a message of ChirpStack's MQTT integration; raises CodecError when malformed."""
    application_id, dev_eui, event_type = parse_topic(topic)
    message_cls = EVENT_TYPES.get(event_type)
    if message_cls is None:
        raise CodecError(f"device {dev_eui}: unsupported event type {event_type!r}")
    as_json = payload.lstrip()[:1] == b"{" if marshaler == "auto" else marshaler == "json"
    message = _parse_json_fast(message_cls, payload) if as_json else None
    if message is None:
        message = message_cls()
        try:
            if as_json:
                json_format.Parse(payload, message, ignore_unknown_fields=True)
            else:
                message.ParseFromString(payload)
        except (json_format.ParseError, DecodeError, UnicodeDecodeError, ValueError) as exc:
            kind = "JSON" if as_json else "protobuf"
            raise CodecError(
                f"device {dev_eui}: malformed {kind} {event_type} event: {exc}"
            ) from exc
    info_eui = message.device_info.dev_eui.lower() if message.HasField("device_info") else ""
    if info_eui and info_eui != dev_eui:
        raise CodecError(f"device {dev_eui}: topic and deviceInfo.devEui ({info_eui}) disagree")
    return ChirpStackMessage(event_type, application_id, dev_eui, message)


# -- the JSON marshaler, fast ----------------------------------------------------------------
#
# json_format.Parse walks the JSON in pure Python (about 120 us for one uplink of ~1 KB, most of
# the gateway's time per uplink). _parse_json_fast does the same job for the JSON that ChirpStack
# actually writes (the canonical protobuf JSON mapping: camelCase names, numbers as numbers, enums
# as names, RFC 3339 times in UTC, base64 bytes) and builds the message with one constructor call,
# about 5x faster. It parses the text exactly as json_format does (the same json.loads with a
# duplicate-key check), converts each value as json_format would, and declines (returns None) on
# anything else: a null, a number in a string, an enum as a number, a time with an offset, an
# unknown well-known type, a key given twice, two members of a oneof, any error at all. Then
# json_format.Parse runs as before and decides, so malformed input gets the very same CodecError.
# tests/test_lorawan_fast_json.py holds the two parsers to the same result.


class _DeclinedError(Exception):
    """Not the canonical form: json_format.Parse decides."""


_FLOAT32_MAX = float.fromhex("0x1.fffffep+127")
# Unpaired UTF-16 surrogates, which json_format refuses in strings (same pattern as its own).
_UNPAIRED_SURROGATE = re.compile(
    "[\ud800-\udbff](?![\udc00-\udfff])|(?<![\ud800-\udbff])[\udc00-\udfff]"
)
_RFC3339_UTC = re.compile(r"(\d{4})-(\d\d)-(\d\d)T(\d\d):(\d\d):(\d\d)(?:\.(\d{1,9}))?Z")
_EPOCH = datetime(1970, 1, 1)  # naive, as in Timestamp.FromJsonString
_TIMESTAMP_MIN_S = -62135596800  # 0001-01-01T00:00:00Z
_TIMESTAMP_MAX_S = 253402300799  # 9999-12-31T23:59:59Z
# Struct (ChirpStack's decoded ``object``) nested deeper than this goes the slow way, which
# enforces json_format's recursion limit.
_STRUCT_MAX_DEPTH = 16
_INT_RANGES = {
    FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SINT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_FIXED32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_INT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SINT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1),
    FieldDescriptor.TYPE_FIXED64: (0, 2**64 - 1),
}

_Convert = Callable[[Any], Any]
# How a field's JSON value is checked: the common scalar kinds inline, the rest by a converter.
_STR, _INT, _BOOL, _OTHER = range(4)
# Per message type: JSON key → (constructor keyword, kind, int range or converter, oneof name).
_Plan = dict[str, tuple[str, int, Any, str | None]]
_PLANS: dict[str, tuple[_Plan, bool]] = {}


def _parse_json_fast(message_cls: type[Message], payload: bytes) -> Message | None:
    """``payload`` parsed as json_format.Parse would, or None to let json_format decide."""
    try:
        data = json.loads(payload.decode("utf-8"), object_pairs_hook=_no_duplicate_keys)
        if type(data) is not dict:
            return None
        return message_cls(**_convert_message(message_cls.DESCRIPTOR, data))
    except Exception:  # noqa: BLE001 -- declining is always safe: json_format decides
        return None


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # json_format refuses a key given twice in one object.
    result = dict(pairs)
    if len(result) != len(pairs):
        raise _DeclinedError
    return result


def _convert_message(descriptor: Descriptor, data: dict[str, Any]) -> dict[str, Any]:
    cached = _PLANS.get(descriptor.full_name)
    if cached is None:
        cached = _PLANS[descriptor.full_name] = _plan(descriptor)
    plan, has_oneofs = cached
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        entry = plan.get(key)
        if entry is None:
            if key.startswith("["):
                raise _DeclinedError  # extension syntax: json_format has its own rules
            continue  # unknown fields are ignored (ignore_unknown_fields=True)
        name, kind, arg, _oneof = entry
        if name in kwargs:
            raise _DeclinedError  # the JSON name and the proto name both given
        t = type(value)
        if kind == _STR:
            if t is not str or (not value.isascii() and _UNPAIRED_SURROGATE.search(value)):
                raise _DeclinedError
        elif kind == _INT:
            if t is not int or not arg[0] <= value <= arg[1]:
                raise _DeclinedError
        elif kind == _BOOL:
            if t is not bool:
                raise _DeclinedError
        elif value is None:
            raise _DeclinedError  # json_format clears the field (or sets a null_value)
        else:
            kwargs[name] = arg(value)
            continue
        kwargs[name] = value
    if has_oneofs:
        oneofs = [plan[key][3] for key in data if key in plan and plan[key][3] is not None]
        if len(oneofs) != len(set(oneofs)):
            raise _DeclinedError  # two members of one oneof
    return kwargs


def _plan(descriptor: Descriptor) -> tuple[_Plan, bool]:
    plan: _Plan = {}
    for f in descriptor.fields:
        oneof = f.containing_oneof.name if f.containing_oneof is not None else None
        kind, arg = _field_kind(f)
        plan[f.json_name] = (f.name, kind, arg, oneof)
    for f in descriptor.fields:
        # json_format also takes the proto field name, after the JSON names.
        plan.setdefault(f.name, plan[f.json_name])
    return plan, any(f.containing_oneof is not None for f in descriptor.fields)


def _field_kind(f: FieldDescriptor) -> tuple[int, Any]:
    if not f.is_repeated:
        if f.type == FieldDescriptor.TYPE_STRING:
            return _STR, None
        if f.type == FieldDescriptor.TYPE_BOOL:
            return _BOOL, None
        if f.type in _INT_RANGES:
            return _INT, _INT_RANGES[f.type]
    return _OTHER, _field_converter(f)


def _field_converter(f: FieldDescriptor) -> _Convert:
    entry_type = f.message_type
    if entry_type is not None and entry_type.GetOptions().map_entry:
        if entry_type.fields_by_name["key"].type != FieldDescriptor.TYPE_STRING:
            return _decline
        convert_value = _single_converter(entry_type.fields_by_name["value"])

        def convert_map(value: Any) -> dict[str, Any]:
            if type(value) is not dict:
                raise _DeclinedError
            return {_string(k): convert_value(v) for k, v in value.items()}

        return convert_map
    single = _single_converter(f)
    if f.is_repeated:

        def convert_list(value: Any) -> list[Any]:
            if type(value) is not list:
                raise _DeclinedError
            return [single(v) for v in value]

        return convert_list
    return single


def _single_converter(f: FieldDescriptor) -> _Convert:
    t = f.type
    if t in (FieldDescriptor.TYPE_MESSAGE, FieldDescriptor.TYPE_GROUP):
        return _message_converter(f.message_type)
    if t == FieldDescriptor.TYPE_STRING:
        return _string
    if t == FieldDescriptor.TYPE_BYTES:
        return _bytes
    if t == FieldDescriptor.TYPE_BOOL:
        return _bool
    if t == FieldDescriptor.TYPE_ENUM:
        numbers: dict[str, int] = {v.name: v.number for v in f.enum_type.values}

        def convert_enum(value: Any) -> int:
            if type(value) is not str or value not in numbers:
                raise _DeclinedError
            return numbers[value]

        return convert_enum
    if t in _INT_RANGES:
        low, high = _INT_RANGES[t]

        def convert_int(value: Any) -> int:
            if type(value) is not int or not low <= value <= high:
                raise _DeclinedError
            return value

        return convert_int
    limit = _FLOAT32_MAX if t == FieldDescriptor.TYPE_FLOAT else sys.float_info.max

    def convert_float(value: Any) -> float:
        kind = type(value)
        if kind is not float and kind is not int:
            raise _DeclinedError
        number = float(value)
        if not -limit <= number <= limit:  # NaN, infinities, out of float32 range
            raise _DeclinedError
        return number

    return convert_float


def _message_converter(descriptor: Descriptor) -> _Convert:
    full_name = descriptor.full_name
    if full_name == "google.protobuf.Timestamp":
        return _timestamp
    if full_name == "google.protobuf.Duration":
        return _duration
    if full_name == "google.protobuf.Struct":
        return _struct
    if full_name.startswith("google.protobuf."):
        return _decline  # Any, Value, ListValue, FieldMask, wrappers: special JSON forms

    def convert_message(value: Any) -> dict[str, Any]:
        if type(value) is not dict:
            raise _DeclinedError
        return _convert_message(descriptor, value)

    return convert_message


def _decline(_value: Any) -> Any:
    raise _DeclinedError


def _string(value: Any) -> str:
    if type(value) is not str or (not value.isascii() and _UNPAIRED_SURROGATE.search(value)):
        raise _DeclinedError
    return value


def _bytes(value: Any) -> bytes:
    if type(value) is not str:
        raise _DeclinedError
    # Exactly json_format's decoding, lenient as it is.
    encoded = value.encode("utf-8")
    return base64.urlsafe_b64decode(encoded + b"=" * (4 - len(encoded) % 4))


def _bool(value: Any) -> bool:
    if type(value) is not bool:
        raise _DeclinedError
    return value


@functools.lru_cache(maxsize=256)
def _utc_seconds(date_time: str) -> int:
    """Seconds since the epoch of "YYYY-MM-DDTHH:MM:SS" (already matched by _RFC3339_UTC).

    Memoised: the uplinks of one second (or of a burst) share it.
    """
    delta = (
        datetime(
            int(date_time[0:4]),
            int(date_time[5:7]),
            int(date_time[8:10]),
            int(date_time[11:13]),
            int(date_time[14:16]),
            int(date_time[17:19]),
        )
        - _EPOCH
    )
    return delta.seconds + delta.days * 86400


def _timestamp(value: Any) -> dict[str, int]:
    # Timestamp.FromJsonString's arithmetic, for the UTC form ChirpStack writes.
    match = _RFC3339_UTC.fullmatch(value) if type(value) is str else None
    if match is None:
        raise _DeclinedError
    seconds = _utc_seconds(value[:19])
    fraction = match.group(7)
    nanos = round(float("0." + fraction) * 1e9) if fraction else 0
    if not _TIMESTAMP_MIN_S <= seconds <= _TIMESTAMP_MAX_S or not 0 <= nanos <= 999_999_999:
        raise _DeclinedError
    return {"seconds": seconds, "nanos": nanos}


def _duration(value: Any) -> duration_pb2.Duration:
    if type(value) is not str:
        raise _DeclinedError
    duration = duration_pb2.Duration()
    duration.FromJsonString(value)  # what json_format calls; a ValueError declines
    return duration


def _struct(value: Any) -> struct_pb2.Struct:
    if type(value) is not dict or not _plain_json(value, _STRUCT_MAX_DEPTH):
        raise _DeclinedError
    struct = struct_pb2.Struct()
    struct.update(value)  # the same Value conversions json_format makes
    return struct


def _plain_json(value: Any, depth: int) -> bool:
    kind = type(value)
    if kind is dict:
        return depth > 0 and all(_plain_json(v, depth - 1) for v in value.values())
    if kind is list:
        return depth > 0 and all(_plain_json(v, depth - 1) for v in value)
    return kind is str or kind is int or kind is float or kind is bool or value is None


# -- uplinks, faster still ---------------------------------------------------------------------
#
# An uplink is most of what ChirpStack sends, and the source needs a dozen of its fields. Building
# the whole UplinkEvent (json.loads with the duplicate-key hook, converting every field, the
# protobuf constructor: about 33 us) only to read those back is most of the gateway's time per
# uplink at full rate. parse_uplink_json reads the fields the source uses straight from orjson's
# dict (about 6 us) into an Uplink, with the same checks the fast path above makes on those
# fields, and declines (None) on anything unusual; then parse_message and uplink_from_message
# give the same Uplink the slow way. Fields the source does not use are not validated here (a
# malformed rxInfo[].location, say, no longer rejects an otherwise good uplink), and a key given
# twice takes its last value instead of being refused. tests/test_lorawan_fast_json.py holds the
# two ways to the same Uplink.


# One per uplink: a NamedTuple is as immutable as a frozen dataclass and built 2-3x faster.
class Uplink(NamedTuple):
    """What the ChirpStack source uses of an ``up`` event."""

    deduplication_id: str
    time: datetime | None
    dev_eui: str  # deviceInfo.devEui, lower case; "" when absent
    device_profile_name: str
    tags: Mapping[str, str]
    f_cnt: int
    f_port: int
    data: bytes
    object: dict[str, Any] | None  # ChirpStack's decoded object, numbers as floats
    rssi: float | None  # the strongest gateway's view
    snr: float | None


def uplink_from_message(message: Any) -> Uplink:
    """The Uplink of a parsed ``integration.UplinkEvent``; CodecError for values out of range."""
    info = message.device_info
    best = max(message.rx_info, key=lambda rx: rx.rssi, default=None)
    if best is not None and not math.isfinite(best.snr):
        # Binary protobuf can carry a NaN (JSON cannot; parse_uplink_json declines it).
        raise CodecError(f"rxInfo.snr is not a finite number (got: {best.snr})")
    return Uplink(
        deduplication_id=message.deduplication_id,
        time=_time_of(message),
        dev_eui=info.dev_eui.lower(),
        device_profile_name=info.device_profile_name,
        tags=dict(info.tags),
        f_cnt=message.f_cnt,
        f_port=message.f_port,
        data=message.data,
        object=json_format.MessageToDict(message.object) if message.HasField("object") else None,
        rssi=None if best is None else float(best.rssi),
        snr=None if best is None else float(best.snr),
    )


def _time_of(message: Any) -> datetime | None:
    """The event's ``time``, None when unset; CodecError when no datetime can hold it."""
    if not message.HasField("time") or not (message.time.seconds or message.time.nanos):
        return None
    seconds, nanos = message.time.seconds, message.time.nanos
    # JSON times are checked by json_format; a binary Timestamp can hold any int64 seconds. And
    # the float sum rounds the last nanoseconds of 9999-12-31 into year 10000.
    try:
        if not _TIMESTAMP_MIN_S <= seconds <= _TIMESTAMP_MAX_S or not 0 <= nanos <= 999_999_999:
            raise ValueError("not a protobuf Timestamp")
        return datetime.fromtimestamp(seconds + nanos / 1e9, UTC)
    except (ValueError, OverflowError, OSError) as exc:
        raise CodecError(f"time out of range (got: {seconds} s, {nanos} ns)") from exc


_UINT32_MAX = 2**32 - 1
_INT32 = (-(2**31), 2**31 - 1)


def parse_uplink_json(payload: bytes) -> Uplink | None:
    """An ``up`` event in ChirpStack's JSON marshaling read directly, or None to decline."""
    try:
        data = orjson.loads(payload)
        if type(data) is not dict:
            return None
        return _uplink_view(data)
    except Exception:  # noqa: BLE001 -- declining is always safe: the full parser decides
        return None


# The fields the view reads that json_format also takes under their protobuf (snake_case) name.
# ChirpStack writes the camelCase names, so a document without any of these is read with plain
# lookups; one with them is renamed first, and one with both names of a field is declined (as
# json_format refuses it).
_TOP_PROTO_NAMES = {
    "deduplication_id": "deduplicationId",
    "device_info": "deviceInfo",
    "f_cnt": "fCnt",
    "f_port": "fPort",
    "rx_info": "rxInfo",
}
_INFO_PROTO_NAMES = {"dev_eui": "devEui", "device_profile_name": "deviceProfileName"}


def _json_names(data: dict[str, Any], names: dict[str, str]) -> dict[str, Any]:
    """``data`` with the fields the view reads under their JSON names; declines nulls."""
    # An explicit null has json_format's own rules. ChirpStack never writes one, so any null
    # (even in a field the view does not read) declines: one scan in C instead of a check per
    # field read.
    if None in data.values():
        raise _DeclinedError
    if names.keys().isdisjoint(data.keys()):
        return data
    renamed = dict(data)
    for proto_name, json_name in names.items():
        if proto_name in renamed:
            if json_name in renamed:
                raise _DeclinedError
            renamed[json_name] = renamed.pop(proto_name)
    return renamed


def _uplink_view(data: dict[str, Any]) -> Uplink:
    data = _json_names(data, _TOP_PROTO_NAMES)
    dedup = _string(data.get("deduplicationId", ""))
    raw_time = data.get("time")
    when = None if raw_time is None else _uplink_time(raw_time)
    info = data.get("deviceInfo")
    dev_eui, profile_name, tags = "", "", {}
    if info is not None:
        if type(info) is not dict:
            raise _DeclinedError
        info = _json_names(info, _INFO_PROTO_NAMES)
        dev_eui = _string(info.get("devEui", "")).lower()
        profile_name = _string(info.get("deviceProfileName", ""))
        raw_tags = info.get("tags")
        if raw_tags is not None:
            if type(raw_tags) is not dict:
                raise _DeclinedError
            tags = {_string(k): _string(v) for k, v in raw_tags.items()}
    f_cnt = data.get("fCnt", 0)
    f_port = data.get("fPort", 0)
    for number in (f_cnt, f_port):
        if type(number) is not int or not 0 <= number <= _UINT32_MAX:
            raise _DeclinedError
    raw_data = data.get("data")
    raw_object = data.get("object")
    obj = None
    if raw_object is not None:
        if type(raw_object) is not dict:
            raise _DeclinedError
        obj = _struct_dict(raw_object, _STRUCT_MAX_DEPTH)
    rssi, snr = _best_rx(data.get("rxInfo"))
    return Uplink(
        deduplication_id=dedup,
        time=when,
        dev_eui=dev_eui,
        device_profile_name=profile_name,
        tags=tags,
        f_cnt=f_cnt,
        f_port=f_port,
        data=b"" if raw_data is None else _bytes(raw_data),
        object=obj,
        rssi=rssi,
        snr=snr,
    )


def _uplink_time(value: Any) -> datetime | None:
    stamp = _timestamp(value)
    if not (stamp["seconds"] or stamp["nanos"]):
        return None  # the zero Timestamp is an unset one
    return datetime.fromtimestamp(stamp["seconds"] + stamp["nanos"] / 1e9, UTC)


def _best_rx(rx_info: Any) -> tuple[float | None, float | None]:
    """RSSI and SNR of the strongest gateway (the first of equals, as max() on the message)."""
    if rx_info is None:
        return None, None
    if type(rx_info) is not list:
        raise _DeclinedError
    best_rssi: int | None = None
    rssi = snr = None
    for rx in rx_info:
        if type(rx) is not dict or None in rx.values():
            raise _DeclinedError
        r = rx.get("rssi", 0)
        q = rx.get("snr", 0.0)
        if type(r) is not int or not _INT32[0] <= r <= _INT32[1]:
            raise _DeclinedError
        if (type(q) is not float and type(q) is not int) or not math.isfinite(q):
            raise _DeclinedError
        if best_rssi is None or r > best_rssi:
            best_rssi, rssi, snr = r, float(r), _float32(q)
    return rssi, snr


def _float32(value: float) -> float:
    # rxInfo.snr is a protobuf float: reading it back from the message rounds to float32.
    if abs(value) > _FLOAT32_MAX:
        raise _DeclinedError
    return float(struct.unpack("f", struct.pack("f", value))[0])


def _struct_dict(value: Any, depth: int) -> Any:
    """A Struct's JSON as MessageToDict returns it: every number a float."""
    kind = type(value)
    if kind is dict:
        if depth <= 0:
            raise _DeclinedError
        return {_string(k): _struct_dict(v, depth - 1) for k, v in value.items()}
    if kind is list:
        if depth <= 0:
            raise _DeclinedError
        return [_struct_dict(v, depth - 1) for v in value]
    if kind is str:
        return _string(value)
    if kind is int or kind is float:
        number = float(value)
        if not math.isfinite(number):
            raise _DeclinedError
        return number
    if kind is bool or value is None:
        return value
    raise _DeclinedError


def message_time(message: Any, fallback: datetime) -> datetime:
    """The event's own time, or ``fallback`` when ChirpStack left it out; CodecError when out
    of range."""
    return _time_of(message) or fallback


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
    # The last 16 intervals between uplinks (a deque: one append per uplink, no list copy).
    intervals: deque[float] = field(default_factory=lambda: deque(maxlen=16))
    rssi: float | None = None
    snr: float | None = None
    rssi_trend: float = 0.0
    battery_level: float | None = None
    margin: int | None = None
    silent: bool = False
    uplinks: int = 0
    missed: int = 0
    application_id: str | None = None
    # The device's most recent frames as (fCnt, hash of deduplicationId or 0, time seen).
    recent: deque[tuple[int, int, float]] = field(
        default_factory=lambda: deque(maxlen=_RECENT_FRAMES)
    )
    # Their fCnts alone (same length, same order): most frames are new, and `in` tells so.
    recent_fcnts: deque[int] = field(default_factory=lambda: deque(maxlen=_RECENT_FRAMES))
    # The latest gaps as (first missing fCnt, how many): a frame from one of them that comes
    # after all (a broker that held it unsent until the session was resumed) is late, not a
    # counter reset.
    gaps: deque[tuple[int, int]] = field(default_factory=lambda: deque(maxlen=_RECENT_GAPS))
    late: int = 0


class LinkTracker:
    """De-duplication, frame-counter tracking and link health for every device."""

    def __init__(self, dedup_window_s: float = 600.0, silent_factor: float = 2.5) -> None:
        self._window_s = dedup_window_s
        self._silent_factor = silent_factor
        self.devices: dict[str, DeviceLink] = {}

    def device(self, dev_eui: str) -> DeviceLink:
        link = self.devices.get(dev_eui)
        if link is None:
            # Not setdefault(): that would build a DeviceLink on every call (twice per uplink).
            link = self.devices[dev_eui] = DeviceLink()
        return link

    def is_duplicate(self, dev_eui: str, f_cnt: int, dedup_id: str, now: float) -> bool:
        """True when this device sent this frame within the window; remembers it otherwise.

        A frame is the same when fCnt matches and, where ChirpStack gives one, the
        ``deduplicationId`` too (so a device that re-joined and counts from 0 again is not
        mistaken for a replay). Memory is bounded per device (its last few frames), not per
        uplink: a global window of ids would grow with the rate (at 260 uplinks/s, 156,000 ids
        for ten minutes, tens of MB). Redeliveries come from the broker's in-flight window, a
        device's last few frames; an older one slipping through keeps its stable event id, so a
        receiver still drops it.
        """
        link = self.device(dev_eui)
        ident = hash(dedup_id) if dedup_id else 0
        # Most frames are new: a counter not among the last few settles it in one scan in C.
        recent = link.recent if f_cnt in link.recent_fcnts else ()
        for seen_fcnt, seen_ident, seen_at in recent:
            if (
                seen_fcnt == f_cnt
                and (seen_ident == ident or not (seen_ident and ident))
                and now - seen_at <= self._window_s
            ):
                return True
        link.recent.append((f_cnt, ident, now))
        link.recent_fcnts.append(f_cnt)
        return False

    def uplink(
        self, dev_eui: str, fcnt: int, rssi: float | None, snr: float | None, now: float
    ) -> list[Finding]:
        """Record an uplink (already de-duplicated); returns gap/reset/back findings."""
        link = self.device(dev_eui)
        if link.gaps and link.last_fcnt is not None and self._late(link, fcnt):
            return []
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
                link.gaps.append((expected, ahead))
                findings.append(
                    Finding(
                        "uplink_gap",
                        dev_eui,
                        (Measurement("missed_frames", ahead), Measurement("f_cnt", fcnt)),
                    )
                )
            else:
                link.gaps.clear()  # a new count: frames of the old one's gaps are not late
                findings.append(
                    Finding(
                        "fcnt_reset",
                        dev_eui,
                        (Measurement("f_cnt", fcnt), Measurement("previous_f_cnt", link.last_fcnt)),
                    )
                )
        if link.last_seen is not None:
            link.intervals.append(now - link.last_seen)
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

    @staticmethod
    def _late(link: DeviceLink, fcnt: int) -> bool:
        """Whether ``fcnt`` is a frame of a recent gap, arriving late: it is then no longer
        missed, and neither moves the counter back nor says anything about the link now."""
        for i, (first, count) in enumerate(link.gaps):
            offset = (fcnt - first) % _FCNT_MODULO
            if offset < count:
                # Taken out of its gap: a second copy is not late twice.
                del link.gaps[i]
                if offset:
                    link.gaps.append((first, offset))
                if offset + 1 < count:
                    link.gaps.append(((fcnt + 1) % _FCNT_MODULO, count - offset - 1))
                link.missed -= 1
                link.late += 1
                link.uplinks += 1
                return True
        return False

    def joined(self, dev_eui: str) -> None:
        """A (re-)join restarts the frame counter: the next uplink is not a gap."""
        link = self.device(dev_eui)
        link.last_fcnt = None
        link.gaps.clear()

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


def _median(values: deque[float]) -> float | None:
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
        flags: list[str] = []
        for spec in self.fields:
            # Most decoders' fields are top-level: one dict lookup instead of a path walk.
            raw = decoded.get(spec.field) if "." not in spec.field else _lookup(decoded, spec.field)
            if raw is None:
                continue
            if type(raw) is not float and type(raw) is not int:  # the common cases first
                if isinstance(raw, bool) or not isinstance(raw, int | float | str):
                    raise CodecError(
                        f"profile {self.name}: field {spec.field} is {type(raw).__name__}, "
                        "not a value"
                    )
                if isinstance(raw, str):
                    # Several vendor decoders format numbers as text ("2799 mm", "0.00").
                    number = _LEADING_NUMBER.match(raw)
                    if number is None:
                        values.append(self._measurement(spec, raw[:256]))
                        continue
                    raw = float(number.group(0))
            if type(raw) is int and spec.scale == 1.0 and spec.offset == 0.0 and abs(raw) < 2**53:
                # A counted integer (cm, mV) taken as it is: what the arithmetic and _tidy
                # below make of it too, without them.
                value: float = raw
                tidy: float | int = raw
            else:
                value = raw * spec.scale + spec.offset
                tidy = _tidy(value)
            if (spec.valid_min is not None and value < spec.valid_min) or (
                spec.valid_max is not None and value > spec.valid_max
            ):
                flags.append("out_of_range")
            values.append(self._measurement(spec, tidy))
        if self.water_level is not None:
            flags += self._water_level(values, params)
        if not values:
            raise CodecError(f"profile {self.name}: no mapped field in {sorted(decoded)[:12]}")
        return tuple(values), tuple(sorted(set(flags))) if flags else ()

    def _measurement(self, spec: FieldMap, value: float | str) -> Measurement:
        try:
            return Measurement(spec.name, value, spec.unit)
        except EventValidationError as exc:
            # A decoder's "1e999" or a lone surrogate: the codec's output is unusable.
            raise CodecError(f"profile {self.name}: field {spec.field}: {exc}") from exc

    def _water_level(self, values: list[Measurement], params: Mapping[str, float]) -> list[str]:
        """Appends the water level to ``values``; returns its quality flags."""
        spec = self.water_level
        assert spec is not None
        distance = None
        for m in values:
            if m.name == spec.distance:
                distance = m.value
                break
        height = params.get(spec.mounting_height_param)
        if not isinstance(distance, int | float) or height is None:
            return ["no_level"]
        values.append(Measurement("water_level", _tidy(height - distance), "cm"))
        # 0 is what several ultrasonic sensors report when no echo came back: a sentinel, not
        # a river at the sensor's face.
        if distance == 0 or not spec.sensor_min_cm <= distance <= spec.sensor_max_cm:
            return ["invalid_distance"]
        return []


def _lookup(data: Mapping[str, Any], path: str) -> Any:
    node: Any = data
    for part in path.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


def _tidy(value: float) -> float | int:
    rounded = round(value, 6)
    if type(rounded) is float:  # nearly always: no float() of a float first
        return int(rounded) if rounded.is_integer() and abs(rounded) < 2**53 else rounded
    return int(rounded) if float(rounded).is_integer() and abs(rounded) < 2**53 else rounded
