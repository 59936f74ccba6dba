"""Running a benchmark script from bench/ as a smoke test (figures are printed, never asserted)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run_bench(script: str, *args: str, timeout_s: float = 300) -> str:
    """Run ``bench/<script>`` with ``args`` from the repository root; its stdout once it exited 0.

    A failing run fails the test with the benchmark's output and error text.
    """
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / script), *args],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def row_labels(stdout: str) -> list[str]:
    """The first column of a benchmark's table (text up to two spaces), one per line."""
    return [line.split("  ")[0].strip() for line in stdout.splitlines()]
