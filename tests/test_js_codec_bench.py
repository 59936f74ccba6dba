"""The JavaScript worker benchmark keeps working (it prints figures; none are asserted here)."""

from __future__ import annotations

import pytest

from tests.support.bench import row_labels, run_bench

pytestmark = pytest.mark.slow


def test_js_codec_benchmark_quick_run() -> None:
    stdout = run_bench("js_codec.py", "--quick")
    rows = row_labels(stdout)
    for label in ("in-process JsCodec", "JsWorker", "bare pipe echo"):
        assert label in rows
    assert stdout.count("exceeded its time limit of 100 ms wall clock") == 2
    assert "next call, 1 s after the kill" in stdout
