"""``edge-gateway serial probe`` and the port check of ``check-config``, on real ptys.

The probe and check-config run as real processes (``python -m gateway.cli``), like the other CLI
tests; the permission cases run the same ``main()`` in a child that dropped to user nobody.
"""

from __future__ import annotations

import argparse
import asyncio
import codecs
import contextlib
import grp
import io
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from drivers.ascii_lines import nmea_checksum
from drivers.serial_port import SerialSettings, open_port
from gateway.cli import main
from gateway.serial_cli import parse_ids
from tests.support.privileges import run_as_nobody
from tests.support.socat import PtyPair, require_socat
from tests.test_cli import PROBLEM_RE, assert_no_traceback, clean_env, cli

EXIT_CONFIG = 78
EXIT_PORT = 1


def config_text(state: Path, port: str | Path, name: str = "weather") -> str:
    return f"""
[gateway]
id = "serial-cli-test"
state_dir = "{state}"

[uplink]
type = "file"
path = "-"

[[sources]]
type = "serial_ascii"
name = "{name}"
port = "{port}"
format = "keyvalue"
checksum = "nmea"

[[sources.fields]]
key = "T"
name = "air_temperature"
unit = "Cel"

[[sources.fields]]
key = "H"
name = "relative_humidity"
unit = "%"
"""


def write_config(directory: Path, port: str | Path) -> Path:
    path = directory / "gateway.toml"
    path.write_text(config_text(directory / "state", port), encoding="utf-8")
    return path


def nmea_line(body: str) -> bytes:
    return f"{body}*{nmea_checksum(body):02X}\r\n".encode()


def start_probe(*args: str, cwd: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "gateway.cli", "serial", "probe", *args],
        cwd=cwd,
        env=clean_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_listening(proc: subprocess.Popen[str]) -> str:
    """The probe's first line: it says so once the port is open (input is flushed at open)."""
    assert proc.stdout is not None
    first = proc.stdout.readline()
    assert first.startswith("listening on "), first + proc.communicate(timeout=15)[1]
    return first


# -- probe ---------------------------------------------------------------------------------------


def test_probe_prints_raw_lines_with_byte_counts(pty_pair: PtyPair, tmp_path: Path) -> None:
    proc = start_probe(str(pty_pair.sensor), "--seconds", "1.5", "--baud", "19200", cwd=tmp_path)
    sim = pty_pair.open_sim()
    try:
        header = wait_listening(proc)
        os.write(sim, b"T=21.4,H=55\r\n\x00\xffnoise\r\nT=2")
        out, err = proc.communicate(timeout=15)
    finally:
        os.close(sim)
    assert proc.returncode == 0, err
    assert f"{pty_pair.sensor} at 19200 8N1 for 1.5 s" in header
    lines = out.splitlines()
    assert re.match(r"^\+\s*\d+\.\d\ds\s+13 B  T=21\.4,H=55\\x0d\\x0a$", lines[0]), lines
    assert re.match(r"^\+\s*\d+\.\d\ds\s+9 B  \\x00\\xffnoise\\x0d\\x0a$", lines[1]), lines
    assert lines[2].endswith("3 B  T=2  (unfinished line)")
    assert lines[3] == f"3 line(s), 25 byte(s) in 1.5 s on {pty_pair.sensor} at 19200 8N1"
    assert err == ""


def test_probe_decodes_with_a_configured_source(pty_pair: PtyPair, tmp_path: Path) -> None:
    config = write_config(tmp_path, "/dev/ttyUSB-not-this-one")
    proc = start_probe(
        str(pty_pair.sensor), "--seconds", "1", "--source", "weather", "-c", str(config),
        cwd=tmp_path,
    )  # fmt: skip
    sim = pty_pair.open_sim()
    try:
        wait_listening(proc)
        good = nmea_line("T=21.4,H=55")
        os.write(sim, good + good.replace(b"21.4", b"71.4") + nmea_line("T=3"))
        out, err = proc.communicate(timeout=15)
    finally:
        os.close(sim)
    assert proc.returncode == 0, err
    decoded = [line.strip() for line in out.splitlines() if line.strip().startswith("->")]
    assert decoded[0] == "-> air_temperature=21.4 Cel, relative_humidity=55 %"
    assert decoded[1].startswith("-> rejected (checksum_mismatch): checksum")
    assert decoded[2] == "-> air_temperature=3 Cel  (missing: H)"
    assert out.splitlines()[-1].endswith("; 2 decoded, 1 rejected")


def test_probe_hints_when_nothing_arrives(pty_pair: PtyPair, tmp_path: Path) -> None:
    result = cli("serial", "probe", str(pty_pair.sensor), "--seconds", "0.3", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "0 line(s), 0 byte(s)" in result.stdout
    assert "hint: nothing arrived" in result.stdout


def test_probe_missing_port(tmp_path: Path) -> None:
    port = tmp_path / "usb-FTDI_FT232R_USB_UART_A50285BI-if00-port0"
    result = cli("serial", "probe", str(port), cwd=tmp_path)
    assert result.returncode == EXIT_PORT
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"edge-gateway serial probe: serial port {port} does not exist")
    assert_no_traceback(result)


def test_probe_not_a_tty(tmp_path: Path) -> None:
    port = tmp_path / "ttyUSB0"
    port.write_text("a regular file")
    result = cli("serial", "probe", str(port), cwd=tmp_path)
    assert result.returncode == EXIT_PORT
    assert result.stderr.strip() == (
        f"edge-gateway serial probe: {port} is not a serial device (not a character device)"
    )


async def test_probe_busy_port_names_the_fix(pty_pair: PtyPair, tmp_path: Path) -> None:
    # The gateway (here: this test) holds the port; the probe is refused, with the fix.
    _reader, writer = await open_port(SerialSettings(str(pty_pair.sensor)))
    try:
        returncode, stdout, stderr = await run_cli(
            tmp_path, "serial", "probe", str(pty_pair.sensor)
        )
    finally:
        writer.close()
    assert returncode == EXIT_PORT
    assert stdout == ""
    assert stderr.count("\n") == 1
    assert f"serial port {pty_pair.sensor} is busy" in stderr
    assert "systemctl stop edge-gateway" in stderr


async def run_cli(cwd: Path, *args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gateway.cli",
        *args,
        cwd=cwd,
        env=clean_env(),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(15):
        out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def test_probe_unknown_source(tmp_path: Path, pty_pair: PtyPair) -> None:
    config = write_config(tmp_path, pty_pair.sensor)
    result = cli(
        "serial", "probe", str(pty_pair.sensor), "--source", "nope", "-c", str(config),
        cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == EXIT_CONFIG
    assert "no serial_ascii source named 'nope' (configured: weather)" in result.stderr


@contextlib.contextmanager
def world_readable_dir() -> Iterator[Path]:
    """A directory user nobody can search (pytest's tmp_path is 0700 root)."""
    with tempfile.TemporaryDirectory(prefix="edge-gateway-cli-") as tmp:
        Path(tmp).chmod(0o755)
        yield Path(tmp)


def as_nobody(*argv: str) -> tuple[int, str, str]:
    """``edge-gateway ARGV`` (in-process main) in a child running as nobody."""

    def run() -> str:
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(list(argv))
        return f"{code}\0{out.getvalue()}\0{err.getvalue()}"

    # The child cannot read the interpreter's files under /root: what it loads lazily (codecs
    # here) must be loaded first.
    codecs.lookup("ascii")
    code, out, err = run_as_nobody(run).split("\0")
    return int(code), out, err


def refuse_nobody(pair: PtyPair) -> None:
    node = Path(os.path.realpath(pair.sensor))
    os.chown(node, -1, grp.getgrnam("dialout").gr_gid)
    node.chmod(0o660)


def test_probe_permission_denied_as_an_unprivileged_user() -> None:
    require_socat()
    if os.geteuid() != 0:
        pytest.skip("needs root to run the probe as another user")
    with world_readable_dir() as tmp, PtyPair(tmp) as pair:
        refuse_nobody(pair)
        code, out, err = as_nobody("serial", "probe", str(pair.sensor), "--seconds", "0.1")
    assert code == EXIT_PORT
    assert out == ""
    assert err == (
        f"edge-gateway serial probe: permission denied on serial port {pair.sensor} for user "
        "nobody: add nobody to the 'dialout' group (`usermod -aG dialout nobody`; the systemd "
        "unit has SupplementaryGroups=dialout) and restart the gateway\n"
    )


def test_parse_ids_for_the_modbus_scan() -> None:
    assert parse_ids("1-3,7, 5") == [1, 2, 3, 5, 7]
    assert parse_ids("247") == [247]
    for bad in ("0", "1-248", "3-1", "a", "1-", ""):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_ids(bad)


# -- check-config's port check -------------------------------------------------------------------


def test_check_config_warns_about_a_missing_port_without_failing(tmp_path: Path) -> None:
    port = "/dev/serial/by-id/usb-Prolific_Technology_Inc._USB-Serial_Controller-if00-port0"
    config = write_config(tmp_path, port)
    result = cli("check-config", "-c", str(config), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"{config}: OK"
    warning = result.stderr.strip()
    assert warning.startswith(f"{config}: warning: sources[0].port: serial port {port} does not")
    assert warning.endswith(f"(got: '{port}')")


def test_check_config_not_a_serial_device_is_an_error(tmp_path: Path) -> None:
    port = tmp_path / "ttyUSB0"
    port.write_text("")
    config = write_config(tmp_path, port)
    result = cli("check-config", "-c", str(config), cwd=tmp_path)
    assert result.returncode == EXIT_CONFIG
    assert result.stdout == ""
    problems = [
        line.removeprefix(f"{config}: ")
        for line in result.stderr.splitlines()
        if PROBLEM_RE.match(line.removeprefix(f"{config}: "))
    ]
    assert problems == [
        f"sources[0].port: {port} is not a serial device (not a character device) (got: '{port}')"
    ]


def test_check_config_ok_with_a_present_port(pty_pair: PtyPair, tmp_path: Path) -> None:
    config = write_config(tmp_path, pty_pair.sensor)
    result = cli("check-config", "-c", str(config), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""


def test_check_config_two_sources_on_one_port(tmp_path: Path) -> None:
    config = tmp_path / "gateway.toml"
    text = config_text(tmp_path / "state", "/dev/ttyUSB0")
    second = "[[sources]]" + text.split("[[sources]]", 1)[1].replace('"weather"', '"other"')
    config.write_text(text + second, encoding="utf-8")
    result = cli("check-config", "-c", str(config), cwd=tmp_path)
    assert result.returncode == EXIT_CONFIG
    assert "sources: sources 'weather' and 'other' use the same serial port" in result.stderr
    assert "(got: '/dev/ttyUSB0')" in result.stderr


def test_check_config_two_paths_to_one_device(pty_pair: PtyPair, tmp_path: Path) -> None:
    # A by-id link and the node it points to are one port, which only the machine can tell.
    alias = tmp_path / "usb-FTDI_FT232R-if00-port0"
    alias.symlink_to(os.path.realpath(pty_pair.sensor))
    config = tmp_path / "gateway.toml"
    text = config_text(tmp_path / "state", pty_pair.sensor)
    second = "[[sources]]" + text.split("[[sources]]", 1)[1]
    second = second.replace('"weather"', '"other"').replace(str(pty_pair.sensor), str(alias))
    config.write_text(text + second, encoding="utf-8")
    result = cli("check-config", "-c", str(config), cwd=tmp_path)
    assert result.returncode == EXIT_CONFIG
    node = os.path.realpath(pty_pair.sensor)
    assert (
        f"{config}: sources[1].port: the same device as sources[0].port ({node}); one source "
        f"per port (got: '{alias}')"
    ) in result.stderr.splitlines()


def test_check_config_permission_denied_as_an_unprivileged_user() -> None:
    require_socat()
    if os.geteuid() != 0:
        pytest.skip("needs root to run check-config as another user")
    with world_readable_dir() as tmp, PtyPair(tmp) as pair:
        refuse_nobody(pair)
        config = tmp / "gateway.toml"
        config.write_text(config_text(tmp / "state", pair.sensor), encoding="utf-8")
        config.chmod(0o644)
        code, out, err = as_nobody("check-config", "-c", str(config))
    assert code == EXIT_CONFIG
    assert out == ""
    problem = next((line for line in err.splitlines() if "sources[0].port" in line), err)
    assert problem == (
        f"{config}: sources[0].port: permission denied on serial port {pair.sensor} for user "
        f"nobody: add nobody to the 'dialout' group (`usermod -aG dialout nobody`; the systemd "
        f"unit has SupplementaryGroups=dialout) and restart the gateway (got: '{pair.sensor}')"
    )
    assert PROBLEM_RE.match(problem.removeprefix(f"{config}: "))


def test_probe_lists_the_adapters_that_are_plugged_in(tmp_path: Path) -> None:
    # With no USB adapter on the test machine, the hint says so instead of listing them.
    result = cli("serial", "probe", "/dev/ttyUSB-absent", cwd=tmp_path)
    assert result.returncode == EXIT_PORT
    assert re.search(r"\[(plugged in: |no /dev/serial/by-id/|none plugged in)", result.stderr)
