"""ASCII line protocols without a port: the parser's formats and checksum, the framer's limits."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from drivers.ascii_lines import (
    FieldSpec,
    LineFramer,
    LineParseError,
    LineParser,
    check_encoding,
    nmea_checksum,
)
from gateway.types import Measurement


def nmea(body: str) -> str:
    return f"{body}*{nmea_checksum(body.removeprefix('$')):02X}"


WEATHER = [
    FieldSpec("T", "air_temperature", "Cel"),
    FieldSpec("H", "relative_humidity", "%"),
    FieldSpec("P", "air_pressure", "hPa"),
]


# -- parser: formats -----------------------------------------------------------------------------


def test_regex_named_groups_with_scale_and_offset() -> None:
    parser = LineParser(
        [
            FieldSpec("level", "water_level", "cm", scale=100.0),
            FieldSpec("temp", "water_temperature", "Cel", offset=-273.15),
        ],
        format="regex",
        pattern=r"^LVL (?P<level>\S+) m TMP (?P<temp>\S+) K$",
    )
    values = parser.parse("LVL 1.25 m TMP 288.15 K")
    assert values[0] == Measurement("water_level", 125.0, "cm")
    assert values[1].name == "water_temperature"
    assert values[1].value == pytest.approx(15.0)


def test_regex_is_searched_so_unanchored_patterns_find_their_fields() -> None:
    parser = LineParser([FieldSpec("d", "distance", "mm")], pattern=r"D=(?P<d>\d+)")
    assert parser.parse("#42 D=1234 OK") == (Measurement("distance", 1234.0, "mm"),)


def test_regex_without_match() -> None:
    parser = LineParser([FieldSpec("d", "distance")], pattern=r"^D=(?P<d>\d+)$")
    with pytest.raises(LineParseError) as caught:
        parser.parse("E=12")
    assert caught.value.reason == "no_match"
    assert "E=12" in str(caught.value)


def test_keyvalue() -> None:
    parser = LineParser(WEATHER, format="keyvalue")
    assert parser.parse("T=21.4,H=55,P=1013.2") == (
        Measurement("air_temperature", 21.4, "Cel"),
        Measurement("relative_humidity", 55.0, "%"),
        Measurement("air_pressure", 1013.2, "hPa"),
    )


def test_keyvalue_other_separators_spaces_and_unknown_keys() -> None:
    parser = LineParser(WEATHER[:2], format="keyvalue", separator=";", key_separator=":")
    assert parser.parse(" T: -3.5 ; X:9; H:80 ") == (
        Measurement("air_temperature", -3.5, "Cel"),
        Measurement("relative_humidity", 80.0, "%"),
    )


def test_keyvalue_missing_field_is_left_out_and_named() -> None:
    parser = LineParser(WEATHER, format="keyvalue")
    values, missing = parser.parse_detailed("T=21.4,H=,Q=3")
    assert values == (Measurement("air_temperature", 21.4, "Cel"),)
    assert missing == ("H", "P")


def test_keyvalue_without_any_pair() -> None:
    parser = LineParser(WEATHER, format="keyvalue")
    with pytest.raises(LineParseError) as caught:
        parser.parse("hello world")
    assert caught.value.reason == "no_match"


def test_line_with_none_of_the_fields() -> None:
    parser = LineParser(WEATHER, format="keyvalue")
    with pytest.raises(LineParseError) as caught:
        parser.parse("X=1,Y=2")
    assert caught.value.reason == "no_values"


def test_csv_columns() -> None:
    parser = LineParser(
        [FieldSpec("0", "wind_speed", "m/s"), FieldSpec("2", "wind_direction", "deg")],
        format="csv",
    )
    assert parser.parse("3.5,N,270") == (
        Measurement("wind_speed", 3.5, "m/s"),
        Measurement("wind_direction", 270.0, "deg"),
    )
    values, missing = parser.parse_detailed("3.5")
    assert values == (Measurement("wind_speed", 3.5, "m/s"),)
    assert missing == ("2",)


@pytest.mark.parametrize("text", ["nan", "inf", "-Infinity", "1_000", "0x10", "12abc", "--1", "."])
def test_values_must_be_plain_decimal_numbers(text: str) -> None:
    parser = LineParser(WEATHER[:1], format="keyvalue")
    with pytest.raises(LineParseError) as caught:
        parser.parse(f"T={text}")
    assert caught.value.reason == "not_a_number"


@pytest.mark.parametrize(
    ("text", "value"), [("+1.5", 1.5), ("-.5", -0.5), ("2.", 2.0), ("1e3", 1000.0)]
)
def test_decimal_number_forms(text: str, value: float) -> None:
    parser = LineParser(WEATHER[:1], format="keyvalue")
    assert parser.parse(f"T={text}")[0].value == value


def test_value_that_overflows_after_scaling_is_rejected() -> None:
    parser = LineParser([FieldSpec("T", "air_temperature", scale=1e308)], format="keyvalue")
    with pytest.raises(LineParseError) as caught:
        parser.parse("T=10")
    assert caught.value.reason == "bad_value"


def test_parser_rejects_bad_settings() -> None:
    with pytest.raises(ValueError, match="named group"):
        LineParser([FieldSpec("x", "distance")], pattern=r"(?P<y>\d+)")
    with pytest.raises(ValueError, match="pattern"):
        LineParser([FieldSpec("x", "distance")], format="regex")
    with pytest.raises(ValueError, match="column"):
        LineParser([FieldSpec("x", "distance")], format="csv")
    with pytest.raises(ValueError, match="format"):
        LineParser([FieldSpec("x", "distance")], format="xml")


# -- parser: NMEA checksum -----------------------------------------------------------------------


def test_nmea_checksum_of_a_real_sentence() -> None:
    # A GPS sentence from the NMEA 0183 examples: the XOR of everything between '$' and '*'.
    sentence = "GPGGA,123519,4807.038,N,01131.000,E,1,08,0.9,545.4,M,46.9,M,,"
    assert nmea_checksum(sentence) == 0x47


def test_nmea_sentence_with_dollar_and_regex() -> None:
    parser = LineParser(
        [
            FieldSpec("p", "air_pressure", "hPa", scale=1000.0),
            FieldSpec("t", "air_temperature", "Cel"),
        ],
        pattern=r"^\$WIMDA,[^,]*,I,(?P<p>[^,]*),B,(?P<t>[^,]*),C,",
        checksum="nmea",
    )
    line = nmea("$WIMDA,29.9122,I,1.0129,B,21.4,C,,,55.0,,12.1,C,,,,,,,,,,,,")
    values = parser.parse(line)
    assert values[0].value == pytest.approx(1012.9)
    assert values[1] == Measurement("air_temperature", 21.4, "Cel")


def test_nmea_checksum_without_dollar_lowercase_hex() -> None:
    parser = LineParser(WEATHER, format="keyvalue", checksum="nmea")
    body = "T=21.4,H=55,P=1013.2"
    line = f"{body}*{nmea_checksum(body):02x}"
    assert len(parser.parse(line)) == 3


def test_nmea_checksum_mismatch() -> None:
    parser = LineParser(WEATHER, format="keyvalue", checksum="nmea")
    good = nmea("T=21.4,H=55,P=1013.2")
    corrupted = good.replace("21.4", "71.4")
    with pytest.raises(LineParseError) as caught:
        parser.parse(corrupted)
    assert caught.value.reason == "checksum_mismatch"


@pytest.mark.parametrize("line", ["T=21.4,H=55,P=1013.2", "T=21.4*", "T=21.4*G1", "T=1*123"])
def test_nmea_checksum_missing(line: str) -> None:
    parser = LineParser(WEATHER, format="keyvalue", checksum="nmea")
    with pytest.raises(LineParseError) as caught:
        parser.parse(line)
    assert caught.value.reason == "checksum_missing"


# -- framer --------------------------------------------------------------------------------------


def test_framer_splits_lines_across_feeds_and_strips_cr() -> None:
    framer = LineFramer("\n")
    assert framer.feed(b"T=1\r\nT=") == ["T=1"]
    assert framer.pending == 2
    assert framer.feed(b"2\r\n\r\nT=3\n") == ["T=2", "T=3"]
    assert framer.discarded == {}
    assert framer.frames == framer.lines == 3


def test_framer_multi_byte_delimiter_split_across_feeds() -> None:
    framer = LineFramer("\r\n")
    assert framer.feed(b"A=1\r") == []
    assert framer.feed(b"\nA=2\r\nA") == ["A=1", "A=2"]
    # A lone CR inside a line is a control character: garbage.
    assert framer.feed(b"=\r3\r\n") == []
    assert framer.discarded == {"garbage": 1}


def test_framer_drops_overlong_lines_with_a_bounded_buffer() -> None:
    framer = LineFramer("\n", max_line_bytes=16)
    assert framer.feed(b"x" * 10) == []
    for _ in range(100):
        assert framer.feed(b"y" * 1000) == []
        assert framer.buffered <= 16
    assert framer.discarded == {"overlong": 1}
    # The rest of the overlong line is skipped; the next line is fine.
    assert framer.feed(b"yyy\nT=1\n") == ["T=1"]
    assert framer.discarded == {"overlong": 1}
    # An overlong line that arrives whole in one read is counted once too.
    assert framer.feed(b"z" * 40 + b"\nT=2\n") == ["T=2"]
    assert framer.discarded == {"overlong": 2}


def test_framer_overlong_with_split_multi_byte_delimiter() -> None:
    framer = LineFramer("\r\n", max_line_bytes=16)
    framer.feed(b"x" * 40 + b"\r")
    assert framer.buffered <= 16
    assert framer.feed(b"\nOK=1\r\n") == ["OK=1"]
    assert framer.discarded == {"overlong": 1}


def test_line_of_exactly_max_bytes_is_kept() -> None:
    framer = LineFramer("\n", max_line_bytes=16)
    assert framer.feed(b"A" * 16 + b"\n") == ["A" * 16]


def test_framer_discards_binary_garbage() -> None:
    framer = LineFramer("\n")
    lines = framer.feed(b"\xff\xfe\x80\n\x00\x01T=1\nT=2\x1b[0m\nT=3\n")
    assert lines == ["T=3"]
    assert framer.discarded == {"garbage": 3}
    assert framer.recent == {"garbage"}
    assert framer.dropped == 3


def test_framer_decodes_latin1_and_utf8() -> None:
    assert LineFramer("\n", "latin-1").feed("T=21°C\n".encode("latin-1")) == ["T=21°C"]
    assert LineFramer("\n", "utf-8").feed("T=21°C\n".encode()) == ["T=21°C"]
    utf8 = LineFramer("\n", "utf-8")
    assert utf8.feed("T=21°C\n".encode("latin-1")) == []
    assert utf8.discarded == {"garbage": 1}


def test_framer_drop_partial() -> None:
    framer = LineFramer("\n")
    framer.feed(b"T=2")
    assert framer.drop_partial()
    assert framer.pending == 0
    assert not framer.drop_partial()
    assert framer.discarded == {"partial": 1}
    assert framer.feed(b"1\nT=3\n") == ["1", "T=3"]


def test_encodings_must_be_ascii_compatible() -> None:
    assert check_encoding("latin1") == "iso8859-1"
    for bad in ("utf-16", "utf-32", "cp500", "no-such-codec"):
        with pytest.raises(ValueError, match="encoding"):
            check_encoding(bad)


# -- properties: whatever arrives, nothing but the parser's own error, and a bounded buffer -----

chunks = st.lists(st.binary(max_size=300), max_size=30)


@settings(max_examples=300, deadline=None)
@given(
    data=chunks,
    delimiter=st.sampled_from(["\n", "\r\n", "\r", "#!"]),
    limit=st.integers(16, 64),
)
def test_framer_never_raises_and_stays_bounded(
    data: list[bytes], delimiter: str, limit: int
) -> None:
    framer = LineFramer(delimiter, "ascii", limit)
    parser = LineParser(WEATHER, format="keyvalue", checksum="nmea")
    for chunk in data:
        for line in framer.feed(chunk):
            assert len(line.encode("ascii")) <= limit
            assert line == line.strip()
            assert not any((ord(c) < 0x20 and c != "\t") or c == "\x7f" for c in line)
            with contextlib.suppress(LineParseError):
                parser.parse(line)
        assert framer.buffered <= limit + len(delimiter) - 1
    framer.drop_partial()
    assert framer.buffered == 0


@settings(max_examples=200, deadline=None)
@given(
    lines=st.lists(
        st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=40), max_size=20
    ),
    cuts=st.lists(st.integers(0, 2000), max_size=10),
)
def test_framing_does_not_depend_on_how_the_bytes_were_cut(
    lines: list[str], cuts: list[int]
) -> None:
    stream = "".join(f"{line}\r\n" for line in lines).encode("ascii")
    whole = LineFramer("\r\n", max_line_bytes=32)
    expected = whole.feed(stream)
    pieces = LineFramer("\r\n", max_line_bytes=32)
    got: list[str] = []
    start = 0
    for cut in [*sorted({min(c, len(stream)) for c in cuts}), len(stream)]:
        got += pieces.feed(stream[start:cut])
        start = cut
    assert got == expected
    assert pieces.discarded == whole.discarded
    assert expected == [
        line.strip(" \t") for line in lines if line.strip(" \t") and len(line) <= 32
    ]


@settings(max_examples=300, deadline=None)
@given(text=st.text(max_size=200))
def test_parser_raises_only_its_own_error(text: str) -> None:
    parsers = [
        LineParser(WEATHER, format="keyvalue", checksum="nmea"),
        LineParser(WEATHER, format="keyvalue"),
        LineParser([FieldSpec("1", "distance", scale=1e300)], format="csv", separator=";"),
        LineParser([FieldSpec("v", "distance")], pattern=r"(?P<v>[^ ]*)"),
    ]
    for parser in parsers:
        try:
            values = parser.parse(text)
        except LineParseError as exc:
            assert exc.reason
        else:
            assert values
