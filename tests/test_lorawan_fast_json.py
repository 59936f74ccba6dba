"""The fast JSON path of parse_message gives json_format.Parse's result, or steps aside.

``_parse_json_fast`` may decline any input (json_format.Parse then runs, as before the fast path
existed), but what it accepts must parse to exactly the message json_format builds, and it must
decline everything json_format refuses, so malformed messages keep their CodecError.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
from chirpstack_api import common, gw, integration
from google.protobuf import json_format
from google.protobuf.message import Message
from hypothesis import given, settings
from hypothesis import strategies as st

from drivers.lorawan import (
    EVENT_TYPES,
    Uplink,
    _parse_json_fast,
    parse_message,
    parse_uplink_json,
    uplink_from_message,
)
from gateway.errors import CodecError

EUI = "a84041000181c061"


def _topic(kind: str = "up") -> str:
    return f"application/app-1/device/{EUI}/event/{kind}"


def _slow(cls: type[Message], payload: bytes) -> Message | None:
    message = cls()
    try:
        json_format.Parse(payload, message, ignore_unknown_fields=True)
    except (json_format.ParseError, UnicodeDecodeError, ValueError):
        return None
    return message


def _assert_same(cls: type[Message], payload: bytes) -> Message | None:
    """The fast path agrees with json_format (or declines); returns its result."""
    slow = _slow(cls, payload)
    fast = _parse_json_fast(cls, payload)
    if slow is None:
        assert fast is None, f"json_format refuses {payload[:200]!r}, the fast path took it"
    elif fast is not None:
        assert fast == slow, f"different messages from {payload[:200]!r}"
    return fast


def _uplink() -> integration.UplinkEvent:
    """An uplink with every part ChirpStack fills in, as its JSON marshaler writes it."""
    event = integration.UplinkEvent(
        deduplication_id="6f1e9c52-0000-4b8e-9a01-000000000007",
        dev_addr="01000007",
        adr=True,
        dr=5,
        f_cnt=4_000_000_000,
        f_port=2,
        confirmed=True,
        data=bytes(range(7)),
        region_config_id="eu868",
    )
    event.time.FromDatetime(datetime(2025, 3, 14, 6, 0, 0, 7000, tzinfo=UTC))
    info = event.device_info
    info.tenant_name = "Stadtwerke Süd"  # not ASCII
    info.application_id = "3f6b1a2c-5d0e-4c8a-9b7f-1c2d3e4f5a6b"
    info.device_profile_name = "LMDS200"
    info.device_name = "Pegel \U0001f30a 7"  # outside the BMP: a surrogate pair in JSON
    info.dev_eui = EUI
    info.device_class_enabled = common.DeviceClass.CLASS_C
    info.tags["river"] = "Ilm"
    info.tags["site"] = ""
    for n, (rssi, snr) in enumerate(((-97, 6.25), (-120, -19.5))):
        rx = event.rx_info.add()
        rx.gateway_id = f"0016c001f153a14{n}"
        rx.uplink_id = 4_294_967_295
        rx.gw_time.FromJsonString("2025-03-14T05:59:59.997Z")
        rx.ns_time.FromJsonString("2025-03-14T05:59:59.999123456Z")
        rx.time_since_gps_epoch.FromJsonString("1425880816.997s")
        rx.rssi = rssi
        rx.snr = snr
        rx.channel = 7
        rx.location.latitude = 50.6811
        rx.location.longitude = -10.9303
        rx.location.altitude = 420.5
        rx.context = b"\x00\xff\x10"
        rx.metadata["region_common_name"] = "EU868"
        rx.crc_status = gw.CRCStatus.CRC_OK
    event.tx_info.frequency = 868_100_000
    event.tx_info.modulation.lora.bandwidth = 125_000
    event.tx_info.modulation.lora.spreading_factor = 12
    event.tx_info.modulation.lora.code_rate = gw.CodeRate.CR_4_5
    event.object.update(
        {"Distance": 1234, "Bat": 3.6, "ok": True, "none": None, "list": [1, "a", {"b": []}]}
    )
    return event


def _other_events() -> Iterator[Message]:
    join = integration.JoinEvent(deduplication_id="j-1", dev_addr="01020304")
    join.device_info.dev_eui = EUI
    join.time.FromJsonString("2024-06-01T12:00:00Z")
    yield join
    yield integration.StatusEvent(
        deduplication_id="s-1", margin=-5, battery_level=87.5, external_power_source=True
    )
    yield integration.AckEvent(deduplication_id="a-1", queue_item_id="q", acknowledged=True)
    txack = integration.TxAckEvent(downlink_id=4_000_000_000, queue_item_id="q", f_cnt_down=5)
    txack.tx_info.modulation.fsk.datarate = 50_000
    txack.tx_info.timing.delay.delay.FromJsonString("1s")
    yield txack
    log = integration.LogEvent(level=integration.LogLevel.ERROR, description="codec failed")
    log.code = integration.LogCode.UPLINK_CODEC
    log.context["deduplication_id"] = "d-9"
    yield log


def _json(message: Message, **kwargs: Any) -> bytes:
    text: str = json_format.MessageToJson(message, **kwargs)
    return text.encode()


@pytest.mark.parametrize("indent", [None, 2])
@pytest.mark.parametrize("proto_names", [False, True])
def test_chirpstack_json_takes_the_fast_path_and_matches(
    indent: int | None, proto_names: bool
) -> None:
    for message in (_uplink(), integration.UplinkEvent(), *_other_events()):
        payload = _json(message, indent=indent, preserving_proto_field_name=proto_names)
        fast = _assert_same(type(message), payload)
        assert fast == message, f"declined or different: {payload[:300]!r}"


def test_parse_message_uses_it_for_every_event_type() -> None:
    for kind, cls in EVENT_TYPES.items():
        message = _uplink() if kind == "up" else cls()
        if kind != "up":
            message.device_info.dev_eui = EUI
        parsed = parse_message(_topic(kind), _json(message))
        assert parsed.message == message


def _paths(node: Any, path: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    yield path
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _paths(value, (*path, key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from _paths(value, (*path, index))


def _replaced(node: Any, path: tuple[Any, ...], value: Any) -> Any:
    if not path:
        return value
    head, rest = path[0], path[1:]
    if isinstance(node, dict):
        return {**node, head: _replaced(node[head], rest, value)}
    return [_replaced(v, rest, value) if i == head else v for i, v in enumerate(node)]


# What a broken or unusual producer could put anywhere in the JSON.
ODD_VALUES: list[Any] = [
    None,
    "7",
    "-1",
    " 7",
    7,
    7.0,
    7.5,
    -1,
    2**31,
    2**32,
    2**64,
    1e39,
    float("nan"),
    float("inf"),
    True,
    False,
    "",
    "NaN",
    "Infinity",
    "many",
    "\ud800",
    "Süd",
    "AQID",
    "AQI",
    "AQ-_",
    "not base64!",
    "2025-03-14T06:00:00Z",
    "2025-03-14T06:00:00.5+01:00",
    "2025-02-30T06:00:00Z",
    "2025-03-14T06:00:60Z",
    "0000-01-01T00:00:00Z",
    "1.5s",
    "CR_4_5",
    "CRC_OK",
    "CLASS_C",
    "NOT_AN_ENUM",
    [],
    [1],
    [None],
    ["a"],
    [{}],
    {},
    {"a": 1},
    {"seconds": 1},
]


def test_every_field_with_every_odd_value() -> None:
    base = json.loads(_json(_uplink()))
    for path in _paths(base):
        if not path:
            continue
        for value in ODD_VALUES:
            payload = json.dumps(_replaced(base, path, value)).encode()
            _assert_same(integration.UplinkEvent, payload)


@pytest.mark.parametrize(
    "payload",
    [
        b'{"fCnt": "many"}',
        b'{"fCnt": 1, "fCnt": 2}',
        b'{"fCnt": 1, "f_cnt": 2}',
        b'{"deviceInfo": {"devEui": "a", "devEui": "b"}}',
        b'{"txInfo": {"modulation": {"lora": {}, "fsk": {}}}}',
        b'{"txInfo": {"modulation": {"lora": {}, "fsk": null}}}',
        b'{"[ext.field]": 1}',
        b'{"[not an extension": 1}',
        b'{"unknownField": {"anything": [1, 2]}}',
        b'{"rxInfo": {}}',
        b'{"rxInfo": [null]}',
        b'{"deviceInfo": "abc"}',
        b'{"deviceInfo": ["abc"]}',
        b'{"deviceInfo": {"tags": {"a": 1}}}',
        b'{"deviceInfo": {"tags": {"a": null}}}',
        b'{"object": []}',
        b'{"object": {"a": NaN}}',
        b'{"object": {"a": 1e400}}',
        b'{"time": 1}',
        b'{"data": "AQID"} trailing',
        b"[]",
        b'"up"',
        b"{not json",
        b'{"devAddr": "\xff"}',
        b'{"devAddr": "\\udc00"}',
        b"{" + b'"object": ' + b'{"a": ' * 60 + b"1" + b"}" * 60 + b"}",
    ],
)
def test_unusual_payloads(payload: bytes) -> None:
    _assert_same(integration.UplinkEvent, payload)
    slow = _slow(integration.UplinkEvent, payload)
    if slow is None:
        with pytest.raises(CodecError):
            parse_message(_topic(), payload, "json")


def test_wrong_types_are_still_codec_errors() -> None:
    # What the integration test sends: the same CodecError as before the fast path.
    with pytest.raises(CodecError, match="malformed JSON up event"):
        parse_message(_topic(), b'{"fCnt": "many"}')
    with pytest.raises(CodecError, match="malformed JSON up event"):
        parse_message(_topic(), b'{"fCnt": 1, "fCnt": 1}')


_FIELD_NAMES = sorted(
    {f.json_name for f in integration.UplinkEvent.DESCRIPTOR.fields}
    | {"devEui", "rssi", "snr", "seconds", "lora", "tags", "x"}
)
_JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False)
    | st.text(max_size=8)
    | st.sampled_from(["AQID", "2025-03-14T06:00:00Z", "CRC_OK", "1s"]),
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(st.sampled_from(_FIELD_NAMES), inner, max_size=4)
    ),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(_FIELD_NAMES), _JSON, max_size=6))
def test_random_json_agrees(data: dict[str, Any]) -> None:
    _assert_same(integration.UplinkEvent, json.dumps(data).encode())


# -- parse_uplink_json: the fields the source uses, read straight from the JSON ----------------

_VIEW_TOP = {
    "deduplicationId",
    "deduplication_id",
    "time",
    "fCnt",
    "f_cnt",
    "fPort",
    "f_port",
    "data",
    "object",
}
_VIEW_INFO = {"devEui", "dev_eui", "deviceProfileName", "device_profile_name", "tags"}


def _used_part(data: dict[str, Any]) -> dict[str, Any]:
    """``data`` without the fields parse_uplink_json does not read (and so does not check)."""
    out = {k: v for k, v in data.items() if k in _VIEW_TOP}
    for key in ("deviceInfo", "device_info"):
        if key in data:
            info = data[key]
            out[key] = (
                {k: v for k, v in info.items() if k in _VIEW_INFO}
                if isinstance(info, dict)
                else info
            )
    for key in ("rxInfo", "rx_info"):
        if key in data:
            rx = data[key]
            out[key] = (
                [
                    {k: v for k, v in item.items() if k in {"rssi", "snr"}}
                    if isinstance(item, dict)
                    else item
                    for item in rx
                ]
                if isinstance(rx, list)
                else rx
            )
    return out


def _assert_view_agrees(data: Any) -> Uplink | None:
    """What the view accepts is what json_format + uplink_from_message make of the same fields."""
    payload = json.dumps(data).encode()
    view = parse_uplink_json(payload)
    if view is None:
        return None
    assert isinstance(data, dict)
    slow = _slow(integration.UplinkEvent, json.dumps(_used_part(data)).encode())
    assert slow is not None, f"the view took what json_format refuses: {payload[:300]!r}"
    assert view == uplink_from_message(slow), f"different uplinks from {payload[:300]!r}"
    return view


@pytest.mark.parametrize("proto_names", [False, True])
def test_uplink_view_matches_the_full_parse(proto_names: bool) -> None:
    for message in (_uplink(), integration.UplinkEvent()):
        payload = _json(message, preserving_proto_field_name=proto_names)
        view = _assert_view_agrees(json.loads(payload))
        assert view == uplink_from_message(message), f"declined or different: {payload[:300]!r}"
    view = parse_uplink_json(_json(_uplink()))
    assert view is not None
    # The strongest gateway's view; SNR read back as the protobuf float it is.
    assert (view.rssi, view.snr) == (-97.0, 6.25)
    assert view.object is not None and view.object["Distance"] == 1234.0


@pytest.mark.parametrize(
    "change",
    [
        {"fCnt": "5"},  # a number in a string
        {"fCnt": -1},
        {"fPort": 2**32},
        {"time": "2025-03-14T06:00:00+01:00"},  # an offset
        {"data": 5},
        {"deviceInfo": {"tags": {"a": 1}}},
        {"rxInfo": [{"rssi": 1.5}]},
        {"rxInfo": {"rssi": -90}},
        {"object": [1]},
        {"fCnt": None},
        # A null anywhere, even in a field the view does not read: ChirpStack never writes one.
        {"devAddr": None},
        {"rxInfo": [{"rssi": -90, "snr": 5.0, "channel": None}]},
        {"deviceInfo": {"devEui": "0102030405060708", "tenantName": None}},
        {"fCnt": 1, "f_cnt": 2},  # both names
        {"deviceInfo": {"devEui": "0102030405060708", "dev_eui": "0102030405060708"}},
    ],
)
def test_uplink_view_declines_the_unusual(change: dict[str, Any]) -> None:
    data = json.loads(_json(_uplink()))
    data.update(change)
    assert parse_uplink_json(json.dumps(data).encode()) is None


def test_uplink_view_declines_what_is_not_json() -> None:
    for payload in (b"", b"[]", b"{", b"null", b"\xff{}", b'{"fCnt": 1e400}'):
        assert parse_uplink_json(payload) is None


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(_FIELD_NAMES), _JSON, max_size=6))
def test_random_json_view_agrees(data: dict[str, Any]) -> None:
    _assert_view_agrees(data)
