"""ChirpStack v4 source: reads the MQTT application integration of a local ChirpStack.

It subscribes to ``application/+/device/+/event/+`` at QoS 1 with its own client id and a
persistent session, so uplinks that arrive while the gateway restarts wait at the broker. Messages
are acknowledged (PUBACK) only after what they produced is committed to the outbox: a crash between
receipt and commit makes the broker deliver the message again, and the stable event id derived
from ChirpStack's ``deduplicationId`` turns that redelivery into a duplicate, not a new event.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, NamedTuple

import structlog
from chirpstack_api import integration
from google.protobuf import json_format
from tenacity import AsyncRetrying, retry_if_exception_type, wait_exponential_jitter

from drivers.lorawan import (
    ChirpStackMessage,
    Finding,
    LinkTracker,
    Profile,
    Uplink,
    parse_message,
    parse_topic,
    parse_uplink_json,
    uplink_from_message,
)
from drivers.lorawan import message_time as _message_time
from drivers.mqtt_intake import (
    MAX_PACKET_BYTES,
    MQTT_5,
    TERMINAL_CONNACK,
    IntakeMessage,
    MqttIntake,
    MqttIntakeError,
    MqttNoAnswerError,
    MqttRefusedError,
)
from gateway.errors import CodecError, EventValidationError, TerminalUplinkError
from gateway.types import (
    Emit,
    Event,
    Measurement,
    Reading,
    ReportError,
    Severity,
    stable_event_id,
)

log = structlog.get_logger(__name__)

_SILENT_CHECK_S = 5.0
# Messages processed between two turns of the event loop (well under 1 ms of work). Each commit
# round trip (outbox thread done -> writer -> store task -> PUBACKs) takes several loop turns,
# each waiting behind one such slice: at 64 a round trip took ~60 ms under load and the window
# of unacknowledged uplinks was spent on that; at 8, live 12,000/s went from 7,000-9,000 to
# ~10,000-11,000 delivered/s (bench/chirpstack_ingest.py), drain unchanged.
_YIELD_EVERY = 8
# Resumes in a row that each brought some uplinks back but not all (see _idle): beyond this
# the rest are counted as dropped rather than resumed for without end.
_MAX_RESUMES = 20
# A connection on which the source fell behind is resumed once it has caught up, but no sooner
# than this after the last resume (see _consume).
_RESUME_EVERY_S = 1.0
_LOG_SEVERITY = {"INFO": Severity.INFO, "WARNING": Severity.WARNING, "ERROR": Severity.ALARM}


@dataclass(frozen=True, slots=True)
class DeviceRule:
    """Catalog entry: which devices (by devEUI, device-profile name or tag) use which profile."""

    profile: Profile
    dev_eui: str | None = None
    device_profile: str | None = None
    tag: tuple[str, str] | None = None
    params: Mapping[str, float] = field(default_factory=dict)
    expected_interval_s: float | None = None


class Catalog:
    """Finds the rule for a device: devEUI first, then device-profile name, then tags."""

    def __init__(self, rules: Sequence[DeviceRule]) -> None:
        self._by_eui = {r.dev_eui.lower(): r for r in rules if r.dev_eui}
        self._by_profile = {r.device_profile: r for r in rules if r.device_profile}
        self._by_tag = [r for r in rules if r.tag]

    def match(
        self, dev_eui: str, device_profile: str, tags: Mapping[str, str]
    ) -> DeviceRule | None:
        rule = self._by_eui.get(dev_eui) or self._by_profile.get(device_profile)
        if rule is not None:
            return rule
        for candidate in self._by_tag:
            assert candidate.tag is not None
            key, value = candidate.tag
            if tags.get(key) == value:
                return candidate
        return None


@dataclass(frozen=True, slots=True)
class BrokerSettings:
    """How to reach the local broker ChirpStack publishes to."""

    host: str
    port: int
    client_id: str
    topic: str = "application/+/device/+/event/+"
    marshaler: str = "auto"
    username: str | None = None
    password: Callable[[], str | None] = lambda: None
    tls_context: Callable[[], ssl.SSLContext | None] = lambda: None
    keepalive_s: int = 60
    reconnect_min_s: float = 1.0
    reconnect_max_s: float = 30.0
    # Messages received and not yet acknowledged (committed) before reading pauses: bounds
    # memory while the broker pushes a backlog; the broker keeps the rest for the session.
    max_unacked: int = 1000
    # MQTT 5 (default): how many unacknowledged uplinks the broker may have in flight to us
    # (see ChirpStackSourceConfig.receive_maximum); 4 = 3.1.1 for brokers without 5, where the
    # broker's max_inflight_messages (20 by default) rules.
    mqtt_version: int = MQTT_5
    receive_maximum: int = 20000


# LoRaWAN's largest application payload (DR with 242-byte MACPayload limit, minus nothing for
# FOpts-less frames); ChirpStack rejects what does not fit the device's data rate anyway.
MAX_DOWNLINK_BYTES = 242


class DownlinkRejectedError(ValueError):
    """A downlink request that cannot be queued; the message says why."""


@dataclass(slots=True)
class DownlinkBudget:
    """Downlinks per device and UTC day: airtime is shared and regulated (duty cycle)."""

    daily_cap: int
    used: dict[tuple[str, str], int] = field(default_factory=dict)

    def take(self, dev_eui: str, day: str) -> None:
        key = (dev_eui, day)
        if self.used.get(key, 0) >= self.daily_cap:
            raise DownlinkRejectedError(
                f"device {dev_eui} reached its cap of {self.daily_cap} downlinks for {day}"
            )
        self.used = {k: v for k, v in self.used.items() if k[1] == day}
        self.used[key] = self.used.get(key, 0) + 1

    def give_back(self, dev_eui: str, day: str) -> None:
        """Undo a :meth:`take` whose downlink never reached the broker."""
        key = (dev_eui, day)
        if self.used.get(key, 0) > 0:
            self.used[key] -= 1


class _SessionLostError(Exception):
    """The broker connection failed or dropped; retried with backoff."""


# One per uplink: a NamedTuple is as immutable as a frozen dataclass and built 2-3x faster.
class _Frame(NamedTuple):
    """One uplink frame (devEUI, fCnt) and what it became; a duplicate becomes nothing."""

    key: tuple[str, int]
    items: list[Reading | Event]
    duplicate: bool = False


class ChirpStackSource:
    """Turns ChirpStack integration events into readings and link-health events."""

    def __init__(
        self,
        name: str,
        broker: BrokerSettings,
        catalog: Catalog,
        *,
        dedup_window_s: float = 600.0,
        downlink_daily_cap: int = 24,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.name = name
        self._broker = broker
        self._catalog = catalog
        self._tracker = LinkTracker(dedup_window_s)
        self._clock = clock
        self._unknown_reported: set[str] = set()
        self.counters: dict[str, int] = {}
        self.connected = asyncio.Event()
        self._client: MqttIntake | None = None
        self._budget = DownlinkBudget(downlink_daily_cap)
        self._rules: dict[str, DeviceRule] = {}
        # Uplink frames handed to the pipeline and not committed yet, with the acknowledgements
        # of copies that arrived meanwhile (see _process).
        self._uncommitted: dict[tuple[str, int], list[Callable[[], None]]] = {}
        self._skipped_told_until = 0.0
        # Uplinks whose packet ids the broker skipped: not resumed for yet, and what the last
        # resume is for (see _idle).
        self._owed = 0
        self._trying = 0
        self._resumes_in_a_row = 0
        self._resumed_at = 0.0
        self._next_silence_check = 0.0

    @property
    def tracker(self) -> LinkTracker:
        return self._tracker

    def _count(self, what: str) -> None:
        self.counters[what] = self.counters.get(what, 0) + 1

    async def replay(
        self, lines: Sequence[str], emit: Emit, report_error: ReportError, interval_s: float = 0.0
    ) -> None:
        """Feed a capture (JSON lines ``{"topic", "payload"}``) through the same decoding.

        For the embedded demo and for trying a device catalog on a desk, without a broker.
        """
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                topic, payload = str(record["topic"]), json.dumps(record["payload"]).encode()
            except (ValueError, KeyError, TypeError) as exc:
                self._count("malformed")
                report_error("malformed_message", f"capture line {number}: {exc}")
                continue
            await self._process(topic, payload, emit, report_error, lambda: None)
            if interval_s:
                await asyncio.sleep(interval_s)

    async def run(self, emit: Emit, report_error: ReportError) -> None:
        retrying = AsyncRetrying(
            wait=wait_exponential_jitter(
                multiplier=self._broker.reconnect_min_s,
                max=self._broker.reconnect_max_s,
                jitter=self._broker.reconnect_min_s,
            ),
            retry=retry_if_exception_type(_SessionLostError),
            reraise=True,
        )
        async for attempt in retrying:
            with attempt:
                await self._session(emit, report_error)

    async def _connect(self) -> MqttIntake:
        broker = self._broker
        try:
            return await MqttIntake.connect(
                broker.host,
                broker.port,
                broker.client_id,
                username=broker.username,
                password=broker.password(),
                # A persistent session: the broker keeps our subscription and queues uplinks
                # while the gateway restarts.
                clean_session=False,
                keepalive_s=broker.keepalive_s,
                tls_context=broker.tls_context(),
                max_unacked=broker.max_unacked,
                version=broker.mqtt_version,
                receive_maximum=broker.receive_maximum,
            )
        except MqttRefusedError as exc:
            if exc.rc in TERMINAL_CONNACK:
                raise TerminalUplinkError(
                    f"source {self.name}: broker {broker.host}:{broker.port} refused: {exc}"
                ) from exc
            log.warning("chirpstack_disconnected", source=self.name, error=str(exc))
            raise _SessionLostError(str(exc)) from exc
        except MqttIntakeError as exc:
            log.warning("chirpstack_disconnected", source=self.name, error=str(exc))
            raise _SessionLostError(str(exc)) from exc

    async def _session(self, emit: Emit, report_error: ReportError) -> None:
        broker = self._broker
        # After a lost connection every unacknowledged message comes again, marked DUP: what a
        # resume was for cannot be told from those, so it is resumed for once more.
        self._owed += self._trying
        self._trying = 0
        client = await self._connect()
        try:
            log.info("chirpstack_connected", source=self.name, host=broker.host, port=broker.port)
            while True:
                # Re-subscribing on every connect: harmless with a kept session (done while
                # consuming, see _resubscribe), needed without.
                if not client.session_present:
                    await client.subscribe(broker.topic, qos=1)
                self._client = client
                self.connected.set()
                await self._serve(client, emit, report_error)
                # No downlink starts on a connection about to be handed over; one under way
                # gets its PUBACK before drained() returns.
                self._client = None
                if not await client.drained():
                    log.info("chirpstack_resume_undrained", source=self.name)
                # Resumed on a new connection before this one is closed: the broker hands the
                # session over and hangs up on the old connection in one step, so no uplink
                # finds the session away (and queued, or dropped) in between.
                resumed = await self._connect()
                self._resumed_at = asyncio.get_running_loop().time()
                old, client = client, resumed
                self._client = client
                self._count_resent(old)
                await old.close()
                self._count("session_resumes")
                log.info("chirpstack_session_resumed", source=self.name, owed=self._trying)
        except MqttIntakeError as exc:
            log.warning("chirpstack_disconnected", source=self.name, error=str(exc))
            raise _SessionLostError(str(exc)) from exc
        except BaseExceptionGroup as group:
            leaves = [e for e in group.exceptions if isinstance(e, MqttIntakeError)]
            task = asyncio.current_task()
            if len(leaves) != len(group.exceptions) or (task is not None and task.cancelling()):
                raise
            log.warning("chirpstack_disconnected", source=self.name, error=str(leaves[0]))
            raise _SessionLostError(str(leaves[0])) from group
        finally:
            self.connected.clear()
            self._client = None
            self._count_resent(client)
            await client.close()

    def _count_resent(self, client: MqttIntake) -> None:
        if client.resent:
            self.counters["broker_resent"] = self.counters.get("broker_resent", 0) + client.resent

    async def _serve(self, client: MqttIntake, emit: Emit, report_error: ReportError) -> None:
        """One connection's work; returns when the session should be resumed on a new one."""
        async with asyncio.TaskGroup() as tg:
            silence = tg.create_task(self._watch_silence(emit), name=f"{self.name}-silence")
            resubscribed = None
            if client.session_present:
                resubscribed = tg.create_task(
                    self._resubscribe(client), name=f"{self.name}-resubscribe"
                )
            try:
                await self._consume(client, emit, report_error, resubscribed)
            finally:
                silence.cancel()
                if resubscribed is not None:
                    resubscribed.cancel()

    async def _resubscribe(self, client: MqttIntake) -> None:
        """Subscribes again while the kept session's messages are consumed.

        They come before the SUBACK, up to receive_maximum of them: waiting for it first would
        mean reading them all into memory. Consumed meanwhile, they stay within max_unacked.
        mosquitto 2.0 discards any packet beyond 1000 it has not yet written to a client, a
        SUBACK too; the kept session has the subscription anyway, so an answer that never
        comes is logged, not fatal. A refusal ends the session as on a first connect.
        """
        try:
            await client.subscribe(self._broker.topic, qos=1, timeout_s=10.0, hold_reading=False)
        except MqttNoAnswerError as exc:
            log.warning("chirpstack_resubscribe_unanswered", source=self.name, error=str(exc))

    async def _consume(
        self,
        client: MqttIntake,
        emit: Emit,
        report_error: ReportError,
        resubscribed: asyncio.Task[None] | None,
    ) -> None:
        """Hands every message of the connection to _process; raises when the connection is
        lost, returns when the session should be resumed on a new one (see _idle)."""
        qos0_told = False
        skipped = 0
        behind = False
        # Uplinks owed from an earlier connection: what this one gets resent is counted once
        # the resend is complete (the SUBACK comes after it) and everything is acknowledged.
        verifying = self._trying > 0
        if verifying:
            if resubscribed is None:
                client.wake_when_idle()
            else:
                resubscribed.add_done_callback(lambda _task: client.wake_when_idle())
        loop = asyncio.get_running_loop()
        while True:
            batch = await client.batch()
            if not batch:
                if verifying and resubscribed is not None and not resubscribed.done():
                    continue  # the done callback asks again
                if self._idle(client, verifying):
                    return
                verifying = False
                if client.fell_behind:
                    # The broker may hold packets it could not write (see _idle), and only a
                    # later uplink's id would show it: resume anyway, at most once a second.
                    wait_s = self._resumed_at + _RESUME_EVERY_S - loop.time()
                    if wait_s <= 0:
                        return
                    loop.call_later(wait_s, client.wake_when_idle)
                continue
            for n, message in enumerate(batch, start=1):
                if not message.qos:
                    self._count("qos0_messages")
                    if not qos0_told:
                        qos0_told = True
                        log.warning(
                            "chirpstack_qos0",
                            source=self.name,
                            topic=message.topic[:200],
                            detail="ChirpStack publishes its events at QoS 0: the "
                            "broker neither queues them while the gateway is away nor "
                            "waits for their acknowledgement; set qos=1 in "
                            "[integration.mqtt] of chirpstack.toml",
                        )
                if message.oversized:
                    self._oversized(message, report_error, client.acker(message))
                    continue
                await self._process(
                    message.topic,
                    message.payload,
                    emit,
                    report_error,
                    client.acker(message),
                )
                if n % _YIELD_EVERY == 0:
                    # A backlog arrives in batches of hundreds; without a turn of the
                    # loop now and then, the outbox commit, the PUBACKs and the uplink
                    # would all wait for the whole batch (tens of ms).
                    await asyncio.sleep(0)
            if client.skipped != skipped:
                self._broker_skipped(client.skipped - skipped)
                skipped = client.skipped
                client.wake_when_idle()
            elif client.fell_behind and not behind:
                behind = True
                client.wake_when_idle()

    def _broker_skipped(self, n: int) -> None:
        """Counts packet ids the broker skipped; says so at most once a minute."""
        self._owed += n
        total = self.counters["broker_skipped"] = self.counters.get("broker_skipped", 0) + n
        now = time.monotonic()
        if now >= self._skipped_told_until:
            self._skipped_told_until = now + 60.0
            log.warning(
                "chirpstack_broker_skipped",
                source=self.name,
                uplinks=total,
                detail="the broker skipped these uplinks' packet ids: it dropped them (its "
                "queue for the gateway was full: mosquitto's max_queued_messages, 1000 by "
                "default) or holds them unsent (mosquitto 2.0 discards packets it cannot write "
                "yet beyond 1000); once caught up the gateway resumes the session to get back "
                "those it holds",
            )

    def _idle(self, client: MqttIntake, verifying: bool) -> bool:
        """Everything delivered is acknowledged: whether to resume the session now.

        A resumed session makes the broker send again what it holds in flight for us
        (MQTT-4.4.0-1), so uplinks whose packets mosquitto discarded come back, marked DUP.
        After a resume they are counted against what it was for: none back means those were
        dropped, not held; some back, and the rest may still be held (the resend itself can
        overflow the same way), so another resume follows.
        """
        if verifying:
            recovered = client.resent
            if recovered == 0 or self._resumes_in_a_row >= _MAX_RESUMES:
                self._trying = max(0, self._trying - recovered)
                self._give_up()
            else:
                self._owed += max(0, self._trying - recovered)
                self._trying = 0
                log.info("chirpstack_uplinks_resent", source=self.name, n=recovered)
        if not self._owed:
            self._resumes_in_a_row = 0
            return False
        self._trying, self._owed = self._owed, 0
        self._resumes_in_a_row += 1
        return True

    def _give_up(self) -> None:
        """What the last resume was for and did not bring back was dropped by the broker."""
        lost, self._trying, self._resumes_in_a_row = self._trying, 0, 0
        if not lost:
            return
        total = self.counters["broker_dropped"] = self.counters.get("broker_dropped", 0) + lost
        log.warning(
            "chirpstack_broker_dropped",
            source=self.name,
            uplinks=lost,
            total=total,
            detail="a resumed session did not bring them back: the broker dropped them",
        )

    def knows(self, dev_eui: str) -> bool:
        """Whether this source has heard the device (and so can send it a downlink)."""
        link = self._tracker.devices.get(dev_eui.lower())
        return link is not None and link.application_id is not None

    def action(self, dev_eui: str, name: str) -> tuple[int, bytes, bool]:
        """The named downlink of the device's profile; raises DownlinkRejectedError."""
        rule = self._rules.get(dev_eui.lower())
        actions = rule.profile.actions if rule is not None else {}
        if name not in actions:
            known = ", ".join(sorted(actions)) or "none"
            raise DownlinkRejectedError(f"no action {name!r} for device {dev_eui} (known: {known})")
        return actions[name]

    async def send_downlink(
        self, dev_eui: str, f_port: int, payload: bytes, *, confirmed: bool = False
    ) -> str:
        """Queue a downlink at ChirpStack; returns its id (ChirpStack's queue item id).

        Raises DownlinkRejectedError with the reason when it cannot be queued. The outcome on air
        comes back later as ``downlink_ack`` / ``downlink_txack`` events carrying this id.
        """
        dev_eui = dev_eui.lower()
        if not 1 <= f_port <= 223:
            # fPort 0 is MAC commands, 224 the LoRaWAN test protocol, 225-255 reserved.
            raise DownlinkRejectedError(f"fPort must be 1..223 (got: {f_port})")
        if not payload or len(payload) > MAX_DOWNLINK_BYTES:
            raise DownlinkRejectedError(
                f"payload must be 1..{MAX_DOWNLINK_BYTES} bytes (got: {len(payload)})"
            )
        link = self._tracker.devices.get(dev_eui)
        if link is None or link.application_id is None:
            raise DownlinkRejectedError(
                f"device {dev_eui} has not been heard yet: its ChirpStack application is unknown"
            )
        client = self._client
        if client is None:
            raise DownlinkRejectedError("not connected to the ChirpStack broker")
        day = datetime.fromtimestamp(self._clock(), UTC).date().isoformat()
        self._budget.take(dev_eui, day)
        downlink_id = str(uuid.uuid4())
        command = integration.DownlinkCommand(
            id=downlink_id, dev_eui=dev_eui, confirmed=confirmed, f_port=f_port, data=payload
        )
        topic = f"application/{link.application_id}/device/{dev_eui}/command/down"
        try:
            # ChirpStack's MQTT integration takes the JSON mapping of DownlinkCommand.
            body = json_format.MessageToJson(command, indent=None).encode()
            await client.publish(topic, body, qos=1, timeout_s=10)
        except MqttIntakeError as exc:
            # Not queued, so not on air: it must not count against the device's daily cap.
            self._budget.give_back(dev_eui, day)
            raise DownlinkRejectedError(f"broker did not take the downlink: {exc}") from exc
        self._count("downlinks_queued")
        log.info("downlink_queued", device=dev_eui, f_port=f_port, id=downlink_id, n=len(payload))
        return downlink_id

    def _oversized(
        self, message: IntakeMessage, report_error: ReportError, ack: Callable[[], None]
    ) -> None:
        """A message the intake skipped unread (too large): counted, reported, acknowledged.

        Acknowledged so the broker lets it go: kept, it would come back on every reconnect.
        """
        self._count("malformed")
        report_error(
            "malformed_message",
            f"{message.topic[:200]}: message of {message.oversized} bytes exceeds the intake's"
            f" limit of {MAX_PACKET_BYTES} bytes; dropped unread",
        )
        ack()

    async def _process(
        self,
        topic: str,
        payload: bytes,
        emit: Emit,
        report_error: ReportError,
        ack: Callable[[], None],
    ) -> None:
        try:
            parsed = self._parse(topic, payload, report_error)
        except CodecError as exc:
            self._count("malformed")
            report_error("malformed_message", str(exc))
            ack()
            return
        except EventValidationError as exc:
            # Parsed, but a field cannot be carried in an event (a NaN SNR in a protobuf
            # message, say): as malformed as a bad body, and it must not stop the loop.
            self._count("malformed")
            report_error("malformed_message", f"{topic[:200]}: {exc}")
            ack()
            return
        frame, items = (parsed.key, parsed.items) if isinstance(parsed, _Frame) else (None, parsed)
        if isinstance(parsed, _Frame) and parsed.duplicate:
            # A copy (another gateway's, or the broker's again after a reconnect) of a frame
            # whose events are not committed yet is acknowledged with the original: acked now,
            # a crash before that commit would lose the frame from both.
            waiting = self._uncommitted.get(parsed.key)
            if waiting is None:
                ack()
            else:
                waiting.append(ack)
            return
        if not items:
            ack()
            return
        if frame is not None:
            copies: list[Callable[[], None]] = []
            self._uncommitted[frame] = copies

            def settle(original: Callable[[], None] = ack) -> None:
                if self._uncommitted.get(frame) is copies:
                    del self._uncommitted[frame]
                original()
                for copy in copies:
                    copy()

            ack = settle
        for item in items[:-1]:
            await emit(item)
        await emit(items[-1], ack)

    def _parse(
        self, topic: str, payload: bytes, report_error: ReportError
    ) -> list[Reading | Event] | _Frame:
        application_id, dev_eui, event_type = parse_topic(topic)
        marshaler = self._broker.marshaler
        if event_type == "up" and (
            marshaler == "json" or (marshaler == "auto" and payload.lstrip()[:1] == b"{")
        ):
            # Most messages are uplinks: read the fields the source uses straight from the JSON
            # (see parse_uplink_json); anything unusual goes the full way below.
            uplink = parse_uplink_json(payload)
            if uplink is not None:
                if uplink.dev_eui and uplink.dev_eui != dev_eui:
                    raise CodecError(
                        f"device {dev_eui}: topic and deviceInfo.devEui ({uplink.dev_eui}) disagree"
                    )
                return self._uplink(application_id, dev_eui, uplink, report_error)
        parsed = parse_message(topic, payload, marshaler)
        try:
            if parsed.event_type == "up":
                full = uplink_from_message(parsed.message)
            else:
                ts = _message_time(parsed.message, datetime.fromtimestamp(self._clock(), UTC))
        except CodecError as exc:  # a time or an SNR out of range
            raise CodecError(f"device {parsed.dev_eui}: {parsed.event_type} event: {exc}") from exc
        if parsed.event_type == "up":
            return self._uplink(parsed.application_id, parsed.dev_eui, full, report_error)
        return self._items(parsed, ts)

    def _items(self, parsed: ChirpStackMessage, ts: datetime) -> list[Reading | Event]:
        """Events of the other event types (join, status, ack, txack, log)."""
        msg = parsed.message
        dev_eui = parsed.dev_eui
        # Downlinks go to the application the device last talked through.
        self._tracker.device(dev_eui).application_id = parsed.application_id
        self._count(f"{parsed.event_type}_events")
        if parsed.event_type == "join":
            self._tracker.joined(dev_eui)
            return [self._event("device_joined", dev_eui, ts, msg.deduplication_id, ())]
        if parsed.event_type == "status":
            battery = None if msg.battery_level_unavailable else float(msg.battery_level)
            # Built before the tracker keeps anything: a value no event can carry (a NaN
            # battery level) raises here and leaves the device's link state as it was.
            values = [Measurement("margin", msg.margin, "dB")]
            if battery is not None:
                values.append(Measurement("battery_level", round(battery, 2), "%"))
            values.append(Measurement("external_power", msg.external_power_source))
            self._tracker.status(dev_eui, battery, msg.margin)
            return [self._event("device_status", dev_eui, ts, msg.deduplication_id, values)]
        if parsed.event_type == "ack":
            values = [
                Measurement("acknowledged", msg.acknowledged),
                Measurement("f_cnt_down", msg.f_cnt_down),
                Measurement("queue_item_id", msg.queue_item_id[:64]),
            ]
            return [self._event("downlink_ack", dev_eui, ts, msg.deduplication_id, values)]
        if parsed.event_type == "txack":
            values = [
                Measurement("f_cnt_down", msg.f_cnt_down),
                Measurement("queue_item_id", msg.queue_item_id[:64]),
            ]
            return [self._event("downlink_txack", dev_eui, ts, msg.downlink_id, values)]
        # log: ChirpStack's own warnings about the device (codec errors, retransmissions, ...)
        level = integration_log_level(msg)
        values = [
            Measurement("code", integration_log_code(msg)),
            Measurement("description", msg.description[:256]),
        ]
        severity = _LOG_SEVERITY.get(level, Severity.INFO)
        key = f"log:{dev_eui}:{msg.time.seconds}:{msg.time.nanos}:{msg.code}"
        return [self._event("chirpstack_log", dev_eui, ts, key, values, severity=severity)]

    def _uplink(
        self, application_id: str, dev_eui: str, msg: Uplink, report_error: ReportError
    ) -> _Frame:
        now = self._clock()
        ts = msg.time or datetime.fromtimestamp(now, UTC)
        link_state = self._tracker.device(dev_eui)
        # Downlinks go to the application the device last talked through.
        link_state.application_id = application_id
        self._count("up_events")
        # deduplicationId names one radio frame however many gateways heard it; without it,
        # devEui + fCnt within the window does the same job.
        key = msg.deduplication_id or f"{dev_eui}:{msg.f_cnt}"
        frame = (dev_eui, msg.f_cnt)
        if self._tracker.is_duplicate(dev_eui, msg.f_cnt, msg.deduplication_id, now):
            self._count("duplicates")
            return _Frame(frame, [], duplicate=True)
        rule = self._catalog.match(dev_eui, msg.device_profile_name, msg.tags)
        if rule is None:
            self._count("unknown_device")
            report_error("unknown_device", f"device {dev_eui} ({msg.device_profile_name!r})")
            if dev_eui in self._unknown_reported:
                return _Frame(frame, [])
            self._unknown_reported.add(dev_eui)
            values = [Measurement("device_profile", msg.device_profile_name[:256])]
            unknown = self._event(
                "unknown_device", dev_eui, ts, key, values, severity=Severity.WARNING
            )
            return _Frame(frame, [unknown])
        self._rules[dev_eui] = rule
        if rule.expected_interval_s is not None:
            link_state.expected_interval_s = rule.expected_interval_s
        rssi, snr = msg.rssi, msg.snr
        findings = self._tracker.uplink(dev_eui, msg.f_cnt, rssi, snr, now)
        # Nearly always none: no comprehension to set up for them then.
        out: list[Reading | Event] = (
            [self._finding(f, ts, f"{key}:{f.kind}") for f in findings] if findings else []
        )
        try:
            decoded, flags = rule.profile.decode(msg.f_port, msg.data, msg.object, rule.params)
        except CodecError as exc:
            self._count("decode_errors")
            report_error("decode_error", f"device {dev_eui}: {exc}")
            error = [Measurement("f_port", msg.f_port), Measurement("error", str(exc)[:256])]
            out.append(
                self._event("decode_error", dev_eui, ts, key, error, severity=Severity.WARNING)
            )
            return _Frame(frame, out)
        link = [Measurement("f_cnt", msg.f_cnt)]
        if rssi is not None:
            link.append(Measurement("rssi", rssi, "dB[mW]"))
        if snr is not None:
            link.append(Measurement("snr", snr, "dB"))
        out.append(
            Reading(
                source=self.name,
                device=dev_eui,
                ts=ts,
                values=(*decoded, *link),
                quality=flags,
                event_id=stable_event_id(key, ts),
            )
        )
        return _Frame(frame, out)

    def _event(
        self,
        kind: str,
        dev_eui: str,
        ts: datetime,
        key: str,
        values: Sequence[Measurement],
        *,
        severity: Severity = Severity.INFO,
    ) -> Event:
        return Event(
            kind=kind,
            device=dev_eui,
            ts=ts,
            severity=severity,
            values=tuple(values),
            event_id=stable_event_id(f"{key}:{kind}", ts),
        )

    def _finding(self, finding: Finding, ts: datetime, key: str) -> Event:
        severity = Severity.INFO if finding.kind == "device_back" else Severity.WARNING
        return self._event(
            finding.kind, finding.dev_eui, ts, key, finding.values, severity=severity
        )

    async def _watch_silence(self, emit: Emit) -> None:
        # Restarted with every connection (a resumed session too): the schedule is the
        # source's, so frequent resumes do not keep postponing the check.
        loop = asyncio.get_running_loop()
        while True:
            if not self._next_silence_check:
                self._next_silence_check = loop.time() + _SILENT_CHECK_S
            await asyncio.sleep(max(0.0, self._next_silence_check - loop.time()))
            self._next_silence_check = loop.time() + _SILENT_CHECK_S
            now = self._clock()
            ts = datetime.fromtimestamp(now, UTC)
            for finding in self._tracker.check_silent(now):
                log.warning("device_silent", source=self.name, device=finding.dev_eui)
                event = self._finding(finding, ts, f"silent:{finding.dev_eui}:{int(now)}")
                # check_silent marked the device: cancelled mid-emit, the event must still go.
                await asyncio.shield(emit(event))


def integration_log_level(msg: Any) -> str:
    return _enum_name(msg, "level")


def integration_log_code(msg: Any) -> str:
    return _enum_name(msg, "code")


def _enum_name(msg: Any, field_name: str) -> str:
    # Protobuf enums are open: a newer ChirpStack (or a broken peer) can send a number this
    # chirpstack-api does not name. It is carried as the number, not a reason to fail.
    number = getattr(msg, field_name)
    value = msg.DESCRIPTOR.fields_by_name[field_name].enum_type.values_by_number.get(number)
    return str(value.name) if value is not None else str(number)
