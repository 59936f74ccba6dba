"""Pure LoRaWAN logic: ChirpStack message parsing, link tracking, profiles."""

from __future__ import annotations

import contextlib
import math

import pytest
from chirpstack_api import integration
from google.protobuf import json_format
from hypothesis import given
from hypothesis import strategies as st

from drivers.chirpstack import (
    BrokerSettings,
    Catalog,
    ChirpStackSource,
    DeviceRule,
    DownlinkRejectedError,
)
from drivers.lorawan import (
    FieldMap,
    LinkTracker,
    Profile,
    WaterLevel,
    _parse_topic_cached,
    parse_message,
    parse_topic,
)
from drivers.mqtt_intake import MqttIntakeError
from gateway.errors import CodecError
from gateway.types import Event, Reading

EUI = "a84041000181c061"
TOPIC = f"application/app-1/device/{EUI}/event/up"


def _uplink() -> integration.UplinkEvent:
    event = integration.UplinkEvent(deduplication_id="d-1", f_cnt=42, f_port=2, data=b"\x01\x02")
    event.device_info.dev_eui = EUI
    event.object.update({"Distance": 1234})
    return event


def test_parse_topic() -> None:
    assert parse_topic(TOPIC) == ("app-1", EUI, "up")
    assert parse_topic(TOPIC.replace(EUI, EUI.upper())) == ("app-1", EUI, "up")
    with pytest.raises(CodecError):
        parse_topic("application/app-1/device/x/up")
    for not_an_eui in ("x", "a84041000181c06", "a84041000181c0612", "a84041000181c06g"):
        with pytest.raises(CodecError, match="not a devEUI"):
            parse_topic(f"application/app-1/device/{not_an_eui}/event/up")


def test_parse_topic_keeps_only_short_topics() -> None:
    # Memoised for speed, but a long application id (any string, up to MQTT's 64 KiB) must not
    # let a publisher pin memory in the cache.
    long_app = "a" * 10_000
    _parse_topic_cached.cache_clear()
    for n in range(3):
        topic = f"application/{long_app}{n}/device/{EUI}/event/up"
        assert parse_topic(topic) == (f"{long_app}{n}", EUI, "up")
    assert _parse_topic_cached.cache_info().currsize == 0
    assert parse_topic(TOPIC) == ("app-1", EUI, "up")
    assert _parse_topic_cached.cache_info().currsize == 1


@pytest.mark.parametrize("marshaler", ["auto", "json", "protobuf"])
def test_parse_both_marshalers(marshaler: str) -> None:
    event = _uplink()
    json_body = json_format.MessageToJson(event).encode()
    body = event.SerializeToString() if marshaler == "protobuf" else json_body
    parsed = parse_message(TOPIC, body, marshaler)
    assert parsed.event_type == "up"
    assert parsed.message.f_cnt == 42
    assert parsed.message.data == b"\x01\x02"
    assert parsed.message.deduplication_id == "d-1"


def test_parse_auto_detects_protobuf() -> None:
    parsed = parse_message(TOPIC, _uplink().SerializeToString())
    assert parsed.message.f_cnt == 42


def test_topic_and_body_must_agree() -> None:
    event = _uplink()
    event.device_info.dev_eui = "0000000000000001"
    with pytest.raises(CodecError, match="disagree"):
        parse_message(TOPIC, event.SerializeToString())


@given(st.binary(max_size=200))
def test_garbage_only_raises_codec_error(body: bytes) -> None:
    with contextlib.suppress(CodecError):
        parse_message(TOPIC, body)


def test_dedup_window_expires() -> None:
    tracker = LinkTracker(dedup_window_s=10)
    assert not tracker.is_duplicate(EUI, 7, "id-a", 0)
    assert tracker.is_duplicate(EUI, 7, "id-a", 5)
    assert not tracker.is_duplicate(EUI, 7, "id-a", 16)


def test_dedup_tells_a_rejoined_device_from_a_replay() -> None:
    tracker = LinkTracker()
    assert not tracker.is_duplicate(EUI, 0, "before-rejoin", 0)
    # Same fCnt after a re-join, but a new radio frame: ChirpStack gives it a new id.
    assert not tracker.is_duplicate(EUI, 0, "after-rejoin", 30)
    assert tracker.is_duplicate(EUI, 0, "after-rejoin", 31)
    # Without deduplicationId, devEui + fCnt decide.
    assert not tracker.is_duplicate(EUI, 1, "", 40)
    assert tracker.is_duplicate(EUI, 1, "", 41)
    assert not tracker.is_duplicate("0000000000000002", 1, "", 42)


def test_dedup_memory_is_bounded_per_device() -> None:
    tracker = LinkTracker()
    for f_cnt in range(10_000):
        assert not tracker.is_duplicate(EUI, f_cnt, f"id-{f_cnt}", f_cnt * 0.01)
    link = tracker.devices[EUI]
    assert link.recent.maxlen is not None
    assert len(link.recent) == link.recent.maxlen < 100
    # The device's latest frames are still recognised.
    assert tracker.is_duplicate(EUI, 9_999, "id-9999", 100.0)


def test_fcnt_gap_reset_and_wrap() -> None:
    tracker = LinkTracker()
    assert tracker.uplink(EUI, 1, -80, 5, 0) == []
    (gap,) = tracker.uplink(EUI, 5, -80, 5, 60)
    assert gap.kind == "uplink_gap"
    assert {m.name: m.value for m in gap.values} == {"missed_frames": 3, "f_cnt": 5}
    (reset,) = tracker.uplink(EUI, 0, -80, 5, 120)
    assert reset.kind == "fcnt_reset"
    tracker.uplink(EUI, 2**32 - 1, -80, 5, 180)  # (a reset again, then...)
    assert tracker.uplink(EUI, 0, -80, 5, 240) == []  # ...a 32-bit wrap is not a reset
    tracker.joined(EUI)
    assert tracker.uplink(EUI, 0, -80, 5, 300) == []


def test_a_frame_of_a_reported_gap_that_comes_late_is_not_a_reset() -> None:
    """A broker that held frames unsent delivers them after a resumed session: late."""
    tracker = LinkTracker()
    tracker.uplink(EUI, 10, -80, 5, 0)
    (gap,) = tracker.uplink(EUI, 14, -80, 5, 60)  # 11, 12, 13 missing
    assert gap.kind == "uplink_gap"
    assert tracker.uplink(EUI, 12, -95, 1, 70) == []
    link = tracker.devices[EUI]
    assert (link.missed, link.late, link.last_fcnt, link.rssi) == (2, 1, 14, -80)
    assert tracker.uplink(EUI, 15, -80, 5, 120) == []  # the count goes on from 14
    # Each late frame leaves its gap (a copy of it is no longer late: missed never goes
    # below what is missing).
    assert list(link.gaps) == [(11, 1), (13, 1)]
    assert tracker.uplink(EUI, 11, -80, 5, 126) == [] and tracker.uplink(EUI, 13, -80, 5, 127) == []
    assert (link.missed, link.late, list(link.gaps)) == (0, 3, [])
    # Behind, but not of a gap: a reset, and the old count's gaps are forgotten.
    (reset,) = tracker.uplink(EUI, 3, -80, 5, 180)
    assert reset.kind == "fcnt_reset"
    (gap,) = tracker.uplink(EUI, 13, -80, 5, 240)  # in the new count, 13 is ahead: a gap
    assert gap.kind == "uplink_gap"
    # A join forgets them too; gaps after it are tracked anew.
    tracker.joined(EUI)
    assert tracker.uplink(EUI, 0, -80, 5, 300) == []
    assert tracker.uplink(EUI, 13, -80, 5, 360)[0].kind == "uplink_gap"
    assert tracker.uplink(EUI, 12, -80, 5, 420) == []
    assert (link.missed, link.late) == (9 + 12 - 1, 4)


def test_silent_after_two_and_a_half_intervals_and_back() -> None:
    tracker = LinkTracker()
    tracker.device(EUI).expected_interval_s = 60
    tracker.uplink(EUI, 1, -80, 5, 0)
    assert tracker.check_silent(149) == []
    (silent,) = tracker.check_silent(151)
    assert silent.kind == "device_silent"
    assert tracker.check_silent(500) == []  # reported once
    (back,) = tracker.uplink(EUI, 2, -80, 5, 600)
    assert back.kind == "device_back"


def test_silent_learns_the_interval() -> None:
    tracker = LinkTracker()
    for i in range(5):
        tracker.uplink(EUI, i, -80, 5, i * 300)
    assert tracker.check_silent(1200 + 700) == []
    assert [f.kind for f in tracker.check_silent(1200 + 800)] == ["device_silent"]


GAUGE = Profile(
    name="gauge",
    codec=lambda fport, data: {"Distance": int.from_bytes(data[:2], "big"), "Bat": 3.3},
    fields=(
        FieldMap("Distance", "distance", "cm", scale=0.1),
        FieldMap("Bat", "battery", "V", valid_min=3.4),
    ),
    water_level=WaterLevel("distance", sensor_min_cm=28, sensor_max_cm=750),
)


def test_profile_water_level_and_flags() -> None:
    values, flags = GAUGE.decode(2, (1234).to_bytes(2, "big"), None, {"mounting_height_cm": 400})
    got = {m.name: m.value for m in values}
    assert got["distance"] == pytest.approx(123.4)
    assert got["water_level"] == pytest.approx(276.6)
    assert flags == ("out_of_range",)  # battery below its valid minimum: flagged, kept


def test_profile_sentinel_distance_is_flagged_not_dropped() -> None:
    values, flags = GAUGE.decode(2, b"\x00\x00", None, {"mounting_height_cm": 400})
    assert "invalid_distance" in flags
    assert {m.name for m in values} >= {"distance", "water_level"}


def test_profile_without_mounting_height() -> None:
    _, flags = GAUGE.decode(2, (1234).to_bytes(2, "big"), None, {})
    assert "no_level" in flags


def test_profile_prefers_object_when_asked() -> None:
    profile = Profile("obj", codec=None, fields=(FieldMap("t.value", "temperature", "Cel"),))
    values, _ = profile.decode(1, b"", {"t": {"value": 21.5}}, {})
    assert values[0].value == 21.5
    with pytest.raises(CodecError):
        profile.decode(1, b"", None, {})


def test_profile_rejects_structured_values() -> None:
    profile = Profile("bad", codec=lambda f, d: {"x": [1, 2]}, fields=(FieldMap("x", "x"),))
    with pytest.raises(CodecError):
        profile.decode(1, b"", None, {})


@pytest.mark.parametrize("value", ["1e999 mm", "\ud800", float("nan")])
def test_profile_output_no_event_can_carry_is_a_codec_error(value: object) -> None:
    # A decoder's text that reads as infinity, a lone surrogate, a NaN: a decode error for the
    # frame loop to count, not an EventValidationError escaping it.
    profile = Profile("odd", codec=lambda f, d: {"x": value}, fields=(FieldMap("x", "x"),))
    with pytest.raises(CodecError, match="profile odd: field x"):
        profile.decode(1, b"", None, {})


def test_water_level_unbounded_range() -> None:
    assert WaterLevel("d").sensor_max_cm == math.inf


async def test_a_downlink_the_broker_refuses_does_not_count_against_the_cap() -> None:
    class RefusingBroker:
        """The intake's publish as the outermost edge: the broker refuses (MQTT 5 PUBACK)."""

        async def publish(self, topic: str, payload: bytes, **_kwargs: object) -> None:
            raise MqttIntakeError(f"publish to {topic} refused: reason code 0x87")

    source = ChirpStackSource(
        "cs", BrokerSettings("127.0.0.1", 1, "c"), Catalog([]), downlink_daily_cap=1
    )
    source.tracker.device(EUI).application_id = "app-1"
    source._client = RefusingBroker()  # type: ignore[assignment]
    for _ in range(3):
        with pytest.raises(DownlinkRejectedError, match="broker did not take the downlink"):
            await source.send_downlink(EUI, 1, b"\x01")
    # Nothing went on air: the one downlink of the day is still available, and then used up.
    taken: list[str] = []

    class TakingBroker:
        async def publish(self, topic: str, payload: bytes, **_kwargs: object) -> None:
            taken.append(topic)

    source._client = TakingBroker()  # type: ignore[assignment]
    await source.send_downlink(EUI, 1, b"\x01")
    assert taken == [f"application/app-1/device/{EUI}/command/down"]
    with pytest.raises(DownlinkRejectedError, match="reached its cap of 1"):
        await source.send_downlink(EUI, 1, b"\x01")


async def test_a_copy_of_a_frame_not_committed_yet_is_acknowledged_with_the_original() -> None:
    # The broker delivers a frame again after a reconnect (or a second gateway's copy comes)
    # while the original's reading is still on its way to the outbox. Acknowledged at once, a
    # crash before that commit would lose the frame: the broker forgot the copy, and the
    # original was never stored. So the copy's PUBACK waits for the original's commit.
    rule = DeviceRule(Profile("p", None, fields=(FieldMap("Distance", "distance", "mm"),)), EUI)
    source = ChirpStackSource("cs", BrokerSettings("127.0.0.1", 1, "c"), Catalog([rule]))
    handed: list[tuple[Reading | Event, object]] = []

    async def emit(item: Reading | Event, on_stored: object = None) -> None:
        handed.append((item, on_stored))  # the pipeline: committed later

    acks: list[str] = []
    body = json_format.MessageToJson(_uplink()).encode()
    other = _uplink()
    other.f_cnt = 43
    other.deduplication_id = "d-2"
    second = json_format.MessageToJson(other).encode()
    for name, payload in [("original", body), ("copy", body), ("next", second), ("copy 2", body)]:
        await source._process(TOPIC, payload, emit, lambda *_: None, lambda n=name: acks.append(n))
    assert [type(item).__name__ for item, _ in handed] == ["Reading", "Reading"]
    assert acks == []
    assert source.counters["duplicates"] == 2
    commit = handed[0][1]
    assert callable(commit)
    commit()
    assert acks == ["original", "copy", "copy 2"]
    # Once committed, a further copy is acknowledged at once.
    await source._process(TOPIC, body, emit, lambda *_: None, lambda: acks.append("late copy"))
    assert acks[-1] == "late copy"
    assert source._uncommitted == {(EUI, 43): []}
