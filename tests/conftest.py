"""Fixtures shared by the whole test suite: a real mosquitto broker per test.

The broker tests are meant to run against the real thing. Where mosquitto is not installed they
are skipped, except under CI (``CI`` set), where that would hide a broken setup: they fail there.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.mosquitto import Mosquitto, require_mosquitto
from tests.support.socat import PtyPair, require_socat


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[Mosquitto]:
    """A started broker with one plain listener on 127.0.0.1, anonymous access allowed."""
    require_mosquitto()
    with Mosquitto(tmp_path / "broker") as broker:
        yield broker


@pytest.fixture
def mosquitto_tls(tmp_path: Path) -> Iterator[Mosquitto]:
    """Like ``mosquitto`` plus a TLS listener (``tls_port``, ``ca_file``) from a fresh test CA."""
    require_mosquitto()
    with Mosquitto(tmp_path / "broker", tls=True) as broker:
        yield broker


@pytest.fixture
def pty_pair(tmp_path: Path) -> Iterator[PtyPair]:
    """A started socat pty pair: the gateway opens ``.sensor``, the simulator writes on ``.sim``."""
    require_socat()
    with PtyPair(tmp_path / "pty") as pair:
        yield pair
