"""The pool detector benchmark keeps working: a short run reports both rows for each card.

Figures are printed by the benchmark, never asserted here (a shared machine is too noisy).
"""

from __future__ import annotations

import pytest

from tests.support.bench import run_bench

pytestmark = pytest.mark.slow


def test_pool_detector_benchmark_quick_run() -> None:
    stdout = run_bench("pool_detector.py", "--quick")
    assert stdout.count("bare session.run") == 2
    assert stdout.count("frames/s (target >= 10)") == 2
