"""Upstream commands (``.../command/{name}``): parse, dispatch, and answer with an event.

Every command is answered, through the outbox, with a ``command_result`` event or, for an unknown
or malformed command, a ``command_error`` event. A bad command never raises out of here.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, Protocol

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


class DownlinkSender(Protocol):
    """A source that can queue LoRaWAN downlinks (the ChirpStack source)."""

    def knows(self, dev_eui: str) -> bool: ...

    def action(self, dev_eui: str, name: str) -> tuple[int, bytes, bool]: ...

    async def send_downlink(
        self, dev_eui: str, f_port: int, payload: bytes, *, confirmed: bool = False
    ) -> str: ...


_DEV_EUI = re.compile(r"[0-9a-fA-F]{16}")


def downlink_command(senders: Sequence[DownlinkSender]) -> Handler:
    """The ``downlink`` command.

    Arguments: ``device`` (devEUI), and either ``action`` (a named downlink of the device's
    profile) or ``f_port`` (1-223) with ``hex`` (the payload); optional ``confirmed``. Answers
    ``status = queued`` with the ``downlink_id`` that later ``downlink_ack``/``downlink_txack``
    events carry; a rejected request is a ``command_error`` with the reason.
    """

    async def handle(args: Mapping[str, Any]) -> tuple[Measurement, ...]:
        device = args.get("device")
        if not isinstance(device, str) or not _DEV_EUI.fullmatch(device):
            raise CommandError("device must be a devEUI of 16 hex digits")
        device = device.lower()
        sender = next((s for s in senders if s.knows(device)), None)
        if sender is None:
            raise CommandError(f"device {device} has not been heard by any ChirpStack source")
        try:
            if "action" in args:
                f_port, payload, confirmed = sender.action(device, str(args["action"]))
            else:
                f_port, payload, confirmed = _explicit(args)
            downlink_id = await sender.send_downlink(device, f_port, payload, confirmed=confirmed)
        except ValueError as exc:
            raise CommandError(str(exc)) from exc
        return (
            Measurement("status", "queued"),
            Measurement("device", device),
            Measurement("f_port", f_port),
            Measurement("downlink_id", downlink_id),
        )

    return handle


def _explicit(args: Mapping[str, Any]) -> tuple[int, bytes, bool]:
    f_port = args.get("f_port")
    if isinstance(f_port, bool) or not isinstance(f_port, int):
        raise CommandError("f_port must be an integer 1..223 (or give an action)")
    raw = args.get("hex")
    if not isinstance(raw, str):
        raise CommandError("hex must be the payload as a hex string (or give an action)")
    try:
        payload = bytes.fromhex(raw)
    except ValueError as exc:
        raise CommandError(f"hex is not hexadecimal: {exc}") from exc
    confirmed = args.get("confirmed", False)
    if not isinstance(confirmed, bool):
        raise CommandError("confirmed must be true or false")
    return f_port, payload, confirmed
