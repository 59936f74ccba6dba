"""The serial benchmark keeps working: a short run must take every line in every mode.

Figures are printed by the benchmark, never asserted here (a shared CI machine is too noisy).
"""

from __future__ import annotations

import pytest

from tests.support.bench import run_bench
from tests.support.socat import require_socat

pytestmark = pytest.mark.slow


def test_serial_benchmark_quick_run_takes_every_line() -> None:
    require_socat()
    stdout = run_bench("serial_ascii.py", "--lines", "3000")
    for mode in ("bare", "parse", "outbox", "gateway"):
        assert f"  {mode}: " in stdout
    assert "stored 3000" in stdout
    assert "FAIL" not in stdout
