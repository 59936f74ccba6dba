"""ChirpStack ingest, end to end: ChirpStack v4 JSON uplinks → mosquitto → gateway → upstream.

Usage::

    .venv/bin/python bench/chirpstack_ingest.py            # every scenario, about 2 minutes
    .venv/bin/python bench/chirpstack_ingest.py --quick    # drain, cold-start-2k, latency-300
    .venv/bin/python bench/chirpstack_ingest.py --only drain,latency-300 --consumers gateway

What runs where (every box is its own process, so each one's CPU and peak RSS are its own):

* **publisher** (child): plays ChirpStack. It publishes ``UplinkEvent`` messages in ChirpStack's
  JSON marshaling on ``application/{app}/device/{devEui}/event/up`` at QoS 1, paced or as fast as
  it can, and stamps when each one went out. It speaks MQTT 3.1.1 over a plain socket (a few
  µs of CPU per message) so that the load generator takes as little as possible of the 2 cores.
* **"ChirpStack" broker** (mosquitto): one with the Debian defaults (``max_inflight_messages 20``,
  ``max_queued_messages 1000``: *stock*) and one with the same in-flight window and a queue deep
  enough for a backlog (*deep queue*).
* **consumer** (child): either the **gateway** (``gateway.app.Gateway`` from a config dict: a
  ChirpStack source with a persistent session and manual ack after the outbox commit, the device
  catalog decoding ``dragino-lmds200`` payloads locally, the SQLite outbox with
  ``synchronous = full``, the MQTT uplink at QoS 1 with batches of ``--uplink-batch`` events), or
  the reference **relay**: plain aiomqtt, subscribe (persistent session) and republish each
  message at QoS 1, no decoding, no outbox, acknowledged by paho on receipt.
* **upstream broker** (mosquitto, the test helper's generous limits) and the **verifying
  subscriber** (in this parent process, QoS 1, also a plain socket): every uplink must arrive
  upstream exactly once by id. For the gateway the id is the event id it derives from
  ``deduplicationId`` (``stable_event_id``, computed here in advance); for the relay it is the
  ``deduplicationId`` in the republished JSON. Duplicates (same id again) are allowed and reported.

Scenarios (each runs once with each consumer, in a fresh consumer process):

* ``live-max``: deep-queue broker; the consumer is connected, then N uplinks are published as
  fast as the publisher can. Rate = uplinks delivered / (first publish → last arrival upstream).
* ``drain``: deep-queue broker; N uplinks are queued for the consumer's persistent session while
  it is not running, then it starts (cold). Rate = N / (its subscription → last arrival).
* ``live-12k``: stock broker, publisher paced at ``--rate`` (12,000/s): the consumer keeps up, or
  the broker drops what exceeds its 1000-message queue for it.
* ``cold-start-12k``: stock broker, a backlog of ``max_queued_messages`` (1000) queued while the
  consumer is down, then it starts and the publisher goes on at ``--rate`` from the moment it is
  subscribed (the publisher is started and connected first, and waits for the word). Zero loss
  needs the consumer to drain the backlog while keeping up. Rate = all uplinks / (its
  subscription → last arrival).
* ``cold-start-2k``: the same at ``--safe-rate`` (2,000/s), below both consumers' capacity here:
  a cold start with stock limits must lose nothing.
* ``strict-window-20`` (gateway only): the gateway's ingest path in one process without MQTT,
  ChirpStackSource → Pipeline → Outbox (synchronous = full), with at most 20 uplinks handed over
  and not yet acknowledged: what a broker that enforces ``max_inflight_messages 20`` allows.
  mosquitto 2.0.11 does not (it moves up to 19 more queued messages into flight on each PUBACK),
  so the broker runs above never show this limit; see bench/README.md.
* ``latency-300``: stock broker, publisher paced at 300 uplinks/s: publish → arrival upstream, p50
  and p99 (the clock is CLOCK_MONOTONIC, shared by every process on the machine).

``--isolate`` puts the consumer alone on the last CPU and everything else (brokers, publisher,
verifier) on the others, to tell the consumer's limits from the benchmark's own load; by default
all share every CPU, as ChirpStack, the broker and the gateway do on a gateway.

bench/README.md explains every figure and keeps the measured results. Exit status: 0 when every
run finished and the gateway lost nothing where it must not (everywhere except the two runs paced
at the target, where the stock broker drops what a slower consumer cannot take: that is a missed
target, printed as FAIL); 1 otherwise. Missed performance targets do not change the status.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import importlib
import json
import math
import os
import resource
import signal
import socket
import sys
import tempfile
import threading
import time
from array import array
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, ClassVar

SCRIPT = Path(__file__).resolve()
ROOT = SCRIPT.parent.parent
sys.path.insert(0, str(ROOT))

import orjson  # noqa: E402

from bench.throughput import (  # noqa: E402
    fmt,
    machine_busy_s,
    peak_rss_mb,
    percentile,
    print_table,
    proc_cpu_s,
    read_all,
    verdict,
)
from gateway.types import stable_event_id  # noqa: E402

# Targets from the issue.
TARGET_RATE = 12_000
TARGET_RSS_MB = 60.0
TARGET_P99_MS = 50.0
LATENCY_RATE = 300
# mosquitto's default max_inflight_messages, for the in-process run that enforces it strictly.
STRICT_WINDOW = 20
# A paced rate both consumers sustain on this machine: a cold start at it must lose nothing.
SAFE_RATE = 2_000
# Cores used by processes outside the benchmark above which a run is flagged as disturbed.
OTHER_LOAD_WARN = 0.2

# mosquitto.conf(5) defaults, which Debian's /etc/mosquitto/mosquitto.conf leaves alone. The test
# helper raises the limits (1000 in flight, 100,000 queued, Nagle off); these lines come after its
# own and win (the last value of an option counts).
STOCK_CONFIG = (
    "max_inflight_messages 20",
    "max_inflight_bytes 0",
    "max_queued_messages 1000",
    "max_queued_bytes 0",
    "set_tcp_nodelay false",
)
STOCK_QUEUE = 1000
# The stock in-flight window, with a queue deep enough to hold a drain backlog.
DEEP_QUEUE_CONFIG = (*STOCK_CONFIG, "max_queued_messages 1000000")

CHIRPSTACK_FILTER = "application/+/device/+/event/+"
GATEWAY_ID = "bench"
UPSTREAM_FILTERS = (f"edge/gateway/{GATEWAY_ID}/event/#", "relay/#")
RELAY_PREFIX = "relay/"
MQTT_KEEPALIVE_S = 600

# -- the uplinks --------------------------------------------------------------------------------
#
# Uplink i comes from device i % DEVICES with fCnt i // DEVICES (no gaps, so the gateway emits no
# uplink_gap events), at BASE_TIME + i ms. Its deduplicationId ends in i as 12 hex digits.

DEVICES = 200
APPLICATION_ID = "3f6b1a2c-5d0e-4c8a-9b7f-1c2d3e4f5a6b"
TENANT_ID = "52f14cd4-c6f1-4fbd-8f87-4025e1d49242"
DEVICE_PROFILE_ID = "0c5e7a45-3b1d-4b59-9f9f-2d1b3b8a1a10"
GATEWAY_EUI = "0016c001f153a14c"
BASE_TIME = datetime(2025, 3, 14, 6, 0, tzinfo=UTC)
MOUNTING_HEIGHT_CM = 500


def dev_eui(i: int) -> str:
    return f"a8404100{i % DEVICES:08x}"


def dedup_id(run: int, i: int) -> str:
    return f"6f1e9c52-{run:04x}-4b8e-9a01-{i:012x}"


def index_of_dedup(dedup: str) -> int:
    return int(dedup[-12:], 16)


def uplink_time(i: int) -> datetime:
    return BASE_TIME + timedelta(milliseconds=i)


def lmds200_frame(i: int) -> bytes:
    """A Dragino LMDS200 fPort 2 frame: battery mV, two target distances in cm, alarm flags."""
    battery_mv = 3600 - (i // DEVICES) % 400
    distance_cm = 180 + (i * 7) % 150
    return (
        battery_mv.to_bytes(2, "big")
        + distance_cm.to_bytes(2, "big")
        + (distance_cm + 3).to_bytes(2, "big")
        + b"\x00"
    )


def build_uplink(run: int, i: int) -> Any:
    """Uplink i as a chirpstack-api message, the way ChirpStack v4 fills it in."""
    from chirpstack_api import common, gw, integration

    event = integration.UplinkEvent(
        deduplication_id=dedup_id(run, i),
        dev_addr=f"0{(0x1000000 + i % DEVICES):07x}",
        adr=True,
        dr=5,
        f_cnt=i // DEVICES,
        f_port=2,
        confirmed=False,
        data=lmds200_frame(i),
    )
    ts = uplink_time(i)
    event.time.FromDatetime(ts)
    info = event.device_info
    info.tenant_id = TENANT_ID
    info.tenant_name = "Stadtwerke"
    info.application_id = APPLICATION_ID
    info.application_name = "river-gauges"
    info.device_profile_id = DEVICE_PROFILE_ID
    info.device_profile_name = "LMDS200"
    info.device_name = f"pegel-{i % DEVICES:03d}"
    info.dev_eui = dev_eui(i)
    info.device_class_enabled = common.DeviceClass.CLASS_A  # type: ignore[attr-defined]
    info.tags["river"] = "Ilm"
    info.tags["site"] = f"pegel-{i % DEVICES:03d}"
    rx = event.rx_info.add()
    rx.gateway_id = GATEWAY_EUI
    rx.uplink_id = 1000 + i % 50000
    rx.gw_time.FromDatetime(ts - timedelta(milliseconds=3))
    rx.ns_time.FromDatetime(ts - timedelta(milliseconds=1))
    rx.rssi = -70 - i % 50
    rx.snr = round(9.5 - (i % 30) * 0.25, 2)
    rx.channel = i % 8
    rx.location.latitude = 50.6811
    rx.location.longitude = 10.9303
    rx.location.altitude = 420.0
    rx.context = b"\x1f\x2e\x3d\x4c"
    rx.metadata["region_config_id"] = "eu868"
    rx.metadata["region_common_name"] = "EU868"
    rx.crc_status = gw.CRCStatus.CRC_OK  # type: ignore[attr-defined]
    tx = event.tx_info
    tx.frequency = 867_100_000 + (i % 8) * 200_000
    tx.modulation.lora.bandwidth = 125_000
    tx.modulation.lora.spreading_factor = 7
    tx.modulation.lora.code_rate = gw.CodeRate.CR_4_5  # type: ignore[attr-defined]
    return event


class UplinkFactory:
    """JSON payloads of ``build_uplink`` at string-formatting speed.

    One message is rendered with ``json_format.MessageToJson`` (compact, as ChirpStack's JSON
    marshaler emits it) with marker values in every varying field; the markers become format
    fields. ``check`` proves for a few indexes that the fast rendering parses back to exactly the
    message chirpstack-api builds.
    """

    _MARKERS: ClassVar[dict[str, Any]] = {
        "dedup": "DEDUPMARKER",
        "time": "2001-01-01T01:01:01.001Z",
        "gwtime": "2002-02-02T02:02:02.002Z",
        "nstime": "2003-03-03T03:03:03.003Z",
        "eui": "eeeeeeeeeeeeeeee",
        "addr": "addrmark",
        "name": "NAMEMARKER",
        "site": "SITEMARKER",
        "fcnt": 987654321,
        "data": b"DATAMARKER",
        "uplink": 876543210,
        "rssi": -123456,
        "snr": 98765.5,
        "channel": 7654321,
        "freq": 123456789,
    }

    def __init__(self, run: int) -> None:
        from google.protobuf import json_format

        self.run = run
        m = self._MARKERS
        msg = build_uplink(run, 0)
        msg.deduplication_id = m["dedup"]
        msg.time.FromJsonString(m["time"])
        msg.rx_info[0].gw_time.FromJsonString(m["gwtime"])
        msg.rx_info[0].ns_time.FromJsonString(m["nstime"])
        msg.device_info.dev_eui = m["eui"]
        msg.dev_addr = m["addr"]
        msg.device_info.device_name = m["name"]
        msg.device_info.tags["site"] = m["site"]
        msg.f_cnt = m["fcnt"]
        msg.data = m["data"]
        msg.rx_info[0].uplink_id = m["uplink"]
        msg.rx_info[0].rssi = m["rssi"]
        msg.rx_info[0].snr = m["snr"]
        msg.rx_info[0].channel = m["channel"]
        msg.tx_info.frequency = m["freq"]
        text = json_format.MessageToJson(msg, indent=None).replace("{", "{{").replace("}", "}}")
        for key, value in m.items():
            if isinstance(value, bytes):
                rendered = base64.b64encode(value).decode()
            elif isinstance(value, float):
                rendered = repr(value)
            else:
                rendered = str(value)
            assert text.count(rendered) == 1, (key, rendered)
            text = text.replace(rendered, "{" + key + "}")
        self._template = text

    def payload(self, i: int) -> bytes:
        ts = uplink_time(i)
        return self._template.format(
            dedup=dedup_id(self.run, i),
            time=_rfc3339(ts),
            gwtime=_rfc3339(ts - timedelta(milliseconds=3)),
            nstime=_rfc3339(ts - timedelta(milliseconds=1)),
            eui=dev_eui(i),
            addr=f"0{(0x1000000 + i % DEVICES):07x}",
            name=f"pegel-{i % DEVICES:03d}",
            site=f"pegel-{i % DEVICES:03d}",
            fcnt=i // DEVICES,
            data=base64.b64encode(lmds200_frame(i)).decode(),
            uplink=1000 + i % 50000,
            rssi=-70 - i % 50,
            snr=repr(round(9.5 - (i % 30) * 0.25, 2)),
            channel=i % 8,
            freq=867_100_000 + (i % 8) * 200_000,
        ).encode()

    def check(self, indexes: Sequence[int]) -> None:
        from chirpstack_api import integration
        from google.protobuf import json_format

        for i in indexes:
            parsed = json_format.Parse(self.payload(i), integration.UplinkEvent())
            if parsed != build_uplink(self.run, i):
                raise AssertionError(f"fast rendering of uplink {i} differs from chirpstack-api's")


def _rfc3339(ts: datetime) -> str:
    return ts.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ts.microsecond // 1000:03d}Z"


def topic_of(i: int) -> str:
    return f"application/{APPLICATION_ID}/device/{dev_eui(i)}/event/up"


def expected_event_ids(run: int, n: int) -> dict[str, int]:
    """The event id the gateway derives for each uplink's reading → the uplink's index."""
    ids = {}
    for i in range(n):
        ts = uplink_time(i)
        # The gateway's own arithmetic (drivers.lorawan.message_time): seconds + nanos / 1e9.
        seconds = int(ts.timestamp())
        nanos = ts.microsecond * 1000
        when = datetime.fromtimestamp(seconds + nanos / 1e9, UTC)
        ids[stable_event_id(dedup_id(run, i), when)] = i
    return ids


# -- MQTT 3.1.1 over a plain socket (publisher, session set-up, verifying subscriber) -------------


def _remaining_length(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | 0x80 if n else byte)
        if not n:
            return bytes(out)


def _mqtt_string(text: str) -> bytes:
    raw = text.encode()
    return len(raw).to_bytes(2, "big") + raw


def connect_packet(client_id: str, *, clean: bool) -> bytes:
    body = (
        _mqtt_string("MQTT")
        + bytes([4, 0x02 if clean else 0x00])
        + MQTT_KEEPALIVE_S.to_bytes(2, "big")
        + _mqtt_string(client_id)
    )
    return b"\x10" + _remaining_length(len(body)) + body


def subscribe_packet(packet_id: int, filters: Sequence[str], qos: int = 1) -> bytes:
    body = packet_id.to_bytes(2, "big") + b"".join(_mqtt_string(f) + bytes([qos]) for f in filters)
    return b"\x82" + _remaining_length(len(body)) + body


def publish_packet(topic: str, packet_id: int, payload: bytes) -> bytes:
    body = _mqtt_string(topic) + packet_id.to_bytes(2, "big") + payload
    return b"\x32" + _remaining_length(len(body)) + body


DISCONNECT = b"\xe0\x00"


class PacketReader:
    """Splits a byte stream into MQTT packets: (first byte, body)."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        buf = self._buf
        buf += data
        out = []
        pos, end = 0, len(buf)
        while end - pos >= 2:
            length, shift, i = 0, 0, pos + 1
            while i < end:
                byte = buf[i]
                length |= (byte & 0x7F) << shift
                shift += 7
                i += 1
                if not byte & 0x80:
                    break
            else:
                break
            if i + length > end:
                break
            out.append((buf[pos], bytes(buf[i : i + length])))
            pos = i + length
        del buf[:pos]
        return out


def _read_packet(sock: socket.socket, reader: PacketReader, want: int) -> bytes:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        data = sock.recv(65536)
        if not data:
            break
        for first, body in reader.feed(data):
            if first >> 4 == want:
                return body
    raise RuntimeError(f"no MQTT packet of type {want} from the broker")


def create_session(host: str, port: int, client_id: str, topic: str) -> None:
    """A persistent session subscribed to ``topic`` at QoS 1, then disconnected: the broker now
    queues what is published for ``client_id`` until it connects (the drain backlog)."""
    reader = PacketReader()
    with socket.create_connection((host, port), timeout=10) as sock:
        sock.sendall(connect_packet(client_id, clean=False))
        connack = _read_packet(sock, reader, 2)
        if connack[1] != 0:
            raise RuntimeError(f"CONNACK {connack[1]} for {client_id}")
        sock.sendall(subscribe_packet(1, [topic]))
        suback = _read_packet(sock, reader, 9)
        if suback[2] != 1:
            raise RuntimeError(f"SUBACK {suback[2]} for {client_id}")
        sock.sendall(DISCONNECT)


class UpstreamSubscriber(asyncio.Protocol):
    """The verifying subscriber on the upstream broker (QoS 1, PUBACKs batched per read).

    Each reading is counted by id as it arrives: the first arrival time of every uplink index, and
    how many times it arrived.
    """

    def __init__(self, n: int, event_ids: dict[str, int] | None) -> None:
        self._reader = PacketReader()
        self._transport: asyncio.Transport | None = None
        self._event_ids = event_ids
        self.subscribed = asyncio.get_running_loop().create_future()
        self.first_rx = array("d", bytes(8 * n))
        self.copies = array("I", bytes(4 * n))
        self.unique = 0
        self.messages = 0
        self.other_events = 0
        self.gap_events = 0
        self.missed_frames = 0
        self.foreign = 0
        self.changed = asyncio.Event()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        client_id = f"bench-verify-{os.getpid()}-{time.monotonic_ns()}"
        transport.write(connect_packet(client_id, clean=True))
        transport.write(subscribe_packet(1, UPSTREAM_FILTERS))

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.subscribed.done():
            self.subscribed.set_exception(ConnectionError(f"upstream subscriber lost: {exc}"))

    def data_received(self, data: bytes) -> None:
        now = time.monotonic()
        acks = []
        for first, body in self._reader.feed(data):
            kind = first >> 4
            if kind == 3:
                topic_len = int.from_bytes(body[:2], "big")
                pos = 2 + topic_len
                if first & 0x06:
                    acks.append(b"\x40\x02" + body[pos : pos + 2])
                    pos += 2
                self._message(body[2 : 2 + topic_len], body[pos:], now)
            elif kind == 9 and not self.subscribed.done():
                if any(code >= 0x80 for code in body[2:]):
                    self.subscribed.set_exception(RuntimeError(f"SUBACK refused: {body!r}"))
                else:
                    self.subscribed.set_result(None)
        if acks and self._transport is not None:
            self._transport.write(b"".join(acks))

    def _message(self, topic: bytes, payload: bytes, now: float) -> None:
        self.messages += 1
        if topic.startswith(RELAY_PREFIX.encode()):
            indexes = [index_of_dedup(orjson.loads(payload)["deduplicationId"])]
        else:
            data = orjson.loads(payload)
            indexes = []
            assert self._event_ids is not None
            for event in data if isinstance(data, list) else [data]:
                kind = event.get("kind")
                if kind != "reading":
                    self.other_events += 1
                    if kind == "uplink_gap":
                        # The gateway noticed fCnt gaps: its own count of what never arrived.
                        self.gap_events += 1
                        self.missed_frames += sum(
                            v["v"] for v in event.get("vals", []) if v["n"] == "missed_frames"
                        )
                    continue
                index = self._event_ids.get(event["id"])
                if index is None:
                    self.foreign += 1
                else:
                    indexes.append(index)
        for index in indexes:
            if not 0 <= index < len(self.copies):
                self.foreign += 1
                continue
            if not self.copies[index]:
                self.first_rx[index] = now
                self.unique += 1
            self.copies[index] += 1
        self.changed.set()

    def close(self) -> None:
        if self._transport is not None:
            self._transport.write(DISCONNECT)
            self._transport.close()


# -- child: publisher --------------------------------------------------------------------------


class _AckCounter(threading.Thread):
    """Counts the broker's PUBACKs on the publisher's socket (it sends that client nothing else,
    and every PUBACK of MQTT 3.1.1 is 4 bytes)."""

    def __init__(self, sock: socket.socket, expected: int) -> None:
        super().__init__(daemon=True)
        self._sock = sock
        self._expected = expected
        self.acked = 0
        self.done = threading.Event()

    def run(self) -> None:
        received = 0
        try:
            while self.acked < self._expected:
                data = self._sock.recv(262144)
                if not data:
                    break
                received += len(data)
                self.acked = received // 4
        finally:
            self.done.set()


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def run_publisher(args: argparse.Namespace) -> dict[str, Any]:
    factory = UplinkFactory(args.run)
    first, n, rate = args.first, args.count, args.rate
    packets = [
        publish_packet(topic_of(i), 1 + (k % 65535), factory.payload(i))
        for k, i in enumerate(range(first, first + n))
    ]
    stamps = array("d", bytes(8 * n))
    sock = socket.create_connection((args.host, args.port), timeout=10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.sendall(connect_packet(f"bench-chirpstack-{os.getpid()}", clean=True))
    if _read_packet(sock, PacketReader(), 2)[1] != 0:
        raise RuntimeError("CONNACK refused")
    sock.settimeout(None)
    if args.gated:
        # Ready to send (packets built, connected); the parent says when: a cold start's live
        # uplinks start at the consumer's subscription, not a Python start-up after it.
        print(f"READY {time.monotonic()!r}", flush=True)
        if sys.stdin.readline().strip() != "GO":
            raise RuntimeError("the parent did not say GO")
    acks = _AckCounter(sock, n)
    acks.start()
    # At most this many unacknowledged: packet ids (1..65535) are never reused while in flight.
    max_outstanding = 20_000
    sent = 0
    cpu_start = _cpu_s()
    t0 = time.monotonic()
    while sent < n:
        now = time.monotonic()
        # Paced: everything due by now (at most ~1 ms late); else chunks of 256.
        due = min(n, int((now - t0) * rate) + 1) if rate else min(n, sent + 256)
        due = min(due, acks.acked + max_outstanding)
        if due > sent:
            for k in range(sent, due):
                stamps[k] = now
            sock.sendall(b"".join(packets[sent:due]))
            sent = due
        elif rate:
            time.sleep(max(0.0, min(0.002, t0 + sent / rate - time.monotonic())))
        else:
            time.sleep(0.0005)
    t_sent = time.monotonic()
    acks.done.wait(60)
    cpu = _cpu_s() - cpu_start
    with contextlib.suppress(OSError):
        sock.sendall(DISCONNECT)
    sock.close()
    Path(args.stamps).write_bytes(stamps.tobytes())
    return {
        "sent": sent,
        "acked": acks.acked,
        "publish_rate": n / max(t_sent - t0, 1e-9),
        "cpu_s": cpu,
    }


# -- child: the gateway ------------------------------------------------------------------------


def gateway_config(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "gateway": {
            "id": GATEWAY_ID,
            "state_dir": args.work_dir,
            "shutdown_flush_s": 10.0,
            "log_level": "warning",
        },
        "outbox": {"synchronous": "full"},
        "uplink": {
            "type": "mqtt",
            "host": "127.0.0.1",
            "port": args.upstream_port,
            "client_id": f"bench-uplink-{args.client_id}",
            "tls": {"enabled": False},
            "allow_insecure": True,
            "batch_max_events": args.uplink_batch,
            "max_inflight": args.uplink_inflight,
            "stats_interval_s": 3600,
            "reconnect_min_s": 0.1,
            "reconnect_max_s": 0.5,
        },
        "sources": [
            {
                "type": "chirpstack",
                "host": "127.0.0.1",
                "port": args.port,
                "client_id": args.client_id,
                "reconnect_min_s": 0.1,
                "reconnect_max_s": 0.5,
                **({"max_unacked": args.max_unacked} if args.max_unacked else {}),
                **({"receive_maximum": args.receive_maximum} if args.receive_maximum else {}),
            }
        ],
        "profiles": {
            "radar-gauge": {
                "codec": "dragino-lmds200",
                "fields": [
                    {"field": "dis1", "name": "distance", "unit": "cm"},
                    {"field": "Bat", "name": "battery", "unit": "V", "valid_min": 2.5},
                ],
                "water_level": {"distance": "distance", "sensor_min_cm": 30, "sensor_max_cm": 2000},
            }
        },
        "devices": [
            {
                "device_profile": "LMDS200",
                "profile": "radar-gauge",
                "params": {"mounting_height_cm": MOUNTING_HEIGHT_CM},
            }
        ],
    }


async def run_gateway(args: argparse.Namespace) -> dict[str, Any]:
    from gateway.app import Gateway
    from gateway.config import config_from_dict
    from gateway.process import tune_daemon

    # What `edge-gateway run` has loaded (its command line module), for an honest RSS.
    importlib.import_module("gateway.cli")
    gateway = Gateway(config_from_dict(gateway_config(args), "bench"), {})
    tune_daemon()  # as `edge-gateway run` does before it starts the gateway
    task = asyncio.create_task(gateway.run(), name="gateway")
    source: Any = None
    async with asyncio.timeout(30):
        while source is None:
            if task.done():
                task.result()
            with contextlib.suppress(StopIteration):
                source = gateway.source("chirpstack")
            await asyncio.sleep(0.002)
        await source.connected.wait()
    print(f"READY {time.monotonic()!r}", flush=True)
    rc = await task
    counters = gateway.metrics.counters
    return {
        "rc": rc,
        "events_in": counters["events_in"],
        "events_out": counters["events_out"],
        "messages_out": counters["messages_out"],
        "source_errors": counters["source_errors"],
        "source": dict(source.counters),
    }


# -- child: the bare aiomqtt relay -------------------------------------------------------------


async def run_relay(args: argparse.Namespace) -> dict[str, Any]:
    import aiomqtt

    inflight = 64
    sub = aiomqtt.Client(
        "127.0.0.1",
        args.port,
        identifier=args.client_id,
        protocol=aiomqtt.ProtocolVersion.V311,
        clean_session=False,
    )
    pub = aiomqtt.Client(
        "127.0.0.1",
        args.upstream_port,
        identifier=f"{args.client_id}-up",
        protocol=aiomqtt.ProtocolVersion.V311,
        clean_session=True,
        max_inflight_messages=inflight,
    )
    pub.pending_calls_threshold = inflight + 16
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    relayed = 0
    slots = asyncio.Semaphore(inflight)
    pending: set[asyncio.Task[None]] = set()

    async def forward(topic: str, payload: bytes) -> None:
        try:
            await pub.publish(RELAY_PREFIX + topic, payload, qos=1, timeout=30)
        finally:
            slots.release()

    async def consume() -> None:
        nonlocal relayed
        async for message in sub.messages:
            payload = message.payload
            assert isinstance(payload, bytes)
            await slots.acquire()
            task = asyncio.create_task(forward(message.topic.value, payload))
            pending.add(task)
            task.add_done_callback(pending.discard)
            relayed += 1

    async with sub, pub:
        await sub.subscribe(CHIRPSTACK_FILTER, qos=1)
        print(f"READY {time.monotonic()!r}", flush=True)
        consumer = asyncio.create_task(consume())
        await stop.wait()
        consumer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await consumer
        if pending:
            await asyncio.wait(pending)
    return {"relayed": relayed}


# -- child: the gateway's ingest path with a strict in-flight window, no MQTT ---------------------


async def run_strict_window(args: argparse.Namespace) -> dict[str, Any]:
    """ChirpStackSource → Pipeline → Outbox in process, at most ``--window`` uplinks unacked.

    What a broker that enforces ``max_inflight_messages`` lets through (mosquitto 2.0.11 does not,
    see bench/README.md): uplink k + window is handed over only once uplink k is acknowledged,
    which the source does after the outbox commit. A consumer task takes the committed rows and
    acknowledges them as the uplink would after its PUBACK. No broker, no paho.
    """
    from drivers.chirpstack import BrokerSettings, ChirpStackSource
    from gateway.app import build_catalog
    from gateway.config import PipelineSection, config_from_dict
    from gateway.health import Metrics
    from gateway.outbox import Outbox
    from gateway.pipeline import Pipeline
    from gateway.wire import Encoding

    cfg = config_from_dict(gateway_config(args), "bench")
    factory = UplinkFactory(args.run)
    n = args.count
    uplinks = [(topic_of(i), factory.payload(i)) for i in range(n)]
    source = ChirpStackSource("chirpstack", BrokerSettings("-", 1, "-"), build_catalog(cfg))
    window = asyncio.Semaphore(args.window)
    outbox_path = Path(args.work_dir) / "outbox.sqlite3"
    async with Outbox(outbox_path, cfg.outbox, Encoding.JSON) as outbox:
        pipeline = Pipeline(PipelineSection(), outbox, Metrics())

        async def emit(item: Any, on_stored: Any = None) -> None:
            await pipeline.submit(item, on_stored)

        async def upstream() -> None:
            forwarded = 0
            while forwarded < n:
                rows = await outbox.fetch(500, timeout_s=5)
                if not rows:
                    raise RuntimeError(f"stalled after {forwarded} uplinks")
                outbox.ack(row.seq for row in rows)
                forwarded += len(rows)

        storing = asyncio.create_task(pipeline.run())
        forwarding = asyncio.create_task(upstream())
        cpu_start, t0 = _cpu_s(), time.monotonic()
        for topic, payload in uplinks:
            await window.acquire()
            await source._process(topic, payload, emit, lambda _k, _d: None, window.release)
        await forwarding
        elapsed, cpu = time.monotonic() - t0, _cpu_s() - cpu_start
        await pipeline.close()
        await storing
    return {"uplinks": n, "elapsed_s": elapsed, "cpu_s": cpu, "rate": n / elapsed}


def child_main(args: argparse.Namespace) -> int:
    if args.consumer_cpu is not None and args.role != "publisher":
        os.sched_setaffinity(0, {args.consumer_cpu})
    if args.role == "publisher":
        result = run_publisher(args)
    else:
        from gateway.logs import configure_logging

        # Warnings and errors only, on stderr: stdout carries READY and the result line.
        configure_logging("warning", "json", sys.stderr)
        runners = {"gateway": run_gateway, "relay": run_relay, "strict": run_strict_window}
        result = asyncio.run(runners[args.role](args))
    result["peak_rss_mb"] = peak_rss_mb()
    print(json.dumps(result), flush=True)
    return 0


# -- parent ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Scenario:
    name: str
    broker: str  # "stock" or "deep"
    backlog: int  # queued before the consumer starts
    live: int  # published once the consumer is subscribed
    rate: float  # 0: as fast as possible
    what: str
    # False where the publisher may outrun the consumer on purpose (paced at the target with the
    # stock queue limit): a loss there is a missed target, not a malfunction.
    must_not_lose: bool = True


@dataclass
class Run:
    scenario: Scenario
    consumer: str
    error: str = ""
    published: int = 0
    acked_by_broker: int = 0
    unique: int = 0
    duplicates: int = 0
    foreign: int = 0
    other_events: int = 0
    rate: float = float("nan")
    publish_rate: float = float("nan")
    p50_ms: float = float("nan")
    p99_ms: float = float("nan")
    max_ms: float = float("nan")
    peak_rss_mb: float = float("nan")
    cores: dict[str, float] = field(default_factory=dict)
    cpu_us: float = float("nan")  # the consumer's CPU time per delivered uplink
    child: dict[str, Any] = field(default_factory=dict)
    broker_drops: int = 0  # "Outgoing messages are being dropped" lines for the consumer
    gap_events: int = 0  # uplink_gap events the gateway sent ...
    missed_frames: int = 0  # ... and the frames they say are missing

    @property
    def lost(self) -> int:
        return self.published - self.unique


def _k(rate: float) -> str:
    return f"{rate / 1000:g}k" if rate >= 1000 else f"{rate:g}"


def scenarios(args: argparse.Namespace) -> list[Scenario]:
    n = args.events
    rate, safe = args.rate, args.safe_rate
    latency_n = int(LATENCY_RATE * args.latency_s)
    cold = f"stock, {STOCK_QUEUE} queued, cold start, then paced"
    out = [
        Scenario("live-max", "deep", 0, n, 0, "deep queue, publisher as fast as it can"),
        Scenario("drain", "deep", n, 0, 0, f"deep queue, {n:,} queued, then a cold start"),
        Scenario(
            f"live-{_k(rate)}",
            "stock",
            0,
            args.paced_events,
            rate,
            f"stock, paced {rate:,.0f}/s",
            must_not_lose=False,
        ),
        Scenario(
            f"cold-start-{_k(rate)}",
            "stock",
            STOCK_QUEUE,
            args.paced_events,
            rate,
            f"{cold} {rate:,.0f}/s",
            must_not_lose=False,
        ),
        Scenario(
            f"cold-start-{_k(safe)}",
            "stock",
            STOCK_QUEUE,
            int(safe * args.safe_s),
            safe,
            f"{cold} {safe:,.0f}/s",
        ),
        Scenario(
            f"strict-window-{STRICT_WINDOW}",
            "none",
            0,
            n,
            0,
            f"in process, no MQTT: at most {STRICT_WINDOW} uplinks unacknowledged, as a broker "
            "that enforces max_inflight_messages allows",
        ),
        Scenario(
            f"latency-{_k(LATENCY_RATE)}",
            "stock",
            0,
            latency_n,
            LATENCY_RATE,
            f"stock, paced {LATENCY_RATE}/s",
        ),
    ]
    if args.only:
        wanted = set(args.only.split(","))
        unknown = wanted - {s.name for s in out}
        if unknown:
            known = ", ".join(s.name for s in out)
            raise SystemExit(f"unknown scenario(s) {', '.join(sorted(unknown))}; known: {known}")
        out = [s for s in out if s.name in wanted]
    return out


class Child:
    """A child process of this script; its READY line and final JSON line are collected."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self._out: list[bytes] = []
        self._err: list[bytes] = []
        self.ready_at: float | None = None
        self._ready = asyncio.Event()
        self._readers = [
            asyncio.create_task(self._read_stdout()),
            asyncio.create_task(read_all(proc.stderr, self._err)),
        ]

    @classmethod
    async def start(cls, *argv: str, stdin: bool = False) -> Child:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            str(SCRIPT),
            *argv,
            stdin=asyncio.subprocess.PIPE if stdin else None,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        return cls(proc)

    def go(self) -> None:
        """Start a gated publisher (see run_publisher)."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(b"GO\n")

    async def _read_stdout(self) -> None:
        assert self.proc.stdout is not None
        while line := await self.proc.stdout.readline():
            if line.startswith(b"READY "):
                self.ready_at = float(line.split()[1])
                self._ready.set()
            else:
                self._out.append(line)

    async def ready(self, timeout_s: float) -> float:
        waiter = asyncio.ensure_future(self._ready.wait())
        exited = asyncio.ensure_future(self.proc.wait())
        await asyncio.wait({waiter, exited}, timeout=timeout_s, return_when="FIRST_COMPLETED")
        waiter.cancel()
        exited.cancel()
        if self.ready_at is None:
            raise RuntimeError(f"child not ready: {self.stderr()[-2000:]}")
        return self.ready_at

    async def finish(self, timeout_s: float, *, terminate: bool) -> dict[str, Any]:
        if terminate and self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            async with asyncio.timeout(timeout_s):
                await self.proc.wait()
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()
        await asyncio.gather(*self._readers)
        lines = [line for line in b"".join(self._out).decode().splitlines() if line.strip()]
        if self.proc.returncode != 0 or not lines:
            raise RuntimeError(f"child exit {self.proc.returncode}: {self.stderr()[-3000:]}")
        result: dict[str, Any] = json.loads(lines[-1])
        return result

    def stderr(self) -> str:
        return b"".join(self._err).decode(errors="replace")

    def kill(self) -> None:
        if self.proc.returncode is None:
            self.proc.kill()


class CpuSampler:
    """CPU seconds of named processes (and the whole machine), sampled every 0.2 s.

    The window ends at the sample just after the last uplink arrived, not when the run ends: a
    run that lost uplinks waits ``--stall-s`` for them, and that idle time would dilute the
    figures.
    """

    PERIOD_S = 0.2

    def __init__(self, pids: dict[str, int | None]) -> None:
        self._pids = pids
        self._samples: list[tuple[float, dict[str, float]]] = []
        self._task: asyncio.Task[None] | None = None
        self._end: tuple[float, dict[str, float]] | None = None

    def _sample(self) -> tuple[float, dict[str, float]]:
        out = {name: proc_cpu_s(pid) for name, pid in self._pids.items()}
        out["machine"] = machine_busy_s()
        return time.monotonic(), out

    def start(self) -> None:
        self._samples = [self._sample()]
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.PERIOD_S)
            self._samples.append(self._sample())

    def stop(self, until: float, extra: dict[str, float] | None = None) -> dict[str, float]:
        """Cores used per process from start to the first sample at or after ``until``.

        ``extra``: CPU seconds reported by processes that are already gone (the publisher).
        """
        if self._task is not None:
            self._task.cancel()
        self._samples.append(self._sample())
        t0, first = self._samples[0]
        self._end = next((s for s in self._samples if s[0] >= until), self._samples[-1])
        t1, last = self._end
        elapsed = max(t1 - t0, 1e-9)
        used = {name: (last[name] - first[name]) / elapsed for name in last}
        for name, seconds in (extra or {}).items():
            used[name] = seconds / elapsed
        known = sum(v for name, v in used.items() if name != "machine" and not math.isnan(v))
        used["other"] = max(0.0, used.pop("machine") - known)
        return used

    def used_s(self, name: str) -> float:
        """CPU seconds ``name`` used in the window (after stop())."""
        assert self._end is not None
        return self._end[1][name] - self._samples[0][1][name]


def _drop_lines(broker: Any, client_id: str) -> int:
    """How often mosquitto said it dropped messages for ``client_id`` (its queue was full)."""
    text = f"Outgoing messages are being dropped for client {client_id}."
    return sum(1 for line in broker.log_text().splitlines() if line.endswith(text))


class Bench:
    def __init__(self, args: argparse.Namespace, brokers: dict[str, Any], upstream: Any) -> None:
        self.args = args
        self.brokers = brokers
        self.upstream = upstream
        self.run_number = 0
        self.tmp = Path(tempfile.mkdtemp(prefix="bench-chirpstack-"))

    async def publish(
        self, broker: Any, first: int, count: int, rate: float, *, gated: bool = False
    ) -> Child:
        stamps = self.tmp / f"stamps-{self.run_number}-{first}"
        return await Child.start(
            "--role",
            "publisher",
            "--host",
            broker.host,
            "--port",
            str(broker.port),
            "--run",
            str(self.run_number),
            "--first",
            str(first),
            "--count",
            str(count),
            "--rate",
            str(rate),
            "--stamps",
            str(stamps),
            *(["--gated"] if gated else []),
            stdin=gated,
        )

    async def start_profiler(self, child: Child, name: str) -> asyncio.subprocess.Process | None:
        """py-spy on the consumer (``--profile DIR``): collapsed stacks, for profiling only."""
        if not self.args.profile:
            return None
        out = Path(self.args.profile) / f"{name}.txt"
        out.parent.mkdir(parents=True, exist_ok=True)
        return await asyncio.create_subprocess_exec(
            str(Path(sys.executable).parent / "py-spy"),
            "record",
            "--pid",
            str(child.proc.pid),
            "--rate",
            "200",
            "--format",
            "raw",
            "--threads",
            "--output",
            str(out),
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )

    def stamps(self, first: int, count: int) -> array[float]:
        out = array("d")
        out.frombytes((self.tmp / f"stamps-{self.run_number}-{first}").read_bytes())
        assert len(out) == count
        return out

    async def start_consumer(self, consumer: str, broker: Any, client_id: str) -> Child:
        return await Child.start(
            "--role",
            consumer,
            "--host",
            broker.host,
            "--port",
            str(broker.port),
            "--upstream-port",
            str(self.upstream.port),
            "--client-id",
            client_id,
            "--work-dir",
            str(self.tmp / f"state-{self.run_number}"),
            "--uplink-batch",
            str(self.args.uplink_batch),
            "--uplink-inflight",
            str(self.args.uplink_inflight),
            "--max-unacked",
            str(self.args.max_unacked),
            "--receive-maximum",
            str(self.args.receive_maximum),
            *self.consumer_cpu(),
        )

    def consumer_cpu(self) -> list[str]:
        cpu = self.args.consumer_cpu
        return [] if cpu is None else ["--consumer-cpu", str(cpu)]

    async def start_cold(
        self, scenario: Scenario, consumer: str, broker: Any, client_id: str, children: list[Child]
    ) -> tuple[Child, Child | None]:
        """The consumer, and for a cold start with live uplinks their publisher, gated.

        Started and connected before the consumer, the publisher is told to go the moment the
        consumer is subscribed: the backlog has to be drained while the live uplinks come in.
        (Started after it, as until 2026-11-22's fifth session, it began ~0.7 s later, once the
        consumer had drained the backlog alone, and that gap counted in the rate.)
        """
        publisher = None
        if scenario.backlog and scenario.live:
            publisher = await self.publish(
                broker, scenario.backlog, scenario.live, scenario.rate, gated=True
            )
            children.append(publisher)
            await publisher.ready(60)
        child = await self.start_consumer(consumer, broker, client_id)
        children.append(child)
        return child, publisher

    async def run_strict(self, scenario: Scenario) -> Run:
        """The in-process run with a strict in-flight window (gateway code only, no broker)."""
        result = Run(scenario, "gateway")
        child = await Child.start(
            "--role",
            "strict",
            "--run",
            str(self.run_number),
            "--count",
            str(scenario.live),
            "--window",
            str(STRICT_WINDOW),
            "--work-dir",
            str(self.tmp / f"state-{self.run_number}"),
            "--port",
            "1",
            "--upstream-port",
            "1",
            "--client-id",
            "strict",
            *self.consumer_cpu(),
        )
        try:
            out = await child.finish(120 + scenario.live / 200, terminate=False)
        except Exception as exc:  # noqa: BLE001 -- reported in the table
            result.error = f"{type(exc).__name__}: {exc}"
            return result
        result.child = out
        result.published = result.unique = result.acked_by_broker = out["uplinks"]
        result.rate = out["rate"]
        result.cpu_us = out["cpu_s"] * 1e6 / out["uplinks"]
        result.cores = {"consumer": out["cpu_s"] / out["elapsed_s"]}
        # Not reported: this process holds every uplink's JSON in memory before it starts.
        result.peak_rss_mb = float("nan")
        return result

    async def run(self, scenario: Scenario, consumer: str) -> Run:
        self.run_number += 1
        if scenario.broker == "none":
            return await self.run_strict(scenario)
        result = Run(scenario, consumer)
        broker = self.brokers[scenario.broker]
        n = scenario.backlog + scenario.live
        client_id = f"bench-{consumer}-{scenario.name}-{self.run_number}"
        event_ids = expected_event_ids(self.run_number, n) if consumer == "gateway" else None
        drops_before = _drop_lines(broker, client_id)
        _, sub = await asyncio.get_running_loop().create_connection(
            lambda: UpstreamSubscriber(n, event_ids), self.upstream.host, self.upstream.port
        )
        children: list[Child] = []
        try:
            await asyncio.wait_for(sub.subscribed, 10)
            if scenario.backlog:
                # The persistent session exists before the backlog is published.
                await asyncio.to_thread(
                    create_session, broker.host, broker.port, client_id, CHIRPSTACK_FILTER
                )
                children.append(await self.publish(broker, 0, scenario.backlog, 0))
                result.acked_by_broker += (await children[-1].finish(120, terminate=False))["acked"]
            child, publisher = await self.start_cold(
                scenario, consumer, broker, client_id, children
            )
            ready_at = await child.ready(60)
            if publisher is not None:
                publisher.go()
            profiler = await self.start_profiler(child, f"{scenario.name}-{consumer}")
            sampler = CpuSampler(
                {
                    "consumer": child.proc.pid,
                    "cs_broker": broker.pid,
                    "up_broker": self.upstream.pid,
                    "verifier": os.getpid(),
                }
            )
            sampler.start()
            live: dict[str, Any] = {}
            if scenario.live:
                if publisher is None:
                    publisher = await self.publish(
                        broker, scenario.backlog, scenario.live, scenario.rate
                    )
                    children.append(publisher)
                live = await publisher.finish(120 + scenario.live / 100, terminate=False)
                result.acked_by_broker += live["acked"]
                result.publish_rate = live["publish_rate"]
            await self.settle(sub, result.acked_by_broker)
            result.cores = sampler.stop(
                max(sub.first_rx), extra={"publisher": live.get("cpu_s", 0.0)}
            )
            result.cpu_us = sampler.used_s("consumer") * 1e6 / max(sub.unique, 1)
            if profiler is not None:
                profiler.send_signal(signal.SIGINT)
                await profiler.wait()
            result.child = await child.finish(60, terminate=True)
        except Exception as exc:  # noqa: BLE001 -- reported in the table, the other runs go on
            result.error = f"{type(exc).__name__}: {exc}"
            for c in children:
                c.kill()
                await c.proc.wait()
            return result
        finally:
            sub.close()
        self.summarize(result, sub, ready_at)
        result.broker_drops = _drop_lines(broker, client_id) - drops_before
        return result

    async def settle(self, sub: UpstreamSubscriber, expected: int) -> None:
        """Until every uplink the broker accepted has arrived, or nothing came for stall_s."""
        while sub.unique < expected:
            sub.changed.clear()
            try:
                await asyncio.wait_for(sub.changed.wait(), self.args.stall_s)
            except TimeoutError:
                return

    def summarize(self, result: Run, sub: UpstreamSubscriber, ready_at: float) -> None:
        scenario = result.scenario
        result.published = scenario.backlog + scenario.live
        result.unique = sub.unique
        result.duplicates = sum(sub.copies) - sub.unique
        result.foreign = sub.foreign
        result.other_events = sub.other_events
        result.gap_events = sub.gap_events
        result.missed_frames = sub.missed_frames
        result.peak_rss_mb = result.child.get("peak_rss_mb", float("nan"))
        # A backlog is there from the consumer's subscription on; live uplinks from the first
        # publish on.
        t_first = ready_at
        if scenario.live:
            stamps = self.stamps(scenario.backlog, scenario.live)
            if not scenario.backlog:
                t_first = stamps[0]
            lat = sorted(
                (sub.first_rx[scenario.backlog + k] - t) * 1000
                for k, t in enumerate(stamps)
                if sub.copies[scenario.backlog + k]
            )
            result.p50_ms = percentile(lat, 0.50)
            result.p99_ms = percentile(lat, 0.99)
            result.max_ms = lat[-1] if lat else float("nan")
        result.rate = result.unique / max(max(sub.first_rx) - t_first, 1e-9)

    def close(self) -> None:
        for path in sorted(self.tmp.rglob("*"), reverse=True):
            if path.is_dir():
                path.rmdir()
            else:
                path.unlink()
        self.tmp.rmdir()


def report(runs: list[Run], args: argparse.Namespace) -> bool:
    rows = []
    for r in runs:
        s = r.scenario
        if r.error:
            rows.append([s.name, r.consumer, "ERROR", *["-"] * 10])
            continue
        rows.append(
            [
                s.name,
                r.consumer,
                f"{r.published:,}",
                f"{r.unique:,}",
                f"{r.lost:,}",
                str(r.duplicates),
                fmt(r.rate, ",.0f"),
                fmt(r.publish_rate, ",.0f") if s.live else "-",
                fmt(r.p50_ms, ".1f") if s.live else "-",
                fmt(r.p99_ms, ".1f") if s.live else "-",
                fmt(r.peak_rss_mb, ".1f"),
                fmt(r.cpu_us, ".0f"),
                " ".join(
                    fmt(r.cores.get(k), ".2f")
                    for k in (
                        "consumer",
                        "cs_broker",
                        "publisher",
                        "up_broker",
                        "verifier",
                        "other",
                    )
                ),
            ]
        )
    print()
    print_table(
        [
            "scenario",
            "consumer",
            "published",
            "delivered",
            "lost",
            "dup",
            "uplinks/s",
            "pub/s",
            "p50 ms",
            "p99 ms",
            "peak RSS MB",
            "CPU us/uplink",
            "cores: cons cs-brk pub up-brk verif other",
        ],
        rows,
    )
    print(
        "uplinks/s: delivered upstream / (first publish, or the consumer's subscription for a "
        "backlog, → last arrival).\npub/s: the publisher's own rate. p50/p99: publish → arrival "
        "upstream (live uplinks only).\nlost: published (and PUBACKed by the broker) but never "
        "seen upstream. dup: extra copies of an id."
    )
    for r in runs:
        name = f"{r.scenario.name} / {r.consumer}"
        if r.error:
            print(f"\nERROR in {name}: {r.error}")
            continue
        if r.foreign:
            print(f"{name}: {r.foreign} readings with ids that are not this run's")
        if r.lost:
            said = (
                "mosquitto logged that it dropped messages for the consumer (its queue was full)"
                if r.broker_drops
                else "mosquitto logged no drops for the consumer"
            )
            dropped = r.child.get("source", {}).get("broker_dropped", 0)
            gaps = (
                f"; the gateway reported {r.gap_events} uplink_gap events, "
                f"{r.missed_frames:,} frames missing, and counted {dropped:,} uplinks the broker "
                "dropped (packet ids it skipped)"
                if r.consumer == "gateway"
                else ""
            )
            print(f"{name}: {r.lost:,} lost, {said}{gaps}")
    disturbed = [r for r in runs if not r.error and r.cores.get("other", 0) > OTHER_LOAD_WARN]
    if disturbed:
        print(
            f"\nWARNING: processes outside the benchmark used more than {OTHER_LOAD_WARN} of a "
            f"core during {len(disturbed)} run(s); those figures are disturbed."
        )
    gw = [r for r in runs if r.consumer == "gateway" and not r.error]
    print("\nTargets (gateway):")
    for r in gw:
        if r.scenario.rate and r.scenario.rate < TARGET_RATE:
            continue
        paced = bool(r.scenario.rate)
        rate_ok = r.rate >= TARGET_RATE * 0.98 if paced else r.rate >= TARGET_RATE
        note = " and no loss (paced at the target: rate judged within 2 %)" if paced else ""
        print(
            f"  >= {TARGET_RATE:,} uplinks/s{note}, {r.scenario.name}: {r.rate:,.0f}/s, "
            f"{r.lost:,} lost  {verdict(rate_ok and r.lost == 0)}"
        )
    for r in gw:
        print(
            f"  zero loss, {r.scenario.name} ({r.scenario.what}): {r.lost} lost of "
            f"{r.published:,}  {verdict(r.lost == 0)}"
        )
    for broker, what in (
        ("stock", "stock broker"),
        ("deep", "deep-queue broker (mosquitto 2.0.11 pushes the backlog unacknowledged)"),
    ):
        measured = [r for r in gw if r.scenario.broker == broker]
        if measured:
            worst = max(measured, key=lambda r: r.peak_rss_mb)
            print(
                f"  peak RSS <= {TARGET_RSS_MB:.0f} MB, {what} (worst: {worst.scenario.name}): "
                f"{worst.peak_rss_mb:.1f} MB  {verdict(worst.peak_rss_mb <= TARGET_RSS_MB)}"
            )
    for r in gw:
        if r.scenario.name.startswith("latency"):
            print(
                f"  p99 ingest-to-publish < {TARGET_P99_MS:.0f} ms at {LATENCY_RATE}/s: "
                f"{r.p99_ms:.1f} ms (p50 {r.p50_ms:.1f}, max {r.max_ms:.1f})  "
                f"{verdict(r.p99_ms < TARGET_P99_MS)}"
            )
    errors = [r for r in runs if r.error]
    gateway_lost = [r for r in gw if (r.lost and r.scenario.must_not_lose) or r.foreign]
    return not errors and not gateway_lost


async def parent_async(args: argparse.Namespace, brokers: dict[str, Any], upstream: Any) -> bool:
    chosen = scenarios(args)
    consumers = args.consumers.split(",")
    factory = UplinkFactory(0)
    factory.check([0, 1, 199, 12345])
    sample = factory.payload(0)
    print(
        f"edge-gateway ChirpStack ingest: {os.cpu_count()} CPUs, Python {sys.version.split()[0]}, "
        f"load average {os.getloadavg()[0]:.2f}; max_unacked {args.max_unacked or 'default'}, "
        f"receive_maximum {args.receive_maximum or 'default'}, "
        f"uplink batches of {args.uplink_batch}, "
        f"outbox synchronous=full"
        + (f"; consumer alone on CPU {args.consumer_cpu}" if args.isolate else "")
    )
    print(f"sample uplink ({len(sample)} bytes, {DEVICES} devices): {sample.decode()}")
    bench = Bench(args, brokers, upstream)
    runs = []
    try:
        for scenario in chosen:
            for consumer in consumers:
                if scenario.broker == "none" and consumer != "gateway":
                    continue  # the gateway's own code, without MQTT: nothing to compare
                t = time.monotonic()
                run = await bench.run(scenario, consumer)
                runs.append(run)
                status = (
                    f"ERROR ({run.error.splitlines()[0][:200]})"
                    if run.error
                    else f"{run.unique:,}/{run.published:,} delivered, {run.rate:,.0f}/s"
                )
                print(
                    f"  {scenario.name:<10} {consumer:<7} {status} ({time.monotonic() - t:.1f}s)",
                    flush=True,
                )
    finally:
        bench.close()
    return report(runs, args)


def parent_main(args: argparse.Namespace) -> int:
    from tests.support.mosquitto import Mosquitto

    if args.isolate:
        # Everything this process starts (brokers, publisher, verifier) inherits the first
        # core; the consumer moves itself to the last (child_main).
        cpus = sorted(os.sched_getaffinity(0))
        if len(cpus) < 2:
            raise SystemExit("--isolate needs at least 2 CPUs")
        os.sched_setaffinity(0, set(cpus[:-1]))
        args.consumer_cpu = cpus[-1]
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-brokers-")))
        brokers = {
            "stock": stack.enter_context(Mosquitto(tmp / "stock", extra_config=STOCK_CONFIG)),
            "deep": stack.enter_context(Mosquitto(tmp / "deep", extra_config=DEEP_QUEUE_CONFIG)),
        }
        upstream = stack.enter_context(Mosquitto(tmp / "upstream"))
        ok = asyncio.run(parent_async(args, brokers, upstream))
    return 0 if ok else 1


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run (< 20 s)")
    parser.add_argument("--events", type=int, help="uplinks for live-max and drain (40,000)")
    parser.add_argument(
        "--paced-events", type=int, help="uplinks published at --rate (live-12k, cold-start)"
    )
    parser.add_argument(
        "--rate", type=float, default=TARGET_RATE, help="the target's paced rate (12,000/s)"
    )
    parser.add_argument(
        "--safe-rate",
        type=float,
        default=SAFE_RATE,
        help=f"a paced rate below the consumers' capacity, for a cold start ({SAFE_RATE:,}/s)",
    )
    parser.add_argument(
        "--safe-s", type=float, help="seconds published at --safe-rate after a cold start (6)"
    )
    parser.add_argument(
        "--latency-s", type=float, help=f"seconds of the {LATENCY_RATE}/s latency run (8)"
    )
    parser.add_argument(
        "--only",
        help="scenarios: live-max,drain,live-12k,cold-start-12k,cold-start-2k,strict-window-20,"
        "latency-300 (default: all)",
    )
    parser.add_argument("--consumers", default="relay,gateway", help="relay,gateway (both)")
    parser.add_argument("--uplink-batch", type=int, default=100, help="uplink.batch_max_events")
    parser.add_argument(
        "--max-unacked",
        type=int,
        default=0,
        help="the ChirpStack source's max_unacked (default: the config default, 1000)",
    )
    parser.add_argument(
        "--receive-maximum",
        type=int,
        default=0,
        help="the ChirpStack source's receive_maximum (default: the config default, 65535)",
    )
    parser.add_argument(
        "--uplink-inflight", type=int, default=8, help="uplink.max_inflight (messages)"
    )
    parser.add_argument("--profile", metavar="DIR", help="py-spy the consumers into DIR")
    parser.add_argument(
        "--isolate",
        action="store_true",
        help="the consumer alone on the last CPU, brokers, publisher and verifier on the others "
        "(default: all share every CPU, as on a gateway)",
    )
    parser.add_argument(
        "--stall-s", type=float, default=3.0, help="give up when nothing arrives for this long"
    )
    # Child-only options: the parent passes them.
    parser.add_argument(
        "--role", choices=("publisher", "gateway", "relay", "strict"), help=argparse.SUPPRESS
    )
    parser.add_argument("--window", type=int, default=20, help=argparse.SUPPRESS)
    parser.add_argument("--host", default="127.0.0.1", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--upstream-port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--client-id", help=argparse.SUPPRESS)
    parser.add_argument("--work-dir", help=argparse.SUPPRESS)
    parser.add_argument("--run", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--first", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--count", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--stamps", help=argparse.SUPPRESS)
    parser.add_argument("--gated", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--consumer-cpu", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.events is None:
        args.events = 3_000 if args.quick else 40_000
    if args.paced_events is None:
        args.paced_events = 3_000 if args.quick else 36_000
    if args.latency_s is None:
        args.latency_s = 2.0 if args.quick else 8.0
    if args.safe_s is None:
        args.safe_s = 1.0 if args.quick else 6.0
    if args.quick and not args.only:
        args.only = f"drain,cold-start-{_k(args.safe_rate)},latency-{_k(LATENCY_RATE)}"
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    return child_main(args) if args.role else parent_main(args)


if __name__ == "__main__":
    sys.exit(main())
