"""The broker helper itself: if these fail, every broker-backed test would be meaningless."""

from __future__ import annotations

import asyncio
import os
import socket
import time
from pathlib import Path

import aiomqtt
import pytest
from aiomqtt.exceptions import MqttConnectError

from tests.support.mosquitto import (
    BrokerStartError,
    Mosquitto,
    Recorder,
    require_mosquitto,
)

pytestmark = pytest.mark.broker

# A minimal MQTT 3.1.1 CONNECT (clean session, keepalive 60, empty client id), for the raw-socket
# checks that must not depend on how a client library reports failures.
RAW_CONNECT = bytes([0x10, 12, 0, 4]) + b"MQTT" + bytes([4, 0x02, 0, 60, 0, 0])
CONNACK_ACCEPTED = bytes([0x20, 2, 0, 0])
TCP_TIME_WAIT = "06"  # state column of /proc/net/tcp


def _raw_connect(host: str, port: int) -> bytes:
    """Send CONNECT on a bare TCP socket and return the reply (b"" when the broker hung up)."""
    with socket.create_connection((host, port), timeout=5) as sock:
        sock.sendall(RAW_CONNECT)
        try:
            return sock.recv(64)
        except ConnectionResetError:
            return b""


def _time_wait_count(port: int) -> int:
    count = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local_port = int(fields[1].rsplit(":", 1)[1], 16)
        if local_port == port and fields[3] == TCP_TIME_WAIT:
            count += 1
    return count


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def test_qos1_messages_arrive_in_order_with_topic_and_retain_flag(
    mosquitto: Mosquitto,
) -> None:
    async with aiomqtt.Client(mosquitto.host, mosquitto.port) as publisher:
        # Published before anyone subscribes: only the retained one may be delivered, flagged.
        await publisher.publish("t/status", b"online", qos=1, retain=True)
        await publisher.publish("t/lost", b"nobody listening", qos=1)

        async with Recorder(mosquitto.host, mosquitto.port, topics=["t/#"]) as rec:
            assert rec.connected.is_set()
            await publisher.publish("other/x", b"not subscribed", qos=1)
            for i in range(300):
                await publisher.publish(f"t/data/{i % 3}", str(i).encode(), qos=1)
            messages = await rec.wait_for_count(301, timeout=10)

    assert messages[0].topic == "t/status"
    assert messages[0].payload == b"online"
    assert messages[0].retain
    data = messages[1:]
    assert [m.payload for m in data] == [str(i).encode() for i in range(300)]
    assert all(m.topic == f"t/data/{i % 3}" and not m.retain for i, m in enumerate(data))
    assert all(m.qos == 1 for m in messages)
    assert rec.payloads("t/lost") == []
    assert not any(m.topic.startswith("other/") for m in rec.messages)


async def test_wait_for_timeout_reports_what_arrived(mosquitto: Mosquitto) -> None:
    async with Recorder(mosquitto.host, mosquitto.port, topics=["t/#"]) as rec:
        async with aiomqtt.Client(mosquitto.host, mosquitto.port) as publisher:
            await publisher.publish("t/a", b"first", qos=1)
        await rec.wait_for_count(1)
        with pytest.raises(TimeoutError, match=r"1 messages .*t/a=b'first'"):
            await rec.wait_for(lambda msgs: len(msgs) >= 2, timeout=0.2)


async def test_restart_keeps_port_and_recorder_resubscribes(mosquitto: Mosquitto) -> None:
    port = mosquitto.port
    async with Recorder(mosquitto.host, port, topics=["t/#"]) as rec:
        async with aiomqtt.Client(mosquitto.host, port) as publisher:
            await publisher.publish("t/before", b"1", qos=1)
        await rec.wait_for_count(1)

        # In a thread so the recorder sees the connection drop while the broker is down, as it
        # would in production, instead of the event loop being blocked through the restart.
        await asyncio.to_thread(mosquitto.restart)
        assert mosquitto.port == port

        await rec.wait_connected(connections=2, timeout=10)
        async with aiomqtt.Client(mosquitto.host, port) as publisher:
            await publisher.publish("t/after", b"2", qos=1)
        await rec.wait_for(lambda msgs: any(m.topic == "t/after" for m in msgs), timeout=10)

    assert rec.payloads() == [b"1", b"2"]
    assert "--- starting mosquitto" in mosquitto.log_text()
    assert mosquitto.log_text().count("--- starting mosquitto") == 2


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="needs Linux /proc/net/tcp")
def test_restart_rebinds_a_port_in_time_wait(mosquitto: Mosquitto) -> None:
    # The broker closing an established connection first leaves that connection in TIME_WAIT on
    # the broker's port; mosquitto's SO_REUSEADDR must let the new process listen regardless.
    client = socket.create_connection((mosquitto.host, mosquitto.port), timeout=5)
    try:
        client.sendall(RAW_CONNECT)
        assert client.recv(64) == CONNACK_ACCEPTED
        mosquitto.stop()
        assert client.recv(64) == b""  # the broker hung up first
    finally:
        client.close()
    deadline = time.monotonic() + 2
    while _time_wait_count(mosquitto.port) == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert _time_wait_count(mosquitto.port) > 0

    mosquitto.start()
    assert _raw_connect(mosquitto.host, mosquitto.port) == CONNACK_ACCEPTED


def test_context_manager_stops_the_process(tmp_path: Path) -> None:
    require_mosquitto()
    with Mosquitto(tmp_path / "b") as broker:
        pid = broker.pid
        assert pid is not None
        assert broker.running
        assert _raw_connect(broker.host, broker.port) == CONNACK_ACCEPTED
    assert not broker.running
    assert not _pid_alive(pid)
    assert "terminating" in broker.log_text()


def test_kill_then_start_on_same_port(mosquitto: Mosquitto) -> None:
    port = mosquitto.port
    mosquitto.kill()
    assert not mosquitto.running
    mosquitto.start()
    assert mosquitto.port == port
    assert _raw_connect(mosquitto.host, port) == CONNACK_ACCEPTED


def test_start_failure_raises_with_broker_log(tmp_path: Path) -> None:
    require_mosquitto()
    broker = Mosquitto(tmp_path / "b", extra_config=["no_such_option 1"])
    with pytest.raises(BrokerStartError, match="no_such_option"):
        broker.start()
    assert not broker.running


async def test_tls_listener_accepts_client_trusting_generated_ca(
    mosquitto_tls: Mosquitto,
) -> None:
    broker = mosquitto_tls
    assert broker.ca_file is not None
    assert broker.tls_port is not None
    assert broker.tls_port != broker.port
    async with Recorder(broker.host, broker.port, topics=["t/#"]) as rec:
        async with aiomqtt.Client(
            broker.host,
            broker.tls_port,
            tls_params=aiomqtt.TLSParameters(ca_certs=str(broker.ca_file)),
        ) as publisher:
            await publisher.publish("t/tls", b"secret", qos=1)
        await rec.wait_for_count(1)
    assert rec.payloads("t/tls") == [b"secret"]


async def test_plaintext_client_to_tls_port_fails(mosquitto_tls: Mosquitto) -> None:
    broker = mosquitto_tls
    assert broker.tls_port is not None
    # aiomqtt does not notice the broker hanging up before CONNACK and only times out, so keep
    # its timeout short; the raw check below shows that the broker did refuse.
    with pytest.raises(aiomqtt.MqttError):
        async with aiomqtt.Client(broker.host, broker.tls_port, timeout=0.5):
            pass
    assert await asyncio.to_thread(_raw_connect, broker.host, broker.tls_port) == b""


async def test_mutual_tls_requires_a_client_certificate(tmp_path: Path) -> None:
    require_mosquitto()
    with Mosquitto(tmp_path / "b", tls=True, require_certificate=True) as broker:
        assert broker.tls_port is not None
        cert = broker.issue_client_cert("gateway-01")
        async with aiomqtt.Client(
            broker.host, broker.tls_port, tls_params=broker.tls_parameters(cert)
        ) as client:
            await client.publish("t/x", b"with cert", qos=1)
        # With TLS 1.3 the client only learns of the rejection after its handshake "succeeded",
        # so aiomqtt again reports a timeout; the broker log names the reason.
        with pytest.raises(aiomqtt.MqttError):
            async with aiomqtt.Client(
                broker.host,
                broker.tls_port,
                tls_params=broker.tls_parameters(),
                timeout=0.5,
            ):
                pass
        assert "peer did not return a certificate" in broker.log_text()


async def test_users_mode_rejects_wrong_password(tmp_path: Path) -> None:
    require_mosquitto(passwd=True)
    users = {"gateway": "s3cret", "ops": "other"}
    with Mosquitto(tmp_path / "b", users=users) as broker:
        async with Recorder(
            broker.host, broker.port, topics=["t/#"], username="ops", password=users["ops"]
        ) as rec:
            async with aiomqtt.Client(
                broker.host, broker.port, username="gateway", password=users["gateway"]
            ) as client:
                await client.publish("t/auth", b"ok", qos=1)
            await rec.wait_for_count(1)

        wrong = users["gateway"] + "-wrong"
        for username, password in (("gateway", wrong), ("nobody", wrong), (None, None)):
            with pytest.raises(MqttConnectError) as caught:
                async with aiomqtt.Client(
                    broker.host, broker.port, username=username, password=password
                ):
                    pass
            # mosquitto answers MQTT 3.1.1 CONNACK 5 ("not authorised"); paho-mqtt 2 maps it to
            # the MQTT 5 reason code 135 "Not authorized".
            rc = caught.value.rc
            assert (rc if isinstance(rc, int) or rc is None else rc.value) in (5, 135)
            assert "Not authori" in str(caught.value)

        # A recorder with bad credentials fails fast instead of retrying until its timeout.
        started = time.monotonic()
        with pytest.raises(MqttConnectError):
            async with Recorder(
                broker.host, broker.port, username="gateway", password=users["ops"]
            ):
                pass
        assert time.monotonic() - started < 2


async def test_persistence_keeps_retained_messages_across_restart(tmp_path: Path) -> None:
    require_mosquitto()
    with Mosquitto(tmp_path / "b", persistence=True) as broker:
        async with aiomqtt.Client(broker.host, broker.port) as client:
            await client.publish("t/config", b"v1", qos=1, retain=True)
        await asyncio.to_thread(broker.restart)
        async with Recorder(broker.host, broker.port, topics=["t/#"]) as rec:
            messages = await rec.wait_for_count(1)
    assert (messages[0].topic, messages[0].payload, messages[0].retain) == ("t/config", b"v1", True)
    assert (tmp_path / "b" / "persistence" / "mosquitto.db").exists()
