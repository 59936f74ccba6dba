"""Config loading, validation messages, environment overrides, credentials and rendering.

Everything here runs the real pydantic models against real files in ``tmp_path``; the only thing
replaced is the process environment (``monkeypatch``), which is the outermost input there is.
"""

from __future__ import annotations

import os
import re
import string
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from gateway.config import (
    ENV_PREFIX,
    FileUplinkConfig,
    GatewayConfig,
    MqttUplinkConfig,
    OutboxSection,
    PipelineSection,
    ReplaySourceConfig,
    TlsSection,
    config_from_dict,
    load_config,
)
from gateway.errors import ConfigError
from gateway.render import render_config, render_example
from gateway.wire import Encoding

EXAMPLE = Path(__file__).resolve().parents[1] / "systemd" / "gateway.example.toml"
REGENERATE = "edge-gateway print-config > systemd/gateway.example.toml"

# `dotted.path: message (got: value)`, the form convention 7 promises for every problem.
PROBLEM_RE = re.compile(
    r"^(?P<path>[A-Za-z_]\w*(?:\[\d+\])*(?:\.\w+(?:\[\d+\])*)*): .+ \(got: .+\)$"
)


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The caller's EDGE_GATEWAY_* and systemd credential variables must not leak into a test."""
    for name in list(os.environ):
        if name.startswith(ENV_PREFIX) or name == "CREDENTIALS_DIRECTORY":
            monkeypatch.delenv(name)
    yield


def write(tmp_path: Path, text: str, name: str = "gateway.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def problems_of(text: str, tmp_path: Path, environ: dict[str, str] | None = None) -> list[str]:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path, environ)
    assert info.value.source == str(path)
    return info.value.problems


def only_problem(text: str, tmp_path: Path) -> str:
    problems = problems_of(text, tmp_path)
    assert len(problems) == 1, problems
    assert PROBLEM_RE.match(problems[0]), f"not `dotted.path: message (got: value)`: {problems[0]}"
    return problems[0]


# -- the committed example ---------------------------------------------------------------------


def test_example_file_loads_and_equals_the_defaults() -> None:
    assert load_config(EXAMPLE) == GatewayConfig()


def test_example_file_does_not_drift_from_the_models() -> None:
    assert EXAMPLE.read_text(encoding="utf-8") == render_example(), (
        f"{EXAMPLE} is out of date; regenerate it with `{REGENERATE}`"
    )


def test_render_example_ignores_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    # `print-config` (no -c) shows the defaults; an operator's shell must not leak into the
    # committed example, nor make the command crash (an uplink override without `type`).
    monkeypatch.setenv("EDGE_GATEWAY_OUTBOX__MAX_ROWS", "77")
    assert render_example() == EXAMPLE.read_text(encoding="utf-8")
    monkeypatch.setenv("EDGE_GATEWAY_UPLINK__HOST", "broker.example.org")
    assert render_example() == EXAMPLE.read_text(encoding="utf-8")


# -- round trip through render_config -------------------------------------------------------------


def _round_trip(cfg: GatewayConfig) -> GatewayConfig:
    text = render_config(cfg)
    return config_from_dict(tomllib.loads(text), "rendered")


def test_round_trip_mqtt_with_credentials_tls_and_replay_sources(tmp_path: Path) -> None:
    for name in ("ca.pem", "client.pem", "client.key", "password", "rec-a.jsonl", "rec-b.jsonl"):
        (tmp_path / name).write_text("x\n", encoding="utf-8")
    path = write(
        tmp_path,
        f"""
[gateway]
id = "anduze-01"
state_dir = "{tmp_path / "state"}"
shutdown_flush_s = 2.5
log_level = "debug"
log_format = "json"

[pipeline]
queue_max = 5
overflow = "drop_oldest"

[outbox]
file = "events.db"
max_rows = 10
max_bytes = 4096
synchronous = "normal"
commit_linger_ms = 0.0

[uplink]
type = "mqtt"
host = "broker.example.org"
port = 8884
protocol = "5"
client_id = "gw-anduze"
encoding = "cbor"
batch_max_events = 50
topic_prefix = "city/water"
username = "anduze"
password_file = "{tmp_path / "password"}"

[uplink.tls]
ca_file = "{tmp_path / "ca.pem"}"
cert_file = "{tmp_path / "client.pem"}"
key_file = "{tmp_path / "client.key"}"

[[sources]]
type = "replay"
name = "river"
file = "{tmp_path / "rec-a.jsonl"}"
interval_s = 0.5
loop = true

[[sources]]
type = "replay"
name = "pool"
file = "{tmp_path / "rec-b.jsonl"}"
""",
    )
    cfg = load_config(path)
    assert isinstance(cfg.uplink, MqttUplinkConfig)
    assert cfg.uplink.encoding is Encoding.CBOR
    assert cfg.uplink.tls.key_file == tmp_path / "client.key"
    assert [s.name for s in cfg.sources] == ["river", "pool"]
    assert _round_trip(cfg) == cfg


def test_round_trip_file_uplink_and_bundled_replay(tmp_path: Path) -> None:
    cfg = load_config(
        write(
            tmp_path,
            """
[gateway]
id = "demo"

[uplink]
type = "file"
path = "/tmp/events.jsonl"
fsync = false
batch_max_events = 7

[[sources]]
type = "replay"
name = "bundled"
interval_s = 0.01
""",
        )
    )
    assert cfg.uplink == FileUplinkConfig(
        type="file", path="/tmp/events.jsonl", fsync=False, batch_max_events=7
    )
    assert cfg.sources == [ReplaySourceConfig(type="replay", name="bundled", interval_s=0.01)]
    text = render_config(cfg)
    # An MQTT-only section must not appear (commented or not) when the uplink is a file.
    assert "[uplink.tls]" not in text
    assert _round_trip(cfg) == cfg


def test_round_trip_plaintext_uplink() -> None:
    cfg = config_from_dict(
        {
            "uplink": {
                "type": "mqtt",
                "host": "10.0.0.2",
                "port": 1883,
                "allow_insecure": True,
                "reconnect_min_s": 0.25,
                "reconnect_max_s": 0.25,
                "tls": {"enabled": False},
            },
            "pipeline": {"queue_max": 1_000_000},
        },
        "test",
    )
    assert _round_trip(cfg) == cfg


# The autouse environment fixture runs once per test, not per example; that is what it is for.
_FUZZ = settings(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

# Text TOML can hold (no surrogates); the strings a technician might paste into host/username.
_toml_text = st.text(st.characters(exclude_categories=("Cs",)), max_size=20)


@settings(_FUZZ, max_examples=150)
# DEL is a control character TOML forbids unescaped, yet JSON leaves it as it is.
@example(host="a\x7fb", username="", client_id="", topic_prefix="edge")
@given(
    host=_toml_text.filter(bool),
    username=_toml_text,
    client_id=_toml_text,
    topic_prefix=_toml_text.filter(bool),
)
def test_round_trip_any_string_values(
    host: str, username: str, client_id: str, topic_prefix: str
) -> None:
    cfg = GatewayConfig(
        uplink=MqttUplinkConfig(
            host=host, username=username, client_id=client_id, topic_prefix=topic_prefix
        )
    )
    assert _round_trip(cfg) == cfg


# -- error messages -------------------------------------------------------------------------------


def test_unknown_top_level_key(tmp_path: Path) -> None:
    assert only_problem("colour = 'blue'\n", tmp_path) == "colour: unknown key (got: 'blue')"


def test_unknown_key_in_nested_section(tmp_path: Path) -> None:
    text = '[uplink]\ntype = "mqtt"\n[uplink.tls]\nenabeld = false\n'
    assert only_problem(text, tmp_path) == "uplink.tls.enabeld: unknown key (got: False)"


def test_unknown_key_in_list_item(tmp_path: Path) -> None:
    text = '[[sources]]\ntype = "replay"\nintervl_s = 1.0\n'
    assert only_problem(text, tmp_path) == "sources[0].intervl_s: unknown key (got: 1.0)"


def test_unknown_key_named_like_a_union_tag(tmp_path: Path) -> None:
    # ChirpStack writes [integration.mqtt]; someone will write [uplink.mqtt]. The union tag
    # pydantic adds to the location must not be confused with the key the user wrote.
    text = '[uplink]\ntype = "mqtt"\n[uplink.mqtt]\nhost = "x"\n'
    problems = problems_of(text, tmp_path)
    assert len(problems) == 1
    assert problems[0].startswith("uplink.mqtt: unknown key"), problems


@pytest.mark.parametrize(
    "key", ["_env_prefix", "_cli_parse_args", "_secrets_dir", "_case_sensitive", "_env_file"]
)
def test_underscore_keys_are_unknown_keys_not_settings_options(tmp_path: Path, key: str) -> None:
    # BaseSettings.__init__ takes its own options as `_name` keywords; a TOML key must never
    # reach them (`_cli_parse_args = true` would parse the daemon's argv and exit).
    value = '"X_"' if key != "_cli_parse_args" else "true"
    assert only_problem(f"{key} = {value}\n", tmp_path).startswith(f"{key}: unknown key (got: ")


def test_wrong_type(tmp_path: Path) -> None:
    problem = only_problem('[uplink]\ntype = "mqtt"\nport = "abc"\n', tmp_path)
    assert re.fullmatch(r"uplink\.port: .*valid integer.* \(got: 'abc'\)", problem), problem


def test_out_of_range(tmp_path: Path) -> None:
    problem = only_problem("[pipeline]\nqueue_max = 0\n", tmp_path)
    assert re.fullmatch(r"pipeline\.queue_max: .*greater than or equal to 1 \(got: 0\)", problem)


def test_unknown_uplink_type(tmp_path: Path) -> None:
    problem = only_problem('[uplink]\ntype = "amqp"\n', tmp_path)
    assert problem.startswith("uplink.type: "), problem
    assert problem.endswith(" (got: 'amqp')"), problem
    assert "'mqtt'" in problem and "'file'" in problem, problem


def test_plaintext_needs_allow_insecure(tmp_path: Path) -> None:
    problem = only_problem('[uplink]\ntype = "mqtt"\n[uplink.tls]\nenabled = false\n', tmp_path)
    assert re.fullmatch(r"uplink\.(allow_insecure|tls\.enabled): .+ \(got: False\)", problem)
    assert "allow_insecure" in problem.partition(": ")[2]


def test_cert_file_needs_key_file(tmp_path: Path) -> None:
    (tmp_path / "client.pem").write_text("x", encoding="utf-8")
    text = f'[uplink]\ntype = "mqtt"\n[uplink.tls]\ncert_file = "{tmp_path / "client.pem"}"\n'
    problem = only_problem(text, tmp_path)
    assert re.fullmatch(r"uplink\.tls\.(key_file|cert_file): .+ \(got: .+\)", problem), problem
    assert "key_file" in problem.partition(": ")[2]


def test_password_file_needs_username(tmp_path: Path) -> None:
    (tmp_path / "pw").write_text("x", encoding="utf-8")
    text = f'[uplink]\ntype = "mqtt"\npassword_file = "{tmp_path / "pw"}"\n'
    problem = only_problem(text, tmp_path)
    assert re.fullmatch(r"uplink\.(username|password_file): .+ \(got: .+\)", problem), problem
    assert "username" in problem


def test_gateway_id_with_slash(tmp_path: Path) -> None:
    problem = only_problem('[gateway]\nid = "site/1"\n', tmp_path)
    assert problem.startswith("gateway.id: ")
    assert problem.endswith(" (got: 'site/1')")
    assert "'/'" in problem


def test_several_problems_one_line_each(tmp_path: Path) -> None:
    text = """
colour = "blue"
[gateway]
id = "a#b"
[pipeline]
queue_max = 0
[uplink]
type = "mqtt"
port = 70000
[[sources]]
type = "replay"
intervl_s = 1
"""
    problems = problems_of(text, tmp_path)
    by_path = {}
    for line in problems:
        match = PROBLEM_RE.match(line)
        assert match, f"not `dotted.path: message (got: value)`: {line}"
        by_path[match["path"]] = line
    assert sorted(by_path) == [
        "colour",
        "gateway.id",
        "pipeline.queue_max",
        "sources[0].intervl_s",
        "uplink.port",
    ]
    assert len(problems) == 5
    assert by_path["uplink.port"].endswith("(got: 70000)")


# -- reading the file -----------------------------------------------------------------------------


def test_missing_file_is_named(tmp_path: Path) -> None:
    path = tmp_path / "nope" / "gateway.toml"
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.source == str(path)
    assert str(path) in str(info.value)
    assert "not found" in str(info.value)


def test_toml_syntax_error_names_the_line(tmp_path: Path) -> None:
    path = write(tmp_path, '[gateway]\nid = "x"\nlog_level = = "debug"\n')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.source == str(path)
    assert len(info.value.problems) == 1
    assert "line 3" in info.value.problems[0]


def test_directory_instead_of_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path)
    assert info.value.source == str(tmp_path)
    assert "directory" in str(info.value)


def test_non_utf8_file(tmp_path: Path) -> None:
    path = tmp_path / "latin1.toml"
    path.write_bytes('[gateway]\nid = "ch\u00e2teau"\n'.encode("latin-1"))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.source == str(path)
    assert "UTF-8" in str(info.value)


# -- environment overrides ----------------------------------------------------------------------

_FILE_WITH_UPLINK = """
[gateway]
id = "from-file"
[uplink]
type = "mqtt"
host = "file.example.org"
port = 8883
"""


def test_environment_wins_over_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGE_GATEWAY_UPLINK__HOST", "env.example.org")
    monkeypatch.setenv("EDGE_GATEWAY_GATEWAY__ID", "from-env")
    cfg = load_config(write(tmp_path, _FILE_WITH_UPLINK))
    assert isinstance(cfg.uplink, MqttUplinkConfig)
    assert cfg.uplink.host == "env.example.org"
    assert cfg.uplink.port == 8883  # the rest of the file's table stays
    assert cfg.gateway.id == "from-env"


def test_environment_overrides_an_uplink_the_file_does_not_mention(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The uplink defaults to MQTT; setting its host from the environment must not require the
    # file to spell out `type = "mqtt"`.
    monkeypatch.setenv("EDGE_GATEWAY_UPLINK__HOST", "env.example.org")
    cfg = load_config(write(tmp_path, '[gateway]\nid = "x"\n'))
    assert isinstance(cfg.uplink, MqttUplinkConfig)
    assert cfg.uplink.host == "env.example.org"


def test_environment_value_is_parsed_as_int(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EDGE_GATEWAY_OUTBOX__MAX_ROWS", "5000")
    cfg = load_config(write(tmp_path, "[outbox]\nmax_rows = 10\n"))
    assert cfg.outbox.max_rows == 5000


def test_bad_environment_value_names_its_dotted_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EDGE_GATEWAY_OUTBOX__MAX_ROWS", "lots")
    problem = only_problem("", tmp_path)
    assert problem.startswith("outbox.max_rows: ")
    assert problem.endswith(" (got: 'lots')")


def test_unparsable_environment_json_is_a_config_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Complex fields are read from the environment as JSON; a typo there is a config problem
    # (exit 78 with the path), not a pydantic_settings.SettingsError traceback.
    monkeypatch.setenv("EDGE_GATEWAY_SOURCES", "[{type = replay}]")
    problems = problems_of("", tmp_path)
    assert len(problems) == 1
    assert problems[0].startswith("sources"), problems


# -- credentials ---------------------------------------------------------------------------------


def _credential_config(tmp_path: Path, extra: str = 'username = "anduze"\n') -> Path:
    return write(
        tmp_path,
        f'[uplink]\ntype = "mqtt"\n{extra}password_file = "mqtt-password"\n',
    )


def test_password_file_is_resolved_in_credentials_directory(tmp_path: Path) -> None:
    creds = tmp_path / "credentials"
    creds.mkdir()
    (creds / "mqtt-password").write_text("not-read-here\n", encoding="utf-8")
    cfg = load_config(_credential_config(tmp_path), {"CREDENTIALS_DIRECTORY": str(creds)})
    assert isinstance(cfg.uplink, MqttUplinkConfig)
    # The config keeps the name; the uplink resolves it at connect time (rotation).
    assert cfg.uplink.password_file == Path("mqtt-password")


def test_missing_credential_file_is_named(tmp_path: Path) -> None:
    creds = tmp_path / "credentials"
    creds.mkdir()
    problems = problems_of(
        _credential_config(tmp_path).read_text(encoding="utf-8"),
        tmp_path,
        {"CREDENTIALS_DIRECTORY": str(creds)},
    )
    assert problems == [
        f"uplink.password_file: file not found (got: {str(creds / 'mqtt-password')!r})"
    ]


def test_password_file_without_username_is_an_error(tmp_path: Path) -> None:
    creds = tmp_path / "credentials"
    creds.mkdir()
    (creds / "mqtt-password").write_text("x\n", encoding="utf-8")
    path = _credential_config(tmp_path, extra="")
    with pytest.raises(ConfigError) as info:
        load_config(path, {"CREDENTIALS_DIRECTORY": str(creds)})
    assert len(info.value.problems) == 1
    assert "username" in info.value.problems[0]


# -- odd input never escapes as anything but ConfigError ------------------------------------------

_FIELD_NAMES = sorted(
    {
        name
        for model in (
            GatewayConfig,
            PipelineSection,
            OutboxSection,
            MqttUplinkConfig,
            TlsSection,
            FileUplinkConfig,
            ReplaySourceConfig,
        )
        for name in model.model_fields
    }
)
# The last two are BaseSettings.__init__ options, which a key in a file must never reach.
_SECTIONS = ["gateway", "pipeline", "outbox", "uplink", "sources", "tls"]
_SECTIONS += ["_env_prefix", "_cli_parse_args"]
_keys = st.one_of(
    st.sampled_from(_FIELD_NAMES + _SECTIONS),
    st.text(string.ascii_letters + "_-.", min_size=1, max_size=12),
)
# What tomllib can produce: no None, every leaf a TOML type.
_scalars = st.one_of(
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
    st.sampled_from(["mqtt", "file", "replay", "amqp", "-", "json", "cbor", "block", "5", ""]),
    st.datetimes(),
    st.dates(),
    st.times(),
)
_values = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_keys, inner, max_size=4),
    max_leaves=12,
)


@settings(_FUZZ, max_examples=300)
@given(data=st.dictionaries(_keys, _values, max_size=5))
def test_random_input_only_ever_raises_config_error(data: dict[str, Any]) -> None:
    try:
        cfg = config_from_dict(data, "fuzz")
    except ConfigError as exc:
        assert exc.problems
        return
    # Whatever validated must render and read back as the same config.
    assert _round_trip(cfg) == cfg
