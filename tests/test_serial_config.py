"""serial_ascii config: what a technician can get wrong is named with its path and value."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from drivers.ascii_lines import nmea_checksum
from gateway.app import build_serial_source, line_parser
from gateway.config import SerialAsciiSourceConfig, config_from_dict
from gateway.errors import ConfigError

FIELDS = [{"key": "T", "name": "air_temperature", "unit": "Cel"}]


def config(tmp_path: Path, **source: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "type": "serial_ascii",
        "name": "ws",
        "port": "/dev/ttyUSB0",
        "format": "keyvalue",
        "fields": FIELDS,
    }
    base.update(source)
    return {
        "gateway": {"state_dir": str(tmp_path)},
        "uplink": {"type": "file"},
        "sources": [base],
    }


def problems(tmp_path: Path, **source: Any) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        config_from_dict(config(tmp_path, **source), "test")
    return caught.value.problems


def test_a_good_source_builds(tmp_path: Path) -> None:
    cfg = config_from_dict(config(tmp_path, checksum="nmea", gap_after_s=60), "test")
    source_cfg = cfg.sources[0]
    assert isinstance(source_cfg, SerialAsciiSourceConfig)
    source = build_serial_source(source_cfg)
    assert source.name == "ws"
    line = f"T=1.5*{nmea_checksum('T=1.5'):02X}"
    assert line_parser(source_cfg).parse(line)[0].value == 1.5


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ({"format": "regex"}, "sources[0].pattern: the regex format needs a pattern (got: None)"),
        (
            {"format": "regex", "pattern": "(?P<t>"},
            "sources[0].pattern: not a regex: missing ), unterminated subpattern at position 0 "
            "(got: '(?P<t>')",
        ),
        (
            {"format": "regex", "pattern": r"(?P<temp>\S+)"},
            "sources[0].fields: keys without a named group in pattern (got: ['T'])",
        ),
        (
            {"format": "csv"},
            "sources[0].fields: csv keys are 0-based column numbers (got: ['T'])",
        ),
        (
            {"encoding": "utf-16"},
            "sources[0].encoding: encoding 'utf-16' is not ASCII-compatible (use ascii, "
            "latin-1, utf-8) (got: 'utf-16')",
        ),
        (
            {"encoding": "klingon"},
            "sources[0].encoding: unknown encoding 'klingon' (got: 'klingon')",
        ),
        (
            {"delimiter": "€"},
            "sources[0].delimiter: not encodable in ascii (got: '€')",
        ),
        (
            {"fields": FIELDS + FIELDS},
            "sources[0].fields: measurement names must be unique (got: ['air_temperature'])",
        ),
        (
            {"reopen_min_s": 10, "reopen_max_s": 1},
            "sources[0].reopen_max_s: must be at least reopen_min_s (got: 1.0)",
        ),
        (
            {"checksum": "crc16"},
            "sources[0].checksum: Input should be 'none' or 'nmea' (got: 'crc16')",
        ),
        (
            {"max_line_bytes": 8},
            "sources[0].max_line_bytes: Input should be greater than or equal to 16 (got: 8)",
        ),
    ],
)
def test_mistakes_are_named(tmp_path: Path, source: dict[str, Any], expected: str) -> None:
    assert problems(tmp_path, **source) == [expected]
