"""TTN decoder test vectors for the devices ``drivers.codecs`` supports, and how to compare them.

The fixture ``tests/fixtures/ttn/vectors.json`` is the subset of the shared vector file
(``../shared/data/ttn-lorawan-vectors/vectors_dev.json``) for these devices, records unchanged.
Run ``python -m tests.codecs._vectors`` from the repository root to refresh it from the shared file.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
FIXTURE = REPO / "tests" / "fixtures" / "ttn" / "vectors.json"
SHARED = REPO.parent / "shared" / "data" / "ttn-lorawan-vectors" / "vectors_dev.json"

# (vendor, device) of the vector file -> registry name in drivers.codecs.CODECS.
CODEC_FOR: dict[tuple[str, str], str] = {
    ("dragino", "ldds20"): "dragino-ldds20",
    ("dragino", "ldds20-114"): "dragino-ldds20-114",
    ("dragino", "ldds75-114"): "dragino-ldds75-114",
    ("dragino", "lmds200"): "dragino-lmds200",
    ("dragino", "lht65"): "dragino-lht65",
    ("decentlab", "dl-pr21-1-10"): "decentlab-dl-pr21-1-10",
    ("decentlab", "dl-pr26-0-1"): "decentlab-dl-pr26-0-1",
    ("decentlab", "dl-pr36-8192"): "decentlab-dl-pr36-8192",
    ("decentlab", "dl-ctd10"): "decentlab-dl-ctd10",
    ("elsys", "elt-2"): "elsys-elt-2",
    ("elsys", "elt-ultrasonic"): "elsys-elt-ultrasonic",
    ("elsys", "ems"): "elsys-ems",
    ("elsys", "ems-desk"): "elsys-ems-desk",
    ("elsys", "ems-door"): "elsys-ems-door",
    ("elsys", "ems-lite"): "elsys-ems-lite",
    ("elsys", "ers"): "elsys-ers",
    ("elsys", "ers-co2"): "elsys-ers-co2",
    ("elsys", "ers-co2-lite"): "elsys-ers-co2-lite",
    ("elsys", "ers-eye"): "elsys-ers-eye",
    ("elsys", "ers-lite"): "elsys-ers-lite",
    ("elsys", "ers-sound"): "elsys-ers-sound",
    ("elsys", "ers-voc"): "elsys-ers-voc",
    ("milesight-iot", "em400-udl"): "milesight-em400-udl",
    ("milesight-iot", "em410-rdl"): "milesight-em410-rdl",
}


def codec_name(record: dict[str, Any]) -> str | None:
    """The registry name decoding this record's device, or None when it is not supported."""
    return CODEC_FOR.get((record["vendor"], record["device"]))


def load(path: Path) -> list[dict[str, Any]]:
    records: list[dict[str, Any]] = json.loads(path.read_text("utf-8"))
    return records


def supported(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The records of supported devices, in file order."""
    return [r for r in records if codec_name(r) is not None]


def mismatches(actual: Any, expected: Any, where: str = "data") -> list[str]:
    """Differences between a decoded value and the expected one, as ``path: message`` lines.

    Floats (on either side) compare with ``math.isclose(rel_tol=1e-6, abs_tol=1e-6)``, so an
    integer-valued JS number matches the float Python computes; everything else compares exactly,
    types included (a string "0.00" never equals a number).
    """
    if isinstance(expected, dict):
        if not isinstance(actual, dict):
            return [f"{where}: expected an object, got {actual!r}"]
        problems = [f"{where}.{k}: missing" for k in expected if k not in actual]
        problems += [
            f"{where}.{k}: unexpected ({actual[k]!r})" for k in actual if k not in expected
        ]
        for key in expected.keys() & actual.keys():
            problems += mismatches(actual[key], expected[key], f"{where}.{key}")
        return problems
    if isinstance(expected, list):
        if not isinstance(actual, list) or len(actual) != len(expected):
            return [f"{where}: expected {expected!r}, got {actual!r}"]
        return [
            p
            for i, (a, e) in enumerate(zip(actual, expected, strict=True))
            for p in mismatches(a, e, f"{where}[{i}]")
        ]
    numeric = (int, float)
    if (
        (isinstance(expected, float) or isinstance(actual, float))
        and isinstance(expected, numeric)
        and isinstance(actual, numeric)
        and not isinstance(expected, bool)
        and not isinstance(actual, bool)
    ):
        if math.isclose(actual, expected, rel_tol=1e-6, abs_tol=1e-6):
            return []
        return [f"{where}: expected {expected!r}, got {actual!r}"]
    if type(actual) is not type(expected) or actual != expected:
        return [f"{where}: expected {expected!r}, got {actual!r}"]
    return []


def refresh_fixture() -> int:
    """Rewrite the fixture from the shared vector file; returns the number of records."""
    records = supported(load(SHARED))
    FIXTURE.write_text(json.dumps(records, indent=2, ensure_ascii=False) + "\n", "utf-8")
    return len(records)


if __name__ == "__main__":
    count = refresh_fixture()
    print(f"wrote {count} vectors to {FIXTURE}")  # noqa: T201 -- a maintenance command's report
