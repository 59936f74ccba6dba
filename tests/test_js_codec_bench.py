"""The JavaScript worker benchmark keeps working (it prints figures; none are asserted here)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_js_codec_benchmark_quick_run() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "js_codec.py"), "--quick"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=False,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    rows = [line.split("  ")[0].strip() for line in result.stdout.splitlines()]
    for label in ("in-process JsCodec", "JsWorker", "bare pipe echo"):
        assert label in rows
    assert result.stdout.count("exceeded its time limit of 100 ms wall clock") == 2
    assert "next call, 1 s after the kill" in result.stdout
