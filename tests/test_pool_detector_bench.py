"""The pool detector benchmark keeps working: a short run reports both rows for each card.

Figures are printed by the benchmark, never asserted here (a shared machine is too noisy).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def test_pool_detector_benchmark_quick_run() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "pool_detector.py"), "--quick"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("bare session.run") == 2
    assert result.stdout.count("frames/s (target >= 10)") == 2
