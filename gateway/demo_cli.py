"""``edge-gateway demo``: the embedded default, no broker and no hardware needed.

Imported only when the command is chosen (gateway/cli.py's _HEAVY_COMMANDS), so the daemon does
not load the demo's recordings, configuration and simulated weather station.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
import tempfile
from importlib import resources
from pathlib import Path

from drivers.serial_port import SerialSource
from gateway.app import Gateway
from gateway.config import GatewayConfig, config_from_dict
from gateway.demo import flood, pool, weather_station
from gateway.logs import configure_logging
from gateway.process import guarded, run_gateway


def add_demo_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    demo = sub.add_parser("demo", help="run the embedded demo: no broker, no hardware")
    demo.add_argument("--interval", type=float, default=0.01, help="seconds between readings")
    demo.add_argument("--state-dir", type=Path, default=None, help="keep the outbox here")
    demo.set_defaults(func=cmd_demo)


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
            code = run_gateway(
                demo_config(state_dir, args.interval, waste_inbox=waste_inbox),
                stop_when_sources_done=True,
            )
        else:
            code = guarded(
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
