"""drivers.mqtt_intake: against a real mosquitto, fake peers for what a broker never sends, and
hypothesis on the parser; the broker tests run once per protocol version (3.1.1 and 5).

Broker tests publish with aiomqtt (an independent MQTT implementation) where the intake is the
receiver, so a symmetric encode/decode mistake cannot hide. Nothing here waits on a clock: every
wait ends on an event (a batch, a PINGRESP, a closed connection); ``GUARD_S`` only turns a hang
into a failure. The keepalive tests wait for the keepalive machinery itself to act, which takes
1-2 s of wall time by design.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import socket
import ssl
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from drivers.mqtt_intake import (
    MAX_PACKET_BYTES,
    MQTT_5,
    MQTT_311,
    IntakeMessage,
    MqttIntake,
    MqttIntakeError,
    MqttRefusedError,
    _Protocol,
)
from tests.support.mosquitto import Mosquitto, Recorder, require_mosquitto

HOST = "127.0.0.1"
# Hang guard only: every wait ends on an event long before this.
GUARD_S = 30.0
# What one read can hand the protocol: asyncio's selector transports recv() at most this much.
READ_BYTES = 256 * 1024

broker = pytest.mark.broker


# -- independent MQTT encoding (not the module's own, so its decoder is checked against ours) ---


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        n, byte = divmod(n, 128)
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def mqtt_str(text: str) -> bytes:
    raw = text.encode()
    return len(raw).to_bytes(2, "big") + raw


def publish_packet(
    topic: str,
    payload: bytes,
    qos: int,
    packet_id: int = 0,
    *,
    dup: bool = False,
    retain: bool = False,
    props: bytes | None = None,
) -> bytes:
    """A PUBLISH; ``props`` (MQTT 5 only) are the property bytes after their length."""
    first = 0x30 | (qos << 1) | (0x08 if dup else 0) | (0x01 if retain else 0)
    body = mqtt_str(topic) + (packet_id.to_bytes(2, "big") if qos else b"")
    if props is not None:
        body += varint(len(props)) + props
    return bytes([first]) + varint(len(body + payload)) + body + payload


def packet_like(first: int, body: bytes) -> bytes:
    return bytes([first]) + varint(len(body)) + body


CONNACK_OK = b"\x20\x02\x00\x00"
CONNACK_5_OK = b"\x20\x03\x00\x00\x00"  # with an empty property list
PINGRESP = b"\xd0\x00"
PINGREQ = b"\xc0\x00"


# -- helpers ------------------------------------------------------------------------------------


async def collect(
    intake: MqttIntake, count: int, *, ack: bool = True, batches: list[int] | None = None
) -> list[IntakeMessage]:
    """Batches until ``count`` messages arrived (acking them unless told not to)."""
    messages: list[IntakeMessage] = []
    async with asyncio.timeout(GUARD_S):
        while len(messages) < count:
            batch = await intake.batch()
            if batches is not None:
                batches.append(len(batch))
            if ack:
                for message in batch:
                    intake.acker(message)()
            messages += batch
    return messages


async def collect_until(intake: MqttIntake, last_payload: bytes) -> list[IntakeMessage]:
    """Batches (acked) up to and including the message carrying ``last_payload``."""
    messages: list[IntakeMessage] = []
    async with asyncio.timeout(GUARD_S):
        while not messages or messages[-1].payload != last_payload:
            for message in await intake.batch():
                intake.acker(message)()
                messages.append(message)
    return messages


async def open_intake(
    port: int, client_id: str = "intake", *, version: int, **kwargs: Any
) -> MqttIntake:
    """Every test connects through here, naming the protocol version it speaks."""
    return await MqttIntake.connect(HOST, port, client_id, version=version, **kwargs)


async def connected(
    port: int, client_id: str = "intake", *, version: int, **kwargs: Any
) -> MqttIntake:
    intake = await open_intake(port, client_id, version=version, **kwargs)
    assert await intake.subscribe("t/#") == 1
    return intake


@pytest.fixture(params=[MQTT_311, MQTT_5], ids=["mqtt311", "mqtt5"])
def version(request: pytest.FixtureRequest) -> int:
    """The protocol version a broker test speaks (each runs with both)."""
    v: int = request.param
    return v


@asynccontextmanager
async def publisher(port: int) -> AsyncIterator[aiomqtt.Client]:
    # paho queues QoS 1 publishes beyond its in-flight limit but sends QoS 0 at once, which
    # reorders a concurrent burst before it reaches the broker; a large limit keeps call order.
    async with aiomqtt.Client(
        HOST, port, identifier="publisher", max_inflight_messages=0xFFFF
    ) as client:
        yield client


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def asyncio_errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    # asyncio logs "Fatal error: protocol.data_received() call failed" when a protocol raises
    # anything: the parser must turn bad input into MqttIntakeError itself.
    return [r.getMessage() for r in caplog.records if r.name == "asyncio"]


# -- a fake peer for what a broker never sends ------------------------------------------------


class FakeBroker:
    """An asyncio server on 127.0.0.1 that answers the CONNECT with ``reply`` and then listens.

    It answers a SUBSCRIBE with ``suback`` as the return code when given, and nothing else: no
    PINGRESP, no PUBACK. Packets sent to it must be short (a one-byte remaining length).
    """

    def __init__(
        self, reply: bytes, *, close_after_reply: bool = False, suback: int | None = None
    ) -> None:
        self.reply = reply
        self.close_after_reply = close_after_reply
        self.suback = suback
        self.received = bytearray()
        self.port = 0
        self.transports: list[asyncio.Transport] = []
        self.lost = 0
        self._changed = asyncio.Event()

    def protocol(self) -> asyncio.Protocol:
        return _FakePeer(self)

    def bump(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def wait_for(self, condition: Callable[[], bool]) -> None:
        async with asyncio.timeout(GUARD_S):
            while not condition():
                await self._changed.wait()


class _FakePeer(asyncio.Protocol):
    def __init__(self, fake: FakeBroker) -> None:
        self.fake = fake
        self.buf = bytearray()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.fake.transports.append(transport)

    def data_received(self, data: bytes) -> None:
        self.fake.received += data
        self.buf += data
        while len(self.buf) >= 2 and len(self.buf) >= 2 + self.buf[1]:
            assert self.buf[1] < 128, bytes(self.buf)
            size = 2 + self.buf[1]
            packet, self.buf = bytes(self.buf[:size]), self.buf[size:]
            self.handle(packet)
        self.fake.bump()

    def handle(self, packet: bytes) -> None:
        if packet[0] == 0x10:
            if self.fake.reply:
                self.transport.write(self.fake.reply)
            if self.fake.close_after_reply:
                self.transport.close()
        elif packet[0] == 0x82 and self.fake.suback is not None:
            self.transport.write(b"\x90\x03" + packet[2:4] + bytes([self.fake.suback]))
        elif packet[0] == 0xE0:  # DISCONNECT: hang up, as a broker does
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.fake.lost += 1
        self.fake.bump()


@asynccontextmanager
async def fake_broker(
    reply: bytes, *, close_after_reply: bool = False, suback: int | None = None
) -> AsyncIterator[FakeBroker]:
    fake = FakeBroker(reply, close_after_reply=close_after_reply, suback=suback)
    server = await asyncio.get_running_loop().create_server(fake.protocol, HOST, 0)
    fake.port = server.sockets[0].getsockname()[1]
    try:
        yield fake
    finally:
        server.close()
        for transport in fake.transports:
            transport.abort()
        await server.wait_closed()


# -- receiving from a real broker ---------------------------------------------------------------


@broker
async def test_receives_qos1_and_qos0_with_topics_payloads_and_packet_ids(
    mosquitto: Mosquitto, version: int
) -> None:
    intake = await connected(mosquitto.port, clean_session=True, version=version)
    assert intake.session_present is False
    try:
        async with publisher(mosquitto.port) as pub:
            await pub.publish("t/a", b"one", qos=1)
            await pub.publish("t/b/c", b"", qos=0)
            await pub.publish("t/\u00e9t\u00e9", bytes(range(256)), qos=1)
            await pub.publish("elsewhere", b"not subscribed", qos=1)
            await pub.publish("t/end", b"\x00end", qos=0)
        got = await collect(intake, 4, ack=False)
        assert [(m.topic, m.payload, m.qos) for m in got] == [
            ("t/a", b"one", 1),
            ("t/b/c", b"", 0),
            ("t/\u00e9t\u00e9", bytes(range(256)), 1),
            ("t/end", b"\x00end", 0),
        ]
        qos1_ids = [m.packet_id for m in got if m.qos == 1]
        assert all(1 <= pid <= 0xFFFF for pid in qos1_ids)
        assert len(set(qos1_ids)) == 2
        assert [m.packet_id for m in got if m.qos == 0] == [0, 0]
        # Only QoS 1 messages wait for an acknowledgement; QoS 0 ackers are no-ops.
        assert intake.unacked == 2
        for message in got:
            intake.acker(message)()
        assert intake.unacked == 0
    finally:
        await intake.close()


@broker
async def test_the_socket_acknowledges_reads_at_once(mosquitto: Mosquitto, version: int) -> None:
    # The PUBACK waits for the outbox commit; without TCP_QUICKACK the kernel delays the TCP
    # ACK and a broker with Nagle on (mosquitto's default) holds the next uplinks back until
    # the PUBACK: 24 ms clumps at 300 uplinks/s. The option needs the transport's socket.
    intake = await connected(mosquitto.port, clean_session=True, version=version)
    try:
        # Before this was checked, an isinstance(socket.socket) test quietly left it None.
        assert intake._protocol._sock is not None
    finally:
        await intake.close()


@broker
async def test_a_qos0_subscription_gets_qos1_publishes_downgraded(
    mosquitto: Mosquitto, version: int
) -> None:
    intake = await open_intake(mosquitto.port, "intake-qos0", version=version)
    try:
        assert await intake.subscribe("t/#", qos=0) == 0
        async with publisher(mosquitto.port) as pub:
            await pub.publish("t/x", b"down", qos=1)
        [message] = await collect(intake, 1)
        assert (message.topic, message.payload, message.qos, message.packet_id) == (
            "t/x",
            b"down",
            0,
            0,
        )
        assert intake.unacked == 0
    finally:
        await intake.close()


@broker
async def test_messages_larger_than_a_read_arrive_whole_and_in_order(
    mosquitto: Mosquitto, version: int
) -> None:
    # 700 KB needs at least three reads; small messages between them share reads with their tails.
    big = [bytes([i]) * 700_000 for i in range(3)]
    sent = [b"s0", big[0], b"s1", b"s2", big[1], big[2], b"s3"]
    intake = await connected(mosquitto.port, version=version)
    try:
        async with publisher(mosquitto.port) as pub:
            await asyncio.gather(*(pub.publish("t/big", p, qos=1) for p in sent))
        got = await collect(intake, len(sent))
        assert [m.payload for m in got] == sent
    finally:
        await intake.close()


@broker
async def test_a_burst_of_thousands_arrives_complete_and_in_order(
    mosquitto: Mosquitto, version: int
) -> None:
    count = 3000
    sent = [f"m{i:05d}".encode() for i in range(count)]
    intake = await connected(mosquitto.port, version=version)
    # Reading is held while the burst is published, so the broker's writes pile up in the
    # socket and reach the parser many packets per read (the batched path under test).
    transport = intake._protocol._transport
    assert transport is not None
    transport.pause_reading()
    batches: list[int] = []
    try:
        async with publisher(mosquitto.port) as pub:
            await asyncio.gather(
                *(pub.publish("t/burst", p, qos=1 if i % 3 else 0) for i, p in enumerate(sent))
            )
        transport.resume_reading()
        got = await collect(intake, count, batches=batches)
        # MQTT orders messages per QoS level only: the broker holds QoS 1 beyond its in-flight
        # limit while QoS 0 goes straight through.
        for qos in (0, 1):
            assert [m.payload for m in got if m.qos == qos] == [
                p for i, p in enumerate(sent) if (1 if i % 3 else 0) == qos
            ]
        assert max(batches) > 1, batches
        assert intake.unacked == 0
    finally:
        await intake.close()


@broker
async def test_a_publish_over_the_size_limit_is_skipped_marked_and_acked_away(
    mosquitto: Mosquitto, version: int
) -> None:
    # Failing the session on it would never end: the broker redelivers an unacknowledged QoS 1
    # message on every reconnect. The intake streams past the payload and hands over a marker.
    size = MAX_PACKET_BYTES + 1
    intake = await connected(mosquitto.port, "oversize", version=version)
    try:
        async with publisher(mosquitto.port) as pub:
            await pub.publish("t/small", b"ok", qos=1)
            await pub.publish("t/huge", b"x" * size, qos=1)
            await pub.publish("t/after", b"still here", qos=1)
        got = await collect(intake, 3)
        assert [(m.topic, m.payload, m.qos, m.oversized) for m in got[:1] + got[2:]] == [
            ("t/small", b"ok", 1, 0),
            ("t/after", b"still here", 1, 0),
        ]
        huge = got[1]
        assert (huge.topic, huge.payload, huge.qos) == ("t/huge", b"", 1)
        # The packet's remaining length: topic, packet id (and MQTT 5's empty properties).
        assert huge.oversized == size + 2 + len("t/huge") + 2 + (1 if version == MQTT_5 else 0)
        assert 1 <= huge.packet_id <= 0xFFFF
        assert intake.unacked == 0
    finally:
        await intake.close()
    # Acknowledged: the kept session does not hand it over again.
    intake = await open_intake(mosquitto.port, "oversize", clean_session=False, version=version)
    try:
        assert intake.session_present is True
        async with publisher(mosquitto.port) as pub:
            await pub.publish("t/marker", b"marker", qos=1)
        again = await collect_until(intake, b"marker")
        assert [m.topic for m in again] == ["t/marker"]
    finally:
        await intake.close()


# -- sessions and acknowledgements ----------------------------------------------------------


@broker
async def test_a_persistent_session_keeps_what_was_published_while_away(
    mosquitto: Mosquitto, version: int
) -> None:
    intake = await connected(mosquitto.port, "keeper", version=version)
    assert intake.session_present is False
    await intake.close()

    away = [f"away-{i}".encode() for i in range(5)]
    async with publisher(mosquitto.port) as pub:
        for payload in away:
            await pub.publish("t/away", payload, qos=1)

    # No new SUBSCRIBE: the broker kept the subscription with the session.
    intake = await open_intake(mosquitto.port, "keeper", clean_session=False, version=version)
    try:
        assert intake.session_present is True
        got = await collect(intake, len(away))
        assert [(m.topic, m.payload, m.qos) for m in got] == [
            (
                "t/away",
                p,
                1,
            )
            for p in away
        ]
    finally:
        await intake.close()


@broker
@pytest.mark.parametrize("keepalive_s", [60, 0])
async def test_unacked_messages_come_back_after_reconnect_and_acked_ones_do_not(
    mosquitto: Mosquitto, version: int, keepalive_s: int
) -> None:
    sent = [f"m{i}".encode() for i in range(10)]
    intake = await connected(mosquitto.port, "acker", keepalive_s=keepalive_s, version=version)
    async with publisher(mosquitto.port) as pub:
        for payload in sent:
            await pub.publish("t/ack", payload, qos=1)
        first = await collect(intake, len(sent), ack=False)
        assert [m.payload for m in first] == sent
        # m5 and m2 out of order, m3 never: PUBACKs leave in receive order (MQTT-4.6.0-2), so
        # m0-m2 go out and m5's waits behind m3's.
        for i in (1, 5, 2, 0):
            intake.acker(first[i])()
        assert intake.unacked == 7
        # Acks given right before close() must still reach the broker ahead of DISCONNECT.
        await intake.close()

        intake = await open_intake(
            mosquitto.port, "acker", clean_session=False, keepalive_s=keepalive_s, version=version
        )
        try:
            assert intake.session_present is True
            # The broker resends in-flight messages before anything new: everything it
            # redelivers arrives before this marker.
            await pub.publish("t/ack", b"marker", qos=1)
            again = await collect_until(intake, b"marker")
        finally:
            await intake.close()
    # Redelivered (DUP) with the same packet identifiers, as MQTT-4.4.0-1 requires: m3 and
    # everything after it, m5 too (its PUBACK was still waiting for m3's).
    assert [(m.payload, m.packet_id) for m in again[:-1]] == [
        (m.payload, m.packet_id) for m in first[3:]
    ]


async def test_a_message_never_acknowledged_ends_the_session_and_comes_back(
    mosquitto: Mosquitto, version: int
) -> None:
    # The consumer settles m1 and m2 but never m0 (a bug, an outbox that cannot commit): with
    # PUBACKs in receive order nothing would ever leave again. The watchdog ends the session
    # and the next one gets all three.
    intake = await connected(mosquitto.port, "staller", version=version, ack_stall_s=0.5)
    async with publisher(mosquitto.port) as pub:
        for i in range(3):
            await pub.publish("t/stall", f"m{i}".encode(), qos=1)
        first = await collect(intake, 3, ack=False)
        for message in first[1:]:
            intake.acker(message)()
        with pytest.raises(MqttIntakeError, match=r"the oldest of 3 unacknowledged messages waite"):
            async with asyncio.timeout(GUARD_S):
                while True:
                    await intake.batch()
        await intake.close()
        intake = await open_intake(mosquitto.port, "staller", clean_session=False, version=version)
        try:
            await pub.publish("t/stall", b"marker", qos=1)
            again = await collect_until(intake, b"marker")
        finally:
            await intake.close()
    assert [m.payload for m in again] == [b"m0", b"m1", b"m2", b"marker"]


async def test_a_paused_intake_is_not_taken_for_a_dead_link(
    mosquitto: Mosquitto, version: int
) -> None:
    # Window full (2), nothing acknowledged: reading pauses, so the PINGRESPs of a 1 s keepalive
    # wait unread. That is not silence from the broker; the stall watchdog is what ends it.
    intake = await connected(
        mosquitto.port, "paused", version=version, keepalive_s=1, max_unacked=2, ack_stall_s=3.5
    )
    try:
        async with publisher(mosquitto.port) as pub:
            for i in range(4):
                await pub.publish("t/paused", f"m{i}".encode(), qos=1)
            await collect(intake, 2, ack=False)
            with pytest.raises(MqttIntakeError, match=r"unacknowledged messages waited"):
                async with asyncio.timeout(GUARD_S):
                    while True:
                        await intake.batch()
    finally:
        await intake.close()


@broker
async def test_reading_pauses_beyond_max_unacked_and_resumes_after_acks(
    tmp_path: Path, version: int
) -> None:
    require_mosquitto()
    # No in-flight limit at the broker (the shared default is 1000): the intake's window is the
    # only thing holding messages back.
    with Mosquitto(tmp_path / "b", extra_config=["max_inflight_messages 0"]) as big_window:
        await _flow_control(big_window.port, version)


async def _flow_control(port: int, version: int) -> None:
    window, count, size = 100, 2000, 1024
    packet = len(publish_packet("t/flow", b"x" * size, 1, 1))
    # Reading stops once a read takes the count to the window or past it.
    bound = window - 1 + READ_BYTES // packet + 1
    assert bound < count
    sent = [f"{i:06d}".encode().ljust(size, b".") for i in range(count)]
    intake = await connected(port, "flow", max_unacked=window, version=version)
    transport = intake._protocol._transport
    assert transport is not None
    try:
        async with publisher(port) as pub:
            await asyncio.gather(*(pub.publish("t/flow", p, qos=1) for p in sent))
            # Every message is at the broker now; none is acknowledged by the intake yet.
            held: list[IntakeMessage] = []
            async with asyncio.timeout(GUARD_S):
                while not held or intake.unacked < window:
                    held += await intake.batch()
            assert not transport.is_reading()
            assert intake.unacked == len(held)
            if version == MQTT_5:
                # The window went out as the Receive Maximum: the broker itself stops there.
                assert len(held) == window
            else:
                assert window <= len(held) <= bound, (len(held), bound)
            assert [m.payload for m in held] == sent[: len(held)]

            got = list(held)
            for message in held:
                intake.acker(message)()
            async with asyncio.timeout(GUARD_S):
                while len(got) < count:
                    batch = await intake.batch()
                    assert intake.unacked <= bound
                    got += batch
                    for message in batch:
                        intake.acker(message)()
            assert [m.payload for m in got] == sent
            assert intake.unacked == 0
    finally:
        await intake.close()


# -- connecting -------------------------------------------------------------------------------


@broker
@pytest.mark.parametrize(
    ("username", "password"), [("gw", "wrong-password"), (None, None), ("nobody", "x")]
)
async def test_refused_credentials_raise_refused_with_the_return_code(
    tmp_path: Path, version: int, username: str | None, password: str | None
) -> None:
    require_mosquitto(passwd=True)
    with Mosquitto(tmp_path / "b", users={"gw": "right-password"}) as locked:
        with pytest.raises(MqttRefusedError) as refused:
            await open_intake(
                locked.port, "intake", username=username, password=password, version=version
            )
        # Bad user name or password, or not authorised: 3.1.1's codes or 5's reason codes.
        assert refused.value.rc in ((4, 5) if version == MQTT_311 else (0x86, 0x87))
        assert f"({refused.value.rc})" in str(refused.value)
        intake = await open_intake(
            locked.port, "intake", username="gw", password="right-password", version=version
        )
        await intake.close()


async def test_nothing_listening_names_host_and_port() -> None:
    port = free_port()
    with pytest.raises(MqttIntakeError, match=f"{HOST}:{port}") as failed:
        await open_intake(port, "intake", version=MQTT_5)
    assert not isinstance(failed.value, MqttRefusedError)


async def test_a_connect_that_never_completes_says_it_timed_out(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The outermost edge faked: a TCP handshake that never finishes (a black-holed address).
    loop = asyncio.get_running_loop()

    async def never(*_args: Any, **_kwargs: Any) -> Any:
        await loop.create_future()

    monkeypatch.setattr(loop, "create_connection", never)
    with pytest.raises(MqttIntakeError, match=rf"cannot connect to {HOST}:1883: timed out$"):
        await open_intake(1883, "intake", timeout_s=0.05, version=MQTT_5)


@broker
async def test_a_killed_broker_fails_batch(mosquitto: Mosquitto, version: int) -> None:
    intake = await connected(mosquitto.port, version=version)
    try:
        async with publisher(mosquitto.port) as pub:
            await pub.publish("t/live", b"alive", qos=1)
        await collect(intake, 1)
        waiting = asyncio.create_task(intake.batch())
        mosquitto.kill()
        # Ends on the closed connection, long before the 60 s keepalive could notice.
        with pytest.raises(MqttIntakeError, match="connection"):
            async with asyncio.timeout(GUARD_S):
                await waiting
    finally:
        await intake.close()


@broker
async def test_a_session_taken_over_fails_batch(mosquitto: Mosquitto, version: int) -> None:
    first = await connected(mosquitto.port, "twin", version=version)
    try:
        waiting = asyncio.create_task(first.batch())
        second = await open_intake(mosquitto.port, "twin", version=version)
        await second.close()
        # The broker hangs up on the first; under MQTT 5 it may say why first (0x8E: session
        # taken over; mosquitto 2.0.11 does not, the fake-peer test covers that DISCONNECT).
        with pytest.raises(MqttIntakeError, match=r"connection closed|reason code 0x8e"):
            async with asyncio.timeout(GUARD_S):
                await waiting
    finally:
        await first.close()


@broker
async def test_a_publish_the_broker_refuses_raises_under_mqtt5(tmp_path: Path) -> None:
    require_mosquitto()
    acl = tmp_path / "acl"
    acl.write_text("topic read t/#\n")
    with Mosquitto(tmp_path / "b", extra_config=[f"acl_file {acl}"]) as guarded:
        intake = await open_intake(guarded.port, version=MQTT_5)
        try:
            with pytest.raises(MqttIntakeError, match="publish to t/x refused: reason code 0x87"):
                await intake.publish("t/x", b"denied")
            assert intake._protocol.pending == {}
            # A refused publish is an answer, not a broken session.
            assert await intake.subscribe("t/#") == 1
        finally:
            await intake.close()


@broker
async def test_publish_qos1_waits_for_puback_and_reaches_a_subscriber(
    mosquitto: Mosquitto, version: int
) -> None:
    async with Recorder(HOST, mosquitto.port, topics=["down/#"]) as rec:
        intake = await open_intake(mosquitto.port, "downlinker", version=version)
        try:
            await intake.publish("down/1", b"\x01\x02", qos=1)
            # The PUBACK resolved the request and freed its packet identifier.
            assert intake._protocol.pending == {}
            await intake.publish("down/2", b"fire and forget", qos=0)
            # Nobody subscribed: MQTT 5 says so in the PUBACK (0x10), which is no refusal.
            await intake.publish("nobody/listens", b"x")
            await asyncio.gather(*(intake.publish("down/n", bytes([i])) for i in range(50)))
        finally:
            await intake.close()
        await rec.wait_for_count(52)
    assert [(m.topic, m.payload, m.qos) for m in rec.messages[:2]] == [
        ("down/1", b"\x01\x02", 1),
        ("down/2", b"fire and forget", 0),
    ]
    assert sorted(m.payload for m in rec.messages[2:]) == [bytes([i]) for i in range(50)]


@broker
async def test_tls_with_the_test_ca(mosquitto_tls: Mosquitto, version: int) -> None:
    assert mosquitto_tls.tls_port is not None
    intake = await connected(
        mosquitto_tls.tls_port, tls_context=mosquitto_tls.client_ssl_context(), version=version
    )
    try:
        # A message larger than a TLS record and a read, sent and received over TLS.
        payloads = [b"small", bytes(range(256)) * 1200]
        for payload in payloads:
            await intake.publish("t/tls", payload)
        got = await collect(intake, 2)
        assert [m.payload for m in got] == payloads
    finally:
        await intake.close()

    untrusting = ssl.create_default_context()  # the system CAs, not the test CA
    with pytest.raises(MqttIntakeError, match=f"{HOST}:{mosquitto_tls.tls_port}"):
        await open_intake(mosquitto_tls.tls_port, "intake", tls_context=untrusting, version=version)


# -- peers that break the protocol ----------------------------------------------------------


@pytest.mark.parametrize(
    ("garbage", "error"),
    [
        # Remaining length with a fifth continuation byte.
        (b"\x30\xff\xff\xff\xff\x7f", "malformed remaining length"),
        # A SUBACK of the protocol maximum (268,435,455): only a PUBLISH is streamed past.
        (b"\x90\xff\xff\xff\x7f", "exceeds"),
        (publish_packet("t/q2", b"x", 2, 7), "QoS 2"),
        (b"\x36\x05\x00\x01t\x00\x07", "QoS"),  # QoS 3 (both bits): not a QoS at all
        (b"\x30\x00", "malformed PUBLISH"),  # too short for a topic length
        (b"\x30\x01\x00" + PINGRESP, "malformed PUBLISH"),
        (b"\x32\x03\x00\x01t" + PINGRESP, "malformed PUBLISH"),  # QoS 1 without a packet id
        (b"\x30\x02\x00\x09" + PINGRESP * 4, "malformed PUBLISH"),  # topic past the packet end
        (b"\x62\x02\x00\x01", "unexpected packet type 6"),  # PUBREL: we never publish QoS 2
        (b"\x20\x01\x00", "malformed CONNACK"),
        (b"\x40\x01\x00", "malformed acknowledgement"),
    ],
)
async def test_a_malformed_packet_fails_batch(
    garbage: bytes, error: str, caplog: pytest.LogCaptureFixture
) -> None:
    good = publish_packet("t/ok", b"before", 1, 1)
    await _fails_after_good_message(MQTT_311, CONNACK_OK + good + garbage, error)
    assert asyncio_errors(caplog) == []


@pytest.mark.parametrize(
    ("garbage", "error"),
    [
        (packet_like(0x30, mqtt_str("t") + b"\x05"), "malformed properties"),  # past the end
        (packet_like(0x30, mqtt_str("t") + b"\x80"), "malformed properties"),  # unterminated
        (packet_like(0x32, mqtt_str("t") + b"\x00\x01"), "malformed properties"),  # none at all
        (b"\x90\x02\x00\x01", "malformed properties"),  # SUBACK without its property length
        (b"\xe0\x01\x8e", "broker disconnected: reason code 0x8e"),  # DISCONNECT, with reason
    ],
)
async def test_a_malformed_mqtt5_packet_fails_batch(
    garbage: bytes, error: str, caplog: pytest.LogCaptureFixture
) -> None:
    # A property (payload format indicator) the intake skips.
    good = publish_packet("t/ok", b"before", 1, 1, props=b"\x01\x01")
    await _fails_after_good_message(MQTT_5, CONNACK_5_OK + good + garbage, error)
    assert asyncio_errors(caplog) == []


async def _fails_after_good_message(version: int, reply: bytes, error: str) -> None:
    async with fake_broker(reply) as fake:
        intake = await open_intake(fake.port, "intake", timeout_s=GUARD_S, version=version)
        try:
            async with asyncio.timeout(GUARD_S):
                [message] = await intake.batch()
                assert message.payload == b"before"
                with pytest.raises(MqttIntakeError, match=error):
                    await intake.batch()
        finally:
            await intake.close()


@pytest.mark.parametrize(
    "connack",
    [
        b"\x20\x03\x00\x00\x05",  # properties longer than the packet
        b"\x20\x04\x00\x00\x01\x13",  # Server Keep Alive without its value
        b"\x20\x05\x00\x00\x02\x13\x00",  # ... with half of it
        b"\x20\x06\x00\x00\x03\x12\x00\x05",  # a string longer than the properties
        b"\x20\x05\x00\x00\x02\x7f\x00",  # a property CONNACK cannot carry
        b"\x20\x04\x00\x00\x80\x80",  # an unterminated property length
    ],
)
async def test_a_malformed_mqtt5_connack_fails_connect(
    connack: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    async with fake_broker(connack) as fake:
        with pytest.raises(MqttIntakeError, match="malformed"):
            await open_intake(fake.port, timeout_s=GUARD_S, version=MQTT_5)
    assert asyncio_errors(caplog) == []


async def test_a_connack_that_never_comes_times_out() -> None:
    async with fake_broker(b"") as silent:
        with pytest.raises(MqttIntakeError, match=rf"{HOST}:{silent.port} sent no CONNACK"):
            await open_intake(silent.port, "intake", timeout_s=0.2, version=MQTT_311)
        # The client gave up on the connection rather than leaving it open.
        await silent.wait_for(lambda: silent.lost == 1)


async def test_a_peer_closing_before_connack_fails_connect() -> None:
    async with fake_broker(b"", close_after_reply=True) as rude:
        with pytest.raises(MqttIntakeError, match="connection"):
            await open_intake(rude.port, "intake", timeout_s=GUARD_S, version=MQTT_311)


@pytest.mark.parametrize(
    ("rc", "reason"), [(1, "unacceptable protocol version"), (2, "identifier"), (3, "unavailable")]
)
async def test_connack_refusals_carry_code_and_reason(rc: int, reason: str) -> None:
    async with fake_broker(bytes([0x20, 2, 0, rc])) as fake:
        with pytest.raises(MqttRefusedError, match=reason) as refused:
            await open_intake(fake.port, "intake", timeout_s=GUARD_S, version=MQTT_311)
    assert refused.value.rc == rc


async def test_a_refused_subscription_raises() -> None:
    async with fake_broker(CONNACK_OK, suback=0x80) as fake:
        intake = await open_intake(fake.port, "intake", version=MQTT_311)
        try:
            with pytest.raises(MqttIntakeError, match="subscription to t/# refused"):
                await intake.subscribe("t/#")
            assert intake._protocol.pending == {}
        finally:
            await intake.close()


async def test_a_publish_never_acknowledged_times_out_and_frees_its_id() -> None:
    async with fake_broker(CONNACK_OK) as fake:
        intake = await open_intake(fake.port, "intake", version=MQTT_311)
        try:
            with pytest.raises(MqttIntakeError, match=r"no acknowledgement within 0\.2 s"):
                await intake.publish("down/x", b"lost", timeout_s=0.2)
            assert intake._protocol.pending == {}
            sent = publish_packet("down/x", b"lost", 1, 1)
            await fake.wait_for(lambda: sent in fake.received)
        finally:
            await intake.close()


# -- keepalive -------------------------------------------------------------------------------


async def test_keepalive_aborts_when_the_peer_never_answers_pingreq() -> None:
    async with fake_broker(CONNACK_OK) as mute:
        intake = await open_intake(mute.port, "intake", keepalive_s=1, version=MQTT_311)
        try:
            with pytest.raises(MqttIntakeError, match="no packet from the broker for 1 s"):
                async with asyncio.timeout(GUARD_S):
                    await intake.batch()
            assert PINGREQ in mute.received
        finally:
            await intake.close()


async def test_an_mqtt5_server_keepalive_overrides_ours() -> None:
    # CONNACK with Server Keep Alive 1 s (and a user property before it, to be walked past):
    # the client asked for 60 s, yet a peer silent for 1 s is found out.
    props = b"\x26" + mqtt_str("k") + mqtt_str("v") + b"\x13\x00\x01"
    connack = packet_like(0x20, b"\x00\x00" + varint(len(props)) + props)
    async with fake_broker(connack) as mute:
        intake = await open_intake(mute.port, keepalive_s=60, version=MQTT_5)
        try:
            with pytest.raises(MqttIntakeError, match="no packet from the broker for 1 s"):
                async with asyncio.timeout(GUARD_S):
                    await intake.batch()
        finally:
            await intake.close()


async def test_an_mqtt5_connect_announces_the_window_and_a_kept_session() -> None:
    async with fake_broker(CONNACK_5_OK) as fake:
        intake = await open_intake(fake.port, max_unacked=300, version=MQTT_5)
        await intake.close()
    # Session Expiry "never" (0x11) and Receive Maximum 300 (0x21), after the keepalive.
    assert b"MQTT\x05\x00\x00\x3c\x08\x11\xff\xff\xff\xff\x21\x01\x2c" in fake.received


async def test_a_receive_maximum_of_its_own_goes_out_instead_of_the_window() -> None:
    async with fake_broker(CONNACK_5_OK) as fake:
        intake = await open_intake(fake.port, max_unacked=300, receive_maximum=5000, version=MQTT_5)
        await intake.close()
    assert b"\x11\xff\xff\xff\xff\x21\x13\x88" in fake.received  # 5000 = 0x1388


@broker
async def test_pingreqs_keep_a_quiet_session_alive_past_the_keepalive(
    mosquitto: Mosquitto, version: int
) -> None:
    # mosquitto drops a client silent for 1.5 keepalives; PINGREQs go out every half keepalive.
    intake = await connected(mosquitto.port, keepalive_s=1, version=version)
    protocol = intake._protocol
    pongs = 0
    pong = asyncio.Event()
    receive = protocol.data_received

    def counting(data: bytes) -> None:
        nonlocal pongs
        pongs += data.count(PINGRESP)
        pong.set()
        receive(data)

    protocol.data_received = counting  # type: ignore[method-assign]
    try:
        async with asyncio.timeout(GUARD_S):
            # Four answered PINGREQs span at least two keepalives of nothing but pings.
            while pongs < 4:
                pong.clear()
                await pong.wait()
        async with publisher(mosquitto.port) as pub:
            await pub.publish("t/still", b"here", qos=1)
        [message] = await collect(intake, 1)
        assert message.payload == b"here"
    finally:
        await intake.close()
    assert "exceeded timeout" not in mosquitto.log_text()


# -- the protocol object on its own ------------------------------------------------------------


class DummyTransport(asyncio.Transport):
    """Records what the protocol asks of its transport."""

    def __init__(self) -> None:
        super().__init__()
        self.written: list[bytes] = []
        self.reading = True
        self.pauses = 0
        self.closed = False

    def pause_reading(self) -> None:
        self.reading = False
        self.pauses += 1

    def resume_reading(self) -> None:
        self.reading = True

    def is_reading(self) -> bool:
        return self.reading

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written.append(bytes(data))

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed


def attached(max_unacked: int, version: int = MQTT_311) -> tuple[_Protocol, DummyTransport]:
    protocol = _Protocol(max_unacked, version)
    transport = DummyTransport()
    protocol.connection_made(transport)
    return protocol, transport


async def drain(protocol: _Protocol) -> tuple[list[IntakeMessage], MqttIntakeError]:
    """Everything delivered, then the error batch() raises once the connection is closed."""
    protocol.connection_lost(None)
    messages: list[IntakeMessage] = []
    while True:
        try:
            messages += await protocol.batch()
        except MqttIntakeError as exc:
            return messages, exc


def split(data: bytes, cuts: Iterable[int]) -> list[bytes]:
    points = sorted({0, len(data), *(min(c, len(data)) for c in cuts)})
    return [data[a:b] for a, b in itertools.pairwise(points)]


async def test_packet_ids_the_sequence_skips_are_counted_resends_and_qos0_are_not() -> None:
    protocol, _transport = attached(max_unacked=1000)

    def feed(*packets: bytes) -> None:
        protocol.data_received(b"".join(packets))

    feed(*(publish_packet("t", b"p", 1, pid) for pid in (7, 8, 11, 12)))  # 9 and 10 skipped
    assert protocol.skipped == 2
    # Resends after a reconnect (DUP) keep their old ids; QoS 0 has none.
    feed(publish_packet("t", b"p", 1, 3, dup=True), publish_packet("t", b"p", 0))
    feed(publish_packet("t", b"p", 1, 13))
    assert protocol.skipped == 2
    # A step back (a broker that hands out the lowest free id) is no gap of ~65,000.
    feed(publish_packet("t", b"p", 1, 5))
    assert protocol.skipped == 2
    # Ids run 1..65535 and then start at 1 again (0 is not an id).
    feed(publish_packet("t", b"p", 1, 0xFFF0))  # back again: the sequence goes on from here
    assert protocol.skipped == 2
    feed(*(publish_packet("t", b"p", 1, pid) for pid in (0xFFFE, 0xFFFF, 1, 2)))
    assert protocol.skipped == 2 + (0xFFFE - 0xFFF1)
    feed(publish_packet("t", b"p", 1, 0xFFFE), publish_packet("t", b"p", 1, 1))
    assert protocol.skipped == 2 + (0xFFFE - 0xFFF1) + 1  # 0xFFFF skipped before 1
    # A connection starts its own count: the first id after connecting is not a skip.
    fresh, _ = attached(max_unacked=1000)
    fresh.data_received(publish_packet("t", b"p", 1, 500))
    assert fresh.skipped == 0


@broker
async def test_uplinks_a_full_broker_queue_dropped_show_as_skipped_ids(
    tmp_path: Path, version: int
) -> None:
    """mosquitto numbers every message it takes for the session, also one it then drops."""
    require_mosquitto()
    limits = ["max_inflight_messages 10", "max_queued_messages 50"]
    with Mosquitto(tmp_path / "b", extra_config=limits) as small:
        intake = await connected(
            small.port, "drops", max_unacked=10, receive_maximum=10, version=version
        )
        try:
            async with publisher(small.port) as pub:
                # All taken by the broker (PUBACKed) while the intake acknowledges none: 10 in
                # flight, 50 queued, 40 dropped.
                await asyncio.gather(*(pub.publish("t/d", b"%d" % i, qos=1) for i in range(100)))
                got = await collect(intake, 60)
                assert intake.skipped == 0  # nothing after the dropped ones yet
                await pub.publish("t/d", b"last", qos=1)
                got += await collect_until(intake, b"last")
            assert [m.payload for m in got] == [b"%d" % i for i in range(60)] + [b"last"]
            assert intake.skipped == 40
        finally:
            await intake.close()


@broker
async def test_a_session_taken_over_once_drained_gets_nothing_sent_again(
    mosquitto: Mosquitto, version: int
) -> None:
    """drained() waits until the broker has read the PUBACKs; a new connection with the same
    client id then takes the session over with nothing in flight to send again."""
    intake = await connected(mosquitto.port, "takeover", version=version, max_unacked=1000)
    try:
        async with publisher(mosquitto.port) as pub:
            await asyncio.gather(*(pub.publish("t/x", b"%d" % i, qos=1) for i in range(300)))
            await collect(intake, 300)
        assert await intake.drained()
        successor = await open_intake(mosquitto.port, "takeover", version=version)
        try:
            assert successor.session_present
            async with publisher(mosquitto.port) as pub:
                await pub.publish("t/x", b"after", qos=1)
            got = await collect_until(successor, b"after")
            assert [m.payload for m in got] == [b"after"]
            assert successor.resent == 0
        finally:
            await successor.close()
    finally:
        await intake.close()


async def test_a_read_that_finds_a_backlog_counts_as_falling_behind() -> None:
    """The window never filled, but 128 KiB waited in one read: the broker had more for us."""
    protocol, _transport = attached(max_unacked=100_000)
    protocol.data_received(publish_packet("t", b"x" * 1000, 1, 1))
    assert not protocol.fell_behind
    protocol.data_received(b"".join(publish_packet("t", b"x" * 1000, 1, i) for i in range(2, 140)))
    assert protocol.fell_behind and not protocol.paused


async def test_a_pingresp_answers_the_oldest_pingreq_a_keepalive_one_too() -> None:
    """drained() waits for the answer to its own PINGREQ, not to a keepalive ping sent before
    the PUBACKs it is meant to follow."""
    protocol, _transport = attached(max_unacked=10)
    protocol.pongs.append(None)  # the keepalive's, still unanswered
    own: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
    protocol.pongs.append(own)
    protocol.data_received(b"\xd0\x00")
    assert not own.done()
    protocol.data_received(b"\xd0\x00")
    assert own.done() and not protocol.pongs


async def test_drained_is_false_when_the_broker_does_not_answer() -> None:
    async with fake_broker(CONNACK_OK) as fake:
        intake = await open_intake(fake.port, version=MQTT_311)
        try:
            assert not await intake.drained(timeout_s=0.2)
        finally:
            await intake.close()


async def test_acks_of_one_loop_iteration_go_out_in_one_write() -> None:
    protocol, transport = attached(max_unacked=100)
    protocol.data_received(b"".join(publish_packet("t", b"p", 1, pid) for pid in (5, 6, 0x1234)))
    messages = await protocol.batch()
    for message in messages:
        protocol.ack(message.packet_id)
    assert transport.written == []
    await asyncio.sleep(0)  # one loop iteration: the coalesced flush runs
    assert transport.written == [b"\x40\x02\x00\x05\x40\x02\x00\x06\x40\x02\x12\x34"]
    assert protocol.unacked == 0


async def test_pubacks_leave_in_the_order_the_messages_arrived() -> None:
    # MQTT-4.6.0-2: the consumer acknowledges out of order (a malformed or duplicate message at
    # once, good ones after their commit); the wire sees receive order, each id exactly once.
    ids = list(range(1, 41))
    for seed in range(20):
        order = ids[:]
        random.Random(seed).shuffle(order)
        protocol, transport = attached(max_unacked=100)
        protocol.data_received(b"".join(publish_packet("t", b"pp", 1, pid) for pid in ids))
        assert protocol.unacked == 40
        for n, packet_id in enumerate(order, start=1):
            protocol.ack(packet_id, 2)
            protocol._flush_acks()
            wire = b"".join(transport.written)
            acked = [int.from_bytes(wire[i + 2 : i + 4], "big") for i in range(0, len(wire), 4)]
            # Exactly the longest prefix of the arrivals that has been acknowledged.
            done = set(order[:n])
            prefix = next((i for i in ids if i not in done), 41) - 1
            assert acked == ids[:prefix]
            assert protocol.unacked == 40 - prefix
            # Their payloads are the consumer's to free: the byte budget counts them gone.
            assert protocol.unacked_bytes == 2 * (40 - n)


async def test_ordered_pubacks_hold_with_reused_ids_qos0_and_the_window() -> None:
    # A broker that reuses a packet id as soon as its PUBACK arrives (the protocol allows it),
    # QoS 0 messages in between and a small window that pauses reading: PUBACKs still name
    # exactly the broker's oldest unacknowledged message, the counters match what the broker
    # still waits for, and reading always comes back once everything is settled.
    for seed in range(200):
        rnd = random.Random(seed)
        protocol = _Protocol(6, MQTT_311, max_unacked_bytes=50)
        transport = DummyTransport()
        protocol.connection_made(transport)
        free = list(range(1, 12))  # few ids: reuse is frequent
        waiting: list[int] = []  # the broker's in-flight ids, oldest first
        delivered: list[IntakeMessage] = []  # handed to the consumer, not settled yet
        for _ in range(300):
            if transport.reading and free and rnd.random() < 0.5:
                data = b""
                for _ in range(rnd.randint(1, 3)):
                    if rnd.random() < 0.3:
                        data += publish_packet("t/0", b"q0", 0)
                    elif free:
                        packet_id = free.pop(0)
                        data += publish_packet("t/1", b"x" * rnd.randint(0, 20), 1, packet_id)
                        waiting.append(packet_id)
                protocol.data_received(data)
                if protocol._ready:
                    delivered += await protocol.batch()
            elif delivered:
                message = delivered.pop(rnd.randrange(len(delivered)))
                if message.qos:
                    protocol.ack(message.packet_id, len(message.payload))
            protocol._flush_acks()
            wire = b"".join(transport.written)
            transport.written.clear()
            for i in range(0, len(wire), 4):
                packet_id = int.from_bytes(wire[i + 2 : i + 4], "big")
                assert waiting and waiting[0] == packet_id, (seed, packet_id, waiting)
                free.append(waiting.pop(0))
            assert protocol.unacked == len(waiting), seed
            if not delivered:
                assert transport.reading, seed
                assert protocol.unacked_bytes == 0, seed


async def test_reading_pauses_at_the_window_and_resumes_at_half() -> None:
    protocol, transport = attached(max_unacked=4)
    protocol.data_received(b"".join(publish_packet("t", b"", 1, pid) for pid in range(1, 4)))
    assert transport.reading  # 3 < 4
    protocol.data_received(b"".join(publish_packet("t", b"", 1, pid) for pid in range(4, 7)))
    # One read's worth past the window is held, then reading stops.
    assert not transport.reading
    assert protocol.unacked == 6
    messages = await protocol.batch()
    for message in messages[:3]:
        protocol.ack(message.packet_id)
    assert not transport.reading  # 3 > 4 // 2
    protocol.ack(messages[3].packet_id)
    assert transport.reading
    assert transport.pauses == 1


async def test_qos0_messages_the_consumer_has_not_taken_pause_reading_too() -> None:
    # QoS 0 is never acknowledged, so the window alone would let a QoS 0 flood (ChirpStack's
    # integration publishes at QoS 0 unless told otherwise) pile up here without bound.
    protocol, transport = attached(max_unacked=4)
    protocol.data_received(b"".join(publish_packet("t", b"x", 0, 0) for _ in range(3)))
    assert transport.reading  # 3 < 4
    protocol.data_received(b"".join(publish_packet("t", b"x", 0, 0) for _ in range(3)))
    assert not transport.reading
    assert protocol.unacked == 0
    assert len(await protocol.batch()) == 6
    # Taken by the consumer (whose own queue now pushes back): reading goes on.
    assert transport.reading
    assert transport.pauses == 1


async def test_reading_pauses_beyond_the_byte_budget_and_resumes_at_half() -> None:
    # Few messages, but large ones: the count window (100) is far away, the bytes are not.
    protocol = _Protocol(100, MQTT_311, max_unacked_bytes=3000)
    transport = DummyTransport()
    protocol.connection_made(transport)
    protocol.data_received(publish_packet("t", b"x" * 1000, 1, 1))
    protocol.data_received(publish_packet("t", b"x" * 1000, 1, 2))
    assert transport.reading  # 2000 < 3000
    protocol.data_received(publish_packet("t", b"x" * 1000, 1, 3))
    assert not transport.reading
    assert (protocol.unacked, protocol.unacked_bytes) == (3, 3000)
    messages = await protocol.batch()
    protocol.ack(messages[0].packet_id, len(messages[0].payload))
    assert not transport.reading  # 2000 > 3000 // 2
    protocol.ack(messages[1].packet_id, len(messages[1].payload))
    assert transport.reading
    assert protocol.unacked_bytes == 1000


@broker
async def test_the_acker_gives_back_the_message_bytes(mosquitto: Mosquitto, version: int) -> None:
    intake = await connected(mosquitto.port, clean_session=True, version=version)
    try:
        async with publisher(mosquitto.port) as pub:
            await pub.publish("t/a", b"y" * 500, qos=1)
        (message,) = await collect(intake, 1, ack=False)
        assert intake._protocol.unacked_bytes == 500
        intake.acker(message)()
        assert (intake.unacked, intake._protocol.unacked_bytes) == (0, 0)
    finally:
        await intake.close()


async def test_reading_goes_on_while_a_request_waits_for_its_answer() -> None:
    protocol, transport = attached(max_unacked=2)
    answer: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
    protocol.pending[1] = answer
    protocol.read_for.add(1)  # what MqttIntake._request does for a caller that waits
    protocol.data_received(b"".join(publish_packet("t", b"", 1, pid) for pid in range(1, 4)))
    # Over the window, but the SUBACK still to come is behind these messages: keep reading.
    assert transport.reading
    protocol.data_received(b"\x90\x03\x00\x01\x01")
    assert answer.result() == b"\x01"
    assert not protocol.pending  # answered: what MqttIntake then re-checks
    protocol.read_for.discard(1)
    protocol.pause_if_full()
    assert not transport.reading


@broker
async def test_a_subscribe_that_does_not_hold_reading_keeps_the_window(
    mosquitto: Mosquitto, version: int
) -> None:
    """A kept session's backlog comes before the SUBACK; consumed meanwhile, it never takes
    more than the window (plus what one read brings) even though the answer is pending."""
    window, count = 20, 300
    intake = await connected(mosquitto.port, "held", version=version)
    await intake.close()
    async with publisher(mosquitto.port) as pub:
        for i in range(count):
            await pub.publish("t/held", b"%05d" % i + b"." * 2000, qos=1)
    packet = len(publish_packet("t/held", b"x" * 2005, 1, 1))
    bound = window - 1 + READ_BYTES // packet + 1
    assert bound < count
    intake = await open_intake(
        mosquitto.port, "held", version=version, max_unacked=window, receive_maximum=count
    )
    transport = intake._protocol._transport
    assert transport is not None
    try:
        assert intake.session_present
        subscribing = asyncio.create_task(
            intake.subscribe("t/#", timeout_s=GUARD_S, hold_reading=False)
        )
        # Nothing acknowledged yet, the SUBACK pending: reading stops at the window all the same.
        held: list[IntakeMessage] = []
        async with asyncio.timeout(GUARD_S):
            while not held or transport.is_reading():
                held += await intake.batch()
        assert window <= len(held) <= bound, (len(held), bound)
        got = list(held)
        for message in held:
            intake.acker(message)()
        got += await collect(intake, count - len(got))
        assert await subscribing == 1
        assert [int(m.payload[:5]) for m in got] == list(range(count))
    finally:
        await intake.close()


@broker
async def test_subscribing_to_a_kept_session_with_a_backlog_over_the_window(
    mosquitto: Mosquitto, version: int
) -> None:
    # The broker sends the queued backlog on connect, before the SUBACK; a window of 5 used to
    # stop reading in front of the SUBACK whenever a read ended between the two.
    intake = await connected(mosquitto.port, "backlog", version=version)
    await intake.close()
    async with publisher(mosquitto.port) as pub:
        for i in range(50):
            await pub.publish("t/backlog", str(i).encode(), qos=1)
    intake = await open_intake(mosquitto.port, "backlog", version=version, max_unacked=5)
    try:
        assert intake.session_present
        for _ in range(3):  # a SUBACK to wait for, with the window full each time
            assert await intake.subscribe("t/#", timeout_s=GUARD_S) == 1
        got = await collect(intake, 50, ack=True)
        assert sorted(int(m.payload) for m in got) == list(range(50))
    finally:
        await intake.close()


async def test_messages_before_a_broken_packet_are_delivered_once() -> None:
    protocol, _transport = attached(max_unacked=100)
    protocol.data_received(publish_packet("t", b"good", 1, 1) + b"\x30\x00")
    protocol.data_received(publish_packet("t", b"later", 1, 2))
    messages, error = await drain(protocol)
    assert [m.payload for m in messages] == [b"good"]
    assert "malformed PUBLISH" in str(error)
    assert protocol.unacked == 1


@pytest.mark.parametrize("version", [MQTT_311, MQTT_5], ids=["mqtt311", "mqtt5"])
@pytest.mark.parametrize("qos", [0, 1])
@pytest.mark.parametrize("cuts", [[], [1], [2, 9], [5, 700_000], [1_048_600], [1_048_590]])
async def test_an_oversized_publish_is_never_buffered_and_parsing_resumes_after_it(
    version: int, qos: int, cuts: list[int]
) -> None:
    props = b"" if version == MQTT_5 else None
    huge = publish_packet("t/huge", b"x" * MAX_PACKET_BYTES, qos, 7, props=props)
    after = publish_packet("t/after", b"next", 1, 8, props=props)
    stream = huge + after
    protocol, _transport = attached(max_unacked=100, version=version)
    for chunk in split(stream, cuts):
        protocol.data_received(chunk)
        # At most the topic and packet id wait in the buffer; the payload is dropped.
        assert len(protocol._buf) < 64
    messages, error = await drain(protocol)
    size = len(huge) - 4  # a 1-byte type and a 3-byte remaining length
    assert messages == [
        IntakeMessage("t/huge", b"", qos, 7 if qos else 0, oversized=size),
        IntakeMessage("t/after", b"next", 1, 8),
    ]
    assert str(error) == "connection closed"


async def test_after_disconnect_reading_resumes_and_arrivals_are_dropped() -> None:
    # close() waits for the broker to hang up; flow control must not hide that EOF.
    protocol, transport = attached(max_unacked=1)
    protocol.data_received(publish_packet("t", b"held", 1, 1))
    assert not transport.reading
    protocol.disconnecting()
    assert transport.reading
    protocol.data_received(publish_packet("t", b"late", 1, 2))
    messages, error = await drain(protocol)
    assert [m.payload for m in messages] == [b"held"]
    assert str(error) == "session closed"
    protocol.ack(1)  # the session is gone: nothing to send
    await asyncio.sleep(0)
    assert transport.written == []


topics = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=24)
payloads = st.one_of(
    st.binary(max_size=48),
    # Sizes that need two- and three-byte remaining lengths.
    st.integers(100, 20_000).map(lambda n: bytes(i % 251 for i in range(n))),
)
publishes = st.tuples(
    topics,
    payloads,
    st.sampled_from([0, 1]),
    st.integers(1, 0xFFFF),
    st.booleans(),
    st.binary(max_size=8),  # MQTT 5 properties (skipped unread, so any bytes)
)
# What the broker may send between PUBLISHes: PINGRESP, and acknowledgements nobody waits for
# (index 2 and 3: 3.1.1 SUBACK; 5 adds an empty property list).
noise = st.sampled_from([0, 1, 2, 3])
NOISE = {
    MQTT_311: [b"", PINGRESP, b"\x40\x02\x00\x63", b"\x90\x03\x00\x64\x01"],
    MQTT_5: [b"", PINGRESP, b"\x40\x02\x00\x63", b"\x90\x04\x00\x64\x00\x01"],
}


@pytest.mark.parametrize("version", [MQTT_311, MQTT_5], ids=["mqtt311", "mqtt5"])
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(noise, publishes), max_size=12), st.data())
def test_publishes_split_anywhere_parse_to_exactly_what_was_sent(
    version: int,
    items: list[tuple[int, tuple[str, bytes, int, int, bool, bytes]]],
    data: st.DataObject,
) -> None:
    stream = b"".join(
        NOISE[version][before]
        + publish_packet(
            topic,
            payload,
            qos,
            pid,
            dup=flag,
            retain=not flag,
            props=props if version == MQTT_5 else None,
        )
        for before, (topic, payload, qos, pid, flag, props) in items
    )
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=40))
    expected = [
        IntakeMessage(topic, payload, qos, pid if qos else 0)
        for _noise, (topic, payload, qos, pid, _flag, _props) in items
    ]

    async def run() -> None:
        protocol, _transport = attached(max_unacked=1 << 20, version=version)
        for chunk in split(stream, cuts):
            protocol.data_received(chunk)
        assert protocol.unacked == sum(m.qos for m in expected)
        messages, error = await drain(protocol)
        assert messages == expected
        assert str(error) == "connection closed"

    asyncio.run(run())


fragments = st.one_of(
    st.binary(max_size=16),
    st.builds(
        publish_packet,
        topics,
        st.binary(max_size=16),
        st.sampled_from([0, 1]),
        st.integers(0, 0xFFFF),
        props=st.none() | st.binary(max_size=6),
    ),
    # Any first byte with a body of any length: short bodies, wrong sizes, unknown types,
    # CONNACKs with property lists of any shape.
    st.builds(packet_like, st.integers(0, 255), st.binary(max_size=8)),
    st.builds(packet_like, st.just(0x20), st.binary(max_size=12).map(lambda b: b"\x00\x00" + b)),
    st.sampled_from(
        [
            CONNACK_OK,
            CONNACK_5_OK,
            PINGRESP,
            b"\x30\xff\xff\xff\x7f",
            b"\xff\xff\xff\xff\xff",
        ]
    ),
)


@pytest.mark.parametrize("version", [MQTT_311, MQTT_5], ids=["mqtt311", "mqtt5"])
@settings(max_examples=500, deadline=None)
@given(st.lists(fragments, max_size=10), st.lists(st.integers(0, 400), max_size=10))
def test_arbitrary_bytes_never_raise_anything_but_intake_errors(
    version: int, parts: Sequence[bytes], cuts: list[int]
) -> None:
    stream = b"".join(parts)

    async def run() -> None:
        protocol, transport = attached(max_unacked=3, version=version)
        for chunk in split(stream, cuts):
            # Anything but MqttIntakeError escaping here fails the example.
            protocol.data_received(chunk)
        delivered = protocol.unacked
        messages, error = await drain(protocol)
        assert isinstance(error, MqttIntakeError)
        assert delivered == sum(1 for m in messages if m.qos)
        # Paused at 3 unacknowledged, or 3 of any QoS waiting for the consumer; taking them
        # resumes only below half the window.
        paused = delivered >= 3 or len(messages) >= 3
        assert transport.reading == (not paused or delivered <= 1)

    asyncio.run(run())
