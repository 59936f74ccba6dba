"""Configuration: pydantic v2 models, one TOML file plus ``EDGE_GATEWAY_...`` environment overrides.

Every model forbids unknown keys (a typo is an error, not a silently ignored line) and carries the
unit in the field name. Secrets are never config values: the config names files (systemd
credentials) and the uplink reads them when it connects.
"""

from __future__ import annotations

import os
import re
import socket
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
)

from gateway.analyzers.config import AnalyzerConfig
from gateway.analyzers.pool_config import PoolConfig
from gateway.errors import ConfigError, GatewayError
from gateway.waste_config import ImageInboxSourceConfig, WasteSection
from gateway.wire import Encoding

DEFAULT_CONFIG_PATH = Path("/etc/edge-gateway/gateway.toml")
ENV_PREFIX = "EDGE_GATEWAY_"

_TOPIC_SAFE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class FieldCheckError(ValueError):
    """A cross-field check that blames one field, so the message can name it and its value."""

    def __init__(self, field: str, value: Any, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.value = value


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class GatewaySection(_Section):
    """Identity and process-wide settings."""

    id: str = Field(
        "",
        description="Gateway id used in every MQTT topic; empty means the host name.",
    )
    state_dir: Path = Field(
        Path("/var/lib/edge-gateway"),
        description="Where the outbox lives (systemd StateDirectory=).",
    )
    shutdown_flush_s: float = Field(
        10.0, gt=0, description="On SIGTERM, how long the uplink may keep sending what is queued."
    )
    heartbeat_timeout_s: float = Field(
        30.0,
        gt=0,
        description="A component whose heartbeat is older than this stops the watchdog ping.",
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field("info")
    log_format: Literal["auto", "json", "console"] = Field(
        "auto", description="auto: JSON lines when stdout is not a terminal (journald)."
    )

    @field_validator("id")
    @classmethod
    def _id_is_topic_safe(cls, value: str) -> str:
        if value and not _TOPIC_SAFE.match(value):
            raise ValueError(
                "may hold letters, digits, '_', '.', '-' (no '/', '+', '#'), at most 64"
            )
        return value

    def resolved_id(self) -> str:
        """The configured id, or the host name made topic-safe."""
        if self.id:
            return self.id
        host = re.sub(r"[^A-Za-z0-9_.-]", "-", socket.gethostname())[:64]
        return host or "edge-gateway"


class PipelineSection(_Section):
    """The bounded queue between sources and analysis."""

    queue_max: int = Field(1000, ge=1, le=1_000_000, description="Readings waiting for analysis.")
    overflow: Literal["block", "drop_oldest"] = Field(
        "block",
        description="block: a source waits (no loss); drop_oldest: newest reading wins, counted.",
    )


class OutboxSection(_Section):
    """The durable store-and-forward queue (SQLite, WAL)."""

    file: str = Field("outbox.sqlite3", description="Relative to gateway.state_dir.")
    max_rows: int = Field(1_000_000, ge=10, description="Events kept while the uplink is down.")
    max_bytes: int = Field(256 * 1024 * 1024, ge=4096, description="Payload bytes kept.")
    max_age_s: float = Field(
        7 * 24 * 3600.0, gt=0, description="Telemetry older than this is dropped (alarms are not)."
    )
    commit_linger_ms: float = Field(
        20.0,
        ge=0,
        le=1000,
        description="Wait this long to gather telemetry into one commit (alarms commit at once).",
    )
    max_commit_rows: int = Field(2000, ge=1, description="Largest number of rows in one commit.")
    synchronous: Literal["full", "normal"] = Field(
        "full",
        description="full: every commit is fsynced (survives power cuts); normal: survives "
        "process crashes only, fewer SD-card flushes.",
    )


class InferenceSection(_Section):
    """On-device inference: the CPU budget, timeouts, and the model cards to verify and load."""

    threads: int = Field(
        1, ge=1, le=64, description="CPU threads that all model runs together may use."
    )
    intra_op_threads: int = Field(
        1,
        ge=1,
        le=64,
        description="Threads one model run may use; threads // intra_op_threads runs go at once.",
    )
    timeout_ms: float = Field(
        1000.0,
        gt=0,
        le=600_000,
        description="A call that waits and runs longer fails (counted); its result is dropped.",
    )
    max_batch: int = Field(
        32,
        ge=1,
        le=4096,
        description="Queued calls to one model stacked into one run (models with a batch dim).",
    )
    models_dir: Path | None = Field(
        None,
        description="Base of relative card paths; empty: the models shipped with edge-gateway.",
    )
    cards: list[Path] = Field(
        default_factory=list,
        description="Cards to verify (sha256, signature, warm-up) and load at start; one that "
        "fails is logged and left out.",
    )
    shadow: dict[str, Path] = Field(
        default_factory=dict,
        description="Model name -> candidate card run beside it on the same inputs: compared in "
        "stats, never deciding.",
    )

    @model_validator(mode="after")
    def _budget(self) -> InferenceSection:
        if self.intra_op_threads > self.threads:
            raise FieldCheckError(
                "intra_op_threads", self.intra_op_threads, "must be at most threads"
            )
        return self

    def card_path(self, card: Path) -> Path:
        """A configured card path resolved against models_dir (or the shipped models)."""
        if card.is_absolute():
            return card
        if self.models_dir is not None:
            return self.models_dir / card
        import models  # noqa: PLC0415 -- only to locate the shipped model files

        return Path(models.__file__).parent / card


class TlsSection(_Section):
    """TLS towards the broker."""

    enabled: bool = Field(True, description="Plaintext needs allow_insecure = true as well.")
    ca_file: Path | None = Field(None, description="CA bundle; empty means the system's CAs.")
    cert_file: Path | None = Field(None, description="Client certificate for mutual TLS.")
    key_file: Path | None = Field(
        None, description="Client key; a relative name is looked up in $CREDENTIALS_DIRECTORY."
    )

    @model_validator(mode="after")
    def _cert_and_key(self) -> TlsSection:
        if (self.cert_file is None) != (self.key_file is None):
            missing = "key_file" if self.key_file is None else "cert_file"
            raise FieldCheckError(missing, None, "cert_file and key_file go together")
        return self


class MqttUplinkConfig(_Section):
    """MQTT uplink to the urban data platform (QoS 1, acknowledged by PUBACK)."""

    type: Literal["mqtt"] = "mqtt"
    host: str = Field("localhost", min_length=1)
    port: int = Field(8883, ge=1, le=65535)
    protocol: Literal["3.1.1", "5"] = Field("3.1.1")
    client_id: str = Field("", description="Empty means edge-gateway-<gateway id>.")
    keepalive_s: int = Field(60, ge=5, le=65535)
    connect_timeout_s: float = Field(10.0, gt=0)
    publish_timeout_s: float = Field(30.0, gt=0)
    topic_prefix: str = Field("edge", min_length=1)
    encoding: Encoding = Field(Encoding.JSON, description="json or cbor.")
    max_inflight: int = Field(64, ge=1, le=65535, description="QoS 1 publishes awaiting PUBACK.")
    batch_max_events: int = Field(
        1, ge=1, le=10_000, description="1: one message per event; more: telemetry in batches."
    )
    batch_max_bytes: int = Field(64 * 1024, ge=1024, le=256 * 1024 * 1024)
    reconnect_min_s: float = Field(1.0, gt=0)
    reconnect_max_s: float = Field(60.0, gt=0)
    stats_interval_s: float = Field(60.0, gt=0, description="Period of state/stats messages.")
    username: str | None = None
    password_file: Path | None = Field(
        None, description="A relative name is looked up in $CREDENTIALS_DIRECTORY."
    )
    tls: TlsSection = TlsSection()
    allow_insecure: bool = Field(False, description="Must be true to send without TLS.")

    @model_validator(mode="after")
    def _plaintext_is_explicit(self) -> MqttUplinkConfig:
        if not self.tls.enabled and not self.allow_insecure:
            raise FieldCheckError(
                "allow_insecure",
                self.allow_insecure,
                "tls.enabled = false sends in plaintext: set allow_insecure = true",
            )
        if self.reconnect_max_s < self.reconnect_min_s:
            raise FieldCheckError(
                "reconnect_max_s", self.reconnect_max_s, "must be at least reconnect_min_s"
            )
        if self.password_file is not None and self.username is None:
            raise FieldCheckError("username", None, "password_file needs a username")
        return self


class FileUplinkConfig(_Section):
    """JSON-lines file (or stdout) uplink: the embedded default and a debugging aid."""

    type: Literal["file"]
    path: str = Field("-", description="'-' writes to standard output.")
    fsync: bool = Field(True, description="fsync each batch before acknowledging it.")
    batch_max_events: int = Field(500, ge=1, le=100_000)


def _uplink_type(value: Any) -> Any:
    # MQTT is the default uplink: `[uplink] host = ...` (or EDGE_GATEWAY_UPLINK__HOST alone)
    # must not need `type = "mqtt"` spelled out.
    if isinstance(value, dict):
        return value.get("type", "mqtt")
    return getattr(value, "type", None)


UplinkConfig = Annotated[
    Annotated[MqttUplinkConfig, Tag("mqtt")] | Annotated[FileUplinkConfig, Tag("file")],
    Discriminator(_uplink_type),
]


class ReplaySourceConfig(_Section):
    """Feeds a recording of readings (JSON lines) through the pipeline."""

    type: Literal["replay"]
    name: str = Field("replay", min_length=1, max_length=64)
    file: Path | None = Field(None, description="Empty means the bundled demo recording.")
    interval_s: float = Field(
        0.0, ge=0, description="Pause between readings; 0 replays as fast as the pipeline takes."
    )
    loop: bool = Field(False, description="Start again at the end.")


_DEV_EUI = re.compile(r"^[0-9a-fA-F]{16}$")
_MEASUREMENT_NAME = re.compile(r"^[a-z][a-z0-9_]{0,63}$")


def _measurement_name(value: str) -> str:
    if not _MEASUREMENT_NAME.match(value):
        raise ValueError("must be lower_snake_case (a-z, 0-9, _), at most 64 characters")
    return value


# The name of a measurement in events: checked here so a typo fails at check-config, not later.
MeasurementName = Annotated[str, AfterValidator(_measurement_name)]
_LOOPBACK_HOSTS = {"localhost", "127.0.0.1", "::1"}


class ChirpStackSourceConfig(_Section):
    """LoRaWAN devices through a local ChirpStack v4 (its MQTT application integration)."""

    type: Literal["chirpstack"]
    name: str = Field("chirpstack", min_length=1, max_length=64)
    host: str = Field("127.0.0.1", min_length=1, description="The broker ChirpStack publishes to.")
    port: int = Field(1883, ge=1, le=65535)
    client_id: str = Field(
        "", description="Empty means edge-gateway-<gateway id>-<name>; keep it stable (session)."
    )
    topic: str = Field("application/+/device/+/event/+")
    marshaler: Literal["auto", "json", "protobuf"] = Field(
        "auto", description="ChirpStack's integration marshaler; auto tells them apart."
    )
    username: str | None = None
    password_file: Path | None = Field(
        None, description="A relative name is looked up in $CREDENTIALS_DIRECTORY."
    )
    tls: TlsSection = TlsSection(enabled=False)
    allow_insecure: bool = Field(
        False, description="Plaintext to a broker that is not on this machine needs this."
    )
    dedup_window_s: float = Field(
        600.0, gt=0, description="A frame seen again within this window is a duplicate."
    )
    replay_file: Path | None = Field(
        None,
        description="Instead of the broker, replay a capture of JSON lines {topic, payload} "
        "(demo, desk tests of the device catalog).",
    )
    replay_interval_s: float = Field(0.0, ge=0)
    downlink_daily_cap: int = Field(
        24, ge=0, description="Downlinks per device and UTC day (duty cycle is shared airtime)."
    )
    reconnect_min_s: float = Field(1.0, gt=0)
    reconnect_max_s: float = Field(30.0, gt=0)
    mqtt_version: Literal["5", "3.1.1"] = Field(
        "5",
        description="5 lets the broker keep receive_maximum uplinks in flight to the gateway; "
        "with 3.1.1 the broker's max_inflight_messages (mosquitto: 20) rules.",
    )
    max_unacked: int = Field(
        1000,
        ge=1,
        le=65535,
        description="Uplinks received but not yet committed to the outbox; beyond this the "
        "gateway stops reading and the broker holds the rest for the session.",
    )
    receive_maximum: int = Field(
        20000,
        ge=1,
        le=65535,
        description="MQTT 5 only: uplinks the broker may have in flight to the gateway, "
        "unacknowledged: how far the gateway may fall behind (plus the broker's queue, "
        "mosquitto: max_queued_messages, 1000) before the broker drops uplinks. The broker "
        "holds them in its memory meanwhile; the gateway's stays bounded by max_unacked. "
        "mosquitto 2.0 discards the packets of those it cannot write yet beyond 1000 and sends "
        "them again only on a resumed session, which the gateway does once it has caught up.",
    )

    @model_validator(mode="after")
    def _plaintext_is_local_or_explicit(self) -> ChirpStackSourceConfig:
        if not self.tls.enabled and not self.allow_insecure and self.host not in _LOOPBACK_HOSTS:
            raise FieldCheckError(
                "allow_insecure",
                self.allow_insecure,
                f"plaintext MQTT to {self.host} (not this machine): enable tls or set "
                "allow_insecure = true",
            )
        if self.password_file is not None and self.username is None:
            raise FieldCheckError("username", None, "password_file needs a username")
        return self


class _SerialPortFields(_Section):
    """Where and how a serial sensor is wired (shared by every serial source type)."""

    name: str = Field(min_length=1, max_length=64)
    port: str = Field(
        min_length=1,
        description="Prefer /dev/serial/by-id/...: it survives re-plugging into another USB port.",
    )
    baud: int = Field(9600, ge=50, le=4_000_000)
    bytesize: Literal[7, 8] = 8
    parity: Literal["N", "E", "O"] = "N"
    stopbits: Literal[1, 2] = 1
    read_timeout_s: float = Field(1.0, gt=0)
    reopen_min_s: float = Field(0.5, gt=0, description="First wait before re-opening a lost port.")
    reopen_max_s: float = Field(
        5.0, gt=0, description="Longest wait; keeps 'restored' within seconds of a re-plug."
    )
    gap_after_s: float | None = Field(
        None, gt=0, description="A gap event when nothing valid arrived for this long."
    )

    @model_validator(mode="after")
    def _reopen_order(self) -> _SerialPortFields:
        if self.reopen_max_s < self.reopen_min_s:
            raise FieldCheckError(
                "reopen_max_s", self.reopen_max_s, "must be at least reopen_min_s"
            )
        return self


class AsciiFieldConfig(_Section):
    """One field of an ASCII line → one measurement (value x scale + offset)."""

    key: str = Field(
        min_length=1,
        description="regex: the named group; keyvalue: the key; csv: the 0-based column.",
    )
    name: MeasurementName
    unit: str | None = None
    scale: float = 1.0
    offset: float = 0.0


class SerialAsciiSourceConfig(_SerialPortFields):
    """A sensor that prints lines of text (weather stations, level probes in ASCII mode)."""

    type: Literal["serial_ascii"]
    device: str = Field("", max_length=256, description="Device id in events; empty: the name.")
    delimiter: str = Field("\n", min_length=1, max_length=4, description="Ends each line.")
    encoding: str = Field("ascii", description="ASCII-compatible: ascii, latin-1, utf-8.")
    max_line_bytes: int = Field(
        512, ge=16, le=65536, description="Longer lines are dropped (and counted)."
    )
    format: Literal["regex", "keyvalue", "csv"] = "regex"
    pattern: str | None = Field(
        None, description="regex format: named groups are the keys (searched; anchor with ^ $)."
    )
    separator: str = Field(",", min_length=1, description="keyvalue and csv: between fields.")
    key_separator: str = Field("=", min_length=1, description="keyvalue: between key and value.")
    checksum: Literal["none", "nmea"] = Field("none", description="nmea: '...*hh' XOR checksum.")
    max_lines: int | None = Field(
        None, ge=1, description="Stop the source after this many lines (demo, desk tests)."
    )
    fields: list[AsciiFieldConfig] = Field(min_length=1)

    @model_validator(mode="after")
    def _format_matches_fields(self) -> SerialAsciiSourceConfig:
        from drivers.ascii_lines import check_encoding  # noqa: PLC0415 -- pure, no I/O

        try:
            check_encoding(self.encoding)
        except ValueError as exc:
            raise FieldCheckError("encoding", self.encoding, str(exc)) from exc
        try:
            self.delimiter.encode(self.encoding)
        except UnicodeEncodeError as exc:
            raise FieldCheckError(
                "delimiter", self.delimiter, f"not encodable in {self.encoding}"
            ) from exc
        if self.format == "regex":
            if not self.pattern:
                raise FieldCheckError("pattern", self.pattern, "the regex format needs a pattern")
            try:
                compiled = re.compile(self.pattern)
            except re.error as exc:
                raise FieldCheckError("pattern", self.pattern, f"not a regex: {exc}") from exc
            missing = [f.key for f in self.fields if f.key not in compiled.groupindex]
            if missing:
                raise FieldCheckError("fields", missing, "keys without a named group in pattern")
        elif self.format == "csv":
            bad = [f.key for f in self.fields if not f.key.isdigit()]
            if bad:
                raise FieldCheckError("fields", bad, "csv keys are 0-based column numbers")
        names = [f.name for f in self.fields]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise FieldCheckError("fields", duplicates, "measurement names must be unique")
        return self


class ModbusRegisterConfig(_Section):
    """One value read from a Modbus slave."""

    name: MeasurementName
    address: int = Field(ge=0, le=65535, description="0-based register address (PDU address).")
    table: Literal["holding", "input"] = "holding"
    data_type: Literal["int16", "uint16", "int32", "uint32", "float32"] = "uint16"
    word_order: Literal["big", "little"] = Field(
        "big", description="32-bit values: which word first."
    )
    byte_order: Literal["big", "little"] = "big"
    unit: str | None = None
    scale: float = 1.0
    offset: float = 0.0


class ModbusSlaveConfig(_Section):
    """One slave on the bus, polled on its own schedule."""

    device_id: int = Field(ge=1, le=247, description="Modbus slave address.")
    device: str = Field(min_length=1, description="Device id in events.")
    poll_interval_s: float = Field(10.0, gt=0)
    timeout_s: float = Field(
        1.0, gt=0, description="The slave's turnaround time; the frames' wire time is added."
    )
    retries: int = Field(1, ge=0, le=5)
    backoff_max_s: float = Field(
        60.0, gt=0, description="Longest wait between probes of a slave that stopped answering."
    )
    registers: list[ModbusRegisterConfig] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique_names(self) -> ModbusSlaveConfig:
        names = [r.name for r in self.registers]
        if len(set(names)) != len(names):
            raise FieldCheckError("registers", names, "register names must be unique per slave")
        return self


class ModbusRtuSourceConfig(_SerialPortFields):
    """Modbus RTU over RS-485: several slaves on one bus."""

    type: Literal["modbus_rtu"]
    baud: int = Field(9600, ge=50, le=4_000_000)
    slaves: list[ModbusSlaveConfig] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique_ids(self) -> ModbusRtuSourceConfig:
        ids = [s.device_id for s in self.slaves]
        if len(set(ids)) != len(ids):
            raise FieldCheckError("slaves", ids, "device_id must be unique on a bus")
        return self


class Sdi12SensorConfig(_Section):
    """One SDI-12 sensor: the values of its aM!/aD0! answer, in order."""

    address: str = Field(pattern=r"^[0-9A-Za-z]$")
    device: str = Field(min_length=1, description="Device id in events.")
    poll_interval_s: float = Field(60.0, gt=0)
    measurement: int = Field(0, ge=0, le=9, description="0: aM!, 1..9: aM1!..aM9!.")
    crc: bool = Field(False, description="aMC!: answers carry a CRC, which is checked.")
    values: list[AsciiFieldConfig] = Field(
        min_length=1, description="key: the 0-based position of the value in the answer."
    )

    @model_validator(mode="after")
    def _keys_are_positions(self) -> Sdi12SensorConfig:
        keys = [v.key for v in self.values]
        if not all(re.fullmatch(r"\d{1,2}", k) for k in keys) or len(set(keys)) != len(keys):
            raise FieldCheckError("values", keys, "keys must be distinct value positions 0..99")
        return self


class Sdi12SourceConfig(_SerialPortFields):
    """SDI-12 sensors through a USB/serial adapter that speaks SDI-12 command text.

    Many adapters talk 9600 8N1 on their USB side: check the adapter's manual and override
    baud/bytesize/parity.
    """

    type: Literal["sdi12"]
    baud: int = Field(1200, ge=50, le=4_000_000)
    bytesize: Literal[7, 8] = 7
    parity: Literal["N", "E", "O"] = "E"
    read_timeout_s: float = Field(
        1.0, gt=0, description="Response window per command, adapter latency included."
    )
    retries: int = Field(3, ge=0, le=10, description="Per command; the spec asks for at least 3.")
    wake_break: bool = Field(
        False, description="Plain level shifters: the gateway sends the 12 ms break itself."
    )
    sensors: list[Sdi12SensorConfig] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique_sensors(self) -> Sdi12SourceConfig:
        devices = [s.device for s in self.sensors]
        slots = [(s.address, s.measurement) for s in self.sensors]
        if len(set(devices)) != len(devices) or len(set(slots)) != len(slots):
            raise FieldCheckError(
                "sensors", devices, "devices and (address, measurement) pairs must be unique"
            )
        return self


SourceConfig = Annotated[
    ReplaySourceConfig
    | ChirpStackSourceConfig
    | SerialAsciiSourceConfig
    | ModbusRtuSourceConfig
    | Sdi12SourceConfig
    | ImageInboxSourceConfig,
    Field(discriminator="type"),
]


class FieldMapConfig(_Section):
    """One decoded field → one measurement (value x scale + offset)."""

    field: str = Field(min_length=1, description="Dotted path in the decoder output.")
    name: MeasurementName = Field(description="Measurement name, lower_snake_case.")
    unit: str | None = Field(None, description="UCUM unit code, e.g. cm, Cel, %, V.")
    scale: float = 1.0
    offset: float = 0.0
    valid_min: float | None = None
    valid_max: float | None = None


class WaterLevelConfig(_Section):
    """Distance sensor over water: water_level = params[mounting_height_param] - distance (cm)."""

    distance: str = Field(description="The measurement (in cm) that holds the distance.")
    mounting_height_param: str = "mounting_height_cm"
    sensor_min_cm: float = Field(0.0, ge=0, description="Below this the sensor is blind.")
    sensor_max_cm: float | None = Field(None, gt=0, description="The sensor's range.")


class DownlinkActionConfig(_Section):
    """A named downlink of a profile (e.g. set the measuring interval)."""

    f_port: int = Field(ge=1, le=223)
    hex: str = Field(min_length=2, max_length=484, pattern=r"^([0-9a-fA-F]{2})+$")
    confirmed: bool = False


class ProfileConfig(_Section):
    """How a device model's payload becomes measurements."""

    codec: str = Field(
        "",
        description="A built-in codec name, js:PATH for a TTN/ChirpStack JavaScript decoder, "
        "or empty to use the object ChirpStack decoded.",
    )
    prefer_object: bool = Field(False, description="Use ChirpStack's object when it has one.")
    fields: list[FieldMapConfig] = Field(min_length=1)
    water_level: WaterLevelConfig | None = None
    actions: dict[str, DownlinkActionConfig] = Field(default_factory=dict)


class DeviceConfig(_Section):
    """Catalog entry: devices matched by devEUI, ChirpStack device-profile name or tag."""

    dev_eui: str | None = None
    device_profile: str | None = None
    tag: str | None = Field(None, description="key=value of a ChirpStack device tag.")
    profile: str = Field(description="A key of [profiles].")
    params: dict[str, float] = Field(default_factory=dict)
    expected_interval_s: float | None = Field(
        None, gt=0, description="Uplink period; silent after 2.5x this (empty: learned)."
    )

    @model_validator(mode="after")
    def _one_selector(self) -> DeviceConfig:
        chosen = [x for x in (self.dev_eui, self.device_profile, self.tag) if x is not None]
        if len(chosen) != 1:
            raise FieldCheckError(
                "dev_eui", self.dev_eui, "give exactly one of dev_eui, device_profile, tag"
            )
        if self.dev_eui is not None and not _DEV_EUI.match(self.dev_eui):
            raise FieldCheckError("dev_eui", self.dev_eui, "must be 16 hex digits")
        if self.tag is not None and "=" not in self.tag:
            raise FieldCheckError("tag", self.tag, "must be key=value")
        return self


class GatewayConfig(BaseSettings):
    """The whole configuration."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
    )

    gateway: GatewaySection = GatewaySection()
    pipeline: PipelineSection = PipelineSection()
    outbox: OutboxSection = OutboxSection()
    inference: InferenceSection = InferenceSection()
    uplink: UplinkConfig = MqttUplinkConfig()
    sources: list[SourceConfig] = Field(default_factory=list)
    profiles: dict[str, ProfileConfig] = Field(default_factory=dict)
    devices: list[DeviceConfig] = Field(default_factory=list)
    analyzers: dict[str, AnalyzerConfig] = Field(default_factory=dict)
    waste: WasteSection = WasteSection()
    pools: dict[str, PoolConfig] = Field(
        default_factory=dict,
        description="Pool-safety cameras by name (lower_snake_case, used in events and alarm ids).",
    )

    @field_validator("pools")
    @classmethod
    def _pool_names(cls, value: dict[str, PoolConfig]) -> dict[str, PoolConfig]:
        bad = [name for name in value if not re.fullmatch(r"[a-z][a-z0-9_]{0,31}", name)]
        if bad:
            raise ValueError(f"pool names must be lower_snake_case, at most 32 (got: {bad})")
        return value

    @model_validator(mode="after")
    def _analyzers_attach_once(self) -> GatewayConfig:
        owner: dict[str, str] = {}
        for name, analyzer in self.analyzers.items():
            for device in analyzer.devices:
                other = owner.setdefault(device, name)
                if other != name:
                    raise FieldCheckError(
                        f"analyzers.{name}.devices",
                        device,
                        f"device {device!r} already has analyzer {other!r}: one per device",
                    )
            if analyzer.model and not self.inference.cards:
                raise FieldCheckError(
                    f"analyzers.{name}.model",
                    analyzer.model,
                    'needs its card in [inference] cards (e.g. "water_level/forecaster.toml"); '
                    'model = "" runs the rules alone',
                )
        return self

    @model_validator(mode="after")
    def _one_source_per_serial_port(self) -> GatewayConfig:
        # Two sources on one port would fight for its exclusive lock: one of them forever "busy".
        ports: dict[str, str] = {}
        for source in self.sources:
            if isinstance(source, _SerialPortFields):
                other = ports.setdefault(source.port, source.name)
                if other != source.name:
                    raise FieldCheckError(
                        "sources",
                        source.port,
                        f"sources {other!r} and {source.name!r} use the same serial port: one "
                        f"source per port (several Modbus slaves share one modbus_rtu source)",
                    )
        return self

    @model_validator(mode="after")
    def _devices_name_profiles(self) -> GatewayConfig:
        for device in self.devices:
            if device.profile not in self.profiles:
                known = ", ".join(sorted(self.profiles)) or "none defined"
                raise ValueError(
                    f"device profile {device.profile!r} is not in [profiles] ({known})"
                )
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The TOML file arrives as init values; the environment must win over the file, and
        # nothing else (.env files, secrets dirs) may sneak in unannounced.
        return (env_settings, init_settings)

    @property
    def outbox_path(self) -> Path:
        return self.gateway.state_dir / self.outbox.file


def credential_path(name: Path, environ: Mapping[str, str] | None = None) -> Path:
    """Resolve a credential file: relative names live in systemd's $CREDENTIALS_DIRECTORY."""
    env = os.environ if environ is None else environ
    if name.is_absolute():
        return name
    cred_dir = env.get("CREDENTIALS_DIRECTORY")
    return Path(cred_dir) / name if cred_dir else name


def _format_value(value: Any) -> str:
    text = repr(value) if isinstance(value, str) else str(value)
    return text if len(text) <= 80 else text[:77] + "..."


# Discriminated unions put the member's tag into an error's location (`uplink.mqtt.port`); the
# user never wrote that level. The tags, by the location shape that precedes them ("[]": an index).
_TAGS_AFTER: dict[tuple[str, ...], frozenset[str]] = {
    ("uplink",): frozenset({"mqtt", "file"}),
    ("sources", "[]"): frozenset(
        {"replay", "chirpstack", "serial_ascii", "modbus_rtu", "sdi12", "image_inbox"}
    ),
}


def _dotted(loc: tuple[int | str, ...]) -> str:
    """Render a pydantic location as ``sources[0].interval_s``, without union tags."""
    parts: list[str] = []
    shape: list[str] = []
    for item in loc:
        if isinstance(item, str) and item in _TAGS_AFTER.get(tuple(shape), ()):
            shape.append("<tag>")
            continue
        if isinstance(item, int):
            shape.append("[]")
            parts.append(f"[{item}]")
        else:
            shape.append(item)
            parts.append(f".{item}" if parts else item)
    return "".join(parts) or "(top level)"


def format_validation_error(exc: ValidationError) -> list[str]:
    """One line per problem: ``dotted.path: message (got: value)``."""
    lines = []
    for err in exc.errors(include_url=False):
        path = _dotted(tuple(err["loc"]))
        ctx = err.get("ctx") or {}
        got = err.get("input")
        show_got = not isinstance(got, dict) and err["type"] != "missing"
        if err["type"] == "extra_forbidden":
            message = "unknown key"
        elif err["type"] == "union_tag_invalid":
            path, got, show_got = f"{path}.type", ctx.get("tag"), True
            message = f"unknown type; expected one of {ctx.get('expected_tags')}"
        elif isinstance(ctx.get("error"), FieldCheckError):
            blamed = ctx["error"]
            path = blamed.field if path == "(top level)" else f"{path}.{blamed.field}"
            got, show_got = blamed.value, True
            message = str(blamed)
        else:
            message = err["msg"].removeprefix("Value error, ")
        suffix = f" (got: {_format_value(got)})" if show_got else ""
        lines.append(f"{path}: {message}{suffix}")
    return lines


def read_toml(path: Path) -> dict[str, Any]:
    """Read a TOML file with errors that name the file and the line."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise ConfigError(str(path), [f"file: not found (got: {path})"]) from exc
    except PermissionError as exc:
        raise ConfigError(str(path), [f"file: permission denied (got: {path})"]) from exc
    except IsADirectoryError as exc:
        raise ConfigError(str(path), [f"file: is a directory (got: {path})"]) from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(str(path), [f"file: not UTF-8 text ({exc.reason})"]) from exc
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        # tomllib puts "(at line L, column C)" into the message, which is what a technician needs.
        raise ConfigError(str(path), [f"toml: syntax error: {exc}"]) from exc


def _check_files(cfg: GatewayConfig, environ: Mapping[str, str] | None) -> list[str]:
    """Files the config names must exist and be readable (credentials via systemd's dir)."""
    candidates: list[tuple[str, Path | None]] = []

    def mqtt_files(prefix: str, section: MqttUplinkConfig | ChirpStackSourceConfig) -> None:
        candidates.extend(
            [
                (f"{prefix}.password_file", section.password_file),
                (f"{prefix}.tls.ca_file", section.tls.ca_file),
                (f"{prefix}.tls.cert_file", section.tls.cert_file),
                (f"{prefix}.tls.key_file", section.tls.key_file),
            ]
        )

    if isinstance(cfg.uplink, MqttUplinkConfig):
        mqtt_files("uplink", cfg.uplink)
    for index, source in enumerate(cfg.sources):
        if isinstance(source, ChirpStackSourceConfig):
            mqtt_files(f"sources[{index}]", source)
    problems: list[str] = []
    for dotted, name in candidates:
        if name is None:
            continue
        resolved = credential_path(name, environ)
        if not resolved.is_file():
            problems.append(f"{dotted}: file not found (got: {str(resolved)!r})")
        elif not os.access(resolved, os.R_OK):
            problems.append(f"{dotted}: file not readable by this user (got: {str(resolved)!r})")
    for index, source in enumerate(cfg.sources):
        replay_file = (
            source.file
            if isinstance(source, ReplaySourceConfig)
            else source.replay_file
            if isinstance(source, ChirpStackSourceConfig)
            else None
        )
        if replay_file is not None and not replay_file.is_file():
            problems.append(f"sources[{index}].file: file not found (got: {str(replay_file)!r})")
    for profile_name, profile in cfg.profiles.items():
        problem = _codec_problem(profile.codec)
        if problem:
            problems.append(f"profiles.{profile_name}.codec: {problem} (got: {profile.codec!r})")
    problems += _analyzer_model_problems(cfg)
    return problems


def _analyzer_model_problems(cfg: GatewayConfig) -> list[str]:
    """An analyzer's model must be the name of one of the configured cards.

    Cards that cannot be read are left to the engine, which refuses them at start with the reason.
    """
    from models.card import load_card  # noqa: PLC0415 -- only when analyzers name models

    wanted = {name: a.model for name, a in cfg.analyzers.items() if a.model}
    if not wanted:
        return []
    names: list[str] = []
    for card in cfg.inference.cards:
        try:
            names.append(load_card(cfg.inference.card_path(card)).name)
        except GatewayError:
            return []
    return [
        f"analyzers.{name}.model: no card in [inference] cards is named {model!r} "
        f"(cards: {', '.join(names)})"
        for name, model in wanted.items()
        if model not in names
    ]


def check_ports(cfg: GatewayConfig) -> tuple[list[str], list[str]]:
    """The serial ports of the config as they are on this machine: (errors, warnings).

    A port without permission, or a path that is not a serial device, is an error a restart
    will not fix. A missing port is only a warning: the sensor may be unplugged while the
    technician checks, and the gateway waits for it. Nothing is opened (the running gateway
    may hold the port).
    """
    from drivers.serial_port import port_problem  # noqa: PLC0415 -- only check-config needs it

    errors: list[str] = []
    warnings: list[str] = []
    seen: dict[str, int] = {}
    for index, source in enumerate(cfg.sources):
        if not isinstance(source, _SerialPortFields):
            continue
        where = f"sources[{index}].port"
        got = f"(got: {source.port!r})"
        problem = port_problem(source.port)
        if problem is None:
            node = os.path.realpath(source.port)
            if node in seen:
                errors.append(
                    f"{where}: the same device as sources[{seen[node]}].port ({node}); "
                    f"one source per port {got}"
                )
            seen.setdefault(node, index)
        elif problem.kind == "missing":
            warnings.append(f"{where}: {problem} {got}")
        else:
            errors.append(f"{where}: {problem} {got}")
    return errors, warnings


def _codec_problem(codec: str) -> str | None:
    if not codec:
        return None
    if codec.startswith("js:"):
        path = Path(codec[3:])
        return None if path.is_file() else "JavaScript decoder file not found"
    from drivers.codecs import CODECS  # noqa: PLC0415 -- the registry is only needed here

    if codec not in CODECS:
        return f"unknown codec; built-in codecs: {', '.join(sorted(CODECS))}"
    return None


def load_config(path: Path, environ: dict[str, str] | None = None) -> GatewayConfig:
    """Load and validate a config file plus environment overrides; raises ConfigError."""
    data = read_toml(path)
    return config_from_dict(data, str(path), environ)


def config_from_dict(
    data: dict[str, Any], source: str, environ: dict[str, str] | None = None
) -> GatewayConfig:
    """Validate already-parsed config data (the embedded demo uses this too)."""
    # BaseSettings.__init__ takes its own options as `_name` keywords (_env_prefix,
    # _cli_parse_args, ...): a key from the file must never reach them.
    problems = [
        f"{key}: unknown key (got: {_format_value(value)})"
        for key, value in data.items()
        if key.startswith("_")
    ]
    fields = {key: value for key, value in data.items() if not key.startswith("_")}
    try:
        cfg = GatewayConfig(**fields)
    except ValidationError as exc:
        raise ConfigError(source, problems + format_validation_error(exc)) from exc
    except SettingsError as exc:
        # An environment override of a table or list must be JSON; pydantic-settings reports
        # "error parsing value for field "sources" from source "EnvSettingsSource"".
        match = re.search(r'field "([^"]+)"', str(exc))
        name = match.group(1) if match else ""
        variable = f"{ENV_PREFIX}{name.upper()}"
        raise ConfigError(
            source,
            [
                *problems,
                f"{name or '(environment)'}: {variable} is not valid JSON "
                f"(got: {_format_value(os.environ.get(variable, ''))})",
            ],
        ) from exc
    problems += _check_files(cfg, environ)
    if problems:
        raise ConfigError(source, problems)
    return cfg
