"""The pool pipeline benchmark keeps working: a short run finishes and reports every row.

Figures are printed by the benchmark, never asserted here (a shared CI machine is too noisy).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def test_pool_pipeline_benchmark_quick_run() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "pool_pipeline.py"), "--quick", "--size", "320x240"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    for row in ("bare session.run", "detector alone", "pool pipeline", "overhead", "RSS:"):
        assert row in result.stdout, row
