"""ChirpStack v4 integration messages, built with chirpstack-api, through a real mosquitto.

The test plays ChirpStack: it publishes uplink/join/status events on ChirpStack's topics with
both marshalers, and asserts the compact events the gateway publishes upstream.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
from chirpstack_api import integration
from google.protobuf import json_format

from drivers.mqtt_intake import MAX_PACKET_BYTES
from gateway.app import Gateway
from gateway.config import config_from_dict
from gateway.types import Event
from tests.integration.helpers import Tally, mqtt_config
from tests.support.mosquitto import Mosquitto, Recorder, require_mosquitto

pytestmark = pytest.mark.broker

BASE = "edge/gateway/gw-test"
GAUGE = "a84041000181c061"
CLIMATE = "a84041000181c062"
APP = "3f6b1a2c-0000-4000-8000-000000000001"


def uplink(
    dev_eui: str,
    f_cnt: int,
    distance_mm: float | None = None,
    *,
    dedup: str | None = None,
    profile: str = "LDDS75",
    rssi: int = -90,
    snr: float = 7.5,
) -> integration.UplinkEvent:
    event = integration.UplinkEvent(
        deduplication_id=dedup if dedup is not None else f"dedup-{dev_eui}-{f_cnt}",
        f_cnt=f_cnt,
        f_port=2,
        data=bytes([f_cnt & 0xFF]),
    )
    event.time.FromJsonString("2024-06-01T12:00:00Z")
    event.device_info.dev_eui = dev_eui
    event.device_info.device_profile_name = profile
    event.device_info.application_id = APP
    rx = event.rx_info.add()
    rx.gateway_id = "0016c001f153a14c"
    rx.rssi = rssi
    rx.snr = snr
    if distance_mm is not None:
        event.object.update({"Distance": distance_mm, "Bat": 3.6})
    return event


def topic(dev_eui: str, event_type: str = "up") -> str:
    return f"application/{APP}/device/{dev_eui}/event/{event_type}"


def as_json(message: Any) -> bytes:
    return json_format.MessageToJson(message).encode()


def gateway_config(state: Path, port: int, marshaler: str = "auto") -> dict[str, Any]:
    cfg = mqtt_config(state, port, sources=[{"type": "chirpstack", "port": port}])
    cfg["sources"][0]["host"] = "127.0.0.1"
    cfg["sources"][0]["marshaler"] = marshaler
    cfg["sources"][0]["client_id"] = "gw-test-chirpstack"
    cfg["sources"][0]["reconnect_min_s"] = 0.1
    cfg["sources"][0]["reconnect_max_s"] = 0.5
    cfg["profiles"] = {
        "ultrasonic-gauge": {
            "prefer_object": True,
            "fields": [
                {"field": "Distance", "name": "distance", "unit": "cm", "scale": 0.1},
                {"field": "Bat", "name": "battery", "unit": "V"},
            ],
            "water_level": {"distance": "distance", "sensor_min_cm": 28, "sensor_max_cm": 750},
        }
    }
    cfg["devices"] = [
        {
            "device_profile": "LDDS75",
            "profile": "ultrasonic-gauge",
            "params": {"mounting_height_cm": 400},
        }
    ]
    return cfg


@asynccontextmanager
async def running(cfg: dict[str, Any]) -> AsyncIterator[Gateway]:
    gateway = Gateway(config_from_dict(cfg, "test"), {})
    task = asyncio.create_task(gateway.run())
    try:
        yield gateway
    finally:
        gateway.request_stop()
        assert await asyncio.wait_for(task, 20) == 0


async def wait_subscribed(gateway: Gateway) -> None:
    """Until the ChirpStack source is subscribed and the uplink listens for commands."""
    # Sources start right after the gateway task does; give it the moment to build them.
    async with asyncio.timeout(15):
        while not gateway_has_source(gateway):  # noqa: ASYNC110 -- polls until the source exists
            await asyncio.sleep(0.01)
        connected: asyncio.Event = gateway.source("chirpstack").connected  # type: ignore[attr-defined]
        await connected.wait()
        # The uplink counts its connection once it subscribed to commands: a command published
        # (at QoS 0) before that is lost, as the downlink test saw about one run in three.
        while gateway.metrics.counters["uplink_connects"] < 1:  # noqa: ASYNC110
            await asyncio.sleep(0.01)


def gateway_has_source(gateway: Gateway) -> bool:
    try:
        gateway.source("chirpstack")
    except StopIteration:
        return False
    return True


def kinds(tally: Tally) -> list[str]:
    return [e.kind for e in tally.update().events]


def of_kind(tally: Tally, kind: str) -> list[Event]:
    return [e for e in tally.update().events if e.kind == kind]


def values(event: Event) -> dict[str, Any]:
    return {m.name: m.value for m in event.values}


@pytest.mark.parametrize("marshaler", ["json", "protobuf"])
async def test_uplinks_become_water_level_readings(
    mosquitto: Mosquitto, tmp_path: Path, marshaler: str
) -> None:
    cfg = gateway_config(tmp_path / "state", mosquitto.port, marshaler="auto")
    async with Recorder(mosquitto.host, mosquitto.port, topics=[f"{BASE}/event/#"]) as rec:
        tally = Tally(rec.messages)
        async with running(cfg) as gateway:
            await wait_subscribed(gateway)
            async with aiomqtt.Client(mosquitto.host, mosquitto.port) as chirpstack:
                # The last at QoS 0, ChirpStack's default: taken too, and counted (with a
                # warning in the log) because the broker then neither queues nor waits.
                for f_cnt, distance, qos in ((1, 1234, 1), (2, 1250, 1), (3, 100, 0)):
                    message = uplink(GAUGE, f_cnt, distance)
                    body = as_json(message) if marshaler == "json" else message.SerializeToString()
                    await chirpstack.publish(topic(GAUGE), body, qos=qos)
            await rec.wait_for(lambda _m: len(of_kind(tally, "reading")) >= 3)
            counters = gateway.source("chirpstack").counters  # type: ignore[attr-defined]
            assert counters["qos0_messages"] == 1
    readings = of_kind(tally, "reading")
    first = values(readings[0])
    assert first["distance"] == pytest.approx(123.4)
    assert first["water_level"] == pytest.approx(400 - 123.4)
    assert first["battery"] == pytest.approx(3.6)
    assert first["rssi"] == -90 and first["snr"] == 7.5 and first["f_cnt"] == 1
    assert readings[0].device == GAUGE
    assert readings[0].quality == ()
    # 10 cm is below the sensor's blind zone: flagged, still forwarded.
    assert readings[2].quality == ("invalid_distance",)


async def test_duplicates_gaps_resets_unknown_and_malformed(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    cfg = gateway_config(tmp_path / "state", mosquitto.port)
    async with Recorder(mosquitto.host, mosquitto.port, topics=[f"{BASE}/event/#"]) as rec:
        tally = Tally(rec.messages)
        async with running(cfg) as gateway:
            await wait_subscribed(gateway)
            async with aiomqtt.Client(mosquitto.host, mosquitto.port) as cs:
                # One frame heard by two gateways: same deduplicationId, published twice.
                await cs.publish(topic(GAUGE), as_json(uplink(GAUGE, 10, 1000)), qos=1)
                await cs.publish(topic(GAUGE), as_json(uplink(GAUGE, 10, 1000, rssi=-110)), qos=1)
                # No deduplicationId: devEui + fCnt does the job.
                await cs.publish(topic(GAUGE), as_json(uplink(GAUGE, 11, 1000, dedup="")), qos=1)
                await cs.publish(topic(GAUGE), as_json(uplink(GAUGE, 11, 1000, dedup="")), qos=1)
                # Frames 12..14 lost on air.
                await cs.publish(topic(GAUGE), as_json(uplink(GAUGE, 15, 1000)), qos=1)
                # The device re-joined without a join event reaching us: counter restarts.
                await cs.publish(topic(GAUGE), as_json(uplink(GAUGE, 0, 1000, dedup="r0")), qos=1)
                # Garbage of several kinds, then an unknown device.
                await cs.publish(topic(GAUGE), b"{not json", qos=1)
                await cs.publish(topic(GAUGE), b'{"fCnt": "many"}', qos=1)
                await cs.publish(topic(GAUGE), b"\x08\xff\xff\xff\xff\xff\xff\xff\xff", qos=1)
                await cs.publish(topic(GAUGE, "bogus"), b"{}", qos=1)
                await cs.publish(
                    topic(CLIMATE), as_json(uplink(CLIMATE, 1, profile="LHT65")), qos=1
                )
                await cs.publish(
                    topic(CLIMATE), as_json(uplink(CLIMATE, 2, profile="LHT65")), qos=1
                )
                # Still alive and reading after all that.
                await cs.publish(topic(GAUGE), as_json(uplink(GAUGE, 1, 1111)), qos=1)
            await rec.wait_for(
                lambda _m: any(values(e).get("f_cnt") == 1 for e in of_kind(tally, "reading"))
            )
            counters = gateway.metrics.counters
            assert counters["source_errors_malformed_message"] == 4
            assert counters["source_errors_unknown_device"] == 2

    readings = of_kind(tally, "reading")
    assert [values(r)["f_cnt"] for r in readings] == [10, 11, 15, 0, 1]
    (gap,) = of_kind(tally, "uplink_gap")
    assert values(gap) == {"missed_frames": 3, "f_cnt": 15}
    (reset,) = of_kind(tally, "fcnt_reset")
    assert values(reset) == {"f_cnt": 0, "previous_f_cnt": 15}
    unknown = of_kind(tally, "unknown_device")
    assert len(unknown) == 1 and unknown[0].device == CLIMATE


async def test_messages_that_parse_but_cannot_be_carried_are_malformed_not_fatal(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    # Binary protobuf carries what JSON cannot: times beyond year 9999, NaN floats, enum
    # numbers this chirpstack-api does not name. None of them may stop the source.
    far_future = uplink(GAUGE, 1, 1000)
    far_future.time.seconds = 10**13
    # Valid, but its float sum rounds into year 10000 (a JSON uplink takes the same path).
    last_ns = json.dumps({"time": "9999-12-31T23:59:59.999999999Z"}).encode()
    nan_snr = uplink(GAUGE, 2, 1000)
    nan_snr.rx_info[0].snr = float("nan")
    nan_battery = integration.StatusEvent(deduplication_id="st-nan", battery_level=float("nan"))
    nan_battery.device_info.dev_eui = GAUGE
    future_log = integration.LogEvent(level=42, code=4242, description="from a newer ChirpStack")
    future_log.device_info.dev_eui = GAUGE
    future_log.time.FromJsonString("2024-06-01T12:00:00Z")
    cfg = gateway_config(tmp_path / "state", mosquitto.port)
    async with Recorder(mosquitto.host, mosquitto.port, topics=[f"{BASE}/event/#"]) as rec:
        tally = Tally(rec.messages)
        async with running(cfg) as gateway:
            await wait_subscribed(gateway)
            async with aiomqtt.Client(mosquitto.host, mosquitto.port) as cs:
                await cs.publish(topic(GAUGE), last_ns, qos=1)
                for event_type, message in (
                    ("up", far_future),
                    ("up", nan_snr),
                    ("status", nan_battery),
                    ("log", future_log),
                    ("up", uplink(GAUGE, 3, 1111)),
                ):
                    await cs.publish(topic(GAUGE, event_type), message.SerializeToString(), qos=1)
            await rec.wait_for(
                lambda _m: any(values(e).get("f_cnt") == 3 for e in of_kind(tally, "reading"))
            )
            counters = gateway.metrics.counters
            assert counters["source_errors_malformed_message"] == 4
            assert gateway.source("chirpstack").counters["malformed"] == 4  # type: ignore[attr-defined]
    assert [values(r)["f_cnt"] for r in of_kind(tally, "reading")] == [3]
    (log_event,) = of_kind(tally, "chirpstack_log")
    assert values(log_event)["code"] == "4242"


async def test_an_oversized_message_is_counted_acknowledged_and_not_redelivered(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    # Over the intake's limit (mosquitto's message_size_limit allows it): the intake skips it
    # unread; acknowledged, it does not come back when the gateway reconnects to its session.
    cfg = gateway_config(tmp_path / "state", mosquitto.port)
    huge = b"{" + b" " * MAX_PACKET_BYTES + b"}"
    async with Recorder(mosquitto.host, mosquitto.port, topics=[f"{BASE}/event/#"]) as rec:
        tally = Tally(rec.messages)

        def has_reading(f_cnt: int) -> bool:
            return any(values(e).get("f_cnt") == f_cnt for e in of_kind(tally, "reading"))

        async with running(cfg) as gateway:
            await wait_subscribed(gateway)
            async with aiomqtt.Client(mosquitto.host, mosquitto.port) as cs:
                await cs.publish(topic(GAUGE), huge, qos=1)
                await cs.publish(topic(GAUGE), as_json(uplink(GAUGE, 1, 1000)), qos=1)
            await rec.wait_for(lambda _m: has_reading(1))
            assert gateway.metrics.counters["source_errors_malformed_message"] == 1
            assert gateway.metrics.counters["source_errors"] == 1
        async with running(cfg) as gateway:
            await wait_subscribed(gateway)
            async with aiomqtt.Client(mosquitto.host, mosquitto.port) as cs:
                await cs.publish(topic(GAUGE), as_json(uplink(GAUGE, 2, 1000)), qos=1)
            await rec.wait_for(lambda _m: has_reading(2))
            # The broker resends unacknowledged messages first: nothing came back.
            assert gateway.metrics.counters["source_errors"] == 0


async def test_join_and_status_events(mosquitto: Mosquitto, tmp_path: Path) -> None:
    cfg = gateway_config(tmp_path / "state", mosquitto.port)
    join = integration.JoinEvent(deduplication_id="join-1", dev_addr="01020304")
    join.device_info.dev_eui = GAUGE
    status = integration.StatusEvent(deduplication_id="st-1", margin=9, battery_level=87.5)
    status.device_info.dev_eui = GAUGE
    async with Recorder(mosquitto.host, mosquitto.port, topics=[f"{BASE}/event/#"]) as rec:
        tally = Tally(rec.messages)
        async with running(cfg) as gateway:
            await wait_subscribed(gateway)
            async with aiomqtt.Client(mosquitto.host, mosquitto.port) as cs:
                await cs.publish(topic(GAUGE), as_json(uplink(GAUGE, 7, 1000)), qos=1)
                await cs.publish(topic(GAUGE, "join"), join.SerializeToString(), qos=1)
                await cs.publish(topic(GAUGE), as_json(uplink(GAUGE, 0, 1000, dedup="a0")), qos=1)
                await cs.publish(topic(GAUGE, "status"), as_json(status), qos=1)
            await rec.wait_for(lambda _m: len(of_kind(tally, "device_status")) >= 1)
    assert of_kind(tally, "device_joined")
    # After a join the counter restarts at 0 without a reset or gap event.
    assert not of_kind(tally, "fcnt_reset") and not of_kind(tally, "uplink_gap")
    assert values(of_kind(tally, "device_status")[0]) == {
        "margin": 9,
        "battery_level": 87.5,
        "external_power": False,
    }


async def test_uplinks_sent_while_the_gateway_was_down_still_arrive(tmp_path: Path) -> None:
    require_mosquitto()
    # Bounded as a whole: a hang somewhere (one CI run in many) fails with the await it hung on.
    async with asyncio.timeout(90):
        await _uplinks_across_restarts(tmp_path)


async def _uplinks_across_restarts(tmp_path: Path) -> None:
    # Persistence also carries the sessions across the broker restart in the middle.
    with Mosquitto(tmp_path / "broker", persistence=True) as broker:
        cfg = gateway_config(tmp_path / "state", broker.port)
        async with Recorder(
            broker.host, broker.port, topics=[f"{BASE}/event/#"], identifier="cs-recorder"
        ) as rec:
            tally = Tally(rec.messages)

            async def publish(f_cnts: range) -> None:
                # Bounded: a publish that never gets its PUBACK (a broker restarting under it)
                # fails the test with a reason instead of hanging it.
                async with aiomqtt.Client(broker.host, broker.port, timeout=10) as cs:
                    for f_cnt in f_cnts:
                        await cs.publish(
                            topic(GAUGE), as_json(uplink(GAUGE, f_cnt, 1000)), qos=1, timeout=10
                        )

            async with running(cfg) as gateway:
                await wait_subscribed(gateway)
                await publish(range(200))
                await rec.wait_for(lambda _m: len(of_kind(tally, "reading")) >= 50, timeout=20)
            # The gateway is stopped: ChirpStack keeps publishing into its persistent session.
            await publish(range(200, 400))
            async with running(cfg) as gateway:
                await wait_subscribed(gateway)
                broker.stop()
                broker.start()
                await publish(range(400, 600))
                await rec.wait_for(
                    lambda _m: len({e.event_id for e in of_kind(tally, "reading")}) >= 600,
                    timeout=60,
                )
    f_cnts = sorted({values(e)["f_cnt"] for e in of_kind(tally, "reading")})
    assert f_cnts == list(range(600))
    # Redelivered frames keep their event id, so upstream sees copies, never new events.
    by_fcnt: dict[int, set[str]] = {}
    for event in of_kind(tally, "reading"):
        by_fcnt.setdefault(int(values(event)["f_cnt"]), set()).add(event.event_id)
    assert all(len(ids) == 1 for ids in by_fcnt.values())


async def test_uplinks_the_broker_dropped_while_the_gateway_was_away_are_counted(
    tmp_path: Path,
) -> None:
    """Counted from the packet ids mosquitto skipped, besides the devices' fCnt gaps: the
    operator learns the broker's queue was too short, not just that frames went missing."""
    require_mosquitto()
    with Mosquitto(tmp_path / "broker", extra_config=["max_queued_messages 20"]) as broker:
        cfg = gateway_config(tmp_path / "state", broker.port)
        async with Recorder(broker.host, broker.port, topics=[f"{BASE}/event/#"]) as rec:
            tally = Tally(rec.messages)
            async with running(cfg) as gateway:
                await wait_subscribed(gateway)
            # Away: the session queues 20 and the broker drops the other 30.
            async with aiomqtt.Client(broker.host, broker.port) as cs:
                for f_cnt in range(1, 51):
                    await cs.publish(topic(GAUGE), as_json(uplink(GAUGE, f_cnt, 1000)), qos=1)
            async with running(cfg) as gateway:
                await wait_subscribed(gateway)
                async with aiomqtt.Client(broker.host, broker.port) as cs:
                    await cs.publish(topic(GAUGE), as_json(uplink(GAUGE, 51, 1000)), qos=1)
                await rec.wait_for(
                    lambda _m: any(values(e)["f_cnt"] == 51 for e in of_kind(tally, "reading"))
                )
                counters = gateway.source("chirpstack").counters  # type: ignore[attr-defined]
                # Once caught up, the source resumes its session for the 30 skipped ids: none
                # come back, so they were dropped (not held unsent).
                async with asyncio.timeout(15):
                    while "broker_dropped" not in counters:  # noqa: ASYNC110 -- set by the resume
                        await asyncio.sleep(0.01)
                assert counters["broker_dropped"] == 30
                assert counters["broker_skipped"] == 30
                assert counters["session_resumes"] == 1
    assert [values(e)["f_cnt"] for e in of_kind(tally, "reading")] == [*range(1, 21), 51]
    (gap,) = of_kind(tally, "uplink_gap")
    assert values(gap) == {"missed_frames": 30, "f_cnt": 51}


# Publishes the JSON lines {"topic", "hex"} of a file at QoS 1 and waits for every PUBACK.
_PUBLISHER = """
import json, sys
import paho.mqtt.client as mqtt
client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="chirpstack-burst")
client.max_inflight_messages_set(65535)
client.max_queued_messages_set(0)
client.connect("127.0.0.1", int(sys.argv[1]))
client.loop_start()
sent = [client.publish(m["topic"], bytes.fromhex(m["hex"]), qos=1)
        for m in map(json.loads, open(sys.argv[2]))]
for info in sent:
    info.wait_for_publish(60)
client.disconnect()
client.loop_stop()
"""


async def test_uplinks_the_broker_held_unsent_come_back_when_the_session_is_resumed(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    """mosquitto 2.0 writes a client's in-flight messages to its socket at once and discards
    the packets it cannot write yet beyond max_queued_messages (here 100), while the messages
    stay in flight for the session. The source, having fallen behind, resumes its session on a
    new connection once it has caught up: the broker sends them again."""
    require_mosquitto()
    count = 5000
    lines = []
    for f_cnt in range(count):
        message = uplink(GAUGE, f_cnt, 1000)
        for n in range(12):  # heard by 13 gateways: ~2.7 KB, as a dense city network sends
            rx = message.rx_info.add()
            rx.gateway_id = f"0016c001f153a{n:03x}"
            rx.rssi = -110
            rx.snr = -5.0
            rx.location.latitude, rx.location.longitude = 50.68, 10.93
        lines.append(json.dumps({"topic": topic(GAUGE), "hex": as_json(message).hex()}))
    burst = tmp_path / "burst.jsonl"
    burst.write_text("\n".join(lines) + "\n")
    # ChirpStack's broker with the small cap; events go upstream to the usual test broker.
    with Mosquitto(tmp_path / "broker", extra_config=["max_queued_messages 100"]) as broker:
        cfg = gateway_config(tmp_path / "state", broker.port)
        cfg["uplink"]["port"] = mosquitto.port
        cfg["sources"][0]["receive_maximum"] = 65535
        cfg["sources"][0]["max_unacked"] = 50
        async with Recorder(mosquitto.host, mosquitto.port, topics=[f"{BASE}/event/#"]) as rec:
            tally = Tally(rec.messages)
            async with running(cfg) as gateway:
                await wait_subscribed(gateway)
                # This event loop, and with it the gateway, stands still while another process
                # publishes ~13 MB: the broker fills TCP's buffers towards the gateway, then
                # its list of unsent packets, then discards packets.
                subprocess.run(  # noqa: ASYNC221 -- the stall is the point
                    [sys.executable, "-c", _PUBLISHER, str(broker.port), str(burst)],
                    check=True,
                    timeout=120,
                )
                await rec.wait_for(
                    lambda _m: len({e.event_id for e in of_kind(tally, "reading")}) >= count,
                    timeout=60,
                )
                counters = gateway.source("chirpstack").counters  # type: ignore[attr-defined]
                stats = gateway.source("chirpstack").tracker.devices[GAUGE]  # type: ignore[attr-defined]
    f_cnts = sorted({values(e)["f_cnt"] for e in of_kind(tally, "reading")})
    assert f_cnts == list(range(count))
    # The mechanism was exercised: the held ones were the tail of the burst (no later uplink's
    # id showed them missing), and came back only because the session was resumed.
    assert counters["session_resumes"] >= 1
    assert counters["broker_resent"] > 0
    assert "broker_dropped" not in counters
    assert not of_kind(tally, "fcnt_reset") and not of_kind(tally, "uplink_gap")
    assert stats.missed == 0


async def test_downlinks_are_validated_queued_capped_and_acknowledged(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    cfg = gateway_config(tmp_path / "state", mosquitto.port)
    cfg["sources"][0]["downlink_daily_cap"] = 2
    cfg["profiles"]["ultrasonic-gauge"]["actions"] = {
        "interval_20min": {"f_port": 1, "hex": "01000004B0", "confirmed": True}
    }
    command = f"{BASE}/command/downlink"
    async with (
        Recorder(mosquitto.host, mosquitto.port, topics=[f"{BASE}/event/#"]) as rec,
        Recorder(
            mosquitto.host, mosquitto.port, topics=["application/+/device/+/command/down"]
        ) as downlinks,
    ):
        tally = Tally(rec.messages)
        async with running(cfg) as gateway:
            await wait_subscribed(gateway)
            async with aiomqtt.Client(mosquitto.host, mosquitto.port) as client:
                await client.publish(
                    f"{BASE}/command/downlink", b'{"device": "a84041000181c061", "f_port": 3}'
                )
                await client.publish(topic(GAUGE), as_json(uplink(GAUGE, 1, 1000)), qos=1)
                await rec.wait_for(lambda _m: bool(of_kind(tally, "reading")))
                for body in (
                    b'{"id": "a", "device": "A84041000181C061", "f_port": 3, "hex": "0100003c"}',
                    b'{"id": "b", "device": "a84041000181c061", "action": "interval_20min"}',
                    b'{"id": "c", "device": "a84041000181c061", "f_port": 3, "hex": "01"}',
                    b'{"id": "d", "device": "a84041000181c061", "f_port": 0, "hex": "01"}',
                    b'{"id": "e", "device": "a84041000181c061", "action": "reboot"}',
                    b'{"id": "f", "device": "a84041000181c061", "f_port": 3, "hex": "zz"}',
                ):
                    await client.publish(command, body, qos=1)

                def answered(_m: object) -> bool:
                    return (
                        len(of_kind(tally, "command_result") + of_kind(tally, "command_error")) >= 7
                    )

                await rec.wait_for(answered)
                queued = [values(e) for e in of_kind(tally, "command_result")]
                assert [q["request_id"] for q in queued] == ["a", "b"]
                # ChirpStack reports the transmission and the device's acknowledgement.
                first_id = str(queued[0]["downlink_id"])
                txack = integration.TxAckEvent(downlink_id=1, queue_item_id=first_id, f_cnt_down=5)
                txack.device_info.dev_eui = GAUGE
                ack = integration.AckEvent(
                    deduplication_id="ack-1", queue_item_id=first_id, acknowledged=True
                )
                ack.device_info.dev_eui = GAUGE
                await client.publish(topic(GAUGE, "txack"), as_json(txack), qos=1)
                await client.publish(topic(GAUGE, "ack"), as_json(ack), qos=1)
                await rec.wait_for(lambda _m: bool(of_kind(tally, "downlink_ack")))
            await downlinks.wait_for_count(2)

    sent = [json_format.Parse(m.payload, integration.DownlinkCommand()) for m in downlinks.messages]
    assert [m.topic for m in downlinks.messages] == [
        f"application/{APP}/device/{GAUGE}/command/down"
    ] * 2
    assert (sent[0].f_port, sent[0].data, sent[0].confirmed) == (
        3,
        bytes.fromhex("0100003c"),
        False,
    )
    assert (sent[1].f_port, sent[1].data, sent[1].confirmed) == (
        1,
        bytes.fromhex("01000004B0"),
        True,
    )
    assert sent[0].id == first_id
    errors = {
        values(e).get("request_id"): str(values(e)["error"])
        for e in of_kind(tally, "command_error")
    }
    assert "has not been heard" in errors[None]
    assert "cap of 2" in errors["c"]
    assert "fPort must be 1..223" in errors["d"]
    assert "no action 'reboot'" in errors["e"]
    assert "not hexadecimal" in errors["f"]
    assert values(of_kind(tally, "downlink_txack")[0])["queue_item_id"] == first_id
    assert values(of_kind(tally, "downlink_ack")[0])["acknowledged"] is True


async def test_stats_show_every_sensors_link_health(mosquitto: Mosquitto, tmp_path: Path) -> None:
    cfg = gateway_config(tmp_path / "state", mosquitto.port)
    async with Recorder(mosquitto.host, mosquitto.port, topics=[f"{BASE}/#"]) as rec:
        tally = Tally(rec.messages)
        async with running(cfg) as gateway:
            await wait_subscribed(gateway)
            async with aiomqtt.Client(mosquitto.host, mosquitto.port) as cs:
                for f_cnt in (1, 2, 5):
                    await cs.publish(topic(GAUGE), as_json(uplink(GAUGE, f_cnt, 1000)), qos=1)
                await rec.wait_for(lambda _m: len(of_kind(tally, "reading")) >= 3)
                await cs.publish(f"{BASE}/command/stats", b"", qos=1)

            def lorawan_stats(messages: list[Any]) -> list[dict[str, Any]]:
                return [
                    json.loads(m.payload)["lorawan"][0]
                    for m in messages
                    if m.topic == f"{BASE}/state/stats"
                ]

            await rec.wait_for(lambda ms: any(s["devices"] == 1 for s in lorawan_stats(ms)))
    stats = [s for s in lorawan_stats(rec.messages) if s["devices"] == 1][-1]
    assert stats["source"] == "chirpstack" and stats["connected"] is True
    assert stats["missed_frames"] == 2
    assert stats["counters"]["up_events"] == 3
