"""Any input gives a JSON-serialisable dict or a ``CodecError``: never another exception.

Random bytes seldom get past a frame's first check (a Decentlab version byte, an Elsys type), so
besides plain random payloads every codec also gets the vector payloads of all devices, their
prefixes, and mutations of them (bytes overwritten, cut, extended) on every fPort.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from drivers.codecs import CODECS, Codec, CodecError
from tests.codecs._vectors import FIXTURE, codec_name, load

RECORDS = load(FIXTURE)
PAYLOADS = sorted({bytes.fromhex(r["bytes_hex"]) for r in RECORDS})
NAMES = sorted(CODECS)


def _decode_or_codec_error(codec: Codec, fport: int, payload: bytes) -> None:
    try:
        result: Any = codec(fport, payload)
    except CodecError as exc:
        assert str(exc), "a CodecError names the device and the problem"
        return
    assert isinstance(result, dict)
    json.dumps(result, allow_nan=False)


@pytest.mark.parametrize("name", NAMES)
@settings(max_examples=300, deadline=None)
@given(payload=st.binary(max_size=64), fport=st.integers(0, 255))
def test_random_bytes(name: str, payload: bytes, fport: int) -> None:
    _decode_or_codec_error(CODECS[name], fport, payload)


@st.composite
def _mutated(draw: st.DrawFn) -> bytes:
    """A vector payload with some bytes overwritten, then cut or extended."""
    buf = bytearray(draw(st.sampled_from(PAYLOADS)))
    for _ in range(draw(st.integers(0, 4))):
        if buf:
            buf[draw(st.integers(0, len(buf) - 1))] = draw(st.integers(0, 255))
    cut = draw(st.integers(0, len(buf)))
    return bytes(buf[:cut]) + draw(st.binary(max_size=8))


@pytest.mark.parametrize("name", NAMES)
@settings(max_examples=300, deadline=None)
@given(payload=_mutated(), fport=st.integers(0, 255))
def test_mutated_vectors(name: str, payload: bytes, fport: int) -> None:
    _decode_or_codec_error(CODECS[name], fport, payload)


@pytest.mark.parametrize("name", NAMES)
def test_every_vector_payload_on_every_fport(name: str) -> None:
    codec = CODECS[name]
    for payload in PAYLOADS:
        for fport in range(256):
            _decode_or_codec_error(codec, fport, payload)


DATA_RECORDS = [r for r in RECORDS if "data" in r["expected_output"]]


@pytest.mark.parametrize("record", DATA_RECORDS, ids=[r["id"] for r in DATA_RECORDS])
def test_every_truncation_of_a_valid_payload(record: dict[str, Any]) -> None:
    name = codec_name(record)
    assert name is not None
    payload = bytes.fromhex(record["bytes_hex"])
    for cut in range(len(payload)):
        _decode_or_codec_error(CODECS[name], record["fPort"], payload[:cut])


def test_fixed_layout_truncations_raise() -> None:
    # Frames with a fixed length (Dragino) or a length the flags announce (Decentlab) must not
    # decode from a prefix at all; TLV formats may legitimately end after any whole element.
    fixed = ("dragino-", "decentlab-")
    for record in DATA_RECORDS:
        name = codec_name(record)
        assert name is not None
        if not name.startswith(fixed):
            continue
        payload = bytes.fromhex(record["bytes_hex"])
        for cut in range(len(payload)):
            if name == "dragino-ldds20" and cut == 4:
                continue  # the 4-byte "No Sensor" frame is itself a vector
            with pytest.raises(CodecError):
                CODECS[name](record["fPort"], payload[:cut])
