"""The pool pipeline benchmark keeps working: a short run finishes and reports every row.

Figures are printed by the benchmark, never asserted here (a shared CI machine is too noisy).
"""

from __future__ import annotations

import pytest

from tests.support.bench import run_bench

pytestmark = pytest.mark.slow


def test_pool_pipeline_benchmark_quick_run() -> None:
    stdout = run_bench("pool_pipeline.py", "--quick", "--size", "320x240")
    for row in ("bare session.run", "detector alone", "pool pipeline", "overhead", "RSS:"):
        assert row in stdout, row
