"""The Elsys TLV decoder beyond the TTN vectors."""

from __future__ import annotations

import pytest

from drivers.codecs import CODECS, CodecError
from drivers.codecs.elsys import decode_elsys, decode_ers, decode_tlv


def test_negative_temperature_and_signed_acceleration() -> None:
    assert decode_ers(5, bytes.fromhex("01FF9C03FF8001")) == {
        "temperature": -10.0,
        "x": -1,
        "y": -128,
        "z": 1,
    }


def test_unknown_type_ends_decoding_like_the_vendor_decoder() -> None:
    # 0x3D (debug) is not decoded by Elsys's decoder: what precedes it is kept.
    assert decode_ers(5, bytes.fromhex("0100E23D01020304")) == {"temperature": 22.6}


def test_payload_that_starts_unknown_or_is_empty_is_an_error() -> None:
    with pytest.raises(CodecError, match=r"Elsys ERS: unknown data type 0xff at offset 0"):
        decode_ers(5, bytes.fromhex("FF0102"))
    with pytest.raises(CodecError, match="empty payload"):
        decode_ers(5, b"")


def test_value_cut_short_is_an_error() -> None:
    with pytest.raises(CodecError, match=r"temperature needs 2 byte\(s\) at offset 1"):
        decode_ers(5, bytes.fromhex("0100"))


def test_repeated_external_temperature2_becomes_a_list() -> None:
    assert decode_elsys(5, bytes.fromhex("1900FA")) == {"externalTemperature2": 25.0}
    assert decode_elsys(5, bytes.fromhex("1900FA19FF9C1900C8")) == {
        "externalTemperature2": [25.0, -10.0, 20.0]
    }


def test_multi_value_types() -> None:
    payload = bytes.fromhex(
        "1000FA00C8"  # IR temperatures 25.0 and 20.0
        "09010203040506"  # GPS
        "150A05"  # sound peak and average
    )
    assert decode_elsys(5, payload) == {
        "irInternalTemperature": 25.0,
        "irExternalTemperature": 20.0,
        "lat": 0x010203,
        "long": 0x040506,
        "soundPeak": 10,
        "soundAvg": 5,
    }
    grideye = decode_elsys(5, bytes.fromhex("1314" + "05" * 64))["grideye"]
    assert grideye == [20.5] * 64


def test_32_bit_values_are_signed_as_in_the_vendor_decoder() -> None:
    # JavaScript's << makes 0xFFFFFFFF a -1; the vendor decoder reports it so.
    assert decode_elsys(5, bytes.fromhex("0BFFFFFFFF")) == {"pulseAbs": -1}


def test_every_model_shares_the_decoder_but_names_itself() -> None:
    for name, codec in CODECS.items():
        if name.startswith("elsys"):
            assert codec(5, bytes.fromhex("0100E2")) == {"temperature": 22.6}
    with pytest.raises(CodecError, match=r"^Elsys ELT Ultrasonic: "):
        CODECS["elsys-elt-ultrasonic"](5, bytes.fromhex("0E23"))
    assert decode_tlv("x", bytes.fromhex("0E2311")) == {"distance": 8977}
