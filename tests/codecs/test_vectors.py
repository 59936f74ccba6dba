"""Every TTN test vector of every supported device decodes to the vendor decoder's output."""

from __future__ import annotations

import json
from typing import Any

import pytest

from drivers.codecs import CODECS, CodecError, get_codec
from tests.codecs._vectors import (
    CODEC_FOR,
    FIXTURE,
    SHARED,
    codec_name,
    load,
    mismatches,
    supported,
)

RECORDS = load(FIXTURE)


def _name(record: dict[str, Any]) -> str:
    name = codec_name(record)
    assert name is not None, f"{record['id']}: device {record['device']} has no codec"
    return name


@pytest.mark.parametrize("record", RECORDS, ids=[r["id"] for r in RECORDS])
def test_vector(record: dict[str, Any]) -> None:
    codec = get_codec(_name(record))
    payload = bytes.fromhex(record["bytes_hex"])
    expected = record["expected_output"]
    if "data" in expected:
        # Every vector of these devices is data only; none carries warnings or errors as well.
        assert set(expected) == {"data"}
        actual = codec(record["fPort"], payload)
        assert mismatches(actual, expected["data"]) == []
        json.dumps(actual, allow_nan=False)
    else:
        # Negative vectors: the vendor decoder returns {"errors": [...]}, the codec raises with the
        # same words in its message.
        with pytest.raises(CodecError) as raised:
            codec(record["fPort"], payload)
        for message in expected["errors"]:
            assert message in str(raised.value)


def test_fixture_holds_only_supported_devices() -> None:
    assert supported(RECORDS) == RECORDS


@pytest.mark.parametrize("device", sorted(CODEC_FOR), ids="/".join)
def test_every_supported_device_has_vectors(device: tuple[str, str]) -> None:
    assert any((r["vendor"], r["device"]) == device for r in RECORDS)
    assert CODEC_FOR[device] in CODECS


def test_fixture_is_not_behind_the_shared_vectors() -> None:
    if not SHARED.exists():
        pytest.skip(
            f"{SHARED} is absent (a clone without ../shared): only the fixture copy is tested"
        )
    fixture = {r["id"]: r for r in RECORDS}
    shared = supported(load(SHARED))
    missing = [r["id"] for r in shared if r["id"] not in fixture]
    changed = [r["id"] for r in shared if r["id"] in fixture and fixture[r["id"]] != r]
    assert (missing, changed) == ([], []), (
        f"the fixture lacks {missing} and differs on {changed}; "
        "refresh it with `python -m tests.codecs._vectors`"
    )


def test_mismatches_compares_floats_with_tolerance_and_the_rest_exactly() -> None:
    assert mismatches({"a": 3.0000000001, "b": [1, "x"]}, {"a": 3, "b": [1, "x"]}) == []
    assert mismatches({"t": 0.0}, {"t": "0.00"}) == ["data.t: expected '0.00', got 0.0"]
    assert mismatches({"a": 1}, {"a": 1, "b": 2}) == ["data.b: missing"]
    assert mismatches({"a": True}, {"a": 1}) == ["data.a: expected 1, got True"]
    assert mismatches([1.0], [1.1]) == ["data[0]: expected 1.1, got 1.0"]
