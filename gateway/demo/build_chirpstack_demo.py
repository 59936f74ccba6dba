"""Builds ``chirpstack-demo.jsonl``: ChirpStack v4 JSON uplink events for the embedded demo.

Run from the repository root: ``python -m gateway.demo.build_chirpstack_demo``. Not imported by
the gateway. The water levels are the real Hub'Eau readings of ``gard-anduze-2020-09.jsonl``
(see PROVENANCE.md), encoded as a Dragino LMDS200 radar gauge mounted 900 cm above the gauge zero
would send them (fPort 2: battery mV, distance 1 cm, distance 2 cm, flags). The climate frames are
the LHT65 example payload of TTN's device repository (Apache-2.0), unchanged. The stream also
holds what a real network produces: one frame heard by two gateways, two frames lost on air, and a
device status event.
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from pathlib import Path

from chirpstack_api import integration
from google.protobuf import json_format

HERE = Path(__file__).resolve().parent
APPLICATION = "5e1a0c2b-8d1f-4a6e-9c3b-2f7d4e6a1b00"
GAUGE = "a84041000181c071"
CLIMATE = "a84041000181c072"
MOUNTING_HEIGHT_CM = 900
LHT65_EXAMPLE = bytes.fromhex("CBF60B0D0376010ADD7FFF")
# Every third half-hour reading of the flood: 48 uplinks over three days.
STEP = 3
LOST_FCNTS = {20, 21}


def _uplink(
    dev_eui: str, profile: str, f_cnt: int, ts: str, data: bytes, *, rssi: int
) -> dict[str, object]:
    event = integration.UplinkEvent(
        deduplication_id=f"{dev_eui}-{f_cnt:05d}", f_cnt=f_cnt, f_port=2, data=data, dr=5
    )
    event.time.FromJsonString(ts)
    event.device_info.dev_eui = dev_eui
    event.device_info.device_profile_name = profile
    event.device_info.application_id = APPLICATION
    event.device_info.application_name = "stadtwerke-sensors"
    rx = event.rx_info.add()
    rx.gateway_id = "0016c001f153a14c"
    rx.rssi = rssi
    rx.snr = 6.5
    mapped: dict[str, object] = json.loads(json_format.MessageToJson(event))
    return mapped


def _line(dev_eui: str, kind: str, payload: dict[str, object]) -> str:
    topic = f"application/{APPLICATION}/device/{dev_eui}/event/{kind}"
    return json.dumps({"topic": topic, "payload": payload}, separators=(",", ":"))


def main() -> None:
    readings = [json.loads(line) for line in (HERE / "gard-anduze-2020-09.jsonl").open()]
    lines = []
    f_cnt = 0
    for index, reading in enumerate(readings[::STEP]):
        level_cm = reading["values"][0]["v"] / 10
        distance_cm = round(MOUNTING_HEIGHT_CM - level_cm)
        frame = (3600).to_bytes(2, "big") + distance_cm.to_bytes(2, "big") + bytes(3)
        f_cnt += 1
        if f_cnt in LOST_FCNTS:
            continue
        uplink = _uplink(GAUGE, "LMDS200", f_cnt, reading["ts"], frame, rssi=-97 - index % 5)
        lines.append(_line(GAUGE, "up", uplink))
        if f_cnt == 10:
            # The same frame again (a broker redelivery, or a second integration instance):
            # same deduplicationId.
            lines.append(_line(GAUGE, "up", uplink))
        if index % 8 == 0:
            ts = datetime.fromisoformat(reading["ts"]) + timedelta(minutes=7)
            climate = _uplink(
                CLIMATE,
                "LHT65",
                index // 8 + 1,
                ts.isoformat().replace("+00:00", "Z"),
                LHT65_EXAMPLE,
                rssi=-104,
            )
            lines.append(_line(CLIMATE, "up", climate))
    status = {
        "deduplicationId": f"{GAUGE}-status-1",
        "time": readings[-1]["ts"],
        "deviceInfo": {"devEui": GAUGE, "deviceProfileName": "LMDS200"},
        "margin": 8,
        "batteryLevel": 91.3,
    }
    lines.append(_line(GAUGE, "status", status))
    (HERE / "chirpstack-demo.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
