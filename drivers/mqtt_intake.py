"""A lean MQTT 3.1.1 / 5 subscriber for high-rate intake from the local broker.

Why not aiomqtt here (it stays the upstream client): at ChirpStack's full rate the intake is the
gateway's hot path, and paho (under aiomqtt) costs 40-55 us of CPU per message on this class of
machine. It reads each packet with three or four ``recv`` calls, parses it field by field and runs
a callback chain per message; aiomqtt then queues every message in an unbounded queue, so a
broker pushing a backlog faster than the outbox commits grows the heap without limit (80+ MB in
bench/chirpstack_ingest.py's drain). This client:

* reads whatever the socket holds (asyncio reads up to 256 KiB at a time) and parses every
  complete packet in it in one pass, handing the consumer lists of messages, not one message
  per wake-up;
* acknowledges with PUBACKs that the consumer sends after its own commit, coalesced into one
  write per loop iteration;
* stops reading from the socket while more than ``max_unacked`` messages, or more than
  ``max_unacked_bytes`` of their payloads, are delivered but not acknowledged: TCP flow control
  then holds the rest at the broker (which queues them for the persistent session), so memory is
  bounded by the window, not by the backlog or by how large the messages are.

It implements only what the ChirpStack source needs: CONNECT (persistent session, credentials,
TLS through asyncio), SUBSCRIBE, receiving PUBLISH at QoS 0/1, PUBACK, publishing at QoS 1 (for
downlink commands), keepalive (PINGREQ/PINGRESP) and DISCONNECT. Pure asyncio; no logging here:
errors are raised to the caller, which names and counts them.

A PUBLISH larger than ``max_packet_bytes`` (default ``MAX_PACKET_BYTES``) is not buffered: its
payload is streamed past as it arrives and the consumer gets an :class:`IntakeMessage` with an
empty payload and ``oversized`` set to the packet's size, to count, report and acknowledge.
Failing the session instead would never end: the broker redelivers an unacknowledged QoS 1
message on every reconnect.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import struct
from collections import deque
from collections.abc import Callable
from typing import NamedTuple, Protocol

# MQTT 3.1.1 control packet types (high nibble of the fixed header).
_CONNECT = 0x10
_CONNACK = 0x20
_PUBLISH = 0x30
_PUBACK = 0x40
_SUBSCRIBE = 0x82  # the low nibble 0b0010 is mandatory for SUBSCRIBE (MQTT-3.8.1-1)
_SUBACK = 0x90
_PINGREQ = b"\xc0\x00"
_PINGRESP = 0xD0
_DISCONNECT = b"\xe0\x00"
_DUP = 0x08  # PUBLISH fixed-header flag: a resend of a message delivered before

# The protocol caps the remaining length at 268,435,455 bytes; ChirpStack events are a few KB.
# The default of ``max_packet_bytes``: a larger PUBLISH is not data the gateway can use. Its
# payload is skipped, never buffered, and the message is handed over marked ``oversized`` (see
# the module docstring). Any other packet that large is a broken peer and fails the session.
MAX_PACKET_BYTES = 1 << 20

# How long the oldest unacknowledged message may wait before the session is ended (see connect):
# the consumer acknowledges within milliseconds of its commit, so a minute means it never will.
DEFAULT_ACK_STALL_S = 60.0

# A read this large found that much waiting in the socket: the broker had more for us than we
# took, also when the window never filled (a process starved of CPU does not read at all).
_BACKLOG_READ = 128 * 1024

# Payload bytes received and not yet acknowledged before reading pauses (with max_unacked).
DEFAULT_MAX_UNACKED_BYTES = 16 * 1024 * 1024

MQTT_311 = 4
MQTT_5 = 5

CONNACK_REASONS = {
    1: "unacceptable protocol version",
    2: "client identifier rejected",
    3: "server unavailable",
    4: "bad user name or password",
    5: "not authorised",
    # MQTT 5 reason codes (§3.2.2.2)
    0x80: "unspecified error",
    0x81: "malformed packet",
    0x82: "protocol error",
    0x84: "unsupported protocol version",
    0x85: "client identifier not valid",
    0x86: "bad user name or password",
    0x87: "not authorised",
    0x88: "server unavailable",
    0x89: "server busy",
    0x8A: "banned",
    0x8C: "bad authentication method",
}
# Refusals a retry cannot fix: credentials and authorisation (3.1.1 and 5).
TERMINAL_CONNACK = frozenset({4, 5, 0x86, 0x87, 0x8A, 0x8C})


class MqttIntakeError(Exception):
    """The connection failed, dropped or broke the protocol; a reconnect may help."""


class MqttNoAnswerError(MqttIntakeError):
    """A request's acknowledgement (SUBACK, PUBACK) did not come in time."""


class MqttRefusedError(MqttIntakeError):
    """The broker answered CONNECT with a refusal (``rc``: the CONNACK return code)."""

    def __init__(self, rc: int) -> None:
        super().__init__(f"connection refused: {CONNACK_REASONS.get(rc, 'code')} ({rc})")
        self.rc = rc


# One per uplink: a NamedTuple is as immutable as a frozen dataclass and built 2-3x faster.
class IntakeMessage(NamedTuple):
    """One received PUBLISH. ``packet_id`` is 0 for QoS 0 (nothing to acknowledge).

    ``oversized`` is 0, or the packet's remaining length when it exceeded ``max_packet_bytes``:
    the payload was then skipped unread (``payload`` is empty), and acknowledging the message
    is what stops the broker from delivering it again.
    """

    topic: str
    payload: bytes
    qos: int
    packet_id: int
    oversized: int = 0


def _utf8(text: str) -> bytes:
    raw = text.encode()
    if len(raw) > 0xFFFF:
        raise ValueError(f"MQTT strings are at most 65,535 bytes (got: {len(raw)})")
    return struct.pack("!H", len(raw)) + raw


def _packet(first: int, body: bytes) -> bytes:
    """A control packet: fixed header with the variable-length remaining length, then body."""
    length = len(body)
    header = bytearray([first])
    while True:
        byte, length = length & 0x7F, length >> 7
        header.append(byte | (0x80 if length else 0))
        if not length:
            return bytes(header) + body


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def connect_packet(
    client_id: str,
    *,
    keepalive_s: int,
    clean_session: bool,
    username: str | None,
    password: str | None,
    version: int = 4,
    receive_maximum: int = 0,
    session_expiry_s: int = 0,
) -> bytes:
    """CONNECT for MQTT 3.1.1 (version 4) or 5 (with Receive Maximum and Session Expiry)."""
    flags = 0x02 if clean_session else 0
    payload = _utf8(client_id)
    if username is not None:
        flags |= 0x80
        payload += _utf8(username)
        if password is not None:
            flags |= 0x40
            payload += _utf8(password)
    head = _utf8("MQTT") + bytes([version, flags]) + struct.pack("!H", keepalive_s)
    if version == MQTT_5:
        props = b""
        if session_expiry_s:
            props += b"\x11" + struct.pack("!I", session_expiry_s)
        if receive_maximum:
            props += b"\x21" + struct.pack("!H", receive_maximum)
        head += _varint(len(props)) + props
    return _packet(_CONNECT, head + payload)


def puback(packet_id: int) -> bytes:
    return bytes((_PUBACK, 2, packet_id >> 8, packet_id & 0xFF))


class _Protocol(asyncio.Protocol):
    """One connection's byte stream: parsing, flow control and outstanding requests."""

    def __init__(
        self,
        max_unacked: int,
        version: int = MQTT_311,
        max_unacked_bytes: int = DEFAULT_MAX_UNACKED_BYTES,
        max_packet_bytes: int = MAX_PACKET_BYTES,
    ) -> None:
        self._loop = asyncio.get_running_loop()
        self.version = version
        self._max_unacked = max_unacked
        self._max_unacked_bytes = max_unacked_bytes
        self._max_packet_bytes = max_packet_bytes
        self._buf = bytearray()
        # Bytes of an oversized PUBLISH still to come, dropped as they arrive.
        self._skip = 0
        self._transport: asyncio.Transport | None = None
        # asyncio hands out a TransportSocket (a restricted view, not a socket.socket) that still
        # allows setsockopt; None for transports without one.
        self._sock: _SetSockOpt | None = None
        self._ready: list[IntakeMessage] = []
        self._waiter: asyncio.Future[None] | None = None
        self._error: MqttIntakeError | None = None
        self._paused = False
        self.unacked = 0
        # Payload bytes of those messages: a count alone would let 1000 messages of 1 MiB each
        # hold a gigabyte; reading also pauses beyond max_unacked_bytes.
        self.unacked_bytes = 0
        self._acks = bytearray()
        self._ack_scheduled = False
        # QoS 1 packet ids in the order their PUBLISHes arrived, and acknowledgements that came
        # before an earlier message's: PUBACKs go out in receive order (MQTT-4.6.0-2), while the
        # consumer acknowledges a malformed or duplicate message at once and a good one only
        # after its commit.
        self._arrived: deque[int] = deque()
        # An id is in flight at most once (the broker reuses it only after our PUBACK).
        self._early: set[int] = set()
        # When the oldest unacknowledged message became the oldest (see stalled_s).
        self._head_since = 0.0
        self.connack: asyncio.Future[tuple[int, bool]] = self._loop.create_future()
        # Requests we sent, by packet id: SUBACK (granted QoS list) or PUBACK (None).
        self.pending: dict[int, asyncio.Future[bytes]] = {}
        self.last_received = self._loop.time()
        self.server_keepalive_s: int | None = None
        self.closed: asyncio.Future[None] = self._loop.create_future()
        # Packet ids the broker numbered but never sent on this connection (see _sequence).
        self.skipped = 0
        self._expect_id = 0
        # QoS 1 messages that came marked DUP: sent again on this connection after a resume.
        self.resent = 0
        # batch() hands back an empty list once nothing is unacknowledged (see wake_when_idle).
        self.wake_when_idle = False
        # Whether reading ever paused on this connection, or a read found a backlog waiting:
        # the broker then had more for us than we took, and what TCP could not take waited at
        # the broker.
        self.fell_behind = False
        # One per PINGREQ sent, oldest first: the future of a drained() waiting for its
        # answer, None for a keepalive ping (see MqttIntake.drained).
        self.pongs: list[asyncio.Future[bytes] | None] = []
        # Requests whose caller waits for the answer before it consumes again: reading must
        # not pause in front of that answer (see pause_if_full).
        self.read_for: set[int] = set()

    # -- asyncio.Protocol ------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        sock = transport.get_extra_info("socket")
        self._sock = sock if hasattr(sock, "setsockopt") else None

    def data_received(self, data: bytes) -> None:
        if self._error is not None:
            # The stream is out of step (or the session is gone): parsing the kept buffer again
            # would deliver its messages a second time.
            return
        self.last_received = self._loop.time()
        self._quick_ack()
        if len(data) >= _BACKLOG_READ:
            self.fell_behind = True
        if self._skip:
            if len(data) <= self._skip:
                self._skip -= len(data)
                return
            data = data[self._skip :]
            self._skip = 0
        buf = self._buf
        buf += data
        try:
            used = self._parse(buf)
        except MqttIntakeError as exc:
            self._fail(exc)
            return
        if used:
            del buf[:used]

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(MqttIntakeError(f"connection lost: {exc}" if exc else "connection closed"))
        if not self.closed.done():
            self.closed.set_result(None)

    # -- parsing ---------------------------------------------------------------------------
    def _parse(self, buf: bytearray) -> int:
        """Handle every complete packet in ``buf``; returns how many bytes were used."""
        ready = self._ready
        before = len(ready)
        try:
            return self._split(buf, ready)
        finally:
            # Also when a packet was incomplete or broken: what reached ``ready`` is counted.
            if len(ready) > before:
                new = [m for m in ready[before:] if m.qos]
                if new and not self._arrived:
                    self._head_since = self._loop.time()
                self._arrived.extend(m.packet_id for m in new)
                self.unacked += len(new)
                self.unacked_bytes += sum(len(m.payload) for m in new)
                if self._waiter is not None and not self._waiter.done():
                    self._waiter.set_result(None)
                self.pause_if_full()

    def pause_if_full(self) -> None:
        """Stop reading while the window is full, unless a request waits for its answer.

        A kept session's backlog arrives before the SUBACK (and uplinks before a downlink's
        PUBACK); paused behind them, that answer would never be read while the messages wait for
        the subscription to be confirmed: a deadlock that a read boundary decided.
        """
        # Messages not yet taken by the consumer count too: QoS 0 ones are never acknowledged,
        # and without this a QoS 0 flood would queue here without bound.
        full = (
            self.unacked >= self._max_unacked
            or self.unacked_bytes >= self._max_unacked_bytes
            or len(self._ready) >= self._max_unacked
        )
        if full and not self._paused and not self.read_for and self._transport:
            self.fell_behind = True
            self._paused = True
            self._transport.pause_reading()

    @property
    def paused(self) -> bool:
        """Whether reading is paused (the window is full)."""
        return self._paused

    def _resume(self) -> None:
        assert self._transport is not None
        self._paused = False
        # Silence is timed from here: nothing could be read while paused (see _keepalive).
        self.last_received = self._loop.time()
        self._transport.resume_reading()

    def keep_reading(self) -> None:
        """Read on while a request is outstanding (see :meth:`pause_if_full`)."""
        if self._paused and self._transport:
            self._resume()

    def _split(self, buf: bytearray, ready: list[IntakeMessage]) -> int:
        pos, end = 0, len(buf)
        while end - pos >= 2:
            first = buf[pos]
            # Remaining length: 1-4 bytes, 7 bits each, least significant first.
            length, shift, i = 0, 0, pos + 1
            while True:
                if i >= end:
                    return pos
                byte = buf[i]
                length |= (byte & 0x7F) << shift
                i += 1
                if not byte & 0x80:
                    break
                shift += 7
                if shift > 21:
                    raise MqttIntakeError("malformed remaining length")
            kind = first & 0xF0
            stop = i + length
            if length > self._max_packet_bytes:
                if kind != _PUBLISH:
                    raise MqttIntakeError(
                        f"packet of {length} bytes exceeds {self._max_packet_bytes}"
                    )
                # Only the topic and packet id are kept (they fit: a topic is at most 64 KiB).
                head = self._publish_head(buf, first, i, min(stop, end))
                if head is None:
                    return pos
                topic, qos, packet_id, _start = head
                if qos:
                    self._sequence(first, packet_id)
                ready.append(IntakeMessage(topic, b"", qos, packet_id, oversized=length))
                if stop > end:
                    self._skip = stop - end
                    return end
                pos = stop
                continue
            if stop > end:
                return pos
            if kind == _PUBLISH:
                head = self._publish_head(buf, first, i, stop)
                if head is None:
                    raise MqttIntakeError("malformed PUBLISH: topic or packet id past its end")
                topic, qos, packet_id, start = head
                if qos:
                    self._sequence(first, packet_id)
                if self.version == MQTT_5:
                    # Properties (message expiry, content type, ...): nothing the intake uses.
                    start = _skip_properties(buf, start, stop)
                ready.append(IntakeMessage(topic, bytes(buf[start:stop]), qos, packet_id))
            else:
                self._control(kind, bytes(buf[i:stop]))
            pos = stop
        return pos

    def _sequence(self, first: int, packet_id: int) -> None:
        """Count the packet ids skipped before this first delivery of a QoS 1 message.

        mosquitto numbers a session's QoS 1 messages in sequence (1..65535, then 1 again) when
        it takes them for the session, and one it then drops is never sent: an id the sequence
        skips is an uplink the broker dropped for us (its queue for the session was full), or,
        with 2.0's cap on unsent packets per client, one whose packet it discarded while the
        message stays in flight for the session (sent again only on a resumed session). Those
        resends carry DUP and their old ids: counted as ``resent``, not in the sequence. Each
        connection starts the count afresh. A broker that numbers otherwise makes this count
        meaningless (and the ChirpStack source resume its session now and then for nothing),
        never the delivery wrong.
        """
        if first & _DUP:
            self.resent += 1
            return
        expected = self._expect_id
        if packet_id != expected and expected:
            gap = (packet_id - expected) % 0xFFFF
            # mosquitto's ids only move on; a step back (a broker handing out the lowest free
            # id, say) reads as a gap of more than half the range and is not counted.
            if gap < 0x8000:
                self.skipped += gap
        self._expect_id = packet_id % 0xFFFF + 1

    @staticmethod
    def _publish_head(
        buf: bytearray, first: int, i: int, stop: int
    ) -> tuple[str, int, int, int] | None:
        """(topic, QoS, packet id, where the rest starts) of a PUBLISH whose body starts at
        ``i``, or None when its topic and packet id do not end by ``stop``."""
        qos = (first >> 1) & 3
        if qos > 1:
            # We subscribe at QoS 1, so the broker downgrades; QoS 2 is a broken peer.
            raise MqttIntakeError("QoS 2 PUBLISH on a QoS 1 subscription")
        if i + 2 > stop:
            return None
        topic_len = (buf[i] << 8) | buf[i + 1]
        t_end = i + 2 + topic_len
        start = t_end + 2 if qos else t_end
        if start > stop:
            return None
        topic = buf[i + 2 : t_end].decode("utf-8", "replace")
        packet_id = (buf[t_end] << 8) | buf[t_end + 1] if qos else 0
        return topic, qos, packet_id, start

    def _control(self, kind: int, body: bytes) -> None:
        if kind == _CONNACK:
            # 3.1.1: flags, return code. 5: flags, reason code, properties (a refusing broker
            # that does not speak 5 answers in the 3.1.1 form, hence >= 2).
            if len(body) < 2:
                raise MqttIntakeError("malformed CONNACK")
            if self.version == MQTT_5 and len(body) > 2:
                self.server_keepalive_s = _server_keepalive(body, 2)
            if not self.connack.done():
                self.connack.set_result((body[1], bool(body[0] & 1)))
        elif kind in (_PUBACK, _SUBACK & 0xF0):
            if len(body) < 2:
                raise MqttIntakeError("malformed acknowledgement")
            rest = body[2:]
            if self.version == MQTT_5:
                if kind == _PUBACK:
                    rest = rest[:1]  # the reason code (absent: success), not the properties
                else:
                    rest = bytes(body[_skip_properties(body, 2, len(body)) :])
            future = self.pending.pop((body[0] << 8) | body[1], None)
            if future is not None and not future.done():
                future.set_result(rest)
        elif kind == _DISCONNECT[0] and self.version == MQTT_5:
            # MQTT 5 lets the broker say why it hangs up (session taken over, shutting down).
            code = body[0] if body else 0
            raise MqttIntakeError(f"broker disconnected: reason code 0x{code:02x}")
        elif kind == _PINGRESP:
            if self.pongs:
                pong = self.pongs.pop(0)
                if pong is not None and not pong.done():
                    pong.set_result(b"")
        else:
            raise MqttIntakeError(f"unexpected packet type {kind >> 4}")

    # -- consumer side ---------------------------------------------------------------------
    async def batch(self) -> list[IntakeMessage]:
        while not self._ready:
            if self._error is not None:
                raise self._error
            if self.wake_when_idle and not self.unacked:
                # Asked for: everything delivered is acknowledged, nothing waits (see
                # MqttIntake.wake_when_idle).
                self.wake_when_idle = False
                return []
            self._waiter = self._loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        ready, self._ready = self._ready, []
        self._resume_if_room()
        return ready

    def ack(self, packet_id: int, size: int = 0) -> None:
        """Queue a PUBACK (``size``: the message's payload bytes); all PUBACKs of one loop
        iteration go out in one write."""
        if self._error is not None:
            # The session is gone: the broker redelivers, and stable event ids make that a
            # duplicate receivers drop.
            return
        self.unacked_bytes -= size
        arrived = self._arrived
        if arrived and arrived[0] != packet_id and packet_id in arrived:
            # An earlier message is still being committed: this PUBACK waits for that one.
            self._early.add(packet_id)
            return
        self._send_ack(packet_id)
        early = self._early
        while early and arrived and arrived[0] in early:
            head = arrived[0]
            early.discard(head)
            self._send_ack(head)
        self._resume_if_room()
        if not self._ack_scheduled:
            self._ack_scheduled = True
            self._loop.call_soon(self._flush_acks)
        self._wake_if_idle()

    def _wake_if_idle(self) -> None:
        if self.wake_when_idle and not self.unacked:
            waiter = self._waiter
            if waiter is not None and not waiter.done():
                waiter.set_result(None)

    def _resume_if_room(self) -> None:
        """Read again once the window is half empty (hysteresis: not a pause per message)."""
        if (
            self._paused
            and self.unacked <= self._max_unacked // 2
            and self.unacked_bytes <= self._max_unacked_bytes // 2
            and len(self._ready) <= self._max_unacked // 2
            and self._transport
        ):
            self._resume()

    def stalled_s(self, now: float) -> float:
        """How long the oldest unacknowledged message has been waiting (0 when none waits)."""
        return now - self._head_since if self._arrived else 0.0

    def _send_ack(self, packet_id: int) -> None:
        if self._arrived and self._arrived[0] == packet_id:
            self._arrived.popleft()
            self._head_since = self._loop.time()
        self._acks += puback(packet_id)
        self.unacked -= 1

    def _flush_acks(self) -> None:
        self._ack_scheduled = False
        if self._acks and self._transport is not None and self._error is None:
            self._transport.write(bytes(self._acks))
        self._acks.clear()

    def send(self, data: bytes) -> None:
        if self._error is not None:
            raise self._error
        assert self._transport is not None
        self._transport.write(data)

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    def disconnecting(self) -> None:
        """After DISCONNECT: drop whatever still arrives, but read on to see the hang-up."""
        # What arrives now is unacknowledged and goes back to the kept session; parsing it
        # could pause reading again and hide the broker's EOF.
        self._fail(MqttIntakeError("session closed"))
        if self._transport is not None:
            self._transport.resume_reading()

    def abort(self, reason: str) -> None:
        self._fail(MqttIntakeError(reason))
        if self._transport is not None:
            self._transport.abort()

    def _fail(self, exc: MqttIntakeError) -> None:
        if self._error is None:
            self._error = exc
        for future in (self.connack, self._waiter, *self.pending.values(), *self.pongs):
            if future is not None and not future.done():
                future.set_exception(self._error)
                # Retrieved here so an unawaited request future does not log at collection.
                future.exception()
        self.pending.clear()
        self.read_for.clear()
        self.pongs.clear()

    def _quick_ack(self) -> None:
        # See drivers/chirpstack.py: the PUBACK waits for the outbox commit, so the TCP ACK has
        # nothing to ride on; with mosquitto's Nagle default a delayed ACK stalls the next
        # uplink by up to 40 ms. Linux clears TCP_QUICKACK by itself, hence once per read.
        if self._sock is not None and _QUICKACK is not None:
            with contextlib.suppress(OSError):
                self._sock.setsockopt(socket.IPPROTO_TCP, _QUICKACK, 1)


_QUICKACK: int | None = getattr(socket, "TCP_QUICKACK", None)


class _SetSockOpt(Protocol):
    def setsockopt(self, level: int, option: int, value: int, /) -> None: ...


def _property_length(buf: bytes | bytearray, pos: int, stop: int) -> tuple[int, int]:
    """An MQTT 5 property length (variable byte integer) at ``pos``: (length, first byte after)."""
    length, shift = 0, 0
    while True:
        if pos >= stop or shift > 21:
            raise MqttIntakeError("malformed properties")
        byte = buf[pos]
        pos += 1
        length |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return length, pos
        shift += 7


def _skip_properties(buf: bytes | bytearray, pos: int, stop: int) -> int:
    length, pos = _property_length(buf, pos, stop)
    if pos + length > stop:
        raise MqttIntakeError("malformed properties: longer than the packet")
    return pos + length


def _server_keepalive(body: bytes, pos: int) -> int | None:
    """Server Keep Alive (property 0x13) from CONNACK properties, if the broker set one."""
    length, pos = _property_length(body, pos, len(body))
    end = pos + length
    if end > len(body):
        raise MqttIntakeError("malformed CONNACK: properties longer than the packet")
    # Property identifiers and their value sizes (MQTT 5 §2.2.2.2), enough to walk a CONNACK.
    fixed = {
        0x11: 4,
        0x12: -1,
        0x13: 2,
        0x15: -1,
        0x16: -2,
        0x1A: -1,
        0x1C: -1,
        0x1F: -1,
        0x21: 2,
        0x22: 2,
        0x24: 1,
        0x25: 1,
        0x26: -3,
        0x27: 4,
        0x28: 1,
        0x29: 1,
        0x2A: 1,
    }
    while pos < end:
        ident = body[pos]
        pos += 1
        size = fixed.get(ident)
        if size is None:
            raise MqttIntakeError(f"malformed CONNACK: unknown property 0x{ident:02x}")
        value = pos
        if size > 0:
            pos += size
        elif size == -3:  # user property: two strings
            for _ in range(2):
                pos += 2 + int.from_bytes(body[pos : pos + 2], "big")
        else:  # a string or binary data
            pos += 2 + int.from_bytes(body[pos : pos + 2], "big")
        if pos > end:
            raise MqttIntakeError(f"malformed CONNACK: property 0x{ident:02x} past the end")
        if ident == 0x13:
            return int.from_bytes(body[value:pos], "big")
    return None


class MqttIntake:
    """One connected session; create with :meth:`connect`, end with :meth:`close`."""

    def __init__(
        self,
        protocol: _Protocol,
        keepalive_s: int,
        session_present: bool,
        ack_stall_s: float = DEFAULT_ACK_STALL_S,
    ) -> None:
        self._protocol = protocol
        self._keepalive_s = keepalive_s
        self._ack_stall_s = ack_stall_s
        self.session_present = session_present
        self._next_id = 0
        self._pinger = asyncio.create_task(self._keepalive(), name="mqtt-intake-keepalive")

    @classmethod
    async def connect(
        cls,
        host: str,
        port: int,
        client_id: str,
        *,
        username: str | None = None,
        password: str | None = None,
        clean_session: bool = False,
        keepalive_s: int = 60,
        tls_context: ssl.SSLContext | None = None,
        max_unacked: int = 2000,
        max_unacked_bytes: int = DEFAULT_MAX_UNACKED_BYTES,
        max_packet_bytes: int = MAX_PACKET_BYTES,
        ack_stall_s: float = DEFAULT_ACK_STALL_S,
        timeout_s: float = 10.0,
        version: int = MQTT_5,
        session_expiry_s: int = 0xFFFFFFFF,
        receive_maximum: int | None = None,
    ) -> MqttIntake:
        """Connect and wait for CONNACK; raises MqttRefusedError or MqttIntakeError.

        With MQTT 5 the client announces ``receive_maximum`` (default: ``max_unacked``) as its
        Receive Maximum, so the broker keeps that many messages in flight to it instead of its
        own ``max_inflight_messages`` (mosquitto's default, 20, made the commit round trip the
        ceiling: 20 uplinks per fsync). A Receive Maximum above ``max_unacked`` costs this
        process no memory in normal operation (reading still pauses at ``max_unacked``; the
        rest wait in TCP's buffers and at the broker) and lets the broker hold that many in
        flight before it starts queueing, and beyond its queue (``max_queued_messages``, 1000
        by default) dropping. While a request waits for its answer reading does not pause
        unless told otherwise (see :meth:`subscribe`). A PUBLISH over ``max_packet_bytes``
        arrives ``oversized`` (module docstring).
        When the oldest unacknowledged message has waited ``ack_stall_s`` (0: never) the session
        ends with an :class:`MqttIntakeError`: PUBACKs leave in receive order, so one message
        the consumer never settles would hold every later one, the window would fill and
        reading would stop for good; a new session gets all of them delivered again.
        A kept session (``clean_session=False``) lives ``session_expiry_s`` at the
        broker (MQTT 5 ends it at disconnect unless told otherwise; 0xFFFFFFFF: never).
        """
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout_s):
                _transport, protocol = await loop.create_connection(
                    lambda: _Protocol(max_unacked, version, max_unacked_bytes, max_packet_bytes),
                    host,
                    port,
                    ssl=tls_context,
                    server_hostname=host if tls_context is not None else None,
                )
        except (OSError, TimeoutError) as exc:
            reason = str(exc) or "timed out"  # TimeoutError has no message of its own
            raise MqttIntakeError(f"cannot connect to {host}:{port}: {reason}") from exc
        try:
            protocol.send(
                connect_packet(
                    client_id,
                    keepalive_s=keepalive_s,
                    clean_session=clean_session,
                    username=username,
                    password=password,
                    version=version,
                    receive_maximum=(
                        min(receive_maximum or max_unacked, 0xFFFF) if version == MQTT_5 else 0
                    ),
                    session_expiry_s=0 if clean_session or version != MQTT_5 else session_expiry_s,
                )
            )
            async with asyncio.timeout(timeout_s):
                rc, session_present = await protocol.connack
        except TimeoutError as exc:
            protocol.abort("no CONNACK")
            raise MqttIntakeError(f"{host}:{port} sent no CONNACK within {timeout_s} s") from exc
        except BaseException:
            protocol.abort("connect failed")
            raise
        if rc != 0:
            protocol.abort("refused")
            raise MqttRefusedError(rc)
        # MQTT 5: the broker may impose its own keepalive (Server Keep Alive), which then rules.
        keepalive_s = protocol.server_keepalive_s or keepalive_s
        return cls(protocol, keepalive_s, session_present, ack_stall_s)

    def _packet_id(self) -> int:
        # 1..65535, skipping ids still waiting for their acknowledgement.
        for _ in range(0xFFFF):
            self._next_id = self._next_id % 0xFFFF + 1
            if self._next_id not in self._protocol.pending:
                return self._next_id
        raise MqttIntakeError("no free packet identifier")

    async def _request(
        self, packet: Callable[[int], bytes], timeout_s: float, *, hold_reading: bool = True
    ) -> bytes:
        packet_id = self._packet_id()
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        protocol = self._protocol
        protocol.pending[packet_id] = future
        if hold_reading:
            protocol.read_for.add(packet_id)
            protocol.keep_reading()
        try:
            protocol.send(packet(packet_id))
            async with asyncio.timeout(timeout_s):
                return await future
        except TimeoutError as exc:
            raise MqttNoAnswerError(f"no acknowledgement within {timeout_s} s") from exc
        finally:
            protocol.pending.pop(packet_id, None)
            protocol.read_for.discard(packet_id)
            protocol.pause_if_full()

    async def subscribe(
        self, topic: str, qos: int = 1, timeout_s: float = 10.0, *, hold_reading: bool = True
    ) -> int:
        """Subscribe; returns the granted QoS (raises MqttIntakeError on refusal).

        A kept session's messages come before the SUBACK, so by default reading goes on past
        the window until it arrives: a caller that waits for it before consuming would
        otherwise never see it. ``hold_reading=False`` is for a caller that consumes meanwhile:
        the window then holds as always, and the SUBACK waits its turn behind the messages.
        """
        body = _utf8(topic) + bytes([qos])
        if self._protocol.version == MQTT_5:
            body = b"\x00" + body  # no properties; the options byte carries the QoS as in 3.1.1
        granted = await self._request(
            lambda pid: _packet(_SUBSCRIBE, struct.pack("!H", pid) + body),
            timeout_s,
            hold_reading=hold_reading,
        )
        if len(granted) != 1 or granted[0] > 2:
            raise MqttIntakeError(f"subscription to {topic} refused")
        return granted[0]

    async def publish(
        self, topic: str, payload: bytes, *, qos: int = 1, timeout_s: float = 10.0
    ) -> None:
        """Publish at QoS 0 or 1 (waiting for the PUBACK)."""
        head = _utf8(topic)
        props = b"\x00" if self._protocol.version == MQTT_5 else b""
        if qos == 0:
            self._protocol.send(_packet(_PUBLISH, head + props + payload))
            return
        # The consumer goes on meanwhile (a downlink is published from another task), so the
        # window holds: with a large Receive Maximum, reading on could take in thousands.
        reason = await self._request(
            lambda pid: _packet(_PUBLISH | 0x02, head + struct.pack("!H", pid) + props + payload),
            timeout_s,
            hold_reading=False,
        )
        # MQTT 5: a PUBACK may refuse (0x87 not authorised, 0x97 quota exceeded, ...).
        if reason and reason[0] >= 0x80:
            raise MqttIntakeError(f"publish to {topic} refused: reason code 0x{reason[0]:02x}")

    async def batch(self) -> list[IntakeMessage]:
        """The messages received since the last call (waits for at least one)."""
        return await self._protocol.batch()

    def acker(self, message: IntakeMessage) -> Callable[[], None]:
        """What acknowledges ``message`` (a no-op at QoS 0 or once this session is gone)."""
        if not message.qos:
            return _nothing
        protocol, packet_id, size = self._protocol, message.packet_id, len(message.payload)
        return lambda: protocol.ack(packet_id, size)

    @property
    def unacked(self) -> int:
        return self._protocol.unacked

    async def drained(self, timeout_s: float = 2.0) -> bool:
        """Whether the broker has read everything sent so far (PUBACKs above all), waited for
        with a PINGREQ: the broker answers packets of a connection in order. False if no answer
        came within ``timeout_s``.

        Before a session is resumed on another connection: mosquitto reads a connection a
        packet at a time, so the new CONNECT could take the session over before it read the
        last PUBACKs of the old one, and it would send those messages again.
        """
        protocol = self._protocol
        protocol._flush_acks()
        pong: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        protocol.pongs.append(pong)
        try:
            protocol.send(_PINGREQ)
            async with asyncio.timeout(timeout_s):
                await pong
        except (TimeoutError, MqttIntakeError):
            return False
        return True

    @property
    def fell_behind(self) -> bool:
        """Whether reading paused on this connection because the window was full, or a read
        found a backlog waiting in the socket."""
        return self._protocol.fell_behind

    @property
    def resent(self) -> int:
        """QoS 1 messages this connection received marked DUP (sent before, not acknowledged)."""
        return self._protocol.resent

    def wake_when_idle(self) -> None:
        """Let the next :meth:`batch` that finds nothing to hand over, with every delivered
        message acknowledged, return an empty list instead of waiting (once)."""
        self._protocol.wake_when_idle = True
        self._protocol._wake_if_idle()

    @property
    def skipped(self) -> int:
        """Uplinks the broker numbered for this session but dropped instead of sending them on
        this connection, as far as its packet ids tell (see ``_Protocol._sequence``)."""
        return self._protocol.skipped

    async def _keepalive(self) -> None:
        """PINGREQ every half keepalive, and the two watchdogs: broker silence, stalled acks."""
        keepalive_s, stall_s = self._keepalive_s, self._ack_stall_s
        periods = [p for p in (keepalive_s / 2, stall_s / 4) if p > 0]
        if not periods:
            return
        protocol = self._protocol
        loop = asyncio.get_running_loop()
        next_ping = loop.time() + keepalive_s / 2
        while True:
            await asyncio.sleep(min(periods))
            now = loop.time()
            waited = protocol.stalled_s(now)
            if stall_s > 0 and waited > stall_s:
                protocol.abort(
                    f"the oldest of {protocol.unacked} unacknowledged messages waited"
                    f" {waited:.0f} s for its acknowledgement (limit {stall_s:g} s); a new"
                    " session gets them delivered again"
                )
                return
            if keepalive_s <= 0 or now < next_ping:
                continue
            next_ping = now + keepalive_s / 2
            # The broker answers every PINGREQ; silence for a whole keepalive means the link is
            # dead even if TCP has not noticed (a pulled cable keeps a socket "open" for hours).
            # Not while reading is paused: the answer then waits unread in the socket (a
            # consumer that stops settling messages is the stall watchdog's to name).
            if now - protocol.last_received > keepalive_s and not protocol.paused:
                protocol.abort(f"no packet from the broker for {keepalive_s} s")
                return
            with contextlib.suppress(MqttIntakeError):
                protocol.send(_PINGREQ)
                protocol.pongs.append(None)  # answered in order: see drained()

    async def close(self) -> None:
        """DISCONNECT (so the broker drops no Will and keeps the session) and close."""
        self._pinger.cancel()
        with contextlib.suppress(MqttIntakeError, asyncio.CancelledError):
            await self._pinger
        # PUBACKs queued for this loop iteration go out ahead of DISCONNECT, or the broker would
        # redeliver messages already committed (awaiting a finished pinger does not yield).
        self._protocol._flush_acks()
        with contextlib.suppress(MqttIntakeError, AssertionError):
            self._protocol.send(_DISCONNECT)
            # The broker reads the PUBACKs ahead of the DISCONNECT, then hangs up. Closing first
            # lets a prompt reconnect with the same client id take the session over before the
            # broker read them (mosquitto reads one packet per wake-up): it would redeliver them.
            self._protocol.disconnecting()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(2.0):
                    await asyncio.shield(self._protocol.closed)
        self._protocol.close()  # a no-op after the hang-up; cuts a stuck broker off
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(2.0):
                await asyncio.shield(self._protocol.closed)


def _nothing() -> None:
    return None
