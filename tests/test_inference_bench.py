"""The inference benchmark keeps working (figures are printed by it, never asserted here)."""

from __future__ import annotations

import pytest

from tests.support.bench import row_labels, run_bench

pytestmark = pytest.mark.slow


def test_inference_benchmark_quick_run() -> None:
    rows = row_labels(run_bench("inference_engine.py", "--quick"))
    for label in ("bare session.run", "LoadedModel.run", "engine, 1 caller", "engine, 64 callers"):
        assert label in rows
