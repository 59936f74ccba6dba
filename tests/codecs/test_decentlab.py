"""Decentlab protocol v2 frames beyond the TTN vectors."""

from __future__ import annotations

import pytest

from drivers.codecs import CodecError
from drivers.codecs.decentlab import decode_dl_ctd10, decode_dl_pr26_0_1, decode_dl_pr36_8192


def test_other_protocol_versions_are_rejected_with_the_vendor_message() -> None:
    with pytest.raises(CodecError, match="protocol version 3 doesn't match v2"):
        decode_dl_pr26_0_1(1, bytes.fromhex("03016700020C7F"))


def test_groups_follow_the_flags() -> None:
    # Flags 0x0001: only the pressure/temperature group, no battery word.
    data = decode_dl_pr36_8192(1, bytes.fromhex("02032B000180679781"))
    assert set(data) == {"protocol_version", "device_id", "pressure", "temperature"}
    # Flag bits beyond the device's groups are ignored, as by the vendor decoder.
    assert decode_dl_pr36_8192(1, bytes.fromhex("02032B80020C2B"))["battery_voltage"] == {
        "displayName": "Battery voltage",
        "value": 3.115,
        "unit": "V",
    }


def test_value_without_unit_has_no_unit_key() -> None:
    data = decode_dl_ctd10(1, bytes.fromhex("0207D9000390888081006400010C60"))
    assert data["freezing_flag"] == {"displayName": "Freezing flag", "value": 1}


def test_trailing_bytes_mean_another_device() -> None:
    with pytest.raises(CodecError, match="trailing"):
        decode_dl_pr26_0_1(1, bytes.fromhex("02016700020C7F00"))


def test_truncated_group_names_the_field() -> None:
    with pytest.raises(CodecError, match=r"DL-PR26.*sensor group 0.*offset 7"):
        decode_dl_pr26_0_1(1, bytes.fromhex("02016700033E80"))
