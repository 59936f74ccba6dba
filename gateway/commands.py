"""Upstream commands (``.../command/{name}``): parse, dispatch, and answer with an event.

Every command is answered, through the outbox, with a ``command_result`` event or, for an unknown
or malformed command, a ``command_error`` event. A bad command never raises out of here.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import structlog

from gateway.types import Event, Measurement, Severity, utc_now
from gateway.wire import loads_json

log = structlog.get_logger(__name__)

# Larger command payloads are refused unread; no command needs more.
MAX_COMMAND_BYTES = 16 * 1024
_MAX_REQUEST_ID = 64

# A handler gets the parsed arguments and returns extra values for the reply.
Handler = Callable[[Mapping[str, Any]], Awaitable[tuple[Measurement, ...]]]


class CommandError(Exception):
    """A command that cannot be carried out; the message goes into the error event."""


def _reply(
    gateway_id: str, command: str, request_id: str | None, ok: bool, extra: tuple[Measurement, ...]
) -> Event:
    values = [Measurement("command", command[:64])]
    if request_id is not None:
        values.append(Measurement("request_id", request_id))
    values.extend(extra)
    return Event(
        kind="command_result" if ok else "command_error",
        device=gateway_id,
        ts=utc_now(),
        severity=Severity.INFO if ok else Severity.WARNING,
        values=tuple(values),
    )


class Commands:
    """Dispatches commands to the handlers the composition root registered."""

    def __init__(self, gateway_id: str, handlers: Mapping[str, Handler]) -> None:
        self._gateway_id = gateway_id
        self._handlers = dict(handlers)

    def register(self, name: str, handler: Handler) -> None:
        self._handlers[name] = handler

    async def handle(self, name: str, payload: bytes) -> Event:
        """Carry out one command and return the answer event."""
        request_id: str | None = None
        try:
            if len(payload) > MAX_COMMAND_BYTES:
                raise CommandError(f"payload larger than {MAX_COMMAND_BYTES} bytes")
            args = self._parse(payload)
            raw_id = args.get("id")
            if raw_id is not None:
                if not isinstance(raw_id, str | int) or len(str(raw_id)) > _MAX_REQUEST_ID:
                    raise CommandError(f"id must be a string of at most {_MAX_REQUEST_ID} chars")
                request_id = str(raw_id)
            handler = self._handlers.get(name)
            if handler is None:
                raise CommandError(f"unknown command; known: {', '.join(sorted(self._handlers))}")
            extra = await handler(args)
        except CommandError as exc:
            log.warning("command_rejected", command=name[:64], error=str(exc))
            return _reply(
                self._gateway_id, name, request_id, False, (Measurement("error", str(exc)[:256]),)
            )
        log.info("command_done", command=name)
        return _reply(self._gateway_id, name, request_id, True, extra)

    @staticmethod
    def _parse(payload: bytes) -> Mapping[str, Any]:
        if not payload.strip():
            return {}
        try:
            args = loads_json(payload)
        except ValueError as exc:
            raise CommandError(f"payload is not JSON: {exc}") from exc
        if not isinstance(args, dict):
            raise CommandError("payload must be a JSON object")
        return args


async def ping(_args: Mapping[str, Any]) -> tuple[Measurement, ...]:
    """Answers ``pong``: proves the command path and the outbox round trip."""
    return (Measurement("reply", "pong"),)
