"""Uplinks: the MQTT uplink to the urban data platform and the file uplink of the embedded demo.

Both take rows from the outbox and acknowledge them only once they are safely away: for MQTT after
the broker's PUBACK (QoS 1), for the file after write + fsync. Anything not acknowledged when a
session ends is handed out again on the next one, keeping its ``event_id``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any, BinaryIO, Protocol

import aiomqtt
import structlog
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, wait_exponential_jitter

from gateway.commands import Commands
from gateway.config import FileUplinkConfig, MqttUplinkConfig
from gateway.credentials import read_password, tls_context
from gateway.errors import TerminalUplinkError
from gateway.health import Metrics
from gateway.outbox import Outbox, OutboxRow
from gateway.topics import Topics
from gateway.types import Lane
from gateway.wire import CONTENT_TYPES, Encoding, dumps_json, encode_batch

log = structlog.get_logger(__name__)

StatsProvider = Callable[[], Awaitable[dict[str, Any]]]

# CONNACK codes that retrying cannot fix: MQTT 3.1.1 §3.2.2.3 (4, 5) and their MQTT 5 reason
# codes (134 bad user name or password, 135 not authorized, 138 banned, 140 bad auth method).
_TERMINAL_CONNACK = {4, 5, 134, 135, 138, 140}
# A session that stayed up this long was a real connection: the next failure starts the backoff
# again from its shortest wait instead of continuing where the last outage left off.
_STABLE_SESSION_S = 30.0
_FETCH_ROWS = 500
# Idle loops wake this often to report that they are alive.
_HEARTBEAT_S = 1.0


class Uplink(Protocol):
    """What the composition root needs from any uplink."""

    heartbeat: Callable[[], None]

    @property
    def state(self) -> str: ...

    async def run(self) -> None: ...

    async def stop(self, deadline_s: float) -> None: ...


class _SessionLostError(Exception):
    """The connection failed or dropped; retried with backoff."""


class _StableSessionLostError(Exception):
    """A long-lived connection dropped; retried with a fresh backoff."""


def _is_terminal(exc: aiomqtt.MqttError) -> bool:
    rc = getattr(exc, "rc", None)
    value = getattr(rc, "value", rc)
    return (
        isinstance(exc, aiomqtt.MqttCodeError)
        and isinstance(value, int)
        and (value in _TERMINAL_CONNACK)
        and "onnect" in type(exc).__name__
    )


def _flatten(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for sub in exc.exceptions for leaf in _flatten(sub)]
    return [exc]


class _Message:
    __slots__ = ("payload", "seqs", "topic")

    def __init__(self, topic: str, payload: bytes, seqs: list[int]) -> None:
        self.topic = topic
        self.payload = payload
        self.seqs = seqs


class MqttUplink:
    """Publishes the outbox to an MQTT broker at QoS 1 and answers commands."""

    def __init__(
        self,
        cfg: MqttUplinkConfig,
        gateway_id: str,
        outbox: Outbox,
        *,
        metrics: Metrics,
        commands: Commands,
        stats: StatsProvider,
        environ: Mapping[str, str],
    ) -> None:
        self._cfg = cfg
        self._topics = Topics(cfg.topic_prefix, gateway_id)
        self._client_id = cfg.client_id or f"edge-gateway-{gateway_id}"
        self._outbox = outbox
        self._metrics = metrics
        self._commands = commands
        self._stats = stats
        self._environ = environ
        self._state = "starting"
        self._stop_requested = asyncio.Event()
        self._stop_deadline = 0.0
        self._stats_now = asyncio.Event()
        self._inflight = 0
        self._properties = self._publish_properties()
        self.heartbeat: Callable[[], None] = lambda: None

    @property
    def state(self) -> str:
        return self._state

    @property
    def topics(self) -> Topics:
        return self._topics

    def request_stats(self) -> None:
        """Publish a stats message now (the ``stats`` command)."""
        self._stats_now.set()

    async def stop(self, deadline_s: float) -> None:
        """Ask run() to send what it can within the deadline, say offline and return."""
        self._stop_deadline = time.monotonic() + deadline_s
        self._stop_requested.set()

    # -- connection management -------------------------------------------------------------

    async def run(self) -> None:
        while not self._stop_requested.is_set():
            retrying = AsyncRetrying(
                wait=wait_exponential_jitter(
                    multiplier=self._cfg.reconnect_min_s,
                    max=self._cfg.reconnect_max_s,
                    jitter=self._cfg.reconnect_min_s,
                ),
                retry=retry_if_exception_type(_SessionLostError),
                sleep=self._sleep,
                before_sleep=self._before_sleep,
                reraise=True,
            )
            try:
                async for attempt in retrying:
                    with attempt:
                        if self._stop_requested.is_set():
                            return
                        await self._session()
            except _StableSessionLostError:
                continue
            else:
                return

    async def _sleep(self, seconds: float) -> None:
        # Backoff waits end early on stop (the outbox already holds everything safely) and beat
        # meanwhile: waiting for a broker is healthy, a hung loop is not.
        deadline = time.monotonic() + seconds
        while (remaining := deadline - time.monotonic()) > 0:
            self.heartbeat()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(remaining, _HEARTBEAT_S)):
                    await self._stop_requested.wait()
            if self._stop_requested.is_set():
                return

    def _before_sleep(self, state: RetryCallState) -> None:
        self._metrics.inc("uplink_connect_failures")
        wait = state.next_action.sleep if state.next_action else 0.0
        error = state.outcome.exception() if state.outcome else None
        log.warning(
            "uplink_retry",
            host=self._cfg.host,
            port=self._cfg.port,
            attempt=state.attempt_number,
            wait_s=round(wait, 2),
            error=str(error.__cause__ or error) if error else None,
            outbox_depth=self._outbox.depth(),
        )

    def _publish_properties(self) -> Properties | None:
        if self._cfg.protocol != "5":
            return None
        props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        props.ContentType = CONTENT_TYPES[self._cfg.encoding]
        return props

    def _client(self) -> aiomqtt.Client:
        protocol = (
            aiomqtt.ProtocolVersion.V5
            if self._cfg.protocol == "5"
            else (aiomqtt.ProtocolVersion.V311)
        )
        client = aiomqtt.Client(
            self._cfg.host,
            self._cfg.port,
            identifier=self._client_id,
            username=self._cfg.username,
            password=read_password("uplink.password_file", self._cfg.password_file, self._environ),
            protocol=protocol,
            # The platform learns of a dead gateway from the broker, not from silence.
            will=aiomqtt.Will(self._topics.conn, b"offline", qos=1, retain=True),
            # Events survive in the outbox, not in a broker session; commands are re-subscribed
            # on every connect, so a clean session loses nothing.
            clean_session=True if protocol is aiomqtt.ProtocolVersion.V311 else None,
            keepalive=self._cfg.keepalive_s,
            timeout=self._cfg.connect_timeout_s,
            tls_context=tls_context("uplink.tls", self._cfg.tls, self._environ),
            max_inflight_messages=self._cfg.max_inflight,
        )
        # aiomqtt warns on every publish beyond 10 outstanding; max_inflight is by design here.
        client.pending_calls_threshold = self._cfg.max_inflight + 16
        return client

    async def _session(self) -> None:
        client = self._client()
        self._state = "connecting"
        connected_at: float | None = None
        try:
            async with client:
                connected_at = time.monotonic()
                await client.publish(self._topics.conn, b"online", qos=1, retain=True)
                await client.subscribe(self._topics.commands, qos=1)
                self._state = "connected"
                self._metrics.inc("uplink_connects")
                log.info(
                    "uplink_connected",
                    host=self._cfg.host,
                    port=self._cfg.port,
                    tls=self._cfg.tls.enabled,
                    outbox_depth=self._outbox.depth(),
                )
                await self._serve(client)
        except (aiomqtt.MqttError, BaseExceptionGroup) as exc:
            # Task groups wrap the connection error; anything that is not an MQTT error is a bug
            # and goes on up. (except* is not used: it would re-wrap what we raise here.)
            leaves = _flatten(exc)
            errors = [e for e in leaves if isinstance(e, aiomqtt.MqttError)]
            if not errors or len(errors) != len(leaves):
                raise
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                # A task group that was cancelled while a child failed reports only the child's
                # error; turning that into a retry would swallow the cancellation for good.
                raise asyncio.CancelledError from exc
            for error in errors:
                if _is_terminal(error):
                    self._state = "refused"
                    raise TerminalUplinkError(
                        f"broker {self._cfg.host}:{self._cfg.port} refused the connection: "
                        f"{error} (check uplink.username and uplink.password_file)"
                    ) from error
            self._state = "disconnected"
            self._outbox.rewind()
            cause = errors[0]
            if connected_at is not None:
                self._metrics.inc("uplink_disconnects")
                log.warning("uplink_disconnected", error=str(cause))
                if time.monotonic() - connected_at > _STABLE_SESSION_S:
                    raise _StableSessionLostError(str(cause)) from cause
            raise _SessionLostError(str(cause)) from cause
        self._state = "stopped"

    async def _serve(self, client: aiomqtt.Client) -> None:
        queue: asyncio.Queue[_Message] = asyncio.Queue(maxsize=self._cfg.max_inflight)
        async with asyncio.TaskGroup() as tg:
            workers = [
                tg.create_task(self._publish_worker(client, queue), name=f"uplink-publish-{i}")
                for i in range(self._cfg.max_inflight)
            ]
            feeder = tg.create_task(self._feed(queue), name="uplink-feed")
            commands = tg.create_task(self._command_loop(client), name="uplink-commands")
            stats = tg.create_task(self._stats_loop(client), name="uplink-stats")
            await self._stop_requested.wait()
            await self._drain(queue)
            for task in (*workers, feeder, commands, stats):
                task.cancel()
        # Said explicitly: a clean disconnect does not trigger the Last Will.
        with contextlib.suppress(aiomqtt.MqttError):
            await client.publish(self._topics.conn, b"offline", qos=1, retain=True, timeout=2.0)
        log.info("uplink_stopped", outbox_depth=self._outbox.depth())

    async def _drain(self, queue: asyncio.Queue[_Message]) -> None:
        while time.monotonic() < self._stop_deadline:
            if self._outbox.depth() == 0 and queue.empty() and self._inflight == 0:
                return
            self.heartbeat()
            await asyncio.sleep(0.02)
        log.warning("uplink_flush_deadline", outbox_depth=self._outbox.depth())

    async def _feed(self, queue: asyncio.Queue[_Message]) -> None:
        batching = self._cfg.batch_max_events > 1
        while True:
            self.heartbeat()
            rows = await self._outbox.fetch(_FETCH_ROWS, timeout_s=_HEARTBEAT_S)
            for message in self._group(rows) if batching else self._single(rows):
                await queue.put(message)

    def _single(self, rows: list[OutboxRow]) -> list[_Message]:
        return [_Message(self._topics.event(r.kind), r.payload, [r.seq]) for r in rows]

    def _group(self, rows: list[OutboxRow]) -> list[_Message]:
        # Alarms go alone and first (fetch returns the alarm lane first); telemetry is packed into
        # arrays of up to batch_max_events / batch_max_bytes.
        out: list[_Message] = []
        pending: list[OutboxRow] = []
        size = 0

        def close() -> None:
            nonlocal pending, size
            if pending:
                payload = encode_batch([r.payload for r in pending], self._cfg.encoding)
                out.append(_Message(self._topics.batch, payload, [r.seq for r in pending]))
            pending, size = [], 0

        for row in rows:
            if row.lane is Lane.ALARM:
                out.append(_Message(self._topics.event(row.kind), row.payload, [row.seq]))
                continue
            if pending and (
                len(pending) >= self._cfg.batch_max_events
                or size + len(row.payload) > self._cfg.batch_max_bytes
            ):
                close()
            pending.append(row)
            size += len(row.payload) + 1
        close()
        return out

    async def _publish_worker(self, client: aiomqtt.Client, queue: asyncio.Queue[_Message]) -> None:
        while True:
            message = await queue.get()
            self._inflight += 1
            try:
                await client.publish(
                    message.topic,
                    message.payload,
                    qos=1,
                    properties=self._properties,
                    timeout=self._cfg.publish_timeout_s,
                )
            finally:
                self._inflight -= 1
            # PUBACK received: only now may the outbox forget these events.
            self._outbox.ack(message.seqs)
            self._metrics.inc("events_out", len(message.seqs))
            self._metrics.inc("messages_out")

    async def _command_loop(self, client: aiomqtt.Client) -> None:
        async for message in client.messages:
            name = self._topics.command_name(str(message.topic))
            if name is None:
                continue
            payload = message.payload if isinstance(message.payload, bytes) else b""
            self._metrics.inc("commands_in")
            reply = await self._commands.handle(name, payload)
            await self._outbox.put(reply)

    async def _stats_loop(self, client: aiomqtt.Client) -> None:
        while True:
            await self._publish_stats(client)
            self._stats_now.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._cfg.stats_interval_s):
                    await self._stats_now.wait()

    async def _publish_stats(self, client: aiomqtt.Client) -> None:
        self.heartbeat()
        stats = await self._stats()
        await client.publish(
            self._topics.stats, dumps_json(stats), qos=1, timeout=self._cfg.publish_timeout_s
        )


class FileUplink:
    """Writes events as JSON lines to a file or stdout; acknowledges after write (+ fsync)."""

    def __init__(self, cfg: FileUplinkConfig, outbox: Outbox, metrics: Metrics) -> None:
        self._cfg = cfg
        self._outbox = outbox
        self._metrics = metrics
        self._state = "starting"
        self._stop_requested = asyncio.Event()
        self._stop_deadline = 0.0
        self.heartbeat: Callable[[], None] = lambda: None

    @property
    def state(self) -> str:
        return self._state

    async def stop(self, deadline_s: float) -> None:
        self._stop_deadline = time.monotonic() + deadline_s
        self._stop_requested.set()

    async def run(self) -> None:
        if self._outbox.encoding is not Encoding.JSON:
            raise TerminalUplinkError("the file uplink writes JSON lines: use encoding json")
        stream, owned = self._open()
        self._state = "connected"
        try:
            async with asyncio.TaskGroup() as tg:
                writer = tg.create_task(self._write_loop(stream), name="file-uplink-write")
                await self._stop_requested.wait()
                while time.monotonic() < self._stop_deadline and self._outbox.depth():
                    self.heartbeat()
                    await asyncio.sleep(0.02)
                writer.cancel()
        finally:
            self._state = "stopped"
            if owned:
                stream.close()

    def _open(self) -> tuple[BinaryIO, bool]:
        if self._cfg.path == "-":
            return sys.stdout.buffer, False
        path = Path(self._cfg.path)
        path.parent.mkdir(parents=True, exist_ok=True)
        return path.open("ab"), True

    async def _write_loop(self, stream: BinaryIO) -> None:
        while True:
            self.heartbeat()
            rows = await self._outbox.fetch(self._cfg.batch_max_events, timeout_s=_HEARTBEAT_S)
            if not rows:
                continue
            data = b"".join(row.payload + b"\n" for row in rows)
            await asyncio.to_thread(self._write, stream, data)
            self._outbox.ack(row.seq for row in rows)
            self._metrics.inc("events_out", len(rows))

    def _write(self, stream: BinaryIO, data: bytes) -> None:
        stream.write(data)
        stream.flush()
        if self._cfg.fsync and stream is not sys.stdout.buffer:
            os.fsync(stream.fileno())
