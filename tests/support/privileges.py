"""Run a piece of a test as an unprivileged user, for permission checks that root would pass.

The interpreter lives under /root on the development machine, so ``runuser -u nobody python``
cannot even start it; a forked child keeps the loaded interpreter and drops the privileges the
kernel checks (uid, gid, supplementary groups).
"""

from __future__ import annotations

import os
import pwd
from collections.abc import Callable

__all__ = ["run_as_nobody"]


def run_as_nobody(fn: Callable[[], str]) -> str:
    """``fn()`` in a forked child as nobody (no groups); returns what it returned.

    Only for root (the caller checks); the child never returns into pytest. It cannot read
    files nobody may not read, the interpreter's own included: whatever ``fn`` imports or looks
    up lazily must be loaded before.
    """
    nobody = pwd.getpwnam("nobody")
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        status = 0
        try:
            os.close(read_end)
            os.setgroups([])
            os.setgid(nobody.pw_gid)
            os.setuid(nobody.pw_uid)
            os.write(write_end, fn().encode())
        except BaseException as exc:  # noqa: BLE001 -- reported to the parent, whatever it is
            os.write(write_end, f"child failed: {exc!r}".encode())
            status = 1
        finally:
            os._exit(status)
    os.close(write_end)
    chunks = []
    while chunk := os.read(read_end, 65536):
        chunks.append(chunk)
    os.close(read_end)
    _, status = os.waitpid(pid, 0)
    output = b"".join(chunks).decode()
    if os.waitstatus_to_exitcode(status) != 0:
        raise AssertionError(output)
    return output
