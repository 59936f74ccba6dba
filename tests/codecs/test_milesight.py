"""Milesight channel frames beyond the TTN vectors (layouts from the devices' payload tables)."""

from __future__ import annotations

import pytest

from drivers.codecs import CodecError
from drivers.codecs.milesight import decode_em400_udl, decode_em410_rdl

DEVICE_INFO = (
    "ff0101"  # ipso version 0.1
    "ff166749d19054690031"  # serial number
    "ff090110"  # hardware version
    "ff0a0114"  # firmware version
    "ff0f00"  # class A
    "ff0b01"  # device status
    "fffe01"  # reset event
)


def test_em400_alarm_channels() -> None:
    # The example of Milesight's EM400-UDL payload definition.
    assert decode_em400_udl(85, bytes.fromhex("8367e800018482410601")) == {
        "temperature": 23.2,
        "temperature_alarm": "threshold_alarm",
        "distance": 1601,
        "distance_alarm": "threshold_alarm",
    }


def test_device_information_keeps_each_decoders_version_format() -> None:
    common = {
        "ipso_version": "v0.1",
        "sn": "6749d19054690031",
        "hardware_version": "v1.1",
        "lorawan_class": "Class A",
        "device_status": "on",
        "reset_event": "reset",
    }
    assert decode_em400_udl(85, bytes.fromhex(DEVICE_INFO)) == {
        **common,
        "firmware_version": "v1.20",
    }
    assert decode_em410_rdl(85, bytes.fromhex(DEVICE_INFO)) == {
        **common,
        "firmware_version": "v1.14",
    }


def test_em410_alarms_exceptions_and_history() -> None:
    payload = bytes.fromhex(
        "84822c0101"  # distance alarm: 300 mm, threshold alarm
        "9482f401640002"  # mutation alarm: 500 mm, changed by 100 mm
        "b482fdff02"  # exception: no target (no distance)
        "20ce00e1f5652c0110013200"  # history record: time, 300 mm, 27.2 degC, 50 mm
        "11"  # history events: bits 0 and 4
    )
    assert decode_em410_rdl(85, payload) == {
        "distance": 500,
        "event": [
            {"distance": 300, "distance_alarm": "threshold alarm"},
            {"distance": 500, "distance_mutation": 100, "distance_alarm": "mutation alarm"},
            {"distance_exception": "no target"},
        ],
        "history": [
            {
                "timestamp": 1710612736,
                "distance": 300,
                "temperature": 27.2,
                "event": ["threshold alarm", "mutation alarm"],
                "distance_mutation": 50,
            }
        ],
    }


def test_em410_history_status_words() -> None:
    data = decode_em410_rdl(85, bytes.fromhex("20ce00000000fdfffeff000000"))
    assert data["history"] == [
        {
            "timestamp": 0,
            "distance_sensor_status": "no target",
            "temperature_sensor_status": "disabled",
        }
    ]


def test_em410_distance_is_signed_em400_unsigned() -> None:
    assert decode_em410_rdl(85, bytes.fromhex("0482ffff")) == {"distance": -1}
    assert decode_em400_udl(85, bytes.fromhex("0482ffff")) == {"distance": 65535}


def test_unknown_channel_ends_decoding_unless_it_is_the_first() -> None:
    # 0xFE 0x03 is a configuration echo, not decoded here: what precedes it is kept.
    assert decode_em400_udl(85, bytes.fromhex("01755cfe032c01")) == {"battery": 92}
    with pytest.raises(CodecError, match=r"EM400-UDL: unknown channel 0xfe type 0x03"):
        decode_em400_udl(85, bytes.fromhex("fe032c01"))


def test_cut_frames_are_errors() -> None:
    with pytest.raises(CodecError, match="channel type needs"):
        decode_em410_rdl(85, bytes.fromhex("01756403"))
    with pytest.raises(CodecError, match="temperature needs"):
        decode_em410_rdl(85, bytes.fromhex("0367"))
    with pytest.raises(CodecError, match="empty payload"):
        decode_em410_rdl(85, b"")
