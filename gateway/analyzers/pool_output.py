"""Local alarm outputs: where a pool alarm sounds on site, whatever the uplink is doing.

* :class:`MqttAlarmOutput` publishes to a topic on the pool's own broker (a lifeguard's pager
  app, a siren controller, the building's alarm panel listen there): QoS 1, compact JSON, the
  camera state on ``TOPIC/status`` (retained).
* :class:`SerialAlarmOutput` switches a relay (siren, flashing light) by writing bytes to a
  serial port: ``on`` at the alarm and at every repeat (a relay re-plugged in between is switched
  on again), ``off`` once every alarm is acknowledged.

Neither ever holds up the analyzer: a message that cannot go out is counted and logged, and the
next repeat tries again. Payloads carry only numbers and short strings (no image data).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from typing import Any, Protocol

import aiomqtt
import orjson
import structlog

from drivers.serial_port import PortProblemError, SerialSettings, open_port
from gateway.analyzers.pool_config import MqttAlarmConfig, SerialAlarmConfig

__all__ = ["AlarmOutput", "MqttAlarmOutput", "SerialAlarmOutput", "build_output"]

log = structlog.get_logger(__name__)

# How long an alarm waits for the local broker connection before it is counted as not sent (the
# next repeat tries again).
_CONNECT_WAIT_S = 2.0
_FIRST_RETRY_S = 0.2


class AlarmOutput(Protocol):
    """A local alarm output; ``run`` keeps its connection for as long as the pool runs."""

    counters: Counter[str]

    async def run(self) -> None: ...

    async def alarm(self, payload: dict[str, Any]) -> None: ...

    async def clear(self, payload: dict[str, Any]) -> None: ...

    async def status(self, payload: dict[str, Any]) -> None: ...


class MqttAlarmOutput:
    """Publishes alarms to a topic on the local broker, reconnecting on its own."""

    def __init__(self, cfg: MqttAlarmConfig, client_id: str) -> None:
        self._cfg = cfg
        self._client_id = cfg.client_id or client_id
        self._client: aiomqtt.Client | None = None
        self.counters: Counter[str] = Counter()
        self.connected = asyncio.Event()

    async def run(self) -> None:
        delay = _FIRST_RETRY_S
        while True:
            try:
                async with aiomqtt.Client(
                    self._cfg.host,
                    self._cfg.port,
                    identifier=self._client_id,
                    keepalive=30,
                    timeout=5,
                ) as client:
                    self._client = client
                    self.connected.set()
                    self.counters["connects"] += 1
                    delay = _FIRST_RETRY_S
                    # Nothing to read: the connection is kept until it fails.
                    async for _message in client.messages:
                        pass
            except aiomqtt.MqttError as exc:
                self.counters["connect_failures"] += 1
                if delay == _FIRST_RETRY_S:
                    # Once per outage; the retries meanwhile are counted, not logged.
                    log.warning(
                        "pool_alarm_output_down",
                        host=self._cfg.host,
                        port=self._cfg.port,
                        error=str(exc)[:200],
                    )
            finally:
                self._client = None
                self.connected.clear()
            await asyncio.sleep(delay)
            delay = min(self._cfg.reconnect_max_s, delay * 2)

    async def _publish(self, topic: str, payload: dict[str, Any], *, retain: bool) -> None:
        if self._client is None:
            # Starting up or reconnecting: an alarm may wait a moment for the local broker.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(_CONNECT_WAIT_S):
                    await self.connected.wait()
        client = self._client
        if client is None:
            self.counters["not_sent"] += 1
            log.error("pool_alarm_output_not_sent", topic=topic, reason="local broker down")
            return
        try:
            await client.publish(topic, orjson.dumps(payload), qos=1, retain=retain, timeout=5)
        except aiomqtt.MqttError as exc:
            self.counters["not_sent"] += 1
            log.error("pool_alarm_output_not_sent", topic=topic, reason=str(exc)[:200])
            return
        self.counters["sent"] += 1

    async def alarm(self, payload: dict[str, Any]) -> None:
        await self._publish(self._cfg.topic, payload, retain=False)

    async def clear(self, payload: dict[str, Any]) -> None:
        await self._publish(self._cfg.topic, payload, retain=False)

    async def status(self, payload: dict[str, Any]) -> None:
        await self._publish(f"{self._cfg.topic}/status", payload, retain=True)


class SerialAlarmOutput:
    """Switches a relay on a serial port: on at an alarm and each repeat, off when all clear."""

    def __init__(self, cfg: SerialAlarmConfig) -> None:
        self._cfg = cfg
        self._settings = SerialSettings(port=cfg.port, baud=cfg.baud)
        self._writer: asyncio.StreamWriter | None = None
        self.counters: Counter[str] = Counter()

    async def run(self) -> None:
        try:
            await asyncio.Event().wait()
        finally:
            self._close()

    def _close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    async def _write(self, data: bytes) -> None:
        try:
            if self._writer is None or self._writer.is_closing():
                _reader, self._writer = await open_port(self._settings)
            self._writer.write(data)
            await self._writer.drain()
        except (PortProblemError, OSError) as exc:
            self._close()
            self.counters["not_sent"] += 1
            log.error("pool_alarm_relay_failed", port=self._cfg.port, error=str(exc)[:200])
            return
        self.counters["sent"] += 1

    async def alarm(self, payload: dict[str, Any]) -> None:
        await self._write(bytes.fromhex(self._cfg.on_hex))

    async def clear(self, payload: dict[str, Any]) -> None:
        await self._write(bytes.fromhex(self._cfg.off_hex))

    async def status(self, payload: dict[str, Any]) -> None:
        # A relay has one meaning (the alarm); camera status goes upstream and to MQTT outputs.
        return


def build_output(cfg: MqttAlarmConfig | SerialAlarmConfig, client_id: str) -> AlarmOutput:
    """Explicit registry: one branch per output type."""
    if isinstance(cfg, MqttAlarmConfig):
        return MqttAlarmOutput(cfg, client_id)
    return SerialAlarmOutput(cfg)
