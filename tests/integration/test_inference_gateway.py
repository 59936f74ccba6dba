"""The inference engine in the running gateway: a refused model at start, stats, model commands.

The gateway runs in-process (Gateway.run) with real models built by the test, a real sd_notify
socket, and for the command test a real mosquitto.
"""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
from structlog.testing import capture_logs

from gateway.app import Gateway
from gateway.config import config_from_dict
from gateway.wire import Encoding, decode
from tests.integration.helpers import mqtt_config, write_recording
from tests.support.mosquitto import Mosquitto, Recorder
from tests.support.tiny_models import linear_card, linear_card_data, linear_model, write_card


def _models(root: Path) -> dict[str, Any]:
    """A good card, a card whose file does not match its sha256, and a v2 of the good one."""
    linear_card(root / "good")
    broken = linear_model(root / "broken" / "m.onnx", seed=2)
    write_card(root / "broken" / "c.toml", linear_card_data(broken, name="broken", sha256="e" * 64))
    v2 = linear_model(root / "v2" / "m.onnx", seed=1)
    write_card(root / "v2" / "c.toml", linear_card_data(v2, version="2.0.0"))
    return {"models_dir": str(root), "cards": ["good/tiny_linear.toml", "broken/c.toml"]}


@contextmanager
def _notify_socket(path: Path) -> Iterator[socket.socket]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.settimeout(10)
        yield sock


async def test_a_refused_model_is_named_and_the_gateway_runs_on(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    write_recording(tmp_path / "rec.jsonl", 3)
    cfg = {
        "gateway": {"id": "t", "state_dir": str(tmp_path / "state")},
        "uplink": {"type": "file", "path": str(out), "fsync": False},
        "sources": [{"type": "replay", "name": "r", "file": str(tmp_path / "rec.jsonl")}],
        "inference": _models(tmp_path / "models"),
    }
    with _notify_socket(tmp_path / "notify.sock") as sock, capture_logs() as logs:
        gateway = Gateway(
            config_from_dict(cfg, "test"), {"NOTIFY_SOCKET": str(tmp_path / "notify.sock")}
        )
        assert await gateway.run(stop_when_sources_done=True) == 0
        ready = sock.recv(4096).decode()
    assert ready.startswith("READY=1\nSTATUS=")
    assert ready.endswith("; models unavailable: broken")
    refused = [e for e in logs if e["event"] == "model_unavailable"]
    assert len(refused) == 1
    assert refused[0]["model"] == "broken"
    assert "broken/c.toml: sha256: " in refused[0]["reason"]
    loaded = [e for e in logs if e["event"] == "model_loaded"]
    assert [e["model"] for e in loaded] == ["tiny_linear"]
    # The readings went through regardless.
    assert len(out.read_bytes().splitlines()) == 3


@asynccontextmanager
async def _running(cfg: dict[str, Any]) -> AsyncIterator[Gateway]:
    gateway = Gateway(config_from_dict(cfg, "test"), {})
    async with asyncio.TaskGroup() as tg:
        task = tg.create_task(gateway.run(), name="gateway")
        async with asyncio.timeout(15):
            await gateway.ready.wait()
            # Commands are subscribed once the uplink counts its connection.
            while gateway.metrics.counters["uplink_connects"] < 1:  # noqa: ASYNC110
                await asyncio.sleep(0.01)
        try:
            yield gateway
        finally:
            gateway.request_stop()
            async with asyncio.timeout(20):
                assert await task == 0


def _stats(rec: Recorder, base: str) -> list[dict[str, Any]]:
    return [json.loads(p) for p in rec.payloads(f"{base}/state/stats")]


def _replies(rec: Recorder, base: str) -> list[dict[str, Any]]:
    replies = []
    for payload in rec.payloads():
        try:
            event = decode(payload, Encoding.JSON)
        except ValueError:
            continue
        values = {m.name: m.value for m in event.values}
        if event.kind.startswith("command_") and values.get("command") == "model_swap":
            replies.append({"kind": event.kind, **values})
    return replies


@pytest.mark.broker
async def test_stats_and_model_commands_over_mqtt(mosquitto: Mosquitto, tmp_path: Path) -> None:
    cfg = mqtt_config(tmp_path / "state", mosquitto.port)
    cfg["inference"] = _models(tmp_path / "models")
    base = "edge/gateway/gw-test"
    async with (
        Recorder(mosquitto.host, mosquitto.port, topics=[f"{base}/#"]) as rec,
        _running(cfg),
        aiomqtt.Client(mosquitto.host, mosquitto.port) as client,
    ):
        await client.publish(f"{base}/command/stats", b"", qos=1)
        await rec.wait_for(lambda _m: len(_stats(rec, base)) >= 1, timeout=10)
        inference = _stats(rec, base)[-1]["inference"]
        assert inference["threads"] == 1
        assert list(inference["models"]) == ["tiny_linear"]
        assert inference["models"]["tiny_linear"]["version"] == "1.0.0"
        assert "sha256" in inference["unavailable"]["broken"]

        swap = {"model": "tiny_linear", "card": "v2/c.toml", "id": "s1"}
        await client.publish(f"{base}/command/model_swap", json.dumps(swap).encode(), qos=1)
        bad = {"model": "tiny_linear", "card": "../../etc/x.toml", "id": "s2"}
        await client.publish(f"{base}/command/model_swap", json.dumps(bad).encode(), qos=1)
        await rec.wait_for(lambda _m: len(_replies(rec, base)) >= 2, timeout=10)
        replies = {r["request_id"]: r for r in _replies(rec, base)}
        assert replies["s1"]["kind"] == "command_result"
        assert replies["s1"]["version"] == "2.0.0"
        assert replies["s2"]["kind"] == "command_error"
        assert str(replies["s2"]["error"]).startswith("card: must be a path below")

        seen = len(_stats(rec, base))
        await client.publish(f"{base}/command/stats", b"", qos=1)
        await rec.wait_for(lambda _m: len(_stats(rec, base)) > seen, timeout=10)
        after = _stats(rec, base)[-1]["inference"]["models"]["tiny_linear"]
        assert after["version"] == "2.0.0"
        assert after["swaps"] == 1
        assert after["swap_failures"] == 0  # the refused path never reached the engine
