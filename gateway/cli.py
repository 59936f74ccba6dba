"""Command line: ``edge-gateway run|check-config|print-config|demo|codec|serial|version``."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from pathlib import Path

from gateway import __version__
from gateway.app import EXIT_CONFIG, EXIT_OK
from gateway.config import (
    DEFAULT_CONFIG_PATH,
    GatewayConfig,
    check_ports,
    load_config,
)
from gateway.errors import ConfigError
from gateway.logs import configure_logging
from gateway.process import run_gateway, tune_daemon
from gateway.render import render_config, render_example


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


def cmd_run(args: argparse.Namespace) -> int:
    cfg = _load(args.config)
    if cfg is None:
        return EXIT_CONFIG
    configure_logging(cfg.gateway.log_level, cfg.gateway.log_format)
    tune_daemon()
    return run_gateway(cfg)


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


def cmd_version(_args: argparse.Namespace) -> int:
    print(__version__)
    return EXIT_OK


# Commands whose modules load what `edge-gateway run` does not need (numpy and onnxruntime,
# ~40 MB; the JavaScript and serial tools, ~2 MB; the demo, ~0.5 MB): imported only when
# chosen, so the daemon stays small. Others get a placeholder that only lists the command in
# --help.
_HEAVY_COMMANDS = {
    "demo": (
        "gateway.demo_cli",
        "add_demo_parser",
        "run the embedded demo: no broker, no hardware",
    ),
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
