"""Running the gateway as a process: its event loop, its exit status, process-wide settings.

Only the daemon (``edge-gateway run``) calls :func:`tune_daemon`: tests run many gateways in one
process and must keep the interpreter's defaults. The benchmarks call it too, to measure what
runs in the field.
"""

from __future__ import annotations

import asyncio
import gc
import os
import sys
from collections.abc import Callable, Coroutine
from typing import Any

import structlog

from gateway.app import EXIT_CONFIG, EXIT_SOFTWARE, Gateway
from gateway.config import GatewayConfig
from gateway.errors import ConfigError, GatewayError, TerminalUplinkError

log = structlog.get_logger(__name__)

# The outbox commits on its own thread, and the sqlite3 module gives up the GIL around every
# statement; each time it wants it back it waits for the event loop thread to offer it, up to
# the switch interval (5 ms by default). Under load that stretched a 1.4 ms commit of 350 rows
# to 16 ms (p50), and the ChirpStack intake waited on those commits. 0.5 ms brings it to 2.2 ms;
# the event loop thread pays only a check it already makes.
SWITCH_INTERVAL_S = 0.0005

# The cyclic collector's first threshold (allocations minus deallocations of container objects
# between collections; CPython's default is 700). Nearly everything here is freed by reference
# counting: with the collector off, a drain of 30,000 ChirpStack uplinks left 270 objects in
# cycles. Yet at 700 the collector ran ~900 times in that drain and each pass walked every
# young object still in flight (the messages, events and futures of up to 1000 unacknowledged
# uplinks): 7 us per uplink, 8 % of the gateway's CPU. At 50,000 it did not run at all in that
# drain; garbage in cycles waits for it longer, bounded by that count.
GC_THRESHOLD_0 = 50_000


def tune_daemon() -> None:
    """Freeze what is loaded by now, collect cycles less often, shorten the GIL switch interval."""
    # What is loaded by now (modules, pydantic schemas, protobuf descriptors, codecs) lives as
    # long as the process. Frozen, the cyclic collector no longer walks it on every full
    # collection: under a backlog that cut the longest event-loop stall from ~220 ms to ~90 ms
    # (bench/chirpstack_ingest.py).
    gc.freeze()
    gc.set_threshold(GC_THRESHOLD_0, *gc.get_threshold()[1:])
    sys.setswitchinterval(SWITCH_INTERVAL_S)


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for sub in exc.exceptions for leaf in _leaves(sub)]
    return [exc]


def run_gateway(cfg: GatewayConfig, *, stop_when_sources_done: bool = False) -> int:
    return guarded(
        lambda: Gateway(cfg, dict(os.environ)).run(stop_when_sources_done=stop_when_sources_done)
    )


def guarded(main: Callable[[], Coroutine[Any, Any, int]]) -> int:
    """Run the gateway's event loop and turn what ends it into an exit status."""
    try:
        return asyncio.run(main())
    except (Exception, BaseExceptionGroup) as exc:  # the top of main: decide the exit code
        leaves = _leaves(exc)
        for leaf in leaves:
            if isinstance(leaf, TerminalUplinkError | ConfigError):
                log.error("gateway_refused", error=str(leaf))
                return EXIT_CONFIG
        for leaf in leaves:
            if isinstance(leaf, GatewayError):
                log.error("gateway_failed", error=str(leaf))
                return EXIT_SOFTWARE
        log.exception("gateway_crashed")
        return EXIT_SOFTWARE
