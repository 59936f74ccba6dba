"""The water-level benchmark keeps working: a short run finishes and reports every row.

Figures are printed by the benchmark, never asserted here (a shared CI machine is too noisy).
"""

from __future__ import annotations

import pytest

from tests.support.bench import run_bench

pytestmark = pytest.mark.slow


def test_water_level_benchmark_quick_run() -> None:
    stdout = run_bench("water_level.py", "--quick")
    for row in ("bare session.run", "analyzer, sync", "analyzer, daemon path", "RSS:"):
        assert row in stdout, row
    assert stdout.count("readings/s (target >= 2000)") == 2
