"""The benchmark keeps working: a short run must finish and deliver every event.

Figures are printed by the benchmark, never asserted here (a shared CI machine is too noisy).
"""

from __future__ import annotations

import pytest

from tests.support.bench import run_bench
from tests.support.mosquitto import require_mosquitto

pytestmark = [pytest.mark.broker, pytest.mark.slow]


def test_throughput_benchmark_quick_run_delivers_everything() -> None:
    require_mosquitto()
    stdout = run_bench("throughput.py", "--quick", "--only", "bare,batch")
    assert "every event acked, outbox empty, every event id at the subscriber" in stdout
    assert "events/s" in stdout


def test_chirpstack_ingest_benchmark_quick_run_loses_nothing() -> None:
    require_mosquitto()
    stdout = run_bench("chirpstack_ingest.py", "--quick")
    assert "zero loss, cold-start-2k" in stdout
    assert "uplinks/s" in stdout
