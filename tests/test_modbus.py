"""Modbus RTU driver, the pure parts: register decoding, block planning, RTU framing, backoff.

The encoder in these tests is pymodbus's own (``convert_to_registers``, via
``tests.support.modbus_peer.encode``), so a round trip checks the decoder against an independent
implementation, not against itself. The bus behaviour is tested against a real pymodbus server
in ``tests/integration/test_modbus_pty.py``.
"""

from __future__ import annotations

import math
import struct
from pathlib import Path
from typing import get_args

import pytest
from hypothesis import given
from hypothesis import strategies as st

from drivers.modbus import (
    MAX_READ_REGISTERS,
    DataType,
    ModbusRegister,
    ModbusRtuSource,
    ModbusSlave,
    Order,
    RegisterBlock,
    decode_registers,
    exception_name,
    find_response,
    plan_blocks,
    read_request,
    register_value,
    retry_delay_s,
    scale_value,
    scan,
)
from drivers.serial_port import PortProblemError, SerialSettings, SerialSource
from gateway.errors import EventValidationError
from tests.support.modbus_peer import encode

ORDERS: tuple[Order, ...] = get_args(Order)
_RANGES = {
    "int16": (-(2**15), 2**15 - 1),
    "uint16": (0, 2**16 - 1),
    "int32": (-(2**31), 2**31 - 1),
    "uint32": (0, 2**32 - 1),
}


def _crc(frame: bytes) -> bytes:
    """CRC-16/MODBUS written out from the specification (poly 0xA001, init 0xFFFF, low first)."""
    crc = 0xFFFF
    for byte in frame:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0xA001 if crc & 1 else crc >> 1
    return crc.to_bytes(2, "little")


def _answer(device_id: int, function: int, words: list[int]) -> bytes:
    body = bytes([device_id, function, 2 * len(words)]) + struct.pack(f">{len(words)}H", *words)
    return body + _crc(body)


# -- decoding -------------------------------------------------------------------------------------


@st.composite
def _integers(draw: st.DrawFn) -> tuple[str, int, Order, Order]:
    data_type = draw(st.sampled_from(sorted(_RANGES)))
    low, high = _RANGES[data_type]
    value = draw(st.integers(low, high))
    return data_type, value, draw(st.sampled_from(ORDERS)), draw(st.sampled_from(ORDERS))


@given(_integers())
def test_integers_round_trip_through_pymodbus_encoder(case: tuple[str, int, Order, Order]) -> None:
    data_type, value, word_order, byte_order = case
    words = encode(value, data_type, word_order, byte_order)
    decoded = decode_registers(words, data_type, word_order, byte_order)  # type: ignore[arg-type]
    assert decoded == value
    assert isinstance(decoded, int)


@given(
    st.floats(width=32, allow_nan=False, allow_infinity=False),
    st.sampled_from(ORDERS),
    st.sampled_from(ORDERS),
)
def test_float32_round_trips_to_the_same_float32(
    value: float, word_order: Order, byte_order: Order
) -> None:
    words = encode(value, "float32", word_order, byte_order)
    decoded = decode_registers(words, "float32", word_order, byte_order)
    assert struct.pack(">f", decoded) == struct.pack(">f", value)
    # The short decimal form: 9 significant digits identify any float32.
    mantissa = repr(abs(decoded)).split("e")[0].replace(".", "").strip("0")
    assert len(mantissa) <= 9


@pytest.mark.parametrize(
    ("word_order", "byte_order", "words"),
    [
        ("big", "big", [0x47F1, 0x2000]),  # ABCD
        ("little", "big", [0x2000, 0x47F1]),  # CDAB
        ("big", "little", [0xF147, 0x0020]),  # BADC
        ("little", "little", [0x0020, 0xF147]),  # DCBA
    ],
)
def test_the_four_float_layouts(word_order: Order, byte_order: Order, words: list[int]) -> None:
    # 123456.0 is 0x47F12000 as an IEEE-754 single.
    assert decode_registers(words, "float32", word_order, byte_order) == 123456.0


def test_float32_prints_as_the_device_meant_it() -> None:
    assert decode_registers(encode(21.4, "float32"), "float32") == 21.4
    assert decode_registers(encode(-0.001, "float32"), "float32") == -0.001


def test_nan_and_infinity_pass_through() -> None:
    assert math.isnan(decode_registers([0x7FC0, 0x0000], "float32"))
    assert decode_registers([0xFF80, 0x0000], "float32") == -math.inf


def test_byte_order_applies_to_16_bit_values() -> None:
    assert decode_registers([0x3412], "uint16", byte_order="little") == 0x1234
    assert decode_registers([0xFFFE], "int16") == -2


@pytest.mark.parametrize(
    ("words", "data_type", "message"),
    [
        ([1], "int32", "takes 2 register"),
        ([1, 2], "uint16", "takes 1 register"),
        ([70000], "uint16", "0 to 65535"),
        ([-1], "uint16", "0 to 65535"),
        ([1], "int64", "unknown data type"),
    ],
)
def test_decode_refuses_what_it_cannot_read(words: list[int], data_type: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        decode_registers(words, data_type)  # type: ignore[arg-type]


def test_scale_and_offset() -> None:
    assert scale_value(234, 0.1) == 23.4  # not 23.400000000000002
    assert scale_value(2345, 0.1, -10.0) == 224.5
    assert scale_value(7) == 7
    assert isinstance(scale_value(7), int)
    assert isinstance(scale_value(7, 2.0), float)


@given(
    st.integers(-(2**31), 2**32 - 1),
    st.floats(-1e6, 1e6).filter(lambda s: s != 0),
    st.floats(-1e6, 1e6),
)
def test_scale_is_raw_times_scale_plus_offset(raw: int, scale: float, offset: float) -> None:
    expected = raw * scale + offset
    assert math.isclose(scale_value(raw, scale, offset), expected, rel_tol=1e-11, abs_tol=1e-9)


def test_register_value_combines_decoding_and_scaling() -> None:
    reg = ModbusRegister("level", 0, data_type="int32", word_order="little", scale=0.01)
    assert register_value(reg, encode(-12345, "int32", "little")) == -123.45


# -- configuration --------------------------------------------------------------------------------


def test_register_checks_its_address_range_and_name() -> None:
    assert ModbusRegister("x", 65535).width == 1
    with pytest.raises(ValueError, match=r"leaves 0\.\.65535"):
        ModbusRegister("x", 65535, data_type="float32")
    with pytest.raises(EventValidationError, match="lower_snake_case"):
        ModbusRegister("Level", 0)
    with pytest.raises(ValueError, match="unknown data type"):
        ModbusRegister("x", 0, data_type="int64")  # type: ignore[arg-type]


def test_slave_checks() -> None:
    regs = (ModbusRegister("x", 0),)
    for bad_id in (0, 248):
        with pytest.raises(ValueError, match="1 to 247"):
            ModbusSlave(bad_id, "meter", regs)
    with pytest.raises(ValueError, match="used twice"):
        ModbusSlave(1, "meter", (ModbusRegister("x", 0), ModbusRegister("x", 1)))
    with pytest.raises(ValueError, match="no registers"):
        ModbusSlave(1, "meter", ())


def test_the_source_is_a_serial_source_for_the_stats_message() -> None:
    source = ModbusRtuSource(
        "bus", SerialSettings("/dev/ttyUSB0"), [ModbusSlave(1, "meter", (ModbusRegister("x", 0),))]
    )
    assert isinstance(source, SerialSource)
    assert source.counters["silent_slaves"] == 0
    assert source.counters["polls"] == 0


def test_two_slaves_with_one_address_on_a_bus_are_refused() -> None:
    regs = (ModbusRegister("x", 0),)
    with pytest.raises(ValueError, match=r"device_id used twice on one bus: \[3\]"):
        ModbusRtuSource(
            "bus",
            SerialSettings("/dev/null"),
            [ModbusSlave(3, "a", regs), ModbusSlave(3, "b", regs)],
        )


# -- block planning -------------------------------------------------------------------------------


def test_touching_and_overlapping_registers_share_a_read() -> None:
    regs = [
        ModbusRegister("c", 3, data_type="float32"),
        ModbusRegister("a", 0, data_type="uint32"),
        ModbusRegister("b", 2),
        ModbusRegister("low_word", 4),  # inside c
        ModbusRegister("far", 10),  # a gap: a read of its own
        ModbusRegister("i", 2, table="input"),  # another table: another function code
    ]
    blocks = plan_blocks(regs)
    assert [(b.table, b.address, b.count) for b in blocks] == [
        ("holding", 0, 5),
        ("holding", 10, 1),
        ("input", 2, 1),
    ]
    assert [r.name for r in blocks[0].registers] == ["a", "b", "c", "low_word"]
    assert blocks[2].function == 4


def test_a_read_never_exceeds_125_registers() -> None:
    regs = [ModbusRegister(f"r{i}", i * 2, data_type="uint32") for i in range(100)]
    blocks = plan_blocks(regs)
    assert all(b.count <= MAX_READ_REGISTERS for b in blocks)
    assert sum(len(b.registers) for b in blocks) == 100
    assert [b.count for b in blocks] == [124, 76]


def test_block_words_picks_a_registers_slice() -> None:
    reg = ModbusRegister("t", 12, data_type="float32")
    block = RegisterBlock("holding", 10, 4, (reg,))
    assert block.words(reg, [1, 2, 3, 4]) == [3, 4]


# -- RTU framing ----------------------------------------------------------------------------------


def test_requests_match_the_specification_example() -> None:
    # Application protocol §6.3 example (slave 17, 3 registers from 107), CRC from the spec's
    # algorithm as written out above.
    frame = read_request(17, "holding", 107, 3)
    assert frame == bytes.fromhex("1103006b0003") + _crc(bytes.fromhex("1103006b0003"))
    assert frame.hex() == "1103006b00037687"
    assert read_request(1, "input", 8, 2)[:6] == bytes.fromhex("010400080002")


def test_finds_an_answer_behind_stray_bytes() -> None:
    answer = _answer(5, 3, [1, 0xFFFF])
    found, damaged = find_response(b"\x05\x00\x05\x03" + answer + b"\x00", 5, 3, 2)
    assert found is not None
    assert (found.start, found.end, found.registers) == (4, 4 + len(answer), (1, 0xFFFF))
    assert damaged == 0


def test_answers_of_other_slaves_and_other_lengths_are_not_taken() -> None:
    assert find_response(_answer(6, 3, [1, 2]), 5, 3, 2) == (None, 0)
    assert find_response(_answer(5, 3, [1, 2, 3]), 5, 3, 2) == (None, 0)
    assert find_response(_answer(5, 4, [1, 2]), 5, 3, 2) == (None, 0)


def test_a_damaged_answer_is_counted_not_taken() -> None:
    answer = bytearray(_answer(5, 3, [1, 2]))
    answer[4] ^= 0x10
    assert find_response(answer, 5, 3, 2) == (None, 1)


def test_an_incomplete_answer_waits_for_more() -> None:
    answer = _answer(5, 3, [1, 2])
    for cut in range(len(answer)):
        assert find_response(answer[:cut], 5, 3, 2) == (None, 0)


def test_exception_answers() -> None:
    body = bytes([5, 0x83, 2])
    found, _ = find_response(body + _crc(body), 5, 3, 2)
    assert found is not None
    assert found.exception_code == 2
    assert exception_name(2) == "illegal_address"
    assert exception_name(4) == "device_failure"
    assert exception_name(99) == "code_99"


@given(st.binary(max_size=40), st.lists(st.integers(0, 0xFFFF), min_size=1, max_size=125))
def test_a_valid_answer_is_found_after_any_garbage(garbage: bytes, words: list[int]) -> None:
    answer = _answer(9, 3, words)
    found, _ = find_response(garbage + answer, 9, 3, len(words))
    assert found is not None
    # A valid frame inside the garbage would come first; its CRC makes that a 1 in 65536 event
    # per candidate, so the real answer is what is found.
    assert found.registers == tuple(words)
    assert found.end == len(garbage) + len(answer)


# -- scheduling arithmetic ------------------------------------------------------------------------


def test_retry_delay_doubles_up_to_the_ceiling() -> None:
    slave = ModbusSlave(1, "m", (ModbusRegister("x", 0),), poll_interval_s=10, backoff_max_s=60)
    assert [retry_delay_s(slave, n) for n in range(1, 7)] == [10, 20, 40, 60, 60, 60]
    assert retry_delay_s(slave, 10_000) == 60
    hourly = ModbusSlave(1, "m", (ModbusRegister("x", 0),), poll_interval_s=3600)
    assert retry_delay_s(hourly, 3) == 3600


# -- scan -----------------------------------------------------------------------------------------


async def test_scan_of_a_missing_port_names_the_problem(tmp_path: Path) -> None:
    with pytest.raises(PortProblemError) as caught:
        await scan(SerialSettings(str(tmp_path / "ttyUSB9")), [1, 2], 0.05)
    assert caught.value.kind == "missing"
    assert "ttyUSB9" in str(caught.value)


async def test_scan_refuses_ids_outside_1_to_247() -> None:
    with pytest.raises(ValueError, match="1 to 247"):
        await scan(SerialSettings("/dev/null"), [0, 1], 0.05)


def test_data_types_are_the_config_ones() -> None:
    from gateway.config import ModbusRegisterConfig

    config_types = get_args(ModbusRegisterConfig.model_fields["data_type"].annotation)
    assert set(config_types) == set(get_args(DataType))


def test_config_models_map_onto_the_driver_dataclasses() -> None:
    """How gateway.app builds the source: the field names match one to one."""
    from gateway.app import modbus_slaves, serial_settings
    from gateway.config import ModbusRtuSourceConfig

    cfg = ModbusRtuSourceConfig.model_validate(
        {
            "type": "modbus_rtu",
            "name": "pump_station",
            "port": "/dev/serial/by-id/usb-FTDI-if00-port0",
            "baud": 19200,
            "parity": "E",
            "slaves": [
                {
                    "device_id": 3,
                    "device": "level_probe",
                    "poll_interval_s": 5,
                    "registers": [
                        {"name": "level", "address": 0, "data_type": "float32", "unit": "m"},
                        {"name": "temp", "address": 2, "table": "input", "scale": 0.1},
                    ],
                }
            ],
        }
    )
    slaves = modbus_slaves(cfg)
    source = ModbusRtuSource(cfg.name, serial_settings(cfg), slaves)
    assert source.stats()["slaves"][0]["device"] == "level_probe"
    assert slaves[0].registers[0] == ModbusRegister("level", 0, data_type="float32", unit="m")
