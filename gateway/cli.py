"""Command line: ``edge-gateway run | check-config | print-config | demo | codec | version``."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

import structlog

from gateway import __version__
from gateway.app import EXIT_CONFIG, EXIT_OK, EXIT_SOFTWARE, Gateway
from gateway.codec_cli import add_codec_parser
from gateway.config import DEFAULT_CONFIG_PATH, GatewayConfig, config_from_dict, load_config
from gateway.errors import ConfigError, GatewayError, TerminalUplinkError
from gateway.logs import configure_logging
from gateway.render import render_config, render_example

log = structlog.get_logger(__name__)


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
    try:
        return asyncio.run(
            Gateway(cfg, dict(os.environ)).run(stop_when_sources_done=stop_when_sources_done)
        )
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
    return _run_gateway(cfg)


def cmd_check_config(args: argparse.Namespace) -> int:
    cfg = _load(args.config)
    if cfg is None:
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


def demo_config(state_dir: Path, interval_s: float) -> GatewayConfig:
    """The embedded default: bundled recordings → pipeline → outbox → stdout.

    A river gauge's readings replayed as they are, and a ChirpStack capture (a radar gauge and a
    climate sensor) decoded by the built-in codecs through the device catalog.
    """
    capture = resources.files("gateway.demo").joinpath("chirpstack-demo.jsonl")
    return config_from_dict(
        {
            "gateway": {"id": "demo", "state_dir": str(state_dir), "log_level": "warning"},
            "uplink": {"type": "file", "path": "-", "fsync": False},
            "sources": [
                {"type": "replay", "name": "gard-anduze", "interval_s": interval_s},
                {
                    "type": "chirpstack",
                    "name": "lorawan",
                    "replay_file": str(capture),
                    "replay_interval_s": interval_s,
                },
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


def cmd_demo(args: argparse.Namespace) -> int:
    # Logs go to stderr here so stdout is exactly the event stream a platform would receive.
    configure_logging("warning", "console", sys.stderr)
    with tempfile.TemporaryDirectory(prefix="edge-gateway-demo-") as tmp:
        state_dir = args.state_dir or Path(tmp)
        cfg = demo_config(state_dir, args.interval)
        print(
            "edge-gateway demo: replaying a real river flood (Le Gard at Anduze, Sept 2020) "
            "through pipeline -> durable outbox -> uplink (stdout):",
            file=sys.stderr,
        )
        code = _run_gateway(cfg, stop_when_sources_done=True)
        kept = f"; outbox kept in {state_dir}" if args.state_dir else ""
        print(f"edge-gateway demo: done (exit {code}){kept}", file=sys.stderr)
        return code


def cmd_version(_args: argparse.Namespace) -> int:
    print(__version__)
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
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

    add_codec_parser(sub)

    version = sub.add_parser("version", help="print the version")
    version.set_defaults(func=cmd_version)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
