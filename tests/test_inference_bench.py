"""The inference benchmark keeps working (figures are printed by it, never asserted here)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_inference_benchmark_quick_run() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "inference_engine.py"), "--quick"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=False,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    rows = [line.split("  ")[0].strip() for line in result.stdout.splitlines()]
    for label in ("bare session.run", "LoadedModel.run", "engine, 1 caller", "engine, 64 callers"):
        assert label in rows
