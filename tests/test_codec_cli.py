"""``codec run``: the exact JSON-lines interface, through a real subprocess and real QuickJS."""

from __future__ import annotations

import argparse
import json
import os
import re
import selectors
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from gateway import codec_cli
from tests.support.quickjs_oom import memory_outcome

FIXTURES = Path(__file__).parent / "fixtures" / "js"
REPO = Path(__file__).parent.parent
TIMEOUT_S = 60  # a hang fails the test instead of the run
# QuickJS's limit counts CPU time, the worker's hard deadline wall time (50 ms later): on a
# loaded machine either can act first, and both fail the decode as too slow.
TIMED_OUT = "(timed out after|exceeded its time limit)"


def run_cli(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway.codec_cli", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        cwd=REPO,
        check=False,
    )


def lines_of(stdout: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stdout.splitlines()]


def frame(fport: int, hex_payload: str) -> str:
    return json.dumps({"fPort": fport, "bytes_hex": hex_payload})


def test_good_and_bad_lines_one_output_each_in_order() -> None:
    stdin = "\n".join(
        [
            frame(1, "0866 6f 0bb8".replace(" ", "")),
            "this is not json",
            json.dumps({"bytes_hex": "00"}),  # no fPort
            frame(1, "zz"),  # bad hex
            frame(2, "0000000000"),  # the decoder returns errors
            "",  # an empty line is a malformed line too
            json.dumps({"fPort": "1", "bytes_hex": "00"}),
            frame(1, "fe005009c3"),  # good, with a warning
        ]
    )
    done = run_cli("run", str(FIXTURES / "climate_ttn.js"), stdin=stdin + "\n")
    assert done.returncode == 0, done.stderr
    out = lines_of(done.stdout)
    assert len(out) == 8
    assert out[0] == {"data": {"temperature": 21.5, "humidity": 55.5, "battery_mv": 3000}}
    assert out[1]["errors"][0].startswith("input line 2: not a JSON object")
    assert out[2] == {"errors": ["input line 3: fPort must be an integer (got: null)"]}
    assert out[3] == {"errors": ["input line 4: bytes_hex is not hex (got: 'zz')"]}
    assert out[4] == {"errors": ["unknown fPort 2"]}  # the decoder's own result object
    assert out[5]["errors"][0].startswith("input line 6: empty line")
    assert out[6] == {"errors": ['input line 7: fPort must be an integer (got: "1")']}
    assert out[7] == {
        "data": {"temperature": -5.12, "humidity": 40, "battery_mv": 2499},
        "warnings": ["battery low"],
    }
    assert all(set(line) <= {"data", "warnings", "errors"} for line in out)


def test_last_line_without_newline_and_empty_input() -> None:
    done = run_cli("run", str(FIXTURES / "legacy_ttn_v2.js"), stdin=frame(5, "0a0b"))
    assert done.returncode == 0
    assert lines_of(done.stdout) == [{"data": {"port": 5, "first": 10, "count": 2}}]
    done = run_cli("run", str(FIXTURES / "legacy_ttn_v2.js"), stdin="")
    assert (done.returncode, done.stdout) == (0, "")


def test_misbehaving_decoders_fail_their_line_only() -> None:
    needles: list[tuple[str, str | re.Pattern[str]]] = [
        ("loops_forever.js", f"decodeUplink {TIMED_OUT}"),
        ("throws.js", "decodeUplink threw RangeError: unsupported frame type"),
        ("huge_array.js", memory_outcome("16 MiB")),
        ("garbage.js", "returned invalid output: got a number"),
    ]
    for name, needle in needles:
        started = time.monotonic()
        done = run_cli("run", str(FIXTURES / name), stdin=frame(1, "01") + "\n" + frame(1, "02"))
        assert done.returncode == 0, done.stderr
        out = lines_of(done.stdout)
        assert len(out) == 2
        for line in out:
            assert list(line) == ["errors"]
            assert len(line["errors"]) == 1
            assert re.search(needle, line["errors"][0])
            assert name in line["errors"][0]
        assert time.monotonic() - started < TIMEOUT_S


def test_a_hanging_decoder_gets_its_error_line_and_the_next_lines_decode(tmp_path: Path) -> None:
    # Byte 1 sends the decoder into a catastrophically backtracking regex, which QuickJS's own
    # time limit cannot interrupt: only the worker's wall-clock deadline ends it.
    decoder = tmp_path / "hangs.js"
    decoder.write_text(
        "function decodeUplink(input) {\n"
        "  if (input.bytes[0] === 1) {\n"
        '    return {data: {m: /^(a+)+$/.test("a".repeat(40) + "b")}};\n'
        "  }\n"
        "  return {data: {first: input.bytes[0]}};\n"
        "}\n"
    )
    stdin = "\n".join([frame(1, "01"), frame(1, "07"), frame(1, "01"), frame(1, "09")]) + "\n"
    done = run_cli("run", str(decoder), stdin=stdin)
    assert done.returncode == 0, done.stderr
    out = lines_of(done.stdout)
    expected_error = {
        "errors": [
            f"{decoder}: decodeUplink exceeded its time limit of 100 ms wall clock (hard deadline"
            " 150 ms with the worker round trip); the worker process was killed and restarted"
        ]
    }
    assert out == [
        expected_error,
        {"data": {"first": 7}},
        expected_error,
        {"data": {"first": 9}},
    ]


def test_isolation_through_the_cli() -> None:
    done = run_cli("run", str(FIXTURES / "global_state.js"), stdin=(frame(1, "") + "\n") * 3)
    counters = [line["data"]["counter"] for line in lines_of(done.stdout)]
    assert counters == [1, 1, 1]


def test_optional_recv_time_and_variables() -> None:
    line = json.dumps(
        {
            "fPort": 3,
            "bytes_hex": "00ff",
            "recvTime": "2024-05-06T09:08:09.5+02:00",
            "variables": {"site": "weir"},
        }
    )
    done = run_cli("run", str(FIXTURES / "input_probe.js"), stdin=line)
    data = lines_of(done.stdout)[0]["data"]
    assert data["recvTime"] == "2024-05-06T07:08:09.500Z"
    assert data["variables"] == {"site": "weir"}
    assert data["bytes"] == [0, 255]
    assert data["bytesIsArray"] is True


def test_limits_are_passed_through() -> None:
    done = run_cli(
        "run", "--timeout-ms", "25", str(FIXTURES / "loops_forever.js"), stdin=frame(1, "")
    )
    assert re.search(r"limit (of )?25 ms", lines_of(done.stdout)[0]["errors"][0])
    done = run_cli(
        "run", "--memory-limit-mb", "4", str(FIXTURES / "huge_array.js"), stdin=frame(1, "")
    )
    assert memory_outcome("4 MiB").search(lines_of(done.stdout)[0]["errors"][0])


def test_each_line_is_flushed_as_soon_as_it_is_decoded() -> None:
    with subprocess.Popen(
        [sys.executable, "-m", "gateway.codec_cli", "run", str(FIXTURES / "legacy_ttn_v2.js")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        cwd=REPO,
    ) as proc:
        assert proc.stdin is not None
        assert proc.stdout is not None
        for i in range(3):
            proc.stdin.write((frame(i + 1, "07") + "\n").encode())
            proc.stdin.flush()
            # stdin stays open: the answer must come without waiting for more input or EOF.
            line = read_line(proc.stdout.fileno(), deadline=time.monotonic() + TIMEOUT_S)
            assert json.loads(line) == {"data": {"port": i + 1, "first": 7, "count": 1}}
        proc.stdin.close()
        assert proc.wait(timeout=TIMEOUT_S) == 0


def read_line(fd: int, deadline: float) -> bytes:
    buf = b""
    with selectors.DefaultSelector() as sel:
        sel.register(fd, selectors.EVENT_READ)
        while not buf.endswith(b"\n"):
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not sel.select(remaining):
                pytest.fail(f"no complete output line in time (got {buf!r})")
            chunk = os.read(fd, 1)
            if not chunk:
                pytest.fail(f"output ended early (got {buf!r})")
            buf += chunk
    return buf


# --- Loading failures: exit 2 with a message


def test_syntax_error_exits_2_naming_file_and_line() -> None:
    path = FIXTURES / "syntax_error.js"
    done = run_cli("run", str(path), stdin=frame(1, "00"))
    assert done.returncode == 2
    assert f"{path}:4: SyntaxError" in done.stderr
    assert done.stdout == ""


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["run", "/nonexistent/decoder.js"], "cannot read the decoder"),
        (["run", str(FIXTURES / "no_entry_point.js")], "defines no decodeUplink"),
        (["run", str(FIXTURES / "loops_at_top_level.js")], f"evaluating the file {TIMED_OUT}"),
        (["run"], "one of the arguments path --builtin is required"),
        (["run", "x.js", "--builtin", "y"], "not allowed with argument"),
        (["run", "--timeout-ms", "0", "x.js"], "must be at least 1"),
        ([], "required"),
    ],
)
def test_cannot_start_exits_2(args: list[str], needle: str) -> None:
    done = run_cli(*args)
    assert done.returncode == 2
    assert re.search(needle, done.stderr)


# --- Builtin (Python) codecs


def test_builtin_codec_output_is_wrapped_in_data() -> None:
    from drivers.codecs import CODECS

    # A Dragino LHT65 frame from TTN's device repository examples.
    payload = bytes.fromhex("CBF60B0D0376010ADD7FFF")
    expected = {"data": json.loads(json.dumps(CODECS["dragino-lht65"](2, payload)))}
    done = run_cli(
        "run",
        "--builtin",
        "dragino-lht65",
        stdin=frame(2, payload.hex()) + "\nnot json\n" + frame(2, "00") + "\n",
    )
    assert done.returncode == 0, done.stderr
    out = lines_of(done.stdout)
    assert out[0] == expected
    assert out[1]["errors"][0].startswith("input line 2: not a JSON object")
    assert list(out[2]) == ["errors"]  # a truncated frame: the codec's CodecError


def test_unknown_builtin_exits_2_listing_known_names() -> None:
    from drivers.codecs import CODECS

    done = run_cli("run", "--builtin", "no-such-codec", stdin=frame(1, "00"))
    assert done.returncode == 2
    assert "no-such-codec" in done.stderr
    assert all(name in done.stderr for name in CODECS)
    assert done.stdout == ""


# --- Wiring into edge-gateway's parser


def test_add_codec_parser_registers_codec_run() -> None:
    parser = argparse.ArgumentParser(prog="edge-gateway")
    sub = parser.add_subparsers(dest="command", required=True)
    codec_cli.add_codec_parser(sub)
    args = parser.parse_args(["codec", "run", "--timeout-ms", "50", "decoder.js"])
    assert args.func is codec_cli.cmd_codec_run
    assert (args.command, args.codec_command) == ("codec", "run")
    assert (args.path, args.builtin, args.timeout_ms, args.memory_limit_mb) == (
        Path("decoder.js"),
        None,
        50,
        16,
    )
    args = parser.parse_args(["codec", "run", "--builtin", "elsys"])
    assert (args.path, args.builtin) == (None, "elsys")
    with pytest.raises(SystemExit) as caught:
        parser.parse_args(["codec"])
    assert caught.value.code == 2
