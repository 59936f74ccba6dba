"""The serial benchmark keeps working: a short run must take every line in every mode.

Figures are printed by the benchmark, never asserted here (a shared CI machine is too noisy).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.socat import require_socat

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def test_serial_benchmark_quick_run_takes_every_line() -> None:
    require_socat()
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "serial_ascii.py"), "--lines", "3000"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    for mode in ("bare", "parse", "outbox", "gateway"):
        assert f"  {mode}: " in result.stdout
    assert "stored 3000" in result.stdout
    assert "FAIL" not in result.stdout
