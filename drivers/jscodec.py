"""Run vendors' TTN / ChirpStack JavaScript payload decoders in a sandboxed QuickJS.

A decoder file defines ``function decodeUplink(input) { return {data, warnings, errors} }`` with
``input = {bytes, fPort, recvTime, variables}`` (The Things Stack and ChirpStack v4). Two older
forms are recognised as well, because the same vendor files still circulate in them:
``Decode(fPort, bytes, variables)`` (ChirpStack v3) and ``Decoder(bytes, fPort)`` (TTN v2), both
returning the ``data`` object directly.

Semantics, chosen to match the reference runtimes:

* ``bytes`` is a plain JS ``Array`` of numbers, ``fPort`` a number, ``recvTime`` a JS ``Date``
  built inside JS from epoch milliseconds, ``variables`` a plain object of strings (ChirpStack's
  device variables; ``{}`` when there are none).
* The file runs as a classic script in sloppy mode, as in TTN (goja) and ChirpStack v4
  (``strict = false``); top-level ``function``/``var``/``let``/``const`` declarations all count.
* Every decode runs in a fresh QuickJS runtime and context in which the file is evaluated again, so
  nothing a decoder does (globals, counters, patched prototypes) carries over to the next frame.
  TTN and ChirpStack also start a new VM per call.
* Missing fields are defaulted as TTN does: ``data`` absent or ``null`` becomes ``{}``;
  ``warnings``/``errors`` absent or ``null`` are empty. A non-empty ``errors`` list fails the
  decode (:class:`DecoderReportedError`, messages joined with ``", "`` like TTN). ``data`` that is
  not an object, ``warnings``/``errors`` that are not lists of strings, or a return value that is
  not an object fail it too (TTN: "invalid output").
* The result is ``{"data": {...}}`` plus ``"warnings": [...]`` only when there are warnings (TTN's
  JSON omits empty repeated fields). It is converted through ``JSON.stringify`` inside JS, so it is
  always JSON-serialisable: functions and ``undefined`` disappear, ``NaN``/``Infinity`` become
  ``null``, ``Date`` objects become ISO strings.

Not provided: Node's ``Buffer`` (ChirpStack v4 injects one), ``console``, timers, promises' job
queue, modules (``import``/``export``). A decoder that uses them fails with a ``ReferenceError``.

Limits (each failure raises :class:`gateway.errors.CodecError` naming the file):

* Time: QuickJS's interrupt handler with a budget of ``timeout_ms`` (default 100 ms, like
  ChirpStack) for evaluating the file plus the call. The quickjs package measures it with
  ``clock()``, i.e. CPU time of the whole process: busy threads elsewhere in the process make it
  fire earlier in wall time, never later. QuickJS only polls the handler every 10,000 jumps or calls
  and not inside one builtin, so a loop whose every iteration does heavy native work overshoots
  (seconds), and a catastrophically backtracking regular expression is not interrupted at all.
  A hard wall-clock bound needs a process boundary: :class:`drivers.jsworker.JsWorker` runs this
  codec in a worker process that is killed at its deadline (``timeout_ms`` plus a margin), and the
  daemon and ``edge-gateway codec run`` use it. This module stays the pure in-process engine.
* Memory: ``memory_limit_bytes`` per decode (default 16 MiB) for the runtime's whole heap.
  QuickJS mostly throws "out of memory" at the limit, but some of its out-of-memory paths crash
  the process (upstream bugs; seen here once in CI as SIGSEGV). The worker process contains that
  too: the caller gets "the worker died" and a fresh worker for the next frame.
* Output: ``max_output_bytes`` of JSON (default 64 KiB).

Thread-safety: a :class:`JsCodec` holds only immutable Python values. Each decode creates, uses and
frees its own QuickJS runtime on the calling thread (QuickJS records the creating thread's stack
for its overflow checks, so a runtime must not migrate between threads; this design never lets it).
Calls are therefore safe from any thread, including concurrently and through
``asyncio.to_thread``; the extension releases the GIL while JavaScript runs.

Pure module: no asyncio, no logging, no I/O; the caller reads the file.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any, Final, Literal, Protocol

# The quickjs package (the QuickJS C library behind a small CPython extension) ships no type
# information (pyproject's mypy override); what it returns is narrowed through _Context below.
import quickjs

from gateway.errors import CodecError

__all__ = [
    "DEFAULT_MAX_OUTPUT_BYTES",
    "DEFAULT_MEMORY_LIMIT_BYTES",
    "DEFAULT_TIMEOUT_MS",
    "DecoderReportedError",
    "EntryPoint",
    "JsCodec",
    "check_limits",
]

# ChirpStack v4's default `codec.js.max_execution_time` is 100 ms.
DEFAULT_TIMEOUT_MS: Final = 100
# The runtime plus its standard library take about 0.1 MiB; 16 MiB leaves a decoder ample room for
# a 242-byte LoRaWAN payload while bounding an allocation bomb well below a gateway's RAM.
DEFAULT_MEMORY_LIMIT_BYTES: Final = 16 * 1024 * 1024
# A decoded LoRaWAN frame (FRMPayload <= 242 bytes) is a few hundred bytes of JSON; 64 KiB leaves
# room for verbose vendor decoders and keeps one broken decoder from flooding the outbox.
DEFAULT_MAX_OUTPUT_BYTES: Final = 64 * 1024

# Below this a fresh runtime cannot even evaluate a small decoder.
_MIN_MEMORY_LIMIT_BYTES: Final = 1024 * 1024

EntryPoint = Literal["decodeUplink", "Decode", "Decoder"]

# Preference order when a file defines several: the current form first, as TTN's wrapper does.
_ENTRY_POINTS: Final[tuple[EntryPoint, ...]] = ("decodeUplink", "Decode", "Decoder")

_PROBE: Final = (
    "typeof decodeUplink === 'function' ? 'decodeUplink'"
    " : typeof Decode === 'function' ? 'Decode'"
    " : typeof Decoder === 'function' ? 'Decoder' : ''"
)

# How the wrapper below calls each form; `a` is the input object from the host.
_CALLS: Final[dict[EntryPoint, str]] = {
    "decodeUplink": (
        "decodeUplink({bytes: a.bytes, fPort: a.fPort, recvTime: new Date(a.recvTimeMs),"
        " variables: a.variables})"
    ),
    "Decode": "{data: Decode(a.fPort, a.bytes, a.variables)}",
    "Decoder": "{data: Decoder(a.bytes, a.fPort)}",
}

# The wrapper's own frames are named so they can be dropped from a decoder's stack trace.
_WRAPPER_NAME: Final = "__edgeGatewayDecode"


def _wrapper_prefix(entry: EntryPoint) -> str:
    """The call expression for ``entry`` up to its argument (the input object as JSON) and ``)``.

    It always hands a JSON string back: Python never holds a JS object, so nothing keeps the
    runtime alive after the decode and nothing but JSON crosses the boundary.
    """
    return (
        f"(function {_WRAPPER_NAME}(a) {{\n"
        f"  var r = ({_CALLS[entry]});\n"
        '  var kind = r === null ? "null" : Array.isArray(r) ? "array" : typeof r;\n'
        '  return JSON.stringify(kind === "object" ? {kind: kind, result: r} : {kind: kind});\n'
        "})("
    )


# QuickJS appends "    at <function> (<file>[:line])" frames to an exception's text; "<input>" is
# the only file name the quickjs package gives to evaluated code.
_FRAME_SEPARATOR: Final = "\n    at "
_QUICKJS_FILE: Final = "<input>"
_LINE_RE: Final = re.compile(r"<input>:(\d+)")
_INTERRUPTED: Final = "InternalError: interrupted"
_OUT_OF_MEMORY: Final = "InternalError: out of memory"
_MAX_FRAMES: Final = 5

_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_ONE_MS: Final = timedelta(milliseconds=1)


class _Context(Protocol):
    """The part of ``quickjs.Context`` this module uses (one QuickJS runtime with one context)."""

    def eval(self, code: str) -> object: ...
    def set_time_limit(self, seconds: float) -> None: ...
    def set_memory_limit(self, limit: int) -> None: ...


# The extension raises JSException for anything thrown in JS, its StackOverflow subclass for deep
# recursion, and UnicodeDecodeError when a JS string holding a lone surrogate is converted.
_JS_ERRORS: Final[tuple[type[Exception], ...]] = (quickjs.JSException, UnicodeDecodeError)


def check_limits(timeout_ms: int, memory_limit_bytes: int, max_output_bytes: int) -> None:
    """Raise ValueError naming the first limit a decode cannot run with."""
    if timeout_ms < 1:
        raise ValueError(f"timeout_ms must be at least 1 (got: {timeout_ms})")
    if memory_limit_bytes < _MIN_MEMORY_LIMIT_BYTES:
        raise ValueError(
            f"memory_limit_bytes must be at least {_MIN_MEMORY_LIMIT_BYTES}"
            f" (got: {memory_limit_bytes})"
        )
    if max_output_bytes < 2:
        raise ValueError(f"max_output_bytes must be at least 2 (got: {max_output_bytes})")


class DecoderReportedError(CodecError):
    """The decoder ran and returned a non-empty ``errors`` list, which fails the decode.

    ``errors``, ``warnings`` and ``data`` are what the decoder returned (``data`` is ``None`` when
    it returned none), so a caller can show the decoder's own result.
    """

    def __init__(
        self,
        message: str,
        errors: list[str],
        warnings: list[str],
        data: dict[str, Any] | None,
    ) -> None:
        super().__init__(message)
        self.errors = errors
        self.warnings = warnings
        self.data = data


class JsCodec:
    """One decoder file, checked once and run in a fresh sandbox for every frame.

    The constructor evaluates ``source`` once in a throw-away sandbox (with the same limits) to
    report a syntax error, a failing top-level statement or a missing entry point as
    :class:`CodecError` at load time, with ``name`` and the line. QuickJS through the quickjs
    package offers no reusable compiled form, so each decode evaluates the source again.
    """

    def __init__(
        self,
        source: str,
        name: str,
        *,
        timeout_ms: int = DEFAULT_TIMEOUT_MS,
        memory_limit_bytes: int = DEFAULT_MEMORY_LIMIT_BYTES,
        max_output_bytes: int = DEFAULT_MAX_OUTPUT_BYTES,
    ) -> None:
        check_limits(timeout_ms, memory_limit_bytes, max_output_bytes)
        self._source = source
        self._name = name
        self._timeout_ms = timeout_ms
        self._memory_limit_bytes = memory_limit_bytes
        self._max_output_bytes = max_output_bytes
        self._entry_point = self._probe()
        self._call_prefix = _wrapper_prefix(self._entry_point)

    @property
    def name(self) -> str:
        """The name errors use for the file (usually its path)."""
        return self._name

    @property
    def entry_point(self) -> EntryPoint:
        """The function the file defines: ``decodeUplink``, ``Decode`` (v3) or ``Decoder`` (v2)."""
        return self._entry_point

    @property
    def timeout_ms(self) -> int:
        return self._timeout_ms

    @property
    def memory_limit_bytes(self) -> int:
        return self._memory_limit_bytes

    def decode_uplink(
        self,
        fport: int,
        payload: bytes,
        recv_time: datetime | None = None,
        variables: Mapping[str, str] | None = None,
    ) -> dict[str, Any]:
        """Decode one uplink: ``{"data": {...}}`` plus ``"warnings"`` when the decoder gave any.

        ``recv_time`` defaults to now; a naive datetime is taken as UTC. Raises
        :class:`CodecError` (or its subclass :class:`DecoderReportedError`) for every way the
        decoder can fail, and nothing else.
        """
        if not 0 <= fport <= 255:
            raise CodecError(f"{self._name}: fPort must be 0..255 (got: {fport})")
        if recv_time is None:
            recv_time = datetime.now(UTC)
        elif recv_time.tzinfo is None:
            recv_time = recv_time.replace(tzinfo=UTC)
        arg = {
            "bytes": list(payload),
            "fPort": fport,
            # Exact integer milliseconds; float timestamps would round.
            "recvTimeMs": (recv_time - _EPOCH) // _ONE_MS,
            "variables": dict(variables or {}),
        }
        # JSON is valid JavaScript (ES2019), and ensure_ascii keeps U+2028/U+2029 escaped.
        call = self._call_prefix + json.dumps(arg) + ")"
        started = time.perf_counter()
        calling = False
        ctx = self._new_context()
        try:
            ctx.set_time_limit(self._timeout_ms / 1000)
            ctx.eval(self._source)
            # One budget for the file and the call: the limit restarts with every eval.
            remaining_s = self._timeout_ms / 1000 - (time.perf_counter() - started)
            if remaining_s <= 0:
                raise CodecError(self._timeout_message(started, calling=False))
            calling = True
            ctx.set_time_limit(remaining_s)
            raw = ctx.eval(call)
        except _JS_ERRORS as exc:
            raise CodecError(self._describe(exc, started, calling=calling)) from exc
        finally:
            del ctx  # frees the runtime now, on this thread
        return self._result(raw)

    def _new_context(self) -> _Context:
        ctx: _Context = quickjs.Context()
        ctx.set_memory_limit(self._memory_limit_bytes)
        return ctx

    def _probe(self) -> EntryPoint:
        started = time.perf_counter()
        ctx = self._new_context()
        try:
            ctx.set_time_limit(self._timeout_ms / 1000)
            ctx.eval(self._source)
            found = ctx.eval(_PROBE)
        except _JS_ERRORS as exc:
            raise CodecError(self._describe(exc, started, calling=False)) from exc
        finally:
            del ctx
        for entry in _ENTRY_POINTS:
            if found == entry:
                return entry
        raise CodecError(
            f"{self._name}: defines no decodeUplink(input) function"
            " (nor the older Decode(fPort, bytes, variables) or Decoder(bytes, fPort))"
        )

    def _what(self, *, calling: bool) -> str:
        return self._entry_point if calling else "evaluating the file"

    def _timeout_message(self, started: float, *, calling: bool) -> str:
        elapsed_ms = (time.perf_counter() - started) * 1000
        return (
            f"{self._name}: {self._what(calling=calling)} timed out after {elapsed_ms:.0f} ms"
            f" (limit {self._timeout_ms} ms)"
        )

    def _describe(self, exc: Exception, started: float, *, calling: bool) -> str:
        """One line naming the file, what ran, the JS error and where it was thrown."""
        what = self._what(calling=calling)
        if isinstance(exc, UnicodeDecodeError):
            return f"{self._name}: {what} produced an invalid string ({exc})"
        text = str(exc)
        message, sep, stack = text.partition(_FRAME_SEPARATOR)
        if not sep:
            # A thrown non-Error value has no stack; QuickJS prints "undefined"/"null" for it.
            message = text.removesuffix("\n").removesuffix("\nundefined").removesuffix("\nnull")
        if message.startswith(_INTERRUPTED):
            return self._timeout_message(started, calling=calling)
        limit_mib = self._memory_limit_bytes / (1024 * 1024)
        if message.startswith(_OUT_OF_MEMORY):
            return f"{self._name}: {what} exceeded the memory limit ({limit_mib:g} MiB)"
        if isinstance(exc, quickjs.StackOverflow):
            return f"{self._name}: {what} overflowed the stack"
        if not calling and message.startswith("SyntaxError"):
            # A syntax error's only "frame" is the position: report it as file:line.
            line = _LINE_RE.search(stack)
            return f"{self._name}:{line.group(1) if line else '?'}: {message}"
        if message in {"null", "undefined"}:
            # QuickJS throws null when a builtin (Array.prototype.sort, ...) runs out of memory.
            message += f" (a builtin out of memory throws this too; limit {limit_mib:g} MiB)"
        raw_frames = [frame.strip() for frame in stack.split(_FRAME_SEPARATOR) if frame.strip()]
        if calling:
            origin = next((f for f in raw_frames if not f.endswith("(native)")), "")
            if self._is_wrapper_frame(origin):
                # Thrown by the wrapper's JSON.stringify (a cycle, a BigInt), not by the decoder.
                return f"{self._name}: {what} returned output that is not JSON: {message}"
            raw_frames = [f for f in raw_frames if not self._is_wrapper_frame(f)]
        frames = [frame.replace(_QUICKJS_FILE, self._name) for frame in raw_frames]
        where = f" (at {', '.join(frames[:_MAX_FRAMES])})" if frames else ""
        verb = "threw" if calling else "failed:"
        return f"{self._name}: {what} {verb} {message}{where}"

    @staticmethod
    def _is_wrapper_frame(frame: str) -> bool:
        # The wrapper call is evaluated after the file: its frames are the wrapper function and
        # the top-level "<eval>" of the call expression.
        return frame.startswith((_WRAPPER_NAME, "<eval>"))

    def _invalid(self, why: str) -> CodecError:
        return CodecError(f"{self._name}: {self._entry_point} returned invalid output: {why}")

    def _result(self, raw: object) -> dict[str, Any]:
        if not isinstance(raw, str):
            # Only a decoder that replaced JSON.stringify gets here.
            raise self._invalid("the result could not be serialised as JSON")
        size = len(raw.encode())
        if size > self._max_output_bytes:
            raise CodecError(
                f"{self._name}: {self._entry_point} output is {size} bytes of JSON"
                f" (limit {self._max_output_bytes})"
            )
        try:
            envelope = json.loads(raw)
        except ValueError as exc:
            raise self._invalid("the result could not be serialised as JSON") from exc
        if not isinstance(envelope, dict) or not isinstance(envelope.get("kind"), str):
            raise self._invalid("the result could not be serialised as JSON")
        if envelope["kind"] != "object" or not isinstance(envelope.get("result"), dict):
            raise self._invalid(
                f"got {_a(envelope['kind'])}, expected an object {{data, warnings, errors}}"
            )
        result: dict[str, Any] = envelope["result"]
        data = result.get("data")
        if data is not None and not isinstance(data, dict):
            raise self._invalid(f"'data' is {_a(_json_kind(data))}, expected an object")
        warnings = self._strings(result, "warnings")
        errors = self._strings(result, "errors")
        if errors:
            raise DecoderReportedError(
                f"{self._name}: {self._entry_point} returned errors: {', '.join(errors)}",
                errors,
                warnings,
                data,
            )
        out: dict[str, Any] = {"data": data if data is not None else {}}
        if warnings:
            out["warnings"] = warnings
        return out

    def _strings(self, result: dict[str, Any], key: str) -> list[str]:
        value = result.get(key)
        if value is None:
            return []
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise self._invalid(f"'{key}' must be a list of strings (got: {json.dumps(value)})")
        return value


def _json_kind(value: object) -> str:
    if isinstance(value, list):
        return "array"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    return "string" if isinstance(value, str) else "object"


def _a(kind: str) -> str:
    """'an object', 'a number', 'null', 'undefined'."""
    if kind in {"null", "undefined"}:
        return kind
    return f"an {kind}" if kind[0] in "aeiou" else f"a {kind}"
