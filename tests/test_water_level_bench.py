"""The water-level benchmark keeps working: a short run finishes and reports every row.

Figures are printed by the benchmark, never asserted here (a shared CI machine is too noisy).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def test_water_level_benchmark_quick_run() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "water_level.py"), "--quick"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    for row in ("bare session.run", "analyzer, sync", "analyzer, daemon path", "RSS:"):
        assert row in result.stdout, row
    assert result.stdout.count("readings/s (target >= 2000)") == 2
