"""``edge-gateway codec run``: run a payload codec over JSON lines, for vendors' files and checks.

``edge-gateway codec run PATH.js`` (a TTN / ChirpStack JavaScript decoder, see
:mod:`drivers.jscodec`, run in a worker process by :mod:`drivers.jsworker`) or
``edge-gateway codec run --builtin NAME`` (a Python codec from ``drivers.codecs.CODECS``) reads
JSON lines ``{"fPort": <int>, "bytes_hex": "<hex>"}`` on stdin and writes one JSON line per input
line, in order, flushed at once:

* the codec's result: ``{"data": {...}}`` plus ``"warnings"`` when it gave some;
* ``{"errors": [...]}`` when it failed: the decoder's own ``errors`` when it returned some (with its
  ``data``/``warnings`` if it returned those too), else one message. A malformed input line (not
  JSON, no integer ``fPort``, bad hex) gets the same treatment, and the next line is read.

A JavaScript decoder that hangs (even where QuickJS cannot interrupt it: a catastrophic regular
expression) gets its error line once the wall-clock deadline (``--timeout-ms`` plus
:data:`drivers.jsworker.DEFAULT_MARGIN_MS`) has passed; its worker is replaced and the next lines
decode as usual.

A JavaScript input line may also carry ``"recvTime"`` (RFC 3339, default now) and ``"variables"``
(an object of strings, default ``{}``). Exit status: 0 at end of input, even when lines failed;
2 when the codec cannot be loaded (unreadable file, syntax error, no entry point, unknown builtin).

``gateway.cli`` registers this with :func:`add_codec_parser`; ``python -m gateway.codec_cli``
runs the same code standalone.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

from drivers.jscodec import (
    DEFAULT_MEMORY_LIMIT_BYTES,
    DEFAULT_TIMEOUT_MS,
    DecoderReportedError,
)
from drivers.jsworker import JsWorker
from gateway.argtypes import positive_int
from gateway.errors import CodecError

__all__ = ["add_codec_parser", "main", "run_lines"]

EXIT_OK = 0
EXIT_USAGE = 2

# A decode function as the loop sees it: the input line's fields -> the result object to print.
Decode = Callable[[int, bytes, dict[str, Any]], dict[str, Any]]


class _InputError(ValueError):
    """An input line that is not a frame; reported on its output line."""


def _configure(parser: argparse.ArgumentParser) -> None:
    """Add the ``run`` sub-command to ``parser`` (the ``codec`` command or the standalone one)."""
    sub = parser.add_subparsers(dest="codec_command", required=True, metavar="COMMAND")
    run = sub.add_parser(
        "run",
        help="decode JSON lines {fPort, bytes_hex} from stdin, one JSON result line each",
        description=(
            'Read JSON lines {"fPort": <int>, "bytes_hex": "<hex>"} on stdin and write one'
            ' JSON line per input line: the codec\'s {"data": ...} (plus "warnings"), or'
            ' {"errors": [...]} when the codec or the line failed. Exit 0 at end of input.'
        ),
    )
    what = run.add_mutually_exclusive_group(required=True)
    what.add_argument("path", nargs="?", type=Path, help="a TTN/ChirpStack JavaScript decoder")
    what.add_argument("--builtin", metavar="NAME", help="a Python codec of drivers.codecs")
    run.add_argument(
        "--timeout-ms",
        type=positive_int,
        default=DEFAULT_TIMEOUT_MS,
        help=f"JavaScript time limit per frame (default {DEFAULT_TIMEOUT_MS})",
    )
    run.add_argument(
        "--memory-limit-mb",
        type=positive_int,
        default=DEFAULT_MEMORY_LIMIT_BYTES // (1024 * 1024),
        help="JavaScript heap limit per frame in MiB"
        f" (default {DEFAULT_MEMORY_LIMIT_BYTES // (1024 * 1024)})",
    )
    run.set_defaults(func=cmd_codec_run)


def add_codec_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``codec`` (with ``run``) on the top-level sub-parsers; ``func`` returns a status."""
    codec = sub.add_parser("codec", help="run a payload codec over JSON lines (see codec run -h)")
    _configure(codec)


def _load_js(
    path: Path, timeout_ms: int, memory_limit_mb: int, workers: contextlib.ExitStack
) -> Decode:
    """Start the decoder's worker (closed by ``workers``) and load the file in it."""
    try:
        source = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise CodecError(f"{path}: cannot read the decoder: {exc}") from exc
    codec = workers.enter_context(
        JsWorker(
            source,
            str(path),
            timeout_ms=timeout_ms,
            memory_limit_bytes=memory_limit_mb * 1024 * 1024,
        )
    )

    def decode(fport: int, payload: bytes, line: dict[str, Any]) -> dict[str, Any]:
        return codec.decode_uplink(fport, payload, _recv_time(line), _variables(line))

    return decode


def _load_builtin(name: str) -> Decode:
    # Imported here: the JavaScript path must not depend on every vendor module importing.
    from drivers.codecs import CODECS  # noqa: PLC0415

    try:
        fn = CODECS[name]
    except KeyError:
        known = ", ".join(sorted(CODECS))
        raise CodecError(f"unknown builtin codec {name!r}; known: {known}") from None

    def decode(fport: int, payload: bytes, _line: dict[str, Any]) -> dict[str, Any]:
        return {"data": fn(fport, payload)}

    return decode


def _recv_time(line: dict[str, Any]) -> datetime | None:
    value = line.get("recvTime")
    if value is None:
        return None
    if not isinstance(value, str):
        raise _InputError(f"recvTime must be an RFC 3339 string (got: {json.dumps(value)})")
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise _InputError(f"recvTime is not an RFC 3339 time (got: {value!r})") from None
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)


def _variables(line: dict[str, Any]) -> dict[str, str]:
    value = line.get("variables")
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise _InputError(f"variables must be an object of strings (got: {json.dumps(value)})")
    return value


def _parse_line(text: str) -> tuple[int, bytes, dict[str, Any]]:
    text = text.strip()
    if not text:
        raise _InputError('empty line; expected {"fPort": <int>, "bytes_hex": "<hex>"}')
    try:
        line = json.loads(text)
    except ValueError as exc:
        raise _InputError(f"not a JSON object: {exc}") from None
    if not isinstance(line, dict):
        raise _InputError('not a JSON object {"fPort": <int>, "bytes_hex": "<hex>"}')
    fport = line.get("fPort")
    # bool is an int in Python, not in JSON.
    if not isinstance(fport, int) or isinstance(fport, bool):
        raise _InputError(f"fPort must be an integer (got: {json.dumps(fport)})")
    if not 0 <= fport <= 255:
        raise _InputError(f"fPort must be 0..255 (got: {fport})")
    hex_text = line.get("bytes_hex")
    if not isinstance(hex_text, str):
        raise _InputError(f"bytes_hex must be a hex string (got: {json.dumps(hex_text)})")
    try:
        payload = bytes.fromhex(hex_text)
    except ValueError:
        raise _InputError(f"bytes_hex is not hex (got: {hex_text!r})") from None
    return fport, payload, line


def _failure(exc: CodecError | _InputError) -> dict[str, Any]:
    if isinstance(exc, DecoderReportedError):
        # The decoder's own result object, as it returned it.
        out: dict[str, Any] = {}
        if exc.data is not None:
            out["data"] = exc.data
        if exc.warnings:
            out["warnings"] = exc.warnings
        out["errors"] = exc.errors
        return out
    return {"errors": [str(exc)]}


def _dumps(obj: dict[str, Any]) -> str:
    # allow_nan=False: NaN is not JSON, and a consumer's parser would reject the whole line.
    return json.dumps(obj, allow_nan=False)


def run_lines(decode: Decode, lines: Iterable[str], out: IO[str]) -> None:
    """Decode each input line and write its result line, flushed, until the input ends."""
    for number, raw in enumerate(lines, start=1):
        try:
            fport, payload, line = _parse_line(raw)
            result = decode(fport, payload, line)
        except _InputError as exc:
            reply = _failure(_InputError(f"input line {number}: {exc}"))
        except CodecError as exc:
            reply = _failure(exc)
        else:
            reply = result
        try:
            text = _dumps(reply)
        except (TypeError, ValueError) as exc:
            # Only a builtin codec can return a non-JSON value (the JS path goes through JSON).
            text = _dumps({"errors": [f"the codec returned a value that is not JSON: {exc}"]})
        out.write(text + "\n")
        out.flush()


def cmd_codec_run(args: argparse.Namespace) -> int:
    """``codec run``: load the codec, then decode stdin to stdout."""
    with contextlib.ExitStack() as workers:
        try:
            if args.builtin is not None:
                decode = _load_builtin(args.builtin)
            else:
                decode = _load_js(args.path, args.timeout_ms, args.memory_limit_mb, workers)
        except CodecError as exc:
            sys.stderr.write(f"edge-gateway codec run: {exc}\n")
            return EXIT_USAGE
        return _run_stdin(decode)


def _run_stdin(decode: Decode) -> int:
    """Decode stdin to stdout until stdin ends (or the reader of stdout goes away)."""
    # Undecodable input bytes become U+FFFD and so a malformed line, instead of ending the loop.
    stdin = io.TextIOWrapper(sys.stdin.buffer, encoding="utf-8", errors="replace")
    try:
        run_lines(decode, stdin, sys.stdout)
    except BrokenPipeError:
        # The reader went away (`| head`): nothing is left to tell it. Point stdout at /dev/null
        # so the interpreter's final flush does not fail the same way (Python's signal docs).
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    """The standalone parser: ``python -m gateway.codec_cli run ...``."""
    parser = argparse.ArgumentParser(
        prog="edge-gateway codec", description="Run a payload codec over JSON lines."
    )
    _configure(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
