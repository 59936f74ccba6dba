"""Process-wide settings of the daemon (gateway.process.tune_daemon)."""

from __future__ import annotations

import gc
import sys
from collections.abc import Iterator

import pytest

from gateway.process import GC_THRESHOLD_0, SWITCH_INTERVAL_S, tune_daemon


@pytest.fixture
def restore_process_settings() -> Iterator[None]:
    thresholds, interval = gc.get_threshold(), sys.getswitchinterval()
    try:
        yield
    finally:
        gc.set_threshold(*thresholds)
        sys.setswitchinterval(interval)
        gc.unfreeze()


@pytest.mark.usefixtures("restore_process_settings")
def test_tune_daemon_raises_only_the_first_collector_threshold() -> None:
    gc.set_threshold(700, 10, 10)
    tune_daemon()
    assert gc.get_threshold() == (GC_THRESHOLD_0, 10, 10)
    assert sys.getswitchinterval() == pytest.approx(SWITCH_INTERVAL_S)
    # What was loaded before is frozen out of the collector's walks.
    assert gc.get_freeze_count() > 0


@pytest.mark.usefixtures("restore_process_settings")
def test_objects_in_cycles_are_still_collected() -> None:
    """A higher threshold defers the collector; it does not switch it off."""
    tune_daemon()
    assert gc.isenabled()

    class Node:
        def __init__(self) -> None:
            self.me = self

    # More cycles than the threshold: the collector must have run on its own.
    collections = gc.get_stats()[0]["collections"]
    for _ in range(GC_THRESHOLD_0 + 1000):
        Node()
    assert gc.get_stats()[0]["collections"] > collections
