"""What a decoder that allocates past its memory limit may end as.

QuickJS is meant to throw "out of memory" there, and mostly does; but some of its out-of-memory
paths crash the process instead (upstream, e.g. bellard/quickjs#529; here one CI run died with
SIGSEGV inside ``decode_uplink`` of an allocation bomb under a 4 MiB limit, after hundreds of runs
that did not). That is why the daemon and ``edge-gateway codec run`` decode in a worker process,
and why the tests run allocation bombs only there: the caller sees either the memory-limit error
or the worker's death and restart, and the next frame decodes.
"""

from __future__ import annotations

import re


def memory_outcome(limit: str) -> re.Pattern[str]:
    """The error text of either ending, for a limit written as the message writes it ("4 MiB")."""
    return re.compile(
        rf"decodeUplink exceeded the memory limit \({re.escape(limit)}\)"
        r"|the JavaScript worker process died \(killed by signal SIG(SEGV|ABRT)\)"
        r" while running decodeUplink; it was restarted"
    )
