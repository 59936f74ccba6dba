"""SDI-12 codec: command builders, response parsers, CRC, and the source's own validation."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from drivers.sdi12 import (
    DataAnswer,
    Identification,
    MeasurementAnswer,
    Sdi12CrcError,
    Sdi12ParseError,
    Sdi12Sensor,
    Sdi12Source,
    Sdi12Value,
    acknowledge,
    address_query,
    crc16,
    crc_chars,
    format_data,
    format_value,
    identify,
    parse_address,
    parse_data,
    parse_identification,
    parse_measurement,
    send_data,
    start_concurrent,
    start_measurement,
)
from drivers.serial_port import SerialSettings

PARSERS: list[Callable[[bytes], object]] = [
    parse_address,
    parse_measurement,
    lambda line: parse_measurement(line, concurrent=True),
    parse_identification,
    parse_data,
    lambda line: parse_data(line, crc=True),
    lambda line: parse_data(line, "0", crc=True),
]


def test_commands() -> None:
    assert address_query() == b"?!"
    assert acknowledge("3") == b"3!"
    assert identify("0") == b"0I!"
    assert start_measurement("0") == b"0M!"
    assert start_measurement("a", 3) == b"aM3!"
    assert start_measurement("0", crc=True) == b"0MC!"
    assert start_measurement("Z", 9, crc=True) == b"ZMC9!"
    assert start_concurrent("1") == b"1C!"
    assert start_concurrent("1", 2, crc=True) == b"1CC2!"
    assert [send_data("0", i) for i in (0, 9)] == [b"0D0!", b"0D9!"]


@pytest.mark.parametrize(
    "call",
    [
        lambda: identify("?"),
        lambda: identify("00"),
        lambda: identify(""),
        lambda: start_measurement("0", 10),
        lambda: send_data("0", -1),
        lambda: send_data("0", 10),
    ],
)
def test_commands_refuse_bad_arguments(call: object) -> None:
    with pytest.raises(ValueError):
        call()  # type: ignore[operator]


def test_measurement_answer() -> None:
    # §4.4 Start Measurement: a ttt n — 3 values ready within 1 s.
    assert parse_measurement(b"00013\r\n", "0") == MeasurementAnswer("0", 1, 3)
    assert parse_measurement(b"a1209") == MeasurementAnswer("a", 120, 9)
    # Start Concurrent Measurement: a ttt nn.
    assert parse_measurement(b"001012\r\n", concurrent=True) == MeasurementAnswer("0", 10, 12)


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        (b"0001\r\n", "5 characters"),
        (b"000133\r\n", "5 characters"),
        (b"0001x\r\n", "digits"),
        (b"1\xb9013\r\n", "not ASCII"),
        (b"10013\r\n", "address '1', expected '0'"),
        (b"#0013\r\n", "not an SDI-12 address"),
        (b"\r\n", "empty"),
        (b"0\t013\r\n", "control character"),
    ],
)
def test_measurement_answer_malformed(line: bytes, reason: str) -> None:
    with pytest.raises(Sdi12ParseError, match=reason):
        parse_measurement(line, "0")


def test_service_request_and_address() -> None:
    assert parse_address(b"0\r\n") == "0"
    assert parse_address(b"b", "b") == "b"
    with pytest.raises(Sdi12ParseError, match="lone address"):
        parse_address(b"00\r\n")
    with pytest.raises(Sdi12ParseError, match="expected"):
        parse_address(b"1\r\n", "0")


def test_data_answer() -> None:
    assert parse_data(b"0+1.23-4.5+6\r\n", "0") == DataAnswer("0", (1.23, -4.5, 6.0))
    assert parse_data(b"0+1234567-.5+0.\r\n").values == (1234567.0, -0.5, 0.0)
    # An answer without values: the sensor has no more (§4.4 Send Data).
    assert parse_data(b"0\r\n") == DataAnswer("0", ())


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        (b"01.23\r\n", "sign-prefixed"),
        (b"0+1.2.3\r\n", "malformed value"),
        (b"0+\r\n", "sign-prefixed"),
        (b"0+.-1\r\n", "malformed value"),
        (b"0+12345678\r\n", "more than 7 digits"),
        (b"0+1e5\r\n", "sign-prefixed"),
        (b"0+1 +2\r\n", "sign-prefixed"),
    ],
)
def test_data_answer_malformed(line: bytes, reason: str) -> None:
    with pytest.raises(Sdi12ParseError, match=reason):
        parse_data(line)


def test_crc_matches_the_spec_example() -> None:
    # The worked example of the SDI-12 specification: "0D0!" answered "0+3.14OqZ<CR><LF>".
    assert crc_chars(b"0+3.14") == "OqZ"
    assert crc16(b"0+3.14") == 0xFC5A
    assert parse_data(b"0+3.14OqZ\r\n", "0", crc=True).values == (3.14,)
    with pytest.raises(Sdi12CrcError, match="does not match"):
        parse_data(b"0+3.15OqZ\r\n", "0", crc=True)
    with pytest.raises(Sdi12ParseError, match="too short"):
        parse_data(b"0O\r\n", crc=True)
    # Without values, the CRC covers the address alone.
    assert parse_data(f"0{crc_chars(b'0')}".encode(), crc=True).values == ()


def test_identification() -> None:
    ident = parse_identification(b"013CampbellCS1234003STD.03.01\r\n", "0")
    assert ident == Identification("0", "1.3", "Campbell", "CS1234", "003", "STD.03.01")
    padded = parse_identification(b"114GWSIM   CTD-10110\r\n")
    assert (padded.vendor, padded.model, padded.extra) == ("GWSIM", "CTD-10", "")
    with pytest.raises(Sdi12ParseError, match="at least 20"):
        parse_identification(b"014Campbell\r\n")
    with pytest.raises(Sdi12ParseError, match="two digits"):
        parse_identification(b"0x4CampbellCS1234003\r\n")


def test_format_value() -> None:
    assert format_value(12.34, 2) == "+12.34"
    assert format_value(-0.5, 1) == "-0.5"
    assert format_value(6, 0) == "+6"
    with pytest.raises(ValueError, match="seven digits"):
        format_value(12345678, 0)
    with pytest.raises(ValueError, match="seven digits"):
        format_value(math.inf, 1)
    assert format_data("0", [(1.23, 2), (-4.5, 1), (6, 0)]) == b"0+1.23-4.5+6\r\n"
    assert format_data("0", [(3.14, 2)], crc=True) == b"0+3.14OqZ\r\n"


@given(st.binary(max_size=100))
def test_random_bytes_raise_only_parse_errors(data: bytes) -> None:
    for parse in PARSERS:
        with contextlib.suppress(Sdi12ParseError):
            parse(data)


@given(st.text(alphabet="0123456789+-.abcAZ!?\r\n OqZ@", max_size=40))
def test_near_miss_text_raises_only_parse_errors(text: str) -> None:
    for parse in PARSERS:
        with contextlib.suppress(Sdi12ParseError):
            parse(text.encode())


# Values SDI-12 can carry: at most seven digits, `decimals` of them after the point (at most six,
# so that "+0.dddddd" still fits).
sdi12_values = st.tuples(st.integers(-9_999_999, 9_999_999), st.integers(0, 6))


@given(
    st.sampled_from("0123456789AZaz"),
    st.lists(sdi12_values, max_size=9),
    st.booleans(),
)
def test_values_round_trip(address: str, mantissas: list[tuple[int, int]], crc: bool) -> None:
    values = [(m / 10**d, d) for m, d in mantissas]
    line = format_data(address, values, crc=crc)
    answer = parse_data(line, address, crc=crc)
    assert answer.address == address
    assert answer.values == tuple(v for v, _ in values)


@given(st.integers(0, 999), st.integers(0, 9), st.sampled_from("0aZ"))
def test_measurement_answer_round_trip(ready: int, count: int, address: str) -> None:
    line = f"{address}{ready:03d}{count}\r\n".encode()
    assert parse_measurement(line, address) == MeasurementAnswer(address, ready, count)


def _sensor(**overrides: object) -> Sdi12Sensor:
    fields: dict[str, object] = {
        "address": "0",
        "device": "probe-1",
        "poll_interval_s": 60.0,
        "values": (Sdi12Value(0, "water_level", "mm"),),
    }
    fields.update(overrides)
    return Sdi12Sensor(**fields)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        ({"address": "!"}, "address"),
        ({"device": ""}, "device"),
        ({"poll_interval_s": 0}, "poll_interval_s"),
        ({"values": ()}, "no values"),
        ({"measurement": 10}, "measurement"),
    ],
)
def test_sensor_validation(overrides: dict[str, object], reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        _sensor(**overrides)


def test_value_validation() -> None:
    with pytest.raises(ValueError, match="index"):
        Sdi12Value(-1, "level")
    with pytest.raises(ValueError, match="lower_snake_case"):
        Sdi12Value(0, "Water Level")


def test_source_validation() -> None:
    settings = SerialSettings("/dev/null", baud=1200, bytesize=7, parity="E")
    with pytest.raises(ValueError, match="no sensors"):
        Sdi12Source("sdi", settings, [], 3)
    with pytest.raises(ValueError, match="address and measurement"):
        Sdi12Source("sdi", settings, [_sensor(), _sensor(device="other")], 3)
    with pytest.raises(ValueError, match="unique"):
        Sdi12Source("sdi", settings, [_sensor(), _sensor(address="1")], 3)
    source = Sdi12Source("sdi", settings, [_sensor(), _sensor(address="1", device="p2")], 3)
    # Constructing does no I/O; the stats are there before the first poll.
    assert source.stats()["sensors"]["p2"]["polls"] == 0
    assert source.counters["silent_sensors"] == 0
