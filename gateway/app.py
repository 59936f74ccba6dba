"""The composition root: the one place that knows concrete classes and wires them from config.

Start: open outbox → start uplink and pipeline → start sources → READY=1. A broker that is down does
not block readiness; the gateway buffers and says so in STATUS=.
Stop (first SIGTERM/SIGINT): STOPPING=1 → stop sources → drain the pipeline into the outbox →
flush the uplink within gateway.shutdown_flush_s → exit 0. A second signal exits at once; what was
accepted is already on disk.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import math
import os
import signal
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, cast

import structlog

from drivers.chirpstack import BrokerSettings, Catalog, ChirpStackSource, DeviceRule
from drivers.codecs import get_codec
from drivers.lorawan import Codec, FieldMap, Profile, WaterLevel
from drivers.mqtt_intake import MQTT_5, MQTT_311
from drivers.replay import ReplaySource
from gateway import __version__
from gateway.commands import Commands, downlink_command, ping
from gateway.config import (
    ChirpStackSourceConfig,
    GatewayConfig,
    ModbusRtuSourceConfig,
    MqttUplinkConfig,
    ProfileConfig,
    ReplaySourceConfig,
    Sdi12SourceConfig,
    SerialAsciiSourceConfig,
    SourceConfig,
)
from gateway.credentials import read_password, tls_context
from gateway.errors import CodecError, ConfigError
from gateway.health import Heartbeats, Metrics, Notifier, RateMeter
from gateway.outbox import DEFAULT_SENDER_WINDOW, Outbox
from gateway.pipeline import OnStored, Pipeline
from gateway.types import Emit, Event, Measurement, Reading, ReportError
from gateway.uplink import FileUplink, MqttUplink, Uplink
from gateway.waste_config import ImageInboxSourceConfig
from gateway.wire import Encoding

if TYPE_CHECKING:
    from drivers.ascii_lines import LineParser
    from drivers.modbus import ModbusSlave
    from drivers.serial_port import SerialSettings, SerialSource
    from gateway.analyzers.pool_runtime import PoolMonitor
    from gateway.analyzers.runtime import Analyzers
    from gateway.inference import InferenceEngine
    from gateway.waste import WasteInboxSource

log = structlog.get_logger(__name__)

EXIT_OK = 0
EXIT_SOFTWARE = 70
EXIT_CONFIG = 78


class SourceImpl(Protocol):
    """What every source offers the composition root."""

    name: str

    async def run(self, emit: Emit, report_error: ReportError) -> None: ...


class Source:
    """A configured source with the callbacks that connect it to the pipeline."""

    def __init__(self, name: str, impl: SourceImpl, *, serial: bool = False) -> None:
        self.name = name
        self.impl = impl
        # A drivers.serial_port.SerialSource: said here so that a gateway without serial
        # sources never imports pyserial (1.5 MB of RSS) just to ask isinstance.
        self.serial = serial


class CaptureReplay:
    """A ChirpStack source fed from a capture file instead of its broker."""

    def __init__(self, source: ChirpStackSource, path: Path, interval_s: float) -> None:
        self.name = source.name
        self._source = source
        self._path = path
        self._interval_s = interval_s

    async def run(self, emit: Emit, report_error: ReportError) -> None:
        lines = (await asyncio.to_thread(self._path.read_text, "utf-8")).splitlines()
        await self._source.replay(lines, emit, report_error, self._interval_s)


# The stats message lists at most this many silent devices (it has to stay small).
_MAX_LISTED_SILENT = 20


def lorawan_summary(source: ChirpStackSource) -> dict[str, Any]:
    """Link health of a ChirpStack source's devices for the stats message."""
    devices = source.tracker.devices
    silent = sorted(eui for eui, link in devices.items() if link.silent)
    weak = sorted(
        eui for eui, link in devices.items() if link.rssi_trend < -3 and link.uplinks >= 5
    )
    return {
        "source": source.name,
        "connected": source.connected.is_set(),
        "devices": len(devices),
        "silent": len(silent),
        "silent_devices": silent[:_MAX_LISTED_SILENT],
        # A falling RSSI trend warns of a failing antenna or battery before frames are lost.
        "weakening_devices": weak[:_MAX_LISTED_SILENT],
        "missed_frames": sum(link.missed for link in devices.values()),
        # Frames that came after their gap was reported (held by the broker, then resent).
        "late_frames": sum(link.late for link in devices.values()),
        "counters": dict(source.counters),
    }


# Owns the JavaScript codecs' worker processes: the daemon's AsyncExitStack, a tool's ExitStack.
Workers = contextlib.ExitStack | contextlib.AsyncExitStack


def build_profile(name: str, cfg: ProfileConfig, workers: Workers | None = None) -> Profile:
    """A device profile with its codec resolved (built-in registry or a JavaScript file).

    A JavaScript codec runs in a worker process with a hard deadline per frame (a hung decoder
    would otherwise stall the event loop); the worker is started here and ``workers`` closes it.
    """
    codec: Codec | None = None
    if cfg.codec.startswith("js:"):
        path = Path(cfg.codec[3:])
        if workers is None:
            raise ValueError(f"profile {name}: a JavaScript codec needs an owner for its worker")
        from drivers.jsworker import JsWorker  # noqa: PLC0415  # only when configured

        js = workers.enter_context(JsWorker(path.read_text("utf-8"), str(path)))

        def run_js(fport: int, payload: bytes) -> dict[str, Any]:
            result = js.decode_uplink(fport, payload)
            data = result.get("data")
            if not isinstance(data, dict):
                raise CodecError(f"{path}: decodeUplink returned no data object")
            return data

        codec = run_js
    elif cfg.codec:
        codec = get_codec(cfg.codec)
    water = cfg.water_level
    actions = {
        key: (action.f_port, bytes.fromhex(action.hex), action.confirmed)
        for key, action in cfg.actions.items()
    }
    return Profile(
        actions=actions,
        name=name,
        codec=codec,
        prefer_object=cfg.prefer_object,
        fields=tuple(FieldMap(**f.model_dump()) for f in cfg.fields),
        water_level=None
        if water is None
        else WaterLevel(
            distance=water.distance,
            mounting_height_param=water.mounting_height_param,
            sensor_min_cm=water.sensor_min_cm,
            sensor_max_cm=math.inf if water.sensor_max_cm is None else water.sensor_max_cm,
        ),
    )


def build_catalog(cfg: GatewayConfig, workers: Workers | None = None) -> Catalog:
    """The device catalog: [[devices]] rules pointing at [profiles].

    ``workers`` owns the JavaScript codecs' worker processes (required when a profile has one).
    """
    profiles = {name: build_profile(name, p, workers) for name, p in cfg.profiles.items()}
    rules = []
    for device in cfg.devices:
        tag = tuple(device.tag.split("=", 1)) if device.tag else None
        rules.append(
            DeviceRule(
                profile=profiles[device.profile],
                dev_eui=device.dev_eui.lower() if device.dev_eui else None,
                device_profile=device.device_profile,
                tag=(tag[0], tag[1]) if tag else None,
                params=dict(device.params),
                expected_interval_s=device.expected_interval_s,
            )
        )
    return Catalog(rules)


def build_source(
    cfg: SourceConfig, gateway_id: str, catalog: Catalog, environ: Mapping[str, str]
) -> Source:
    """Explicit registry: one branch per source type, no import-time discovery."""
    if isinstance(cfg, ChirpStackSourceConfig):
        key = f"sources.{cfg.name}"
        broker = BrokerSettings(
            host=cfg.host,
            port=cfg.port,
            client_id=cfg.client_id or f"edge-gateway-{gateway_id}-{cfg.name}",
            topic=cfg.topic,
            marshaler=cfg.marshaler,
            username=cfg.username,
            password=functools.partial(
                read_password, f"{key}.password_file", cfg.password_file, environ
            ),
            tls_context=functools.partial(tls_context, f"{key}.tls", cfg.tls, environ),
            reconnect_min_s=cfg.reconnect_min_s,
            reconnect_max_s=cfg.reconnect_max_s,
            max_unacked=cfg.max_unacked,
            mqtt_version=MQTT_5 if cfg.mqtt_version == "5" else MQTT_311,
            receive_maximum=cfg.receive_maximum,
        )
        source = ChirpStackSource(
            cfg.name,
            broker,
            catalog,
            dedup_window_s=cfg.dedup_window_s,
            downlink_daily_cap=cfg.downlink_daily_cap,
        )
        if cfg.replay_file is not None:
            return Source(cfg.name, CaptureReplay(source, cfg.replay_file, cfg.replay_interval_s))
        return Source(cfg.name, source)
    if isinstance(cfg, ReplaySourceConfig):
        return Source(cfg.name, ReplaySource(cfg.name, cfg.file, cfg.interval_s, loop=cfg.loop))
    if isinstance(cfg, ImageInboxSourceConfig):
        raise TypeError("image_inbox sources need the classifier: Gateway builds them")
    return build_serial_source(cfg)


def serial_settings(
    cfg: SerialAsciiSourceConfig | ModbusRtuSourceConfig | Sdi12SourceConfig,
) -> SerialSettings:
    """The port settings every serial source type shares."""
    from drivers.serial_port import SerialSettings  # noqa: PLC0415 -- see Source.serial

    return SerialSettings(
        port=cfg.port,
        baud=cfg.baud,
        bytesize=cfg.bytesize,
        parity=cfg.parity,
        stopbits=cfg.stopbits,
        read_timeout_s=cfg.read_timeout_s,
        reopen_min_s=cfg.reopen_min_s,
        reopen_max_s=cfg.reopen_max_s,
    )


def line_parser(cfg: SerialAsciiSourceConfig) -> LineParser:
    """The parser of a serial_ascii source (the source and ``serial probe --source`` share it)."""
    from drivers.ascii_lines import FieldSpec, LineParser  # noqa: PLC0415

    return LineParser(
        [FieldSpec(f.key, f.name, f.unit, f.scale, f.offset) for f in cfg.fields],
        format=cfg.format,
        pattern=cfg.pattern,
        separator=cfg.separator,
        key_separator=cfg.key_separator,
        checksum=cfg.checksum,
    )


def modbus_slaves(cfg: ModbusRtuSourceConfig) -> list[ModbusSlave]:
    """The driver's view of a modbus_rtu source's slaves (field names match one to one)."""
    from drivers.modbus import ModbusRegister, ModbusSlave  # noqa: PLC0415

    return [
        ModbusSlave(
            device_id=s.device_id,
            device=s.device,
            registers=tuple(ModbusRegister(**r.model_dump()) for r in s.registers),
            poll_interval_s=s.poll_interval_s,
            timeout_s=s.timeout_s,
            retries=s.retries,
            backoff_max_s=s.backoff_max_s,
        )
        for s in cfg.slaves
    ]


def build_serial_source(
    cfg: SerialAsciiSourceConfig | ModbusRtuSourceConfig | Sdi12SourceConfig,
) -> Source:
    """Serial sources: ASCII lines, Modbus RTU, SDI-12 (one branch per type).

    Each driver is imported here, when a source of its type is configured: a gateway that reads
    only ChirpStack does not carry pymodbus and the others (2-3 MB of RSS on a Pi-class board).
    """
    if isinstance(cfg, SerialAsciiSourceConfig):
        from drivers.ascii_lines import AsciiLineSource, Framing  # noqa: PLC0415

        source = AsciiLineSource(
            cfg.name,
            cfg.device or cfg.name,
            serial_settings(cfg),
            Framing(cfg.delimiter, cfg.encoding, cfg.max_line_bytes),
            line_parser(cfg),
            gap_after_s=cfg.gap_after_s,
            max_lines=cfg.max_lines,
        )
        return Source(cfg.name, source, serial=True)
    if isinstance(cfg, ModbusRtuSourceConfig):
        from drivers.modbus import ModbusRtuSource  # noqa: PLC0415

        try:
            modbus = ModbusRtuSource(cfg.name, serial_settings(cfg), modbus_slaves(cfg))
        except ValueError as exc:
            raise ConfigError(f"sources.{cfg.name}", [str(exc)]) from exc
        return Source(cfg.name, modbus, serial=True)
    from drivers.sdi12 import Sdi12Sensor, Sdi12Source, Sdi12Value  # noqa: PLC0415

    sensors = [
        Sdi12Sensor(
            address=s.address,
            device=s.device,
            poll_interval_s=s.poll_interval_s,
            values=tuple(
                Sdi12Value(int(v.key), v.name, v.unit, v.scale, v.offset) for v in s.values
            ),
            measurement=s.measurement,
            crc=s.crc,
        )
        for s in cfg.sensors
    ]
    try:
        sdi12 = Sdi12Source(
            cfg.name, serial_settings(cfg), sensors, cfg.retries, wake_break=cfg.wake_break
        )
    except ValueError as exc:
        raise ConfigError(f"sources.{cfg.name}", [str(exc)]) from exc
    return Source(cfg.name, sdi12, serial=True)


def serial_summary(source: SerialSource) -> dict[str, Any]:
    """A serial source's port and counters for the stats message."""
    return {"source": source.name, **source.port.summary(), "counters": dict(source.counters)}


def sender_window(cfg: GatewayConfig) -> int:
    """The smallest in-flight window of the brokers whose messages wait for an outbox commit.

    The ChirpStack source acknowledges an uplink only once its event is committed; the broker
    hands it at most this many unacknowledged: with MQTT 5 the smaller of the source's own
    window (``max_unacked``, where it stops reading) and its Receive Maximum, with 3.1.1 the
    broker's own ``max_inflight_messages`` (mosquitto's default assumed).
    """
    windows = [
        min(source.max_unacked, source.receive_maximum)
        if source.mqtt_version == "5"
        else DEFAULT_SENDER_WINDOW
        for source in cfg.sources
        if isinstance(source, ChirpStackSourceConfig) and source.replay_file is None
    ]
    return min(windows, default=DEFAULT_SENDER_WINDOW)


class Gateway:
    """One running gateway, wired from a validated config."""

    def __init__(self, cfg: GatewayConfig, environ: Mapping[str, str]) -> None:
        self._cfg = cfg
        self._environ = environ
        self._gateway_id = cfg.gateway.resolved_id()
        self._metrics = Metrics()
        self._notifier = Notifier(environ)
        self._heartbeats = Heartbeats(cfg.gateway.heartbeat_timeout_s)
        self._stop = asyncio.Event()
        # Set once the sources run (READY=1): the demo's simulated sensor waits for it.
        self.ready = asyncio.Event()
        self._signals = 0
        self._rates = RateMeter(self._metrics, ("events_in", "events_out"))
        self._sources: list[Source] = []
        self._engine: InferenceEngine | None = None
        self._inboxes: list[WasteInboxSource] = []
        self._pools: list[PoolMonitor] = []

    @property
    def metrics(self) -> Metrics:
        return self._metrics

    def source(self, name: str) -> SourceImpl:
        """A running source by name (for tests and diagnostics)."""
        return next(s.impl for s in self._sources if s.name == name)

    def request_stop(self) -> None:
        self._stop.set()

    def _on_signal(self, signum: int) -> None:
        self._signals += 1
        if self._signals > 1:
            log.warning("second_signal_exit_now", signal=signal.Signals(signum).name)
            # Everything put() accepted is committed; nothing else is worth waiting for.
            os._exit(128 + signum)
        log.info("stopping", signal=signal.Signals(signum).name)
        self._stop.set()

    async def run(self, *, stop_when_sources_done: bool = False) -> int:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self._on_signal, signum)
        try:
            return await self._run(stop_when_sources_done=stop_when_sources_done)
        finally:
            for signum in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(signum)

    async def _start_models(
        self, stack: contextlib.AsyncExitStack
    ) -> tuple[InferenceEngine | None, Analyzers | None]:
        """The inference engine and analyzers, when the config has models or analyzers."""
        cfg = self._cfg
        if not (cfg.inference.cards or cfg.inference.shadow or cfg.analyzers or cfg.pools):
            return None, None
        # Imported only now: onnxruntime and numpy add ~30 MB of RSS that a gateway only
        # forwarding sensor readings should not carry.
        from gateway.analyzers.runtime import Analyzers  # noqa: PLC0415
        from gateway.inference import InferenceEngine  # noqa: PLC0415

        engine = await stack.enter_async_context(InferenceEngine(cfg.inference))
        # Models are verified (sha256, signature, warm-up) before any source starts; one that
        # fails is left out and its analyzers run on their rules alone.
        await engine.load_configured()
        self._engine = engine
        analyzers = Analyzers(cfg.analyzers, engine, self._metrics) if cfg.analyzers else None
        return engine, analyzers

    async def _run(self, *, stop_when_sources_done: bool) -> int:
        cfg = self._cfg
        uplink_cfg = cfg.uplink
        encoding = (
            uplink_cfg.encoding if isinstance(uplink_cfg, MqttUplinkConfig) else Encoding.JSON
        )
        log.info("gateway_starting", version=__version__, gateway_id=self._gateway_id)
        async with contextlib.AsyncExitStack() as stack:
            outbox = await stack.enter_async_context(
                Outbox(cfg.outbox_path, cfg.outbox, encoding, sender_window=sender_window(cfg))
            )
            engine, analyzers = await self._start_models(stack)
            outbox.heartbeat = self._heartbeats.register("outbox")
            pipeline = Pipeline(cfg.pipeline, outbox, self._metrics)
            pipeline.heartbeat = self._heartbeats.register("pipeline")
            commands = Commands(self._gateway_id, {"ping": ping})
            uplink = self._build_uplink(outbox, commands)
            uplink.heartbeat = self._heartbeats.register("uplink")
            # Entered last on the stack: the JavaScript workers stop before the engine and outbox.
            catalog = build_catalog(cfg, stack)
            sources = [
                build_source(s, self._gateway_id, catalog, self._environ)
                for s in cfg.sources
                if not isinstance(s, ImageInboxSourceConfig)
            ]
            sources += await self._build_waste(stack, engine)
            self._sources = sources
            senders = [s.impl for s in sources if isinstance(s.impl, ChirpStackSource)]
            commands.register("downlink", downlink_command(senders))
            if engine is not None:
                from gateway.model_commands import model_commands  # noqa: PLC0415

                for name, handler in model_commands(engine, cfg.inference).items():
                    commands.register(name, handler)
            if cfg.pools:
                sources += self._build_pools(engine, commands)

            async with asyncio.TaskGroup() as tg:
                uplink_task = tg.create_task(uplink.run(), name="uplink")
                pipeline_task = tg.create_task(pipeline.run(), name="pipeline")
                watchdog_task = tg.create_task(self._watchdog(outbox, uplink), name="watchdog")
                source_tasks = [
                    tg.create_task(
                        self._run_source(s, pipeline, analyzers), name=f"source:{s.name}"
                    )
                    for s in sources
                ]
                self._notifier.ready(self._status(outbox, uplink))
                log.info("gateway_ready", sources=[s.name for s in sources], uplink=uplink_cfg.type)
                self.ready.set()

                if stop_when_sources_done:
                    stopper = asyncio.ensure_future(self._stop.wait())
                    await asyncio.wait({stopper, *source_tasks}, return_when="FIRST_COMPLETED")
                    while not stopper.done() and not all(t.done() for t in source_tasks):
                        await asyncio.wait({stopper, *source_tasks}, return_when="FIRST_COMPLETED")
                    stopper.cancel()
                else:
                    await self._stop.wait()

                self._notifier.stopping(self._status(outbox, uplink))
                for task in source_tasks:
                    task.cancel()
                await asyncio.wait(source_tasks) if source_tasks else None
                await pipeline.close()
                await pipeline_task
                await outbox.flush()
                await uplink.stop(cfg.gateway.shutdown_flush_s)
                await uplink_task
                watchdog_task.cancel()
        log.info("gateway_stopped", **self._metrics.counters)
        return EXIT_OK

    def _build_pools(self, engine: InferenceEngine | None, commands: Commands) -> list[Source]:
        """The pool cameras (sources of their own events) and their operator commands."""
        from gateway.analyzers.pool_output import build_output  # noqa: PLC0415
        from gateway.analyzers.pool_runtime import PoolMonitor, pool_commands  # noqa: PLC0415

        cfg = self._cfg
        monitors = {
            name: PoolMonitor(
                name,
                pool,
                engine,
                cfg.inference,
                self._metrics,
                output=None
                if pool.local_alarm is None
                else build_output(
                    pool.local_alarm, f"edge-gateway-{self._gateway_id}-{name}-alarm"
                ),
            )
            for name, pool in cfg.pools.items()
        }
        self._pools = list(monitors.values())
        for name, handler in pool_commands(monitors).items():
            commands.register(name, handler)
        return [Source(f"pool:{name}", monitor) for name, monitor in monitors.items()]

    async def _build_waste(
        self, stack: contextlib.AsyncExitStack, engine: InferenceEngine | None
    ) -> list[Source]:
        """Image inbox sources with the waste classifier ([waste]), verified before they start.

        A classifier that fails verification is logged and listed as unavailable; the inboxes
        still run and answer every photo with that reason (nothing is guessed without it).
        """
        inboxes = [s for s in self._cfg.sources if isinstance(s, ImageInboxSourceConfig)]
        if not inboxes:
            return []
        from gateway.errors import ModelError  # noqa: PLC0415
        from gateway.inference import InferenceEngine  # noqa: PLC0415
        from gateway.waste import WasteInboxSource, WasteService, waste_setup  # noqa: PLC0415

        if engine is None:
            # Only image inboxes need a model: the engine starts here (closed by the stack).
            engine = await stack.enter_async_context(InferenceEngine(self._cfg.inference))
            self._engine = engine
        service: WasteService | None = None
        reason = ""
        try:
            setup = waste_setup(self._cfg)
            if not engine.available(setup.model_name):
                await engine.load(setup.card_path)
            service = WasteService(setup)
        except ModelError as exc:
            reason = f"the waste classifier is unavailable: {exc}"
            log.error(
                "model_unavailable", model="waste", card=str(self._cfg.waste.card), reason=str(exc)
            )
        self._inboxes = [
            WasteInboxSource(inbox, self._gateway_id, service, engine, reason) for inbox in inboxes
        ]
        return [Source(inbox.name, inbox) for inbox in self._inboxes]

    def _build_uplink(self, outbox: Outbox, commands: Commands) -> Uplink:
        cfg = self._cfg.uplink
        if isinstance(cfg, MqttUplinkConfig):
            uplink = MqttUplink(
                cfg,
                self._gateway_id,
                outbox,
                metrics=self._metrics,
                commands=commands,
                stats=self._stats_provider(outbox),
                environ=self._environ,
            )

            async def stats_command(_args: Mapping[str, Any]) -> tuple[Measurement, ...]:
                uplink.request_stats()
                return (Measurement("reply", "stats published"),)

            commands.register("stats", stats_command)
            if not cfg.tls.enabled:
                log.warning(
                    "uplink_insecure",
                    host=cfg.host,
                    port=cfg.port,
                    reason="tls.enabled = false and allow_insecure = true: events go in plaintext",
                )
            return uplink
        return FileUplink(cfg, outbox, self._metrics)

    def _stats_provider(self, outbox: Outbox) -> Any:
        async def provide() -> dict[str, Any]:
            snap = await outbox.stats()
            counters = self._metrics.counters
            return {
                "v": 1,
                "gateway": self._gateway_id,
                "version": __version__,
                "uptime_s": round(self._metrics.uptime_s(), 1),
                "outbox": {
                    "rows": snap.rows,
                    "bytes": snap.bytes,
                    "oldest_age_s": snap.oldest_age_s,
                },
                "drops": snap.drops,
                "rates_per_s": self._rates.rates(),
                "totals": {
                    "readings_in": counters["readings_in"],
                    "events_in": counters["events_in"],
                    "events_out": counters["events_out"],
                    "readings_dropped_queue_full": counters["readings_dropped_queue_full"],
                    "source_errors": counters["source_errors"],
                },
                "analyzers": {
                    "readings": counters["readings_analyzed"],
                    "warnings": counters["analyzer_warnings"],
                    "no_score": counters["analyzer_no_score"],
                },
                "inference": None if self._engine is None else self._engine.stats(),
                # Monitoring state, detection-off zones (always listed) and alarms per pool.
                "pools": [pool.summary() for pool in self._pools],
                "reconnects": counters["uplink_connects"],
                "connect_failures": counters["uplink_connect_failures"],
                "lorawan": [
                    lorawan_summary(s.impl)
                    for s in self._sources
                    if isinstance(s.impl, ChirpStackSource)
                ],
                # Port state (open, missing, permission: ... with the fix) and counters per
                # serial source, so a technician sees an unplugged or refused port remotely.
                "serial": [
                    serial_summary(cast("SerialSource", s.impl)) for s in self._sources if s.serial
                ],
                # Photos taken, refused (each with a reason event) and deleted, per image inbox.
                "image_inboxes": [
                    {"source": inbox.name, **inbox.inbox.counters} for inbox in self._inboxes
                ],
            }

        return provide

    async def _run_source(
        self, source: Source, pipeline: Pipeline, analyzers: Analyzers | None
    ) -> None:
        def report_error(kind: str, detail: str) -> None:
            self._metrics.inc("source_errors")
            self._metrics.inc(f"source_errors_{kind}")
            log.warning("source_error", source=source.name, kind=kind, detail=detail)

        async def emit(item: Reading | Event, on_stored: OnStored | None = None) -> None:
            # A configured gauge's reading becomes its analysed event here, before the queue:
            # the model runs off the loop, and other devices' readings pass by untouched.
            if (
                analyzers is not None
                and isinstance(item, Reading)
                and analyzers.handles(item.device)
            ):
                item = await analyzers.analyze(item)
            await pipeline.submit(item, on_stored)

        await source.impl.run(emit, report_error)
        log.info("source_finished", source=source.name)

    def _status(self, outbox: Outbox, uplink: Uplink) -> str:
        status = (
            f"broker {uplink.state}; outbox {outbox.depth()} queued; "
            f"{self._metrics.counters['events_out']} sent"
        )
        unavailable = self._engine.unavailable() if self._engine is not None else {}
        if unavailable:
            # systemctl status shows this line: a refused model is seen without reading logs.
            status += f"; models unavailable: {', '.join(sorted(unavailable))}"
        for pool in self._pools:
            if not pool.monitoring:
                # An unwatched pool is said where a technician looks first.
                status += (
                    f"; pool {pool.name} NOT monitoring ({','.join(pool.reasons()) or 'starting'})"
                )
        return status

    async def _watchdog(self, outbox: Outbox, uplink: Uplink) -> None:
        watchdog_s = self._notifier.watchdog_interval_s
        # sd_watchdog_enabled(3) advises pinging at half the interval.
        period = min(5.0, watchdog_s / 2) if watchdog_s else 5.0
        reported: list[str] = []
        while True:
            stale = self._heartbeats.stale()
            if not stale:
                self._notifier.watchdog()
            if stale != reported:
                if stale:
                    log.error("heartbeat_stale", components=stale)
                else:
                    log.info("heartbeat_ok")
                reported = stale
            self._notifier.status(self._status(outbox, uplink))
            await asyncio.sleep(period)
