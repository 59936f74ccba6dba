"""Command line: ``edge-gateway run|check-config|print-config|demo|codec|serial|version``."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import importlib
import os
import sys
import tempfile
from collections.abc import Callable, Coroutine, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import structlog

from drivers.serial_port import SerialSource
from gateway import __version__
from gateway.app import EXIT_CONFIG, EXIT_OK, EXIT_SOFTWARE, Gateway
from gateway.config import (
    DEFAULT_CONFIG_PATH,
    GatewayConfig,
    check_ports,
    config_from_dict,
    load_config,
)
from gateway.demo import flood, pool, weather_station
from gateway.errors import ConfigError, GatewayError, TerminalUplinkError
from gateway.logs import configure_logging
from gateway.render import render_config, render_example

log = structlog.get_logger(__name__)

_SWITCH_INTERVAL_S = 0.0005


def _print_config_error(exc: ConfigError) -> None:
    print(f"{exc.source}: invalid configuration ({len(exc.problems)} problem(s))", file=sys.stderr)
    for problem in exc.problems:
        print(f"{exc.source}: {problem}", file=sys.stderr)


def _load(path: Path) -> GatewayConfig | None:
    try:
        return load_config(path)
    except ConfigError as exc:
        _print_config_error(exc)
        return None


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for sub in exc.exceptions for leaf in _leaves(sub)]
    return [exc]


def _run_gateway(cfg: GatewayConfig, *, stop_when_sources_done: bool = False) -> int:
    return _guarded(
        lambda: Gateway(cfg, dict(os.environ)).run(stop_when_sources_done=stop_when_sources_done)
    )


def _guarded(main: Callable[[], Coroutine[Any, Any, int]]) -> int:
    """Run the gateway's event loop and turn what ends it into an exit status."""
    try:
        return asyncio.run(main())
    except (Exception, BaseExceptionGroup) as exc:  # the top of main: decide the exit code
        leaves = _leaves(exc)
        for leaf in leaves:
            if isinstance(leaf, TerminalUplinkError | ConfigError):
                log.error("gateway_refused", error=str(leaf))
                return EXIT_CONFIG
        for leaf in leaves:
            if isinstance(leaf, GatewayError):
                log.error("gateway_failed", error=str(leaf))
                return EXIT_SOFTWARE
        log.exception("gateway_crashed")
        return EXIT_SOFTWARE


def cmd_run(args: argparse.Namespace) -> int:
    cfg = _load(args.config)
    if cfg is None:
        return EXIT_CONFIG
    configure_logging(cfg.gateway.log_level, cfg.gateway.log_format)
    # What is loaded by now (modules, pydantic schemas, protobuf descriptors, codecs) lives as
    # long as the process. Frozen, the cyclic collector no longer walks it on every full
    # collection: under a backlog that cut the longest event-loop stall from ~220 ms to ~90 ms
    # (bench/chirpstack_ingest.py). Only the daemon does this; tests run many gateways in one
    # process and must get their garbage back.
    gc.freeze()
    # The outbox commits on its own thread, and the sqlite3 module gives up the GIL around every
    # statement; each time it wants it back it waits for the event loop thread to offer it,
    # up to the switch interval (5 ms by default). Under load that stretched a 1.4 ms commit
    # of 350 rows to 16 ms (p50), and the ChirpStack intake waited on those commits. 0.5 ms
    # brings it to 2.2 ms; the event loop thread pays only a check it already makes.
    sys.setswitchinterval(_SWITCH_INTERVAL_S)
    return _run_gateway(cfg)


def cmd_check_config(args: argparse.Namespace) -> int:
    cfg = _load(args.config)
    if cfg is None:
        return EXIT_CONFIG
    # The serial ports as they are on this machine now (only check-config looks: `run` waits
    # for a missing port and reports a refused one in its log and stats, per source).
    errors, warnings = check_ports(cfg)
    for warning in warnings:
        print(f"{args.config}: warning: {warning}", file=sys.stderr)
    if errors:
        _print_config_error(ConfigError(str(args.config), errors))
        return EXIT_CONFIG
    print(f"{args.config}: OK")
    return EXIT_OK


def cmd_print_config(args: argparse.Namespace) -> int:
    if args.config is None:
        sys.stdout.write(render_example())
        return EXIT_OK
    cfg = _load(args.config)
    if cfg is None:
        return EXIT_CONFIG
    sys.stdout.write(render_config(cfg))
    return EXIT_OK


def demo_config(
    state_dir: Path,
    interval_s: float,
    serial_port: Path | None = None,
    waste_inbox: Path | None = None,
) -> GatewayConfig:
    """The embedded default: bundled recordings → pipeline → outbox → stdout.

    A river gauge's readings replayed as they are, a ChirpStack capture (a radar gauge and a
    climate sensor) decoded by the built-in codecs through the device catalog, with
    ``serial_port`` a weather station on a serial port (see gateway.demo.weather_station), and
    with ``waste_inbox`` the photos in that directory classified for a citizen service.
    """
    capture = resources.files("gateway.demo").joinpath("chirpstack-demo.jsonl")
    serial = (
        []
        if serial_port is None
        else [weather_station.source_config(serial_port, len(weather_station.station_lines()))]
    )
    waste = (
        []
        if waste_inbox is None
        else [
            {
                "type": "image_inbox",
                "name": "waste-kiosk",
                "directory": str(waste_inbox),
                "settle_s": 0.0,
                "once": True,
            }
        ]
    )
    return config_from_dict(
        {
            "gateway": {"id": "demo", "state_dir": str(state_dir), "log_level": "warning"},
            **flood.config(),
            **pool.config(),
            "uplink": {"type": "file", "path": "-", "fsync": False},
            "sources": [
                {"type": "replay", "name": "gard-anduze", "interval_s": interval_s},
                {
                    "type": "chirpstack",
                    "name": "lorawan",
                    "replay_file": str(capture),
                    "replay_interval_s": interval_s,
                },
                *serial,
                *waste,
            ],
            "profiles": {
                "radar-gauge": {
                    "codec": "dragino-lmds200",
                    "fields": [
                        {"field": "dis1", "name": "distance", "unit": "cm"},
                        {"field": "Bat", "name": "battery", "unit": "V", "valid_min": 3.1},
                    ],
                    "water_level": {
                        "distance": "distance",
                        "sensor_min_cm": 30,
                        "sensor_max_cm": 2000,
                    },
                },
                "climate": {
                    "codec": "dragino-lht65",
                    "fields": [
                        {"field": "TempC_SHT", "name": "air_temperature", "unit": "Cel"},
                        {"field": "Hum_SHT", "name": "relative_humidity", "unit": "%"},
                        {"field": "BatV", "name": "battery", "unit": "V"},
                    ],
                },
            },
            "devices": [
                {
                    "dev_eui": "a84041000181c071",
                    "profile": "radar-gauge",
                    "params": {"mounting_height_cm": 900},
                    "expected_interval_s": 5400,
                },
                {"device_profile": "LHT65", "profile": "climate"},
            ],
        },
        "embedded demo config",
    )


# How long the demo waits for its serial source to open the port, and then to take every line
# of the simulated station; past that (a line lost on the pty), the demo stops instead of hanging.
_DEMO_SERIAL_TIMEOUT_S = 10.0


async def _weather_station(
    station_side: Path, interval_s: float, gateway: Gateway, run: asyncio.Task[int]
) -> None:
    """Feed the simulated station once the gateway's serial source has opened its port."""
    try:
        async with asyncio.timeout(_DEMO_SERIAL_TIMEOUT_S):
            await gateway.ready.wait()
            source = gateway.source(weather_station.SOURCE_NAME)
            assert isinstance(source, SerialSource)
            await source.port.opened.wait()
    except TimeoutError:
        if not run.done():
            print("edge-gateway demo: the serial port did not open; stopping", file=sys.stderr)
            gateway.request_stop()
        return
    lines = weather_station.station_lines()
    await weather_station.feed(station_side, lines, max(interval_s * 5, 0.005))
    done, _ = await asyncio.wait({run}, timeout=_DEMO_SERIAL_TIMEOUT_S)
    if not done:
        print(
            "edge-gateway demo: the station's lines did not all arrive; stopping", file=sys.stderr
        )
        gateway.request_stop()


async def _demo_with_station(
    tmp: Path, state_dir: Path, interval_s: float, waste_inbox: Path
) -> int:
    """The demo with the simulated weather station on a socat pty pair."""
    async with contextlib.AsyncExitStack() as stack:
        try:
            gateway_side, station_side = await stack.enter_async_context(
                weather_station.pty_pair(tmp)
            )
        except (OSError, RuntimeError) as exc:
            print(
                f"edge-gateway demo: no pseudo-terminal for the weather station ({exc}); "
                "skipping it",
                file=sys.stderr,
            )
            plain = Gateway(
                demo_config(state_dir, interval_s, waste_inbox=waste_inbox), dict(os.environ)
            )
            return await plain.run(stop_when_sources_done=True)
        gateway = Gateway(
            demo_config(state_dir, interval_s, gateway_side, waste_inbox), dict(os.environ)
        )
        async with asyncio.TaskGroup() as tg:
            run = tg.create_task(gateway.run(stop_when_sources_done=True), name="gateway")
            tg.create_task(
                _weather_station(station_side, interval_s, gateway, run), name="weather-station"
            )
        return run.result()


def cmd_demo(args: argparse.Namespace) -> int:
    # Logs go to stderr here so stdout is exactly the event stream a platform would receive.
    configure_logging("warning", "console", sys.stderr)
    with tempfile.TemporaryDirectory(prefix="edge-gateway-demo-") as tmp:
        state_dir = args.state_dir or Path(tmp)
        waste_inbox = _waste_demo_inbox(Path(tmp))
        print(
            "edge-gateway demo: replaying a real river flood (Le Gard at Anduze, Sept 2020) "
            "through pipeline -> durable outbox -> uplink (stdout), and classifying six waste "
            "photos dropped into a kiosk's inbox (on-device AI; the photos never leave):",
            file=sys.stderr,
        )
        if not weather_station.socat_available():
            print(
                "edge-gateway demo: socat not installed, skipping the serial weather station "
                "(apt-get install socat)",
                file=sys.stderr,
            )
            code = _run_gateway(
                demo_config(state_dir, args.interval, waste_inbox=waste_inbox),
                stop_when_sources_done=True,
            )
        else:
            code = _guarded(
                lambda: _demo_with_station(Path(tmp), state_dir, args.interval, waste_inbox)
            )
        kept = f"; outbox kept in {state_dir}" if args.state_dir else ""
        print(f"edge-gateway demo: done (exit {code}){kept}", file=sys.stderr)
        return code


def _waste_demo_inbox(tmp: Path) -> Path:
    """A kiosk's inbox holding copies of the bundled TrashNet training photos (see
    gateway/demo/waste/PROVENANCE.md); the gateway deletes each once classified."""
    inbox = tmp / "waste-inbox"
    inbox.mkdir()
    photos = resources.files("gateway.demo").joinpath("waste")
    for photo in sorted(photos.iterdir(), key=lambda p: p.name):
        if photo.name.endswith(".jpg"):
            (inbox / photo.name).write_bytes(photo.read_bytes())
    return inbox


def cmd_version(_args: argparse.Namespace) -> int:
    print(__version__)
    return EXIT_OK


# Commands whose modules load what `edge-gateway run` does not need (numpy and onnxruntime,
# ~40 MB; the JavaScript and serial tools, ~2 MB): imported only when chosen, so the daemon stays
# small. Others get a placeholder that only lists the command in --help.
_HEAVY_COMMANDS = {
    "codec": (
        "gateway.codec_cli",
        "add_codec_parser",
        "run a payload codec over JSON lines (see codec run -h)",
    ),
    "serial": (
        "gateway.serial_cli",
        "add_serial_parser",
        "serial sensors: probe a port on site",
    ),
    "models": (
        "gateway.models_cli",
        "add_models_parser",
        "model cards: list, verify, quantise, evaluate",
    ),
    "anomaly": (
        "gateway.anomaly_cli",
        "add_anomaly_parser",
        "replay a series through the anomaly analyzer",
    ),
    "vision": (
        "gateway.vision_cli",
        "add_vision_parser",
        "pool person detector on image files: vision detect IMAGE... (JSON lines)",
    ),
    "waste": (
        "gateway.waste_cli",
        "add_waste_parser",
        "waste photo recognition: classify IMAGE... (JSON lines)",
    ),
}


def _add_heavy(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], argv: Sequence[str]
) -> None:
    chosen = next((a for a in argv if not a.startswith("-")), None)
    for name, (module, function, summary) in _HEAVY_COMMANDS.items():
        if chosen == name:
            getattr(importlib.import_module(module), function)(sub)
        else:
            sub.add_parser(name, help=summary)


def build_parser(argv: Sequence[str] = ()) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edge-gateway",
        description="Edge agent for municipal sensor networks.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the gateway")
    run.add_argument("-c", "--config", type=Path, default=DEFAULT_CONFIG_PATH)
    run.set_defaults(func=cmd_run)

    check = sub.add_parser("check-config", help="validate a config file (exit 78 if invalid)")
    check.add_argument("-c", "--config", type=Path, default=DEFAULT_CONFIG_PATH)
    check.set_defaults(func=cmd_check_config)

    show = sub.add_parser(
        "print-config", help="print the default config (or FILE's effective config) as TOML"
    )
    show.add_argument("-c", "--config", type=Path, default=None)
    show.set_defaults(func=cmd_print_config)

    demo = sub.add_parser("demo", help="run the embedded demo: no broker, no hardware")
    demo.add_argument("--interval", type=float, default=0.01, help="seconds between readings")
    demo.add_argument("--state-dir", type=Path, default=None, help="keep the outbox here")
    demo.set_defaults(func=cmd_demo)

    _add_heavy(sub, argv)

    version = sub.add_parser("version", help="print the version")
    version.set_defaults(func=cmd_version)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv).parse_args(argv)
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
