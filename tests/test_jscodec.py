"""drivers.jscodec against real QuickJS, with the decoder files in tests/fixtures/js/."""

from __future__ import annotations

import asyncio
import json
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from drivers.jscodec import DecoderReportedError, JsCodec
from drivers.jsworker import JsWorker
from gateway.errors import CodecError
from tests.support.quickjs_oom import memory_outcome

FIXTURES = Path(__file__).parent / "fixtures" / "js"
RECV_TIME = datetime(2024, 5, 6, 7, 8, 9, 123000, tzinfo=UTC)
# A sanity cap for "it came back", far above the 100 ms limits: machines under test are noisy.
SANITY_S = 5.0


def load(name: str, **limits: int) -> JsCodec:
    path = FIXTURES / name
    return JsCodec(path.read_text(encoding="utf-8"), name, **limits)


# --- What a decoder sees and what it returns: TTN / ChirpStack semantics


def test_ttn_style_decoder() -> None:
    codec = load("climate_ttn.js")
    assert codec.entry_point == "decodeUplink"
    # 21.50 degC, 55.5 %RH, 3000 mV
    assert codec.decode_uplink(1, bytes.fromhex("0866 6f 0bb8")) == {
        "data": {"temperature": 21.5, "humidity": 55.5, "battery_mv": 3000},
    }
    # -5.12 degC, battery exactly at the threshold: no warning, and no "warnings" key.
    assert codec.decode_uplink(1, bytes.fromhex("fe00 50 09c4")) == {
        "data": {"temperature": -5.12, "humidity": 40, "battery_mv": 2500},
    }


def test_warnings_are_returned() -> None:
    codec = load("climate_ttn.js")
    assert codec.decode_uplink(1, bytes.fromhex("fe00 50 09c3")) == {
        "data": {"temperature": -5.12, "humidity": 40, "battery_mv": 2499},
        "warnings": ["battery low"],
    }


def test_input_is_what_ttn_and_chirpstack_pass() -> None:
    codec = load("input_probe.js")
    result = codec.decode_uplink(
        7, bytes([0, 1, 254, 255]), recv_time=RECV_TIME, variables={"site": "bridge-3"}
    )
    assert result == {
        "data": {
            "bytesIsArray": True,
            "byteType": "number",
            "bytes": [0, 1, 254, 255],
            "fPort": 7,
            "recvTimeIsDate": True,
            "recvTime": "2024-05-06T07:08:09.123Z",
            "variables": {"site": "bridge-3"},
            "inputKeys": ["bytes", "fPort", "recvTime", "variables"],
        }
    }


def test_recv_time_defaults_and_time_zones() -> None:
    codec = load("input_probe.js")
    before = datetime.now(UTC) - timedelta(seconds=1)
    seen = codec.decode_uplink(1, b"")["data"]
    after = datetime.now(UTC) + timedelta(seconds=1)
    assert before <= datetime.fromisoformat(seen["recvTime"]) <= after
    assert seen["variables"] == {}
    assert seen["bytes"] == []
    # An aware time in another zone is the same instant; a naive one is taken as UTC.
    cest = RECV_TIME.astimezone(timezone(timedelta(hours=2)))
    assert codec.decode_uplink(1, b"", cest)["data"]["recvTime"] == "2024-05-06T07:08:09.123Z"
    naive = RECV_TIME.replace(tzinfo=None)
    assert codec.decode_uplink(1, b"", naive)["data"]["recvTime"] == "2024-05-06T07:08:09.123Z"


def test_missing_fields_are_defaulted_like_ttn() -> None:
    codec = load("minimal_returns.js")
    assert codec.decode_uplink(1, b"") == {"data": {}}
    assert codec.decode_uplink(2, b"") == {"data": {}}
    assert codec.decode_uplink(3, b"") == {"data": {"ok": True}}
    assert codec.decode_uplink(4, b"") == {
        "data": {"ok": True},
        "warnings": ["check the sensor"],
    }


def test_returned_errors_fail_the_decode() -> None:
    codec = load("climate_ttn.js")
    with pytest.raises(DecoderReportedError) as caught:
        codec.decode_uplink(2, bytes(5))
    assert caught.value.errors == ["unknown fPort 2"]
    assert caught.value.data is None
    assert str(caught.value) == "climate_ttn.js: decodeUplink returned errors: unknown fPort 2"
    assert isinstance(caught.value, CodecError)


def test_output_is_json_like_ttn_marshalling() -> None:
    result = load("non_json_values.js").decode_uplink(1, b"")
    assert result == {
        "data": {
            "nan": None,
            "inf": None,
            "date": "2024-01-02T03:04:05.000Z",
            "nested": [None, None, 1.5],
        }
    }
    assert json.loads(json.dumps(result, allow_nan=False)) == result


def test_chirpstack_v3_decode_form_with_variables() -> None:
    codec = load("water_level_chirpstack_v3.js")
    assert codec.entry_point == "Decode"
    result = codec.decode_uplink(2, bytes.fromhex("0bb8"), variables={"mounting_height_cm": "450"})
    assert result == {"data": {"fPort": 2, "distance_cm": 300, "water_level_cm": 150}}


def test_ttn_v2_decoder_form() -> None:
    codec = load("legacy_ttn_v2.js")
    assert codec.entry_point == "Decoder"
    assert codec.decode_uplink(3, b"\x09\x08") == {"data": {"port": 3, "first": 9, "count": 2}}


def test_top_level_const_arrow_function() -> None:
    assert load("arrow_const.js").decode_uplink(1, b"\x2a") == {"data": {"value": 4.2}}


# --- Isolation


def test_no_state_carries_over_between_frames() -> None:
    codec = load("global_state.js")
    first = codec.decode_uplink(1, b"")
    assert first == {
        "data": {
            "counter": 1,
            "implicitGlobal": 1,
            "viaGlobalThis": 1,
            "polluted": 1,
            "randomWasPatched": False,
        }
    }
    for _ in range(5):
        assert codec.decode_uplink(1, b"") == first


def test_the_load_time_check_leaves_no_state_either() -> None:
    # The constructor evaluated the file once; the first decode must not see that run.
    codec = load("global_state.js")
    assert codec.decode_uplink(1, b"")["data"]["counter"] == 1


def test_separate_codecs_share_nothing() -> None:
    a, b = load("global_state.js"), load("global_state.js")
    assert a.decode_uplink(1, b"") == b.decode_uplink(1, b"")


def test_concurrent_decodes_from_threads() -> None:
    # A roomy time limit: it is counted in the whole process's CPU time (see drivers/jscodec.py),
    # so four threads decoding at once used up 100 ms in one busy CI run; this is about threads.
    codec = load("climate_ttn.js", timeout_ms=2000)
    payloads = [bytes([0, i, 2 * i, 0x0B, 0xB8]) for i in range(64)]
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(lambda p: codec.decode_uplink(1, p), payloads))
    assert [r["data"]["humidity"] for r in results] == list(range(64))
    assert [r["data"]["temperature"] for r in results] == [i / 100 for i in range(64)]


async def test_decode_through_asyncio_to_thread() -> None:
    codec = load("global_state.js")
    results = await asyncio.gather(
        *(asyncio.to_thread(codec.decode_uplink, 1, b"") for _ in range(8))
    )
    assert {r["data"]["counter"] for r in results} == {1}


# --- Misbehaving decoders: CodecError, never a hang or a crash


def test_infinite_loop_is_interrupted_and_elapsed_time_reported() -> None:
    codec = load("loops_forever.js")
    started = time.monotonic()
    with pytest.raises(CodecError, match=r"loops_forever\.js: decodeUplink timed out after \d+ ms"):
        codec.decode_uplink(1, b"\x01")
    assert time.monotonic() - started < SANITY_S


def test_timeout_is_configurable() -> None:
    codec = load("loops_forever.js", timeout_ms=20)
    with pytest.raises(CodecError, match=r"timed out after \d+ ms \(limit 20 ms\)"):
        codec.decode_uplink(1, b"")


def test_loop_in_top_level_code_fails_at_load() -> None:
    started = time.monotonic()
    with pytest.raises(CodecError, match=r"loops_at_top_level\.js: evaluating the file timed out"):
        load("loops_at_top_level.js")
    assert time.monotonic() - started < SANITY_S


def test_memory_limit() -> None:
    # In a worker: QuickJS can crash on an out-of-memory path (see tests/support/quickjs_oom.py).
    source = (FIXTURES / "huge_array.js").read_text(encoding="utf-8")
    with JsWorker(source, "huge_array.js", memory_limit_bytes=4 * 1024 * 1024) as worker:
        started = time.monotonic()
        with pytest.raises(CodecError, match=memory_outcome("4 MiB")) as caught:
            worker.decode_uplink(1, b"")
        assert str(caught.value).startswith("huge_array.js: ")
        assert time.monotonic() - started < SANITY_S
        # The next frame gets a fresh heap (or a fresh worker) and decodes.
        with pytest.raises(CodecError, match=memory_outcome("4 MiB")):
            worker.decode_uplink(1, b"")
    assert load("climate_ttn.js").decode_uplink(1, bytes(5))["data"]["temperature"] == 0


def test_default_memory_limit_stops_an_allocation_bomb() -> None:
    source = (FIXTURES / "huge_array.js").read_text(encoding="utf-8")
    with (
        JsWorker(source, "huge_array.js") as worker,
        pytest.raises(CodecError, match=memory_outcome("16 MiB")),
    ):
        worker.decode_uplink(1, b"")


def test_stack_overflow() -> None:
    with pytest.raises(CodecError, match=r"deep_recursion\.js: decodeUplink overflowed the stack"):
        load("deep_recursion.js").decode_uplink(1, b"")


def test_output_limit() -> None:
    with pytest.raises(CodecError, match=r"huge_output\.js: decodeUplink output is \d+ bytes"):
        load("huge_output.js").decode_uplink(1, b"")
    codec = load("huge_output.js", max_output_bytes=2 * 1024 * 1024)
    assert len(codec.decode_uplink(1, b"")["data"]["blob"]) == 1_000_000


def test_exceptions_name_the_file_the_error_and_the_function() -> None:
    codec = load("throws.js")
    with pytest.raises(CodecError) as caught:
        codec.decode_uplink(1, b"")
    message = str(caught.value)
    assert message.startswith("throws.js: decodeUplink threw RangeError: unsupported frame type")
    assert "checkPort (throws.js" in message
    assert "__edgeGateway" not in message  # the wrapper's frames are not the decoder's

    with pytest.raises(CodecError, match=r"^throws\.js: decodeUplink threw plain string thrown$"):
        codec.decode_uplink(2, b"")
    with pytest.raises(CodecError, match=r"threw TypeError: .*\(at decodeUplink \(throws\.js"):
        codec.decode_uplink(3, b"")


@pytest.mark.parametrize(
    ("fport", "expected"),
    [
        (1, r"returned invalid output: got a number, expected an object"),
        (2, r"returned invalid output: got a string, expected an object"),
        (3, r"returned invalid output: got an array, expected an object"),
        (4, r"returned invalid output: got undefined, expected an object"),
        (5, r"returned invalid output: got null, expected an object"),
        (6, r"returned invalid output: 'data' is a number, expected an object"),
        (7, r"returned invalid output: 'data' is an array, expected an object"),
        (8, r"returned invalid output: 'warnings' must be a list of strings"),
        (9, r"returned invalid output: 'errors' must be a list of strings"),
        (10, r"returned output that is not JSON: TypeError: circular reference"),
        (11, r"returned output that is not JSON: TypeError: .*bigint"),
        (12, r"returned invalid output: got a boolean, expected an object"),
    ],
)
def test_garbage_results(fport: int, expected: str) -> None:
    with pytest.raises(CodecError, match=rf"^garbage\.js: decodeUplink {expected}"):
        load("garbage.js").decode_uplink(fport, b"")


def test_syntax_error_names_file_and_line() -> None:
    with pytest.raises(CodecError, match=r"^syntax_error\.js:4: SyntaxError: "):
        load("syntax_error.js")


def test_missing_entry_point() -> None:
    with pytest.raises(CodecError, match=r"^no_entry_point\.js: defines no decodeUplink\(input\)"):
        load("no_entry_point.js")


def test_failing_top_level_code() -> None:
    with pytest.raises(
        CodecError, match=r"^inline\.js: evaluating the file failed: ReferenceError: 'oops' is not"
    ):
        JsCodec("var x = oops();\nfunction decodeUplink(i) { return {}; }", "inline.js")


def test_fport_out_of_range() -> None:
    with pytest.raises(CodecError, match=r"fPort must be 0\.\.255 \(got: 256\)"):
        load("climate_ttn.js").decode_uplink(256, b"")


@pytest.mark.parametrize(
    "limits",
    [{"timeout_ms": 0}, {"memory_limit_bytes": 1000}, {"max_output_bytes": 0}],
)
def test_nonsensical_limits_are_rejected(limits: dict[str, int]) -> None:
    with pytest.raises(ValueError, match="must be at least"):
        load("climate_ttn.js", **limits)


# --- Properties

_CLIMATE = load("climate_ttn.js")
_SLOPPY = load("sloppy_indexing.js")


@settings(max_examples=150, deadline=None)
@given(fport=st.integers(0, 255), payload=st.binary(max_size=64))
def test_random_payloads_decode_or_raise_codec_error(fport: int, payload: bytes) -> None:
    for codec in (_CLIMATE, _SLOPPY):
        try:
            result = codec.decode_uplink(fport, payload)
        except CodecError:
            continue
        assert isinstance(result["data"], dict)
        assert set(result) <= {"data", "warnings"}
        json.dumps(result, allow_nan=False)


@settings(max_examples=50, deadline=None)
@given(payload=st.binary(min_size=5, max_size=5))
def test_climate_decoder_matches_a_python_reference(payload: bytes) -> None:
    temperature = int.from_bytes(payload[0:2], "big", signed=True) / 100
    battery = int.from_bytes(payload[3:5], "big")
    result = _CLIMATE.decode_uplink(1, payload)
    assert result["data"] == {
        "temperature": temperature,
        "humidity": payload[2] / 2,
        "battery_mv": battery,
    }
    assert result.get("warnings", []) == (["battery low"] if battery < 2500 else [])
