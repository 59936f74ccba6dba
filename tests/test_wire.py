"""The upstream wire format: round trips, the documented shape, batches and hostile input."""

from __future__ import annotations

import math
import re
import struct
import typing
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import cbor2
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.errors import EventValidationError
from gateway.types import MAX_TEXT, Event, Measurement, Provenance, Severity
from gateway.wire import (
    CONTENT_TYPES,
    Encoding,
    decode,
    decode_batch,
    encode,
    encode_batch,
    from_wire,
    to_wire,
)

# -- strategies -------------------------------------------------------------------------------

names = st.from_regex(r"[a-z][a-z0-9_]{0,20}", fullmatch=True)
# Lone surrogates (category Cs) are not UTF-8 and so not text on the wire; whether the model
# rejects them is tested in test_types.py.
texts = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=MAX_TEXT)
short_texts = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=16)
# NaN and infinities are excluded on purpose: JSON has no literal for them (orjson writes null),
# so they cannot round-trip; test_types.py asserts the model refuses them at construction.
finite_floats = st.floats(allow_nan=False, allow_infinity=False)
int64ish = st.integers(min_value=-(2**63), max_value=2**64 - 1)
scalars = st.one_of(finite_floats, int64ish, st.booleans(), texts)
measurements = st.builds(Measurement, name=names, value=scalars, unit=st.none() | short_texts)
provenances = st.builds(
    Provenance,
    model_id=short_texts,
    version=short_texts,
    sha256=st.text(alphabet="0123456789abcdef", min_size=64, max_size=64),
    score=finite_floats,
    threshold=finite_floats,
)
zones = st.sampled_from(
    [UTC, timezone(timedelta(hours=2)), timezone(timedelta(hours=-5, minutes=-30))]
)
# Whole range of a deployed gateway's life; CBOR carries time as float epoch seconds (tag 1),
# which is exact to the microsecond only while |t| < ~2^32 s.
timestamps = st.datetimes(
    # hypothesis takes naive bounds and attaches the zones itself
    min_value=datetime(2000, 1, 1),
    max_value=datetime(2100, 1, 1),
    timezones=zones,
)
event_ids = st.from_regex(r"[0-9A-HJKMNP-TV-Z]{26}", fullmatch=True)
events = st.builds(
    Event,
    kind=names,
    device=texts,
    ts=timestamps,
    severity=st.sampled_from(Severity),
    values=st.lists(measurements, max_size=8).map(tuple),
    model=st.none() | provenances,
    quality=st.lists(names, max_size=4).map(tuple),
    event_id=event_ids,
)


def strict_view(event: Event) -> object:
    """Equality that also tells 1 from 1.0 from True and 0.0 from -0.0."""

    def scalar(v: object) -> tuple[str, str]:
        return type(v).__name__, repr(v)

    return (
        event.schema,
        event.event_id,
        event.ts,
        event.kind,
        event.device,
        event.severity,
        tuple((m.name, scalar(m.value), m.unit) for m in event.values),
        None
        if event.model is None
        else (
            event.model.model_id,
            event.model.version,
            event.model.sha256,
            scalar(event.model.score),
            scalar(event.model.threshold),
        ),
        event.quality,
    )


# -- round trips ------------------------------------------------------------------------------


@given(event=events)
@settings(max_examples=150, deadline=None)
def test_round_trip(event: Event) -> None:
    for encoding in Encoding:
        payload = encode(event, encoding)
        assert isinstance(payload, bytes)
        decoded = decode(payload, encoding)
        assert decoded == event
        assert strict_view(decoded) == strict_view(event)
        # Stable: encoding the decoded event gives the same bytes.
        assert encode(decoded, encoding) == payload


@given(batch=st.lists(events, max_size=5))
@settings(max_examples=40, deadline=None)
def test_batch_round_trip(batch: list[Event]) -> None:
    for encoding in Encoding:
        payload = encode_batch([encode(e, encoding) for e in batch], encoding)
        decoded = decode_batch(payload, encoding)
        assert decoded == batch
        assert [strict_view(e) for e in decoded] == [strict_view(e) for e in batch]


@pytest.mark.parametrize(
    ("encoding", "expected"), [(Encoding.JSON, b"[]"), (Encoding.CBOR, b"\x9f\xff")]
)
def test_empty_batch(encoding: Encoding, expected: bytes) -> None:
    assert encode_batch([], encoding) == expected
    assert decode_batch(expected, encoding) == []


def test_batch_is_a_plain_array_for_generic_decoders() -> None:
    one = Event(kind="reading", device="d", ts=datetime(2024, 1, 1, tzinfo=UTC), event_id="A" * 26)
    json_batch = encode_batch([encode(one, Encoding.JSON)] * 3, Encoding.JSON)
    assert [item["id"] for item in orjson.loads(json_batch)] == ["A" * 26] * 3
    cbor_batch = encode_batch([encode(one, Encoding.CBOR)] * 3, Encoding.CBOR)
    assert [item["id"] for item in cbor2.loads(cbor_batch)] == ["A" * 26] * 3


def test_content_types() -> None:
    assert CONTENT_TYPES == {Encoding.JSON: "application/json", Encoding.CBOR: "application/cbor"}


# -- the documented example -------------------------------------------------------------------

README = Path(__file__).resolve().parent.parent / "README.md"

# The README's "alarm with model provenance", rebuilt from the model.
EXAMPLE = Event(
    kind="water_level",
    device="gauge-anduze-01",
    ts=datetime(2020, 9, 19, 14, 15, 0, tzinfo=UTC),
    severity=Severity.ALARM,
    values=(Measurement("water_level", 712.0, "cm"), Measurement("rise_3h", 184.0, "cm")),
    model=Provenance(
        model_id="water-level-anomaly",
        version="1.0.0",
        sha256="9f2c" * 16,
        score=0.93,
        threshold=0.8,
    ),
    quality=("unvalidated",),
    event_id="01EJKZ3M5G7N8W1Q2R3S4T5V6X",
)
EXAMPLE_JSON = (
    b'{"v":1,"id":"01EJKZ3M5G7N8W1Q2R3S4T5V6X","ts":"2020-09-19T14:15:00Z",'
    b'"kind":"water_level","dev":"gauge-anduze-01","sev":"alarm",'
    b'"vals":[{"n":"water_level","v":712.0,"u":"cm"},{"n":"rise_3h","v":184.0,"u":"cm"}],'
    b'"model":{"id":"water-level-anomaly","ver":"1.0.0",'
    b'"sha256":"9f2c9f2c9f2c9f2c9f2c9f2c9f2c9f2c9f2c9f2c9f2c9f2c9f2c9f2c9f2c9f2c",'
    b'"score":0.93,"thr":0.8},"q":["unvalidated"]}'
)
# Recorded sizes of the example (the README quotes them), so a wire change is a visible diff.
EXAMPLE_JSON_SIZE = 381
EXAMPLE_CBOR_SIZE = 299


def test_documented_example_json_bytes() -> None:
    payload = encode(EXAMPLE, Encoding.JSON)
    assert payload == EXAMPLE_JSON
    assert list(orjson.loads(payload)) == [
        "v",
        "id",
        "ts",
        "kind",
        "dev",
        "sev",
        "vals",
        "model",
        "q",
    ]
    assert len(payload) == EXAMPLE_JSON_SIZE
    assert decode(payload, Encoding.JSON) == EXAMPLE


def test_documented_example_cbor_is_the_same_map_and_smaller() -> None:
    payload = encode(EXAMPLE, Encoding.CBOR)
    assert len(payload) == EXAMPLE_CBOR_SIZE
    assert len(payload) < len(encode(EXAMPLE, Encoding.JSON))
    raw = cbor2.loads(payload)
    assert raw == {**orjson.loads(EXAMPLE_JSON), "ts": EXAMPLE.ts}
    # Canonical CBOR: keys shortest first, then bytewise (RFC 7049 section 3.9).
    assert list(raw) == ["q", "v", "id", "ts", "dev", "sev", "kind", "vals", "model"]
    # The time travels as tag 1 (epoch seconds), not as an ISO string; 712.0 as a half float.
    assert b"\xc1\x1a" in payload
    assert b"2020-09-19" not in payload
    assert b"\xf9" + struct.pack(">e", 712.0) in payload
    assert decode(payload, Encoding.CBOR) == EXAMPLE


def test_readme_shows_what_the_code_encodes() -> None:
    text = README.read_text()
    assert EXAMPLE_JSON.decode() in text
    sizes = re.search(r"is \*\*(\d+) bytes\*\* as\s+JSON and \*\*(\d+) bytes\*\* as CBOR", text)
    assert sizes is not None
    assert (int(sizes[1]), int(sizes[2])) == (EXAMPLE_JSON_SIZE, EXAMPLE_CBOR_SIZE)
    # The demo reading, quoted as CBOR hex: it decodes, and re-encodes to the same bytes.
    hex_block = re.search(r"```text\n([0-9a-f]+)\n```", text)
    assert hex_block is not None
    cbor_bytes = bytes.fromhex(hex_block[1])
    reading = decode(cbor_bytes, Encoding.CBOR)
    assert encode(reading, Encoding.CBOR) == cbor_bytes
    demo = re.search(r"plain reading is \*\*(\d+) bytes\*\* as\s+JSON and \*\*(\d+) bytes", text)
    assert demo is not None
    assert (int(demo[1]), int(demo[2])) == (
        len(encode(reading, Encoding.JSON)),
        len(cbor_bytes),
    )


def test_optional_fields_are_left_out() -> None:
    bare = Event(kind="heartbeat", device="d", ts=datetime(2024, 1, 1, tzinfo=UTC), event_id="X")
    assert list(to_wire(bare)) == ["v", "id", "ts", "kind", "dev", "sev"]
    assert orjson.loads(encode(bare, Encoding.JSON))["sev"] == "info"
    unitless = Event(
        kind="k", device="d", ts=bare.ts, values=(Measurement("open", True),), event_id="X"
    )
    assert to_wire(unitless)["vals"] == [{"n": "open", "v": True}]


def test_json_timestamp_keeps_the_instant_and_microseconds() -> None:
    ts = datetime(2024, 5, 17, 8, 30, 0, 123456, tzinfo=timezone(timedelta(hours=2)))
    e = Event(kind="k", device="d", ts=ts, event_id="X")
    sent = orjson.loads(encode(e, Encoding.JSON))["ts"]
    assert datetime.fromisoformat(sent) == ts
    assert sent.startswith("2024-05-17T")
    assert ".123456" in sent
    assert decode(encode(e, Encoding.JSON), Encoding.JSON).ts == ts
    utc = Event(kind="k", device="d", ts=ts.astimezone(UTC), event_id="X")
    assert orjson.loads(encode(utc, Encoding.JSON))["ts"] == "2024-05-17T06:30:00.123456Z"


def test_epoch_number_timestamps_are_accepted() -> None:
    wire = orjson.loads(EXAMPLE_JSON)
    wire["ts"] = int(EXAMPLE.ts.timestamp())
    assert from_wire(wire).ts == EXAMPLE.ts
    wire["ts"] = EXAMPLE.ts.timestamp() + 0.25
    assert from_wire(wire).ts == EXAMPLE.ts + timedelta(milliseconds=250)


def test_nan_is_not_silently_sent_as_null() -> None:
    """A NaN reading must fail where it is made, not as an undecodable message upstream."""
    try:
        bad = Event(
            kind="k",
            device="d",
            ts=EXAMPLE.ts,
            values=(Measurement("x", math.nan),),
            event_id="X",
        )
    except EventValidationError:
        return
    # Construction accepted it: then encoding must refuse, not write {"v":null}.
    with pytest.raises(EventValidationError):
        encode(bad, Encoding.JSON)


# -- hostile input ----------------------------------------------------------------------------


def _decode_is_clean(payload: bytes, encoding: Encoding) -> None:
    """Decoding yields an Event or raises EventValidationError, nothing else."""
    try:
        result = decode(payload, encoding)
    except EventValidationError:
        return
    assert isinstance(result, Event)


def _decode_batch_is_clean(payload: bytes, encoding: Encoding) -> None:
    try:
        result = decode_batch(payload, encoding)
    except EventValidationError:
        return
    assert all(isinstance(e, Event) for e in result)


@given(garbage=st.binary(max_size=200))
@settings(max_examples=400, deadline=None)
def test_garbage_bytes(garbage: bytes) -> None:
    for encoding in Encoding:
        _decode_is_clean(garbage, encoding)
        _decode_batch_is_clean(garbage, encoding)


json_values = st.recursive(
    st.none() | st.booleans() | int64ish | finite_floats | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner),
    max_leaves=10,
)
EXAMPLE_WIRE: dict[str, typing.Any] = orjson.loads(EXAMPLE_JSON)


def _mutations() -> st.SearchStrategy[dict[str, typing.Any]]:
    """The example's wire map with one key (top level or nested) replaced, removed or added."""
    paths = (
        [(k,) for k in EXAMPLE_WIRE]
        + [("model", k) for k in EXAMPLE_WIRE["model"]]
        + [("vals", 0, k) for k in EXAMPLE_WIRE["vals"][0]]
    )

    @st.composite
    def mutate(draw: st.DrawFn) -> dict[str, typing.Any]:
        wire = orjson.loads(EXAMPLE_JSON)
        path = draw(st.sampled_from(paths))
        parent: typing.Any = wire
        for step in path[:-1]:
            parent = parent[step]
        if draw(st.booleans()):
            del parent[path[-1]]
        else:
            parent[path[-1]] = draw(json_values)
        return wire

    return mutate()


def _dumps(value: object, encoding: Encoding) -> bytes:
    return orjson.dumps(value) if encoding is Encoding.JSON else cbor2.dumps(value)


@given(wire=_mutations())
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_mutated_events_decode_cleanly(wire: dict[str, typing.Any]) -> None:
    for encoding in Encoding:
        payload = _dumps(wire, encoding)
        _decode_is_clean(payload, encoding)
        _decode_batch_is_clean(encode_batch([payload], encoding), encoding)


@given(ts=st.one_of(st.floats(allow_nan=False, allow_infinity=False), int64ish))
@settings(max_examples=200, deadline=None)
def test_any_numeric_timestamp_decodes_cleanly(ts: float) -> None:
    # Epoch numbers are accepted; ones no datetime can hold must be a validation error.
    wire = {**EXAMPLE_WIRE, "ts": ts}
    for encoding in Encoding:
        _decode_is_clean(_dumps(wire, encoding), encoding)


@given(value=json_values)
@settings(max_examples=200, deadline=None)
def test_arbitrary_documents_decode_cleanly(value: object) -> None:
    for encoding in Encoding:
        payload = _dumps(value, encoding)
        _decode_is_clean(payload, encoding)
        _decode_batch_is_clean(payload, encoding)


@pytest.mark.parametrize("epoch", [1e20, -1e20, 2**70, math.nan, math.inf])
def test_cbor_epoch_tags_out_of_range(epoch: float) -> None:
    wire = {**EXAMPLE_WIRE, "ts": cbor2.CBORTag(1, epoch)}
    with pytest.raises(EventValidationError):
        decode(cbor2.dumps(wire), Encoding.CBOR)


def test_cbor_bignum_cannot_smuggle_an_image() -> None:
    # CBOR (unlike JSON) carries integers of any size (tag 2): 75 kB of "JPEG" as one number.
    blob = int.from_bytes(b"\xff\xd8\xff\xe0" + bytes(range(256)) * 300, "big")
    wire = {**EXAMPLE_WIRE, "vals": [{"n": "frame", "v": blob}]}
    payload = cbor2.dumps(wire)
    assert len(payload) > 75_000
    with pytest.raises(EventValidationError):
        decode(payload, Encoding.CBOR)


def _wire(**changes: object) -> dict[str, typing.Any]:
    wire = orjson.loads(EXAMPLE_JSON)
    for key, value in changes.items():
        if value is _DELETE:
            del wire[key]
        else:
            wire[key] = value
    return wire


_DELETE = object()
_MODEL = EXAMPLE_WIRE["model"]


@pytest.mark.parametrize(
    "wire",
    [
        pytest.param([], id="json-array"),
        pytest.param("event", id="string"),
        pytest.param(None, id="null"),
        pytest.param(42, id="number"),
        *[pytest.param(_wire(**{k: _DELETE}), id=f"missing-{k}") for k in ("v", "id", "ts")],
        *[pytest.param(_wire(**{k: _DELETE}), id=f"missing-{k}") for k in ("kind", "dev", "sev")],
        pytest.param(_wire(sev="loud"), id="sev-unknown"),
        pytest.param(_wire(sev=None), id="sev-null"),
        pytest.param(_wire(ts="yesterday"), id="ts-garbage"),
        pytest.param(_wire(ts="2024-05-17T06:30:00"), id="ts-naive"),
        pytest.param(_wire(ts=None), id="ts-null"),
        pytest.param(_wire(ts=[2024, 5, 17]), id="ts-array"),
        pytest.param(_wire(ts=1e20), id="ts-out-of-range"),
        pytest.param(_wire(ts=-1e20), id="ts-out-of-range-negative"),
        pytest.param(_wire(id=5), id="id-number"),
        pytest.param(_wire(id="x" * 300), id="id-too-long"),
        pytest.param(_wire(dev=None), id="dev-null"),
        pytest.param(_wire(kind="Bad Kind"), id="kind-invalid"),
        pytest.param(_wire(kind=7), id="kind-number"),
        pytest.param(_wire(vals=5), id="vals-number"),
        pytest.param(_wire(vals="abc"), id="vals-string"),
        pytest.param(_wire(vals=[5]), id="vals-item-number"),
        pytest.param(_wire(vals=[{"n": "x"}]), id="vals-missing-v"),
        pytest.param(_wire(vals=[{"v": 1}]), id="vals-missing-n"),
        pytest.param(_wire(vals=[{"n": "x", "v": [1, 2]}]), id="vals-v-array"),
        pytest.param(_wire(vals=[{"n": "x", "v": None}]), id="vals-v-null"),
        pytest.param(_wire(vals=[{"n": "x", "v": 1, "u": 5}]), id="vals-u-number"),
        pytest.param(_wire(vals=[{"n": "x", "v": "y" * 300}]), id="vals-v-too-long"),
        pytest.param(_wire(vals=[{"n": "x", "v": 1}] * 65), id="vals-too-many"),
        pytest.param(_wire(model="m"), id="model-string"),
        pytest.param(_wire(model={**_MODEL, "sha256": "abc"}), id="model-sha-short"),
        pytest.param(_wire(model={**_MODEL, "sha256": None}), id="model-sha-null"),
        pytest.param(_wire(model={"id": "m"}), id="model-incomplete"),
        pytest.param(_wire(model={**_MODEL, "score": "high"}), id="model-score-string"),
        pytest.param(_wire(model={**_MODEL, "thr": None}), id="model-thr-null"),
        pytest.param(_wire(v="one"), id="v-string"),
        pytest.param(_wire(v=None), id="v-null"),
        pytest.param(_wire(q="abc"), id="q-string"),
        pytest.param(_wire(q=[1]), id="q-number"),
        pytest.param(_wire(q=["Not OK"]), id="q-invalid"),
    ],
)
@pytest.mark.parametrize("encoding", list(Encoding))
def test_malformed_events_raise_validation_error(encoding: Encoding, wire: object) -> None:
    payload = _dumps(wire, encoding)
    with pytest.raises(EventValidationError):
        decode(payload, encoding)
    with pytest.raises(EventValidationError):
        decode_batch(encode_batch([payload], encoding), encoding)


@pytest.mark.parametrize(
    ("payload", "encoding"),
    [
        (b"", Encoding.JSON),
        (b"", Encoding.CBOR),
        (b"{", Encoding.JSON),
        (b"\xff\xfe\xfd", Encoding.JSON),
        (b"\xff\xfe\xfd", Encoding.CBOR),
        (b"NaN", Encoding.JSON),
        (b"[" * 5000 + b"]" * 5000, Encoding.JSON),
        (b"\x9f" * 5000, Encoding.CBOR),
        (b"\x81" * 5000 + b"\x00", Encoding.CBOR),
        (EXAMPLE_JSON, Encoding.CBOR),
        (EXAMPLE_JSON[:-1], Encoding.JSON),
    ],
    ids=[
        "json-empty",
        "cbor-empty",
        "json-truncated",
        "json-binary",
        "cbor-break-bytes",
        "json-nan",
        "json-deep",
        "cbor-deep-indefinite",
        "cbor-deep-nested",
        "json-as-cbor",
        "json-example-truncated",
    ],
)
def test_specific_garbage(payload: bytes, encoding: Encoding) -> None:
    with pytest.raises(EventValidationError):
        decode(payload, encoding)
    with pytest.raises(EventValidationError):
        decode_batch(payload, encoding)


@pytest.mark.parametrize("encoding", list(Encoding))
def test_batch_must_be_an_array_of_events(encoding: Encoding) -> None:
    single = encode(EXAMPLE, encoding)
    with pytest.raises(EventValidationError, match="a batch is an array"):
        decode_batch(single, encoding)
    bad = encode_batch([single, _dumps({"v": 1}, encoding)], encoding)
    with pytest.raises(EventValidationError):
        decode_batch(bad, encoding)
