"""A JavaScript decoder (:mod:`drivers.jscodec`) in a worker process, with a hard wall-clock bound.

:class:`drivers.jscodec.JsCodec` bounds a decode with QuickJS's interrupt handler, which is not a
hard bound: a loop doing heavy native work per iteration overshoots by seconds, and a
catastrophically backtracking regular expression is never interrupted. :class:`JsWorker` runs
the same ``JsCodec`` (same semantics: a fresh QuickJS context per decode, its memory, output and
time limits, the time limit still the first line) in a child process, and the parent waits for
each answer with ``Connection.poll(deadline)``. Past the deadline it kills the worker (SIGKILL),
raises :class:`~gateway.errors.CodecError` naming the file, and a fresh worker takes over.

Bound on a call (the call is synchronous, meant for the event loop thread): at most
``timeout_ms + margin_ms`` (defaults 100 + 50 ms) of waiting for the answer; the margin covers the
round trip and scheduling (a decode costs 0.1-0.2 ms more than in process, see
``bench/README.md``). The first call after a (re)start may also wait for the worker to be ready
(its interpreter start, about 60 ms here, bounded by ``start_timeout_s``; a replacement is started
as soon as its predecessor is killed, so a frame that comes later finds it ready) and for the
file's evaluation in it (at most ``timeout_ms + margin_ms`` again). Calls are serialised by a
lock: a concurrent caller waits for the one before it.

Failures, all :class:`CodecError` naming the file so a frame loop counts them and goes on:

* the deadline passed: the worker is killed and a new one started at once (it loads the file when
  the next call comes);
* the worker died during a call (OOM killer, a crash, a signal): the same, with how it died;
* a worker found dead between calls is replaced silently before the call (nothing was lost);
* the worker cannot start (no interpreter, an import failing in the child, no answer within
  ``start_timeout_s``): :class:`WorkerStartError` with the reason; the next call tries again.

Why not :mod:`multiprocessing`'s ``Process``: with its "spawn" and "forkserver" start methods the
child re-runs the parent's ``__main__`` (for the ``edge-gateway`` console script that is
``gateway.cli`` with pydantic, onnxruntime and numpy: 0.8 s and 100 MB per child, against 0.04 s
and 13 MB for ``drivers.jscodec`` alone), and "fork" copies a parent that has threads and an event
loop. The worker here is a fresh interpreter (``python -I``, the parent's ``sys.path``) that
imports only this module, :mod:`drivers.jscodec` and what they need; parent and child talk over a
:func:`multiprocessing.Pipe` (a socket pair), in JSON rather than pickle so that even a worker whose
sandbox was broken cannot make the parent run code. The child ignores SIGINT (a terminal's Ctrl-C
is for the parent, which owns the worker's lifetime), exits when the pipe closes, and arms an alarm
of twice the deadline around each request so that it ends itself if the parent died mid-decode.

Close workers with :meth:`JsWorker.close` or use the worker as a context manager; the child is
reaped, so no zombie remains. No asyncio, no logging; a :class:`JsWorker` owns one child process.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from multiprocessing.connection import Connection, Pipe
from types import TracebackType
from typing import Any, Final, Self

from drivers.jscodec import (
    DEFAULT_MAX_OUTPUT_BYTES,
    DEFAULT_MEMORY_LIMIT_BYTES,
    DEFAULT_TIMEOUT_MS,
    DecoderReportedError,
    EntryPoint,
    JsCodec,
    check_limits,
)
from gateway.errors import CodecError

__all__ = [
    "DEFAULT_MARGIN_MS",
    "DEFAULT_START_TIMEOUT_S",
    "JsWorker",
    "WorkerStartError",
    "serve",
]

# Added to timeout_ms for the hard deadline: the round trip costs 0.1-0.2 ms, the rest absorbs
# scheduling delays on a busy 2-core gateway, so that QuickJS's own limit (the gentler one: the
# worker survives it) normally fires first.
DEFAULT_MARGIN_MS: Final = 50
# An interpreter start takes about 60 ms here and some hundreds of ms on a slow SD card; a worker
# that has not said hello after this long is not going to.
DEFAULT_START_TIMEOUT_S: Final = 10.0
# How long close() lets a worker exit on its own after the pipe closed before it is killed.
_CLOSE_GRACE_S: Final = 2.0
# How long a worker whose pipe ended is given to finish dying before it is killed: its exit status
# says how it died (OOM killer, crash), which goes into the error.
_REAP_GRACE_S: Final = 1.0
# A reply holds at most the decoder's output twice (a reported error repeats its errors), and
# JSON escaping makes a character at most 6 bytes: beyond this a worker is not speaking the
# protocol, and reading on would let it fill the parent's memory.
_REPLY_FACTOR: Final = 16
_REPLY_SLACK_BYTES: Final = 64 * 1024

# Run by the child's interpreter. The import is guarded so that a child that cannot import the
# worker (a missing quickjs, a broken install) says why over the pipe instead of only on stderr.
_BOOTSTRAP: Final = """\
import json, sys
sys.path[:] = json.loads(sys.argv[1])
from multiprocessing.connection import Connection
conn = Connection(int(sys.argv[2]))
try:
    from drivers.jsworker import serve
except Exception as exc:
    conn.send_bytes(json.dumps({"error": f"{type(exc).__name__}: {exc}"}).encode())
    raise SystemExit(1) from None
serve(conn)
"""


class WorkerStartError(CodecError):
    """The worker process could not be started, or did not become ready."""


@dataclass
class _Worker:
    """One child process and the parent's end of its pipe."""

    popen: subprocess.Popen[bytes]
    conn: Connection
    loaded: bool = False


class _WorkerGoneError(Exception):
    """The pipe ended: the worker is gone (internal; turned into a CodecError)."""


class _MalformedReplyError(Exception):
    """The worker's reply is not what this module sends (internal; turned into a CodecError)."""


class JsWorker:
    """One decoder file, decoded by :class:`JsCodec` in a worker process with a hard deadline.

    The constructor checks the limits (``ValueError``) and records its arguments; :meth:`open`
    (or entering the context manager) starts the worker and loads the file there, raising
    :class:`CodecError` for a file that :class:`JsCodec` rejects (syntax error, failing top-level
    code, no entry point). :meth:`decode_uplink` opens lazily.
    """

    def __init__(
        self,
        source: str,
        name: str,
        *,
        timeout_ms: int = DEFAULT_TIMEOUT_MS,
        memory_limit_bytes: int = DEFAULT_MEMORY_LIMIT_BYTES,
        max_output_bytes: int = DEFAULT_MAX_OUTPUT_BYTES,
        margin_ms: int = DEFAULT_MARGIN_MS,
        start_timeout_s: float = DEFAULT_START_TIMEOUT_S,
        executable: str | None = None,
    ) -> None:
        # The codec's own limits are checked here, before a worker exists to refuse them.
        check_limits(timeout_ms, memory_limit_bytes, max_output_bytes)
        if margin_ms < 0:
            raise ValueError(f"margin_ms must not be negative (got: {margin_ms})")
        if start_timeout_s <= 0:
            raise ValueError(f"start_timeout_s must be positive (got: {start_timeout_s})")
        self._source = source
        self._name = name
        self._timeout_ms = timeout_ms
        self._memory_limit_bytes = memory_limit_bytes
        self._max_output_bytes = max_output_bytes
        self._margin_ms = margin_ms
        self._start_timeout_s = start_timeout_s
        self._reply_limit = _REPLY_FACTOR * max_output_bytes + _REPLY_SLACK_BYTES
        self._executable = executable if executable is not None else sys.executable
        self._lock = threading.Lock()
        self._worker: _Worker | None = None
        self._entry_point: EntryPoint | None = None
        self._closed = False
        self._restarts = 0

    @property
    def name(self) -> str:
        """The name errors use for the file (usually its path)."""
        return self._name

    @property
    def timeout_ms(self) -> int:
        return self._timeout_ms

    @property
    def deadline_ms(self) -> int:
        """The hard bound on waiting for one answer: ``timeout_ms + margin_ms``."""
        return self._timeout_ms + self._margin_ms

    @property
    def entry_point(self) -> EntryPoint | None:
        """The function the file defines, once a worker has loaded it; else ``None``."""
        return self._entry_point

    @property
    def pid(self) -> int | None:
        """The current worker's process id, or ``None`` when there is none."""
        return self._worker.popen.pid if self._worker is not None else None

    @property
    def restarts(self) -> int:
        """How many workers were replaced after a timeout or a death."""
        return self._restarts

    def open(self) -> None:
        """Start the worker and load the file in it unless that is done; idempotent."""
        with self._lock:
            self._ready()

    def close(self) -> None:
        """Stop the worker (it exits when its pipe closes; killed after a grace period) and reap it.

        Idempotent. Later calls to :meth:`decode_uplink` raise :class:`CodecError`.
        """
        with self._lock:
            self._closed = True
            worker, self._worker = self._worker, None
            if worker is not None:
                _stop(worker, grace_s=_CLOSE_GRACE_S)

    def __enter__(self) -> Self:
        try:
            self.open()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def decode_uplink(
        self,
        fport: int,
        payload: bytes,
        recv_time: datetime | None = None,
        variables: Mapping[str, str] | None = None,
    ) -> dict[str, Any]:
        """What :meth:`JsCodec.decode_uplink` returns, decoded in the worker.

        Raises :class:`CodecError` (or :class:`DecoderReportedError`) for every failure, including
        the deadline, a dead worker and a worker that cannot start; waits at most as the module
        docstring says.
        """
        request = {
            "op": "decode",
            "fPort": fport,
            "hex": payload.hex(),
            # None: the worker takes its own "now", as JsCodec does.
            "recvTime": None if recv_time is None else recv_time.isoformat(),
            "variables": dict(variables or {}),
        }
        with self._lock:
            worker = self._ready()
            entry = self._entry_point or "the decoder"
            reply = self._call(worker, request, subject=entry, activity=f"running {entry}")
        if "result" in reply:
            result: dict[str, Any] = reply["result"]
            return result
        reported = reply.get("reported")
        if reported is not None:
            raise DecoderReportedError(
                reply["error"], reported["errors"], reported["warnings"], reported["data"]
            )
        raise CodecError(reply["error"])

    # -- the parent's side; every method below runs with the lock held

    def _ready(self) -> _Worker:
        if self._closed:
            raise CodecError(f"{self._name}: the JavaScript worker is closed")
        worker = self._worker
        if worker is not None and worker.popen.poll() is not None:
            # Died between calls (OOM killer, an operator): no request was lost, so just replace it.
            self._discard(worker, grace_s=0)
            self._restarts += 1
            worker = None
        if worker is None:
            worker = self._worker = self._spawn()
        if not worker.loaded:
            self._handshake(worker)
        return worker

    def _spawn(self) -> _Worker:
        parent_end, child_end = Pipe(duplex=True)
        try:
            popen = subprocess.Popen(  # noqa: S603 -- our own interpreter and bootstrap, no shell
                [
                    self._executable,
                    "-I",  # no PYTHON* variables, user site or cwd on the path: sys.path is ours
                    "-c",
                    _BOOTSTRAP,
                    json.dumps(sys.path),
                    str(child_end.fileno()),
                ],
                stdin=subprocess.DEVNULL,
                # A decoder cannot print, but nothing in the child may ever write on the parent's
                # stdout (the `codec run` output); stderr is shared for a crashing interpreter.
                stdout=subprocess.DEVNULL,
                pass_fds=(child_end.fileno(),),
            )
        except OSError as exc:
            parent_end.close()
            raise WorkerStartError(
                f"{self._name}: cannot start the JavaScript worker process"
                f" ({self._executable}): {exc}"
            ) from exc
        finally:
            child_end.close()
        return _Worker(popen, parent_end)

    def _handshake(self, worker: _Worker) -> None:
        """Wait for the worker's hello, then load the file in it."""
        try:
            hello = _receive(worker, self._start_timeout_s, self._reply_limit)
        except _WorkerGoneError:
            status = self._discard(worker, grace_s=_REAP_GRACE_S)
            raise WorkerStartError(
                f"{self._name}: the JavaScript worker process exited while starting ({status})"
            ) from None
        except _MalformedReplyError as exc:
            self._discard(worker, grace_s=0)
            raise WorkerStartError(
                f"{self._name}: the JavaScript worker process said something unexpected while"
                f" starting ({exc})"
            ) from None
        if hello is None:
            self._discard(worker, grace_s=0)
            raise WorkerStartError(
                f"{self._name}: the JavaScript worker process did not start within"
                f" {self._start_timeout_s:g} s and was killed"
            )
        if "error" in hello:
            self._discard(worker, grace_s=_REAP_GRACE_S)
            raise WorkerStartError(
                f"{self._name}: the JavaScript worker process could not start: {hello['error']}"
            )
        load = {
            "op": "load",
            "source": self._source,
            "name": self._name,
            "timeout_ms": self._timeout_ms,
            "memory_limit_bytes": self._memory_limit_bytes,
            "max_output_bytes": self._max_output_bytes,
            "guard_s": _guard_s(self.deadline_ms),
        }
        reply = self._call(
            worker, load, subject="evaluating the file", activity="evaluating the file"
        )
        if "error" in reply:
            # The file was refused: this worker holds nothing worth keeping.
            self._discard(worker, grace_s=_CLOSE_GRACE_S)
            raise CodecError(reply["error"])
        self._entry_point = reply["entry_point"]
        worker.loaded = True

    def _call(
        self, worker: _Worker, request: dict[str, Any], *, subject: str, activity: str
    ) -> dict[str, Any]:
        """Send one request and wait for its reply until the deadline."""
        try:
            _send(worker.conn, request)
            reply = _receive(worker, self.deadline_ms / 1000, self._reply_limit)
        except _WorkerGoneError:
            status = self._discard(worker, grace_s=_REAP_GRACE_S)
            self._restart()
            raise CodecError(
                f"{self._name}: the JavaScript worker process died ({status}) while {activity};"
                " it was restarted"
            ) from None
        except _MalformedReplyError as exc:
            self._discard(worker, grace_s=0)
            self._restart()
            raise CodecError(
                f"{self._name}: the JavaScript worker process sent a malformed reply while"
                f" {activity} ({exc}); it was killed and restarted"
            ) from None
        if reply is None:
            self._discard(worker, grace_s=0)
            self._restart()
            raise CodecError(
                f"{self._name}: {subject} exceeded its time limit of {self._timeout_ms} ms wall"
                f" clock (hard deadline {self.deadline_ms} ms with the worker round trip); the"
                " worker process was killed and restarted"
            )
        return reply

    def _discard(self, worker: _Worker, *, grace_s: float) -> str:
        """Forget ``worker``, stop and reap it; how it ended, for an error message."""
        if self._worker is worker:
            self._worker = None
        return _stop(worker, grace_s=grace_s)

    def _restart(self) -> None:
        """Start the replacement now, so its interpreter boots before the next call needs it."""
        self._restarts += 1
        try:
            self._worker = self._spawn()
        except WorkerStartError:
            # The next call tries again and reports this itself.
            self._worker = None


def _guard_s(deadline_ms: int) -> float:
    """The worker's own alarm: only fires when the parent that should kill it is gone."""
    return 2 * deadline_ms / 1000 + 1.0


def _send(conn: Connection, message: Mapping[str, Any]) -> None:
    try:
        conn.send_bytes(json.dumps(message).encode())
    except (BrokenPipeError, ConnectionResetError):
        raise _WorkerGoneError from None


def _receive(worker: _Worker, timeout_s: float, limit_bytes: int) -> dict[str, Any] | None:
    """The next message, ``None`` when none came within ``timeout_s``.

    Raises _WorkerGoneError when the pipe ended, _MalformedReplyError when the message is longer
    than ``limit_bytes`` or not one of the protocol's JSON objects: the parent trusts nothing
    from a process that ran vendor code.
    """
    try:
        if not worker.conn.poll(timeout_s):
            return None
        raw = worker.conn.recv_bytes(limit_bytes)
    except (EOFError, ConnectionResetError):
        raise _WorkerGoneError from None
    except OSError as exc:
        # recv_bytes refuses a longer message before reading it (the pipe is unusable after).
        raise _MalformedReplyError(f"longer than {limit_bytes} bytes") from exc
    try:
        message = json.loads(raw)
    except ValueError as exc:
        raise _MalformedReplyError(f"not JSON: {exc}") from None
    if not _well_formed(message):
        raise _MalformedReplyError(f"unexpected message {raw[:80]!r}")
    return dict(message)


def _well_formed(message: object) -> bool:
    if not isinstance(message, dict):
        return False
    if "result" in message:
        return isinstance(message["result"], dict)
    if "error" in message:
        reported = message.get("reported")
        return isinstance(message["error"], str) and (
            reported is None
            or (isinstance(reported, dict) and {"errors", "warnings", "data"} <= reported.keys())
        )
    return "ready" in message or isinstance(message.get("entry_point"), str)


def _stop(worker: _Worker, *, grace_s: float) -> str:
    """Close the pipe, give the process ``grace_s`` to exit, kill it if it did not, reap it."""
    worker.conn.close()
    popen = worker.popen
    try:
        popen.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        popen.kill()
        popen.wait()
    return _describe_exit(popen.returncode)


def _describe_exit(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"killed by signal {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exit status {returncode}"


# -- the worker's side


def serve(conn: Connection) -> None:
    """The worker's loop: answer load and decode requests on ``conn`` until it closes."""
    # Ctrl-C in a terminal reaches the whole process group; the parent decides when we end.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    codec: JsCodec | None = None
    guard_s = 0.0
    try:
        _reply(conn, {"ready": os.getpid()})
        while True:
            try:
                request = json.loads(conn.recv_bytes())
            except EOFError:
                return
            if request["op"] == "load":
                guard_s = request["guard_s"]
            # SIGALRM's default action ends the process, even while QuickJS is busy in C.
            signal.setitimer(signal.ITIMER_REAL, guard_s)
            try:
                if request["op"] == "load":
                    codec, reply = _load(request)
                elif codec is None:
                    raise RuntimeError("a decode request before a successful load")
                else:
                    reply = _decode(codec, request)
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
            _reply(conn, reply)
    except (BrokenPipeError, ConnectionResetError):
        # The parent went away mid-reply; there is nobody left to answer.
        return


def _reply(conn: Connection, message: Mapping[str, Any]) -> None:
    conn.send_bytes(json.dumps(message).encode())


def _load(request: dict[str, Any]) -> tuple[JsCodec | None, dict[str, Any]]:
    try:
        codec = JsCodec(
            request["source"],
            request["name"],
            timeout_ms=request["timeout_ms"],
            memory_limit_bytes=request["memory_limit_bytes"],
            max_output_bytes=request["max_output_bytes"],
        )
    except CodecError as exc:  # the parent checked the limits (check_limits) before
        return None, {"error": str(exc)}
    return codec, {"entry_point": codec.entry_point}


def _decode(codec: JsCodec, request: dict[str, Any]) -> dict[str, Any]:
    recv_time = request["recvTime"]
    try:
        result = codec.decode_uplink(
            request["fPort"],
            bytes.fromhex(request["hex"]),
            None if recv_time is None else datetime.fromisoformat(recv_time),
            request["variables"],
        )
    except DecoderReportedError as exc:
        reported = {"errors": exc.errors, "warnings": exc.warnings, "data": exc.data}
        return {"error": str(exc), "reported": reported}
    except CodecError as exc:
        return {"error": str(exc)}
    return {"result": result}
