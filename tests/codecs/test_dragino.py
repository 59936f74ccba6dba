"""Dragino frames beyond the TTN vectors, built from the user manuals' byte layouts."""

from __future__ import annotations

import pytest

from drivers.codecs import CodecError
from drivers.codecs._bytes import js_round_fixed, js_to_fixed
from drivers.codecs.dragino import (
    decode_ldds20,
    decode_ldds75_114,
    decode_lht65,
    decode_lmds200,
)


@pytest.mark.parametrize(
    ("x", "digits", "expected"),
    [
        (0.0, 2, "0.00"),
        (-0.0, 2, "0.00"),  # JS drops the sign of -0
        (-0.001, 2, "-0.00"),  # ... but not of a negative number that rounds to zero
        (0.125, 2, "0.13"),  # exact binary tie: JS rounds away from zero, Python's format to even
        (-0.125, 2, "-0.13"),
        (2.5, 0, "3"),
        (0.1, 2, "0.10"),
        (-19.3, 2, "-19.30"),
        (1.005, 2, "1.00"),  # 1.005 is 1.00499999999999989... in binary
    ],
)
def test_js_to_fixed(x: float, digits: int, expected: str) -> None:
    assert js_to_fixed(x, digits) == expected


def test_js_round_fixed() -> None:
    assert js_round_fixed(27.81, 2) == 27.81
    assert js_round_fixed(88.6, 1) == 88.6


class TestLdds75:
    def test_distance_sentinels_and_negative_probe_temperature(self) -> None:
        # BAT 0x8D3B: status bits 15..14 are masked off the 3387 mV.
        assert decode_ldds75_114(2, bytes.fromhex("8D3B000001FF3F00")) == {
            "Bat": 3.387,
            "Distance": "No Sensor",
            "Interrupt_flag": 1,
            "TempC_DS18B20": "-19.30",
            "Sensor_flag": 0,
        }
        assert decode_ldds75_114(2, bytes.fromhex("0D3B001400010501"))["Distance"] == (
            "Invalid Reading"
        )
        # 21 mm is not the sentinel: the decoder compares for exactly 20.
        assert decode_ldds75_114(2, bytes.fromhex("0D3B001500010501"))["Distance"] == "21 mm"

    @pytest.mark.parametrize("length", [7, 9, 11])
    def test_wrong_length(self, length: int) -> None:
        with pytest.raises(CodecError, match=r"LDDS75.*fPort 2 frame is 8 bytes, got"):
            decode_ldds75_114(2, bytes(length))


class TestLdds20Legacy:
    def test_five_byte_frame_reports_the_distance_not_the_battery(self) -> None:
        assert decode_ldds20(2, bytes.fromhex("0E1C0B0500")) == {"value": 2821, "distance": 2821}
        assert decode_ldds20(2, bytes.fromhex("0E1C000A00")) == {
            "value": 10,
            "distance": "Invalid Reading",
        }

    def test_eight_byte_frame_points_to_the_newer_codec(self) -> None:
        with pytest.raises(CodecError, match="dragino-ldds20-114"):
            decode_ldds20(2, bytes.fromhex("0D3B0AEF00000001"))


class TestLmds200:
    def test_configuration_reply(self) -> None:
        assert decode_lmds200(4, bytes.fromhex("0004B0050064012C01")) == {
            "TDC": 1200,
            "ATDC": 5,
            "Alarm_min": 100,
            "Alarm_max": 300,
            "Interrupt": 1,
        }

    def test_device_status(self) -> None:
        assert decode_lmds200(5, bytes.fromhex("0C011001000B88")) == {
            "SENSOR_MODEL": "LMDS200",
            "Ver": 110,
            "FREQUENCY_BAND": "EU868",
            "Sub_band": 0,
            "BAT": 2.952,
        }
        # Another model byte and an unknown band leave their keys out, as in the vendor decoder.
        assert decode_lmds200(5, bytes.fromhex("0B0100FF010B88")) == {
            "Ver": 100,
            "Sub_band": 1,
            "BAT": 2.952,
        }

    def test_non_bcd_version_is_an_error(self) -> None:
        with pytest.raises(CodecError, match="not BCD"):
            decode_lmds200(5, bytes.fromhex("0C01A001000B88"))


class TestLht65:
    def test_no_external_sensor(self) -> None:
        assert decode_lht65(2, bytes.fromhex("CBF60B0D037600FFFFFFFF")) == {
            "BatV": 3.062,
            "Bat_status": 3,
            "TempC_SHT": 28.29,
            "Hum_SHT": 88.6,
            "Ext_sensor": "No external sensor",
        }

    def test_timestamp_mode_moves_probe_and_battery_status(self) -> None:
        assert decode_lht65(2, bytes.fromhex("0A28FF9CC1F4096380A2C0")) == {
            "TempC_DS": 26.0,
            "Bat_status": 3,
            "TempC_SHT": -1.0,
            "Hum_SHT": 50.0,
            "Work_mode": "DS18B20 & timestamp",
            "Systimestamp": 1669374656,
        }

    def test_probe_id_mode_and_disconnected_probe(self) -> None:
        assert decode_lht65(2, bytes.fromhex("CBF628FF3B058FAABBCCDD")) == {
            "BatV": 3.062,
            "Bat_status": 3,
            "No_connect": "Sensor no connection",
            "Work_mode": "DS18B20ID",
            "ID": "28 ff 3b 05 aa bb cc dd ",
        }

    @pytest.mark.parametrize(
        ("ext", "expected"),
        [
            (
                "04",
                {
                    "Work_mode": "Interrupt Sensor send",
                    "Exti_pin_level": "High",
                    "Exti_status": "False",
                },
            ),
            ("05", {"Work_mode": "Illumination Sensor", "ILL_lx": 256}),
            ("06", {"Work_mode": "ADC Sensor", "ADC_V": 0.256}),
            ("07", {"Work_mode": "Interrupt Sensor count", "Exit_count": 256}),
            ("08", {"Work_mode": "Interrupt Sensor count", "Exit_count": 16777216}),
        ],
    )
    def test_external_sensor_modes(self, ext: str, expected: dict[str, object]) -> None:
        data = decode_lht65(2, bytes.fromhex(f"0BF60B0D0376{ext}01000000"))
        assert {k: data[k] for k in expected} == expected

    def test_poll_reply_and_wrong_length_are_errors(self) -> None:
        with pytest.raises(CodecError, match="poll"):
            decode_lht65(2, bytes.fromhex("CBF60B0D0376410ADD7FFF"))
        with pytest.raises(CodecError, match="11 bytes, got 12"):
            decode_lht65(2, bytes(12))
