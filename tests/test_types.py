"""The event model: what an Event can and cannot carry, ids, lanes and validation.

"Images never leave the analyzer" is meant to be a property of the type, not of discipline, so
several tests here try to put pixels (or anything large) into every slot an Event has.
"""

from __future__ import annotations

import base64
import dataclasses
import random
import re
import types
import typing
from datetime import UTC, datetime, timedelta, timezone

import pytest

from gateway.errors import EventValidationError
from gateway.types import (
    MAX_QUALITY_FLAGS,
    MAX_TEXT,
    MAX_VALUES,
    Event,
    Lane,
    Measurement,
    Provenance,
    Reading,
    Severity,
    new_event_id,
    stable_event_id,
)
from gateway.wire import Encoding, encode

TS = datetime(2024, 5, 17, 6, 30, tzinfo=UTC)
SHA = "0123456789abcdef" * 4
CROCKFORD_ID = re.compile(r"[0-9A-HJKMNP-TV-Z]{26}")
# 100 KB of "image": what a careless analyzer might try to attach to an event.
IMAGE_B64 = base64.b64encode(random.Random(1).randbytes(75_000)).decode()


def event(**overrides: typing.Any) -> Event:
    fields: dict[str, typing.Any] = {"kind": "reading", "device": "dev-1", "ts": TS}
    fields.update(overrides)
    return Event(**fields)


def model(**overrides: typing.Any) -> Provenance:
    fields: dict[str, typing.Any] = {
        "model_id": "level-seg",
        "version": "1.0",
        "sha256": SHA,
        "score": 0.9,
        "threshold": 0.5,
    }
    fields.update(overrides)
    return Provenance(**fields)


# -- privacy is a property of the type ------------------------------------------------------


@pytest.mark.parametrize(
    "blob",
    [b"\xff\xd8\xff\xe0JFIF", bytearray(b"\x89PNG\r\n"), memoryview(b"GIF89a")],
    ids=["bytes", "bytearray", "memoryview"],
)
def test_measurement_rejects_binary_values(blob: object) -> None:
    with pytest.raises(EventValidationError, match="must be a number, bool or short string"):
        Measurement("frame", blob)  # type: ignore[arg-type]


@pytest.mark.parametrize("value", [None, [1, 2], {"a": 1}, (1,), 1j])
def test_measurement_rejects_other_non_scalars(value: object) -> None:
    with pytest.raises(EventValidationError):
        Measurement("x", value)  # type: ignore[arg-type]


def test_measurement_string_value_is_length_limited() -> None:
    Measurement("label", "x" * MAX_TEXT)
    with pytest.raises(EventValidationError, match="longer than 256"):
        Measurement("label", "x" * (MAX_TEXT + 1))


def test_event_value_count_is_limited() -> None:
    values = tuple(Measurement(f"v{i}", i) for i in range(MAX_VALUES + 1))
    event(values=values[:MAX_VALUES])
    with pytest.raises(EventValidationError, match="at most 64 values"):
        event(values=values)


def test_event_quality_flag_count_is_limited() -> None:
    flags = tuple(f"f{i}" for i in range(MAX_QUALITY_FLAGS + 1))
    event(quality=flags[:MAX_QUALITY_FLAGS])
    with pytest.raises(EventValidationError, match="at most 16 quality flags"):
        event(quality=flags)


def test_event_values_must_be_measurements() -> None:
    with pytest.raises(EventValidationError, match="values must be Measurements"):
        event(values=(b"\xff\xd8",))
    with pytest.raises(EventValidationError, match="values must be Measurements"):
        event(values=({"n": "x", "v": 1},))


_BINARY_TYPES = (bytes, bytearray, memoryview)


def _leaf_types(hint: object) -> set[object]:
    """Every type a (possibly nested, possibly union) annotation can hold."""
    args = typing.get_args(hint)
    origin = typing.get_origin(hint)
    if not args:
        return {hint}
    out: set[object] = set()
    if origin is not None and origin not in (typing.Union, types.UnionType):
        out.add(origin)
    for arg in args:
        if arg is not Ellipsis:
            out |= _leaf_types(arg)
    return out


@pytest.mark.parametrize("cls", [Event, Measurement, Provenance, Reading])
def test_no_field_is_annotated_with_bytes(cls: type) -> None:
    for f in dataclasses.fields(cls):
        assert "bytes" not in str(f.type), f"{cls.__name__}.{f.name}: {f.type}"
        assert "memoryview" not in str(f.type), f"{cls.__name__}.{f.name}: {f.type}"
    # The string annotations hide aliases (Scalar); resolve them and walk every union member.
    hints = typing.get_type_hints(cls)
    for name, hint in hints.items():
        leaves = _leaf_types(hint)
        assert not leaves & set(_BINARY_TYPES), f"{cls.__name__}.{name}: {hint}"


def _slot_builders() -> dict[str, typing.Callable[[object], object]]:
    """Every slot of an Event (and its parts), each filled with the value under test."""
    return {
        "event.kind": lambda v: event(kind=v),
        "event.device": lambda v: event(device=v),
        "event.event_id": lambda v: event(event_id=v),
        "event.ts": lambda v: event(ts=v),
        "event.severity": lambda v: event(severity=v),
        "event.schema": lambda v: event(schema=v),
        "event.quality": lambda v: event(quality=(v,)),
        "measurement.name": lambda v: Measurement(v, 1),  # type: ignore[arg-type]
        "measurement.value": lambda v: Measurement("x", v),  # type: ignore[arg-type]
        "measurement.unit": lambda v: Measurement("x", 1, v),  # type: ignore[arg-type]
        "provenance.model_id": lambda v: model(model_id=v),
        "provenance.version": lambda v: model(version=v),
        "provenance.sha256": lambda v: model(sha256=v),
        "provenance.score": lambda v: model(score=v),
        "provenance.threshold": lambda v: model(threshold=v),
    }


@pytest.mark.parametrize("slot", sorted(_slot_builders()))
@pytest.mark.parametrize(
    "blob",
    [
        IMAGE_B64,
        IMAGE_B64.encode(),
        # An image is just a big number, too: CBOR would carry it as a bignum (tag 2).
        int.from_bytes(base64.b64decode(IMAGE_B64), "big"),
    ],
    ids=["base64_str_100kB", "raw_bytes_100kB", "bignum_75kB"],
)
def test_a_100kb_image_cannot_be_placed_anywhere(slot: str, blob: object) -> None:
    with pytest.raises(EventValidationError):
        _slot_builders()[slot](blob)


def _maximal_event() -> Event:
    return Event(
        kind="k" * 64,
        device="d" * MAX_TEXT,
        ts=TS,
        severity=Severity.CRITICAL,
        values=tuple(
            Measurement(f"m{i:02d}".ljust(64, "_"), "v" * MAX_TEXT, "u" * MAX_TEXT)
            for i in range(MAX_VALUES)
        ),
        model=model(model_id="i" * MAX_TEXT, version="r" * MAX_TEXT),
        quality=tuple(f"q{i:02d}".ljust(64, "_") for i in range(MAX_QUALITY_FLAGS)),
        event_id="E" * MAX_TEXT,
    )


@pytest.mark.parametrize("encoding", list(Encoding))
def test_the_largest_possible_event_stays_small(encoding: Encoding) -> None:
    size = len(encode(_maximal_event(), encoding))
    # 64 values x (64 + 256 + 256 chars) plus framing: ~40 kB; a frame would be megabytes.
    assert 30_000 < size < 64 * 1024


# -- event ids --------------------------------------------------------------------------------


def test_event_ids_are_26_char_crockford_base32() -> None:
    for _ in range(1000):
        eid = new_event_id()
        assert CROCKFORD_ID.fullmatch(eid), eid
        # 128 bits in 26 x 5 = 130: the first character carries only 3 bits.
        assert eid[0] in "01234567"


def test_stable_event_ids_do_not_change_between_versions() -> None:
    # A receiver drops a redelivered event by its id, also after the gateway is upgraded: the
    # derivation (ULID time part + SHA-256 of the key, Crockford base32) is part of the contract.
    ts = datetime(2025, 3, 14, 6, 0, 0, 5000, tzinfo=UTC)
    assert stable_event_id("6f1e9c52-0001-4b8e-9a01-000000000005", ts) == (
        "01JP9KSWR593C5G6KM7BNP5F2X"
    )
    assert stable_event_id("", datetime(1970, 1, 1, tzinfo=UTC)) == "0000000000WERC8GMRZGE196QV"


def test_event_ids_are_unique_over_100k() -> None:
    ids = {new_event_id() for _ in range(100_000)}
    assert len(ids) == 100_000


def test_event_ids_same_millisecond_still_unique() -> None:
    ids = {new_event_id(1_700_000_000_000) for _ in range(10_000)}
    assert len(ids) == 10_000


def test_event_ids_are_time_ordered() -> None:
    rng = random.Random(7)
    stamps = sorted(rng.sample(range(1, 2**48), 2000))
    ids = [new_event_id(ms) for ms in stamps]
    assert ids == sorted(ids)
    # The time part reads back exactly (48-bit milliseconds in the first 10 characters).
    alphabet = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
    for ms, eid in zip(stamps, ids, strict=True):
        value = 0
        for ch in eid:
            value = value * 32 + alphabet.index(ch)
        assert value >> 80 == ms


def test_default_event_id_is_fresh_and_kept() -> None:
    a, b = event(), event()
    assert a.event_id != b.event_id
    assert CROCKFORD_ID.fullmatch(a.event_id)
    assert dataclasses.replace(a, device="other").event_id == a.event_id


def test_default_event_id_is_close_to_now() -> None:
    before = datetime.now(UTC)
    eid = event().event_id
    value = 0
    for ch in eid:
        value = value * 32 + "0123456789ABCDEFGHJKMNPQRSTVWXYZ".index(ch)
    stamp = datetime.fromtimestamp((value >> 80) / 1000, UTC)
    assert abs(stamp - before) < timedelta(seconds=5)


# -- lanes, timestamps, names -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("severity", "lane"),
    [
        (Severity.INFO, Lane.TELEMETRY),
        (Severity.WARNING, Lane.TELEMETRY),
        (Severity.ALARM, Lane.ALARM),
        (Severity.CRITICAL, Lane.ALARM),
    ],
)
def test_severity_to_lane(severity: Severity, lane: Lane) -> None:
    assert event(severity=severity).lane is lane


def test_alarm_lane_sorts_first() -> None:
    assert Lane.ALARM < Lane.TELEMETRY
    assert list(Lane) == [Lane.ALARM, Lane.TELEMETRY]


@pytest.mark.parametrize("severity", ["alarm", "ALARM", 2, None])
def test_severity_must_be_the_enum(severity: object) -> None:
    with pytest.raises(EventValidationError, match="severity must be a Severity"):
        event(severity=severity)


def test_naive_timestamps_are_rejected() -> None:
    naive = datetime(2024, 5, 17, 6, 30)  # no tzinfo: the point of the test
    with pytest.raises(EventValidationError, match="timezone-aware"):
        event(ts=naive)
    with pytest.raises(EventValidationError, match="timezone-aware"):
        Reading(source="s", device="d", ts=naive, values=())


@pytest.mark.parametrize("ts", ["2024-05-17T06:30:00Z", 1_715_927_400, None])
def test_timestamp_must_be_a_datetime(ts: object) -> None:
    with pytest.raises(EventValidationError, match="timezone-aware"):
        event(ts=ts)


def test_aware_timestamps_in_any_zone_are_accepted() -> None:
    cet = timezone(timedelta(hours=2))
    assert event(ts=datetime(2024, 5, 17, 8, 30, tzinfo=cet)).ts == TS


@pytest.mark.parametrize("name", ["reading", "water_level", "a", "a" * 64, "x9_", "pool_safety_2"])
def test_valid_kind_names(name: str) -> None:
    assert event(kind=name).kind == name
    assert Measurement(name, 1).name == name
    assert event(quality=(name,)).quality == (name,)


@pytest.mark.parametrize(
    "name",
    [
        "",
        "Reading",
        "1abc",
        "_abc",
        "a-b",
        "a b",
        "a/b",
        "a+b",
        "a#",
        "ä",
        "a" * 65,
        # `$` in the pattern also matches before a final newline: a kind ends up in an MQTT topic.
        "reading\n",
        None,
        b"reading",
        5,
    ],
)
def test_invalid_kind_names(name: object) -> None:
    with pytest.raises(EventValidationError, match="lower_snake_case"):
        event(kind=name)
    with pytest.raises(EventValidationError, match="lower_snake_case"):
        Measurement(name, 1)  # type: ignore[arg-type]
    with pytest.raises(EventValidationError, match="lower_snake_case"):
        event(quality=(name,))


@pytest.mark.parametrize("field", ["device", "event_id"])
def test_text_fields_are_length_limited(field: str) -> None:
    event(**{field: "x" * MAX_TEXT})
    with pytest.raises(EventValidationError, match="longer than 256"):
        event(**{field: "x" * (MAX_TEXT + 1)})
    with pytest.raises(EventValidationError, match="must be a string"):
        event(**{field: b"x"})


def test_unit_is_length_limited() -> None:
    assert Measurement("t", 21.5, "Cel").unit == "Cel"
    with pytest.raises(EventValidationError, match="longer than 256"):
        Measurement("t", 21.5, "C" * (MAX_TEXT + 1))


@pytest.mark.parametrize("sha", ["", "0" * 63, "0" * 65, "G" * 64, SHA.upper(), SHA + "\n"])
def test_provenance_sha256_is_64_lower_hex(sha: str) -> None:
    with pytest.raises(EventValidationError, match="sha256"):
        model(sha256=sha)


def test_provenance_sha256_of_wrong_type_is_a_validation_error() -> None:
    # re.fullmatch(None) raises TypeError; the constructor should say what is wrong instead.
    with pytest.raises(EventValidationError, match="sha256"):
        model(sha256=None)


@pytest.mark.parametrize(
    "value", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"]
)
def test_non_finite_floats_are_rejected(value: float) -> None:
    # JSON has no NaN/Infinity: orjson writes null, which no receiver can decode as a value.
    with pytest.raises(EventValidationError):
        Measurement("x", value)
    with pytest.raises(EventValidationError):
        model(score=value)


@pytest.mark.parametrize("value", [2**64, -(2**63) - 1, 10**30], ids=["2^64", "-2^63-1", "1e30"])
def test_integers_beyond_64_bits_are_rejected(value: int) -> None:
    # orjson refuses them with a TypeError at encode time (after validation said yes).
    with pytest.raises(EventValidationError):
        Measurement("x", value)


@pytest.mark.parametrize("value", [2**64 - 1, -(2**63), 0, True, False, -0.0, 1e308])
def test_64_bit_edge_values_are_accepted(value: object) -> None:
    m = Measurement("x", value)  # type: ignore[arg-type]
    for encoding in Encoding:
        encode(event(values=(m,)), encoding)


def test_strings_that_are_not_utf8_are_rejected() -> None:
    # A lone surrogate passes the length check, then orjson/cbor2 raise TypeError/UnicodeError
    # when the outbox encodes it, outside the EventValidationError the pipeline catches.
    with pytest.raises(EventValidationError):
        Measurement("x", "\ud800")
    with pytest.raises(EventValidationError):
        event(device="dev\udcff")


def test_events_are_immutable() -> None:
    e = event(values=(Measurement("x", 1),))
    with pytest.raises(dataclasses.FrozenInstanceError):
        e.device = "other"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        e.values[0].value = 2  # type: ignore[misc]
