"""The benchmark keeps working: a short run must finish and deliver every event.

Figures are printed by the benchmark, never asserted here (a shared CI machine is too noisy).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.mosquitto import require_mosquitto

ROOT = Path(__file__).resolve().parents[1]

pytestmark = [pytest.mark.broker, pytest.mark.slow]


def test_throughput_benchmark_quick_run_delivers_everything() -> None:
    require_mosquitto()
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "throughput.py"), "--quick", "--only", "bare,batch"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "every event acked, outbox empty, every event id at the subscriber" in result.stdout
    assert "events/s" in result.stdout


def test_chirpstack_ingest_benchmark_quick_run_loses_nothing() -> None:
    require_mosquitto()
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "chirpstack_ingest.py"), "--quick"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "zero loss, cold-start-2k" in result.stdout
    assert "uplinks/s" in result.stdout
