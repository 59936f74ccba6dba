"""The gateway's data model: readings that sources produce and events that leave the gateway.

Pure and dependency-free so ``drivers`` and ``models`` can import it. Every string an event can
carry is length-limited and no field accepts ``bytes``: an event has nowhere to put a frame or an
image, which is how "images never leave the analyzer" is enforced by the type, not by discipline.
"""

from __future__ import annotations

import functools
import hashlib
import math
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime
from enum import IntEnum, StrEnum
from typing import Any, Protocol

from gateway.errors import EventValidationError

SCHEMA_VERSION = 1

# Long enough for any label, unit, device id or reason; far too short for even a thumbnail.
MAX_TEXT = 256
MAX_VALUES = 64
MAX_QUALITY_FLAGS = 16
# What every JSON and CBOR peer holds without bignums: int64 .. uint64.
MIN_INT = -(2**63)
MAX_INT = 2**64 - 1

# Used with fullmatch: "$" would also match before a trailing newline.
_NAME_RE = re.compile(r"[a-z][a-z0-9_]{0,63}")
_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_CROCKFORD_PAIRS = tuple(a + b for a in _CROCKFORD for b in _CROCKFORD)

Scalar = float | int | bool | str


class Severity(StrEnum):
    """How urgent an event is; ``alarm`` and above travel in the outbox's alarm lane."""

    INFO = "info"
    WARNING = "warning"
    ALARM = "alarm"
    CRITICAL = "critical"


class Lane(IntEnum):
    """Outbox lanes. Lower values are delivered first and are never evicted for higher ones."""

    ALARM = 0
    TELEMETRY = 1


def new_event_id(now_ms: int | None = None) -> str:
    """A ULID-style id: 48-bit millisecond time + 80 random bits, Crockford base32, 26 chars.

    Time-ordered so a receiver's de-duplication index stays local; random so two gateways
    never collide.
    """
    ms = int(time.time() * 1000) if now_ms is None else now_ms
    return _ulid(ms, os.urandom(10))


def _ulid(ms: int, tail: bytes) -> str:
    # Two characters (10 bits) per lookup: every event gets an id, so this is on the hot path.
    # Spelled out, on the 48-bit time and the 80-bit tail apart (two leading zero bits make the
    # time ten characters): 0.65 us against 1.1 us for a loop over one 130-bit number.
    t = ms & 0xFFFF_FFFF_FFFF
    r = int.from_bytes(tail[:10], "big")
    p = _CROCKFORD_PAIRS
    return "".join(
        (
            p[t >> 40],
            p[(t >> 30) & 1023],
            p[(t >> 20) & 1023],
            p[(t >> 10) & 1023],
            p[t & 1023],
            p[r >> 70],
            p[(r >> 60) & 1023],
            p[(r >> 50) & 1023],
            p[(r >> 40) & 1023],
            p[(r >> 30) & 1023],
            p[(r >> 20) & 1023],
            p[(r >> 10) & 1023],
            p[r & 1023],
        )
    )


def _show(value: object) -> str:
    """A short repr for messages (repr() of a huge int raises ValueError of its own)."""
    if isinstance(value, int) and value.bit_length() > 64:
        return f"<int of {value.bit_length()} bits>"
    return repr(value)[:80]


def _check_text(what: str, value: str) -> None:
    if not isinstance(value, str):
        raise EventValidationError(f"{what} must be a string (got: {type(value).__name__})")
    if len(value) > MAX_TEXT:
        raise EventValidationError(f"{what} is longer than {MAX_TEXT} bytes (got: {len(value)})")
    if not value.isascii():
        try:
            size = len(value.encode("utf-8"))
        except UnicodeEncodeError as exc:
            # Lone surrogates (e.g. from surrogateescape) have no UTF-8 form on the wire.
            raise EventValidationError(f"{what} is not valid Unicode text") from exc
        # The limit is in bytes: four-byte characters must not quadruple what an event holds.
        if size > MAX_TEXT:
            raise EventValidationError(f"{what} is longer than {MAX_TEXT} bytes (got: {size})")


def _check_number(what: str, value: int | float) -> None:
    if isinstance(value, bool):
        return
    if isinstance(value, int):
        if not MIN_INT <= value <= MAX_INT:
            # orjson refuses wider ints (TypeError at encode); CBOR would carry any size.
            raise EventValidationError(f"{what} must fit in 64 bits (got: {_show(value)})")
    elif not math.isfinite(value):
        # JSON has no NaN or Infinity: orjson writes null, which no receiver can decode.
        raise EventValidationError(f"{what} must be finite (got: {value!r})")


@functools.lru_cache(maxsize=4096)
def _is_name(value: str) -> bool:
    # Memoised: the same few dozen measurement names and kinds recur in every event.
    return _NAME_RE.fullmatch(value) is not None


def _check_name(what: str, value: str) -> None:
    if type(value) is not str or not _is_name(value):
        raise EventValidationError(
            f"{what} must be lower_snake_case, at most 64 characters (got: {_show(value)})"
        )


def _check_ts(ts: datetime) -> None:
    if type(ts) is datetime and ts.tzinfo is UTC:
        return  # what nearly every source gives: no utcoffset() call needed
    if not isinstance(ts, datetime) or ts.tzinfo is None or ts.utcoffset() is None:
        raise EventValidationError(f"timestamp must be timezone-aware (got: {_show(ts)})")


# A frozen dataclass's generated __init__ sets each field with object.__setattr__. Measurement,
# Reading and Event (half a dozen of them per LoRaWAN uplink) set theirs through the slots' own
# descriptors instead: the same effect, a third faster (0.21 against 0.32 us for a Measurement).
_Setter = Callable[[object, object], None]


def _slot_setters(cls: type) -> tuple[_Setter, ...]:
    """The setters of ``cls``'s slots, in the order of its fields."""
    return tuple(getattr(cls, f.name).__set__ for f in fields(cls))


@dataclass(frozen=True, slots=True, init=False)
class Measurement:
    """One named value with its UCUM unit (``cm``, ``Cel``, ``%``, ``V``) or no unit."""

    name: str
    value: Scalar
    unit: str | None = None

    def __init__(self, name: str, value: Scalar, unit: str | None = None) -> None:
        set_name, set_value, set_unit = _MEASUREMENT_SETTERS
        set_name(self, name)
        set_value(self, value)
        set_unit(self, unit)
        self.__post_init__()

    def __post_init__(self) -> None:
        unit = self.unit
        # A name and unit once accepted are accepted again: the same few pairs recur in every
        # event, so they are checked in full (in the usual order) only when not known good.
        known = (
            type(self.name) is str
            and (unit is None or type(unit) is str)
            and _is_label(self.name, unit)
        )
        if not known:
            _check_name("measurement name", self.name)
        value = self.value
        if type(value) is float:
            # The common case first, without the general checks' isinstance chain.
            if not math.isfinite(value):
                raise EventValidationError(f"value of {self.name} must be finite (got: {value!r})")
        elif type(value) is int:
            if not MIN_INT <= value <= MAX_INT:
                _check_number(f"value of {self.name}", value)  # raises, naming the limit
        elif isinstance(self.value, str):
            _check_text(f"value of {self.name}", self.value)
        elif isinstance(self.value, bool | int | float):
            _check_number(f"value of {self.name}", self.value)
        else:
            raise EventValidationError(
                f"value of {self.name} must be a number, bool or short string "
                f"(got: {type(self.value).__name__})"
            )
        if not known and unit is not None:
            _check_text(f"unit of {self.name}", unit)


@functools.lru_cache(maxsize=4096)
def _is_label(name: str, unit: str | None) -> bool:
    """Whether a measurement name and unit pass their checks (memoised: they recur)."""
    try:
        _check_name("measurement name", name)
        if unit is not None:
            _check_text("unit", unit)
    except EventValidationError:
        return False
    return True


@dataclass(frozen=True, slots=True)
class Provenance:
    """Which model decided, and how sure it was: carried by every AI-derived event."""

    model_id: str
    version: str
    sha256: str
    score: float
    threshold: float

    def __post_init__(self) -> None:
        for what, text in (("model id", self.model_id), ("model version", self.version)):
            _check_text(what, text)
        if not isinstance(self.sha256, str) or not re.fullmatch(r"[0-9a-f]{64}", self.sha256):
            raise EventValidationError(
                f"model sha256 must be 64 hex digits (got: {_show(self.sha256)})"
            )
        for what, number in (("model score", self.score), ("model threshold", self.threshold)):
            if isinstance(number, bool) or not isinstance(number, int | float):
                raise EventValidationError(f"{what} must be a number (got: {_show(number)})")
            _check_number(what, number)


@dataclass(frozen=True, slots=True, init=False)
class Reading:
    """What a source observed at one moment, before any analysis."""

    source: str
    device: str
    ts: datetime
    values: tuple[Measurement, ...]
    quality: tuple[str, ...] = ()
    # Set by sources whose input has its own identity (see stable_event_id); else a new id.
    event_id: str | None = None

    def __init__(  # noqa: PLR0917 -- the signature the dataclass would generate
        self,
        source: str,
        device: str,
        ts: datetime,
        values: tuple[Measurement, ...],
        quality: tuple[str, ...] = (),
        event_id: str | None = None,
    ) -> None:
        set_source, set_device, set_ts, set_values, set_quality, set_id = _READING_SETTERS
        set_source(self, source)
        set_device(self, device)
        set_ts(self, ts)
        set_values(self, values)
        set_quality(self, quality)
        set_id(self, event_id)
        self.__post_init__()

    def __post_init__(self) -> None:
        _check_text("source", self.source)
        _check_text("device", self.device)
        _check_ts(self.ts)


_MEASUREMENT_SETTERS = _slot_setters(Measurement)
_READING_SETTERS = _slot_setters(Reading)


# Event's default event_id: a new id (a sentinel, so that an explicit None is still refused).
_NEW_ID: Any = object()


@dataclass(frozen=True, slots=True, init=False)
class Event:
    """A compact, versioned event. ``event_id`` is fixed at creation and survives retries."""

    kind: str
    device: str
    ts: datetime
    severity: Severity = Severity.INFO
    values: tuple[Measurement, ...] = ()
    model: Provenance | None = None
    quality: tuple[str, ...] = ()
    event_id: str = field(default_factory=new_event_id)
    schema: int = SCHEMA_VERSION

    def __init__(  # noqa: PLR0917 -- the signature the dataclass would generate
        self,
        kind: str,
        device: str,
        ts: datetime,
        severity: Severity = Severity.INFO,
        values: tuple[Measurement, ...] = (),
        model: Provenance | None = None,
        quality: tuple[str, ...] = (),
        event_id: str = _NEW_ID,
        schema: int = SCHEMA_VERSION,
    ) -> None:
        # Set as Measurement's are (see _slot_setters): one event per uplink at least.
        (
            set_kind,
            set_device,
            set_ts,
            set_severity,
            set_values,
            set_model,
            set_quality,
            set_id,
            set_schema,
        ) = _EVENT_SETTERS
        set_kind(self, kind)
        set_device(self, device)
        set_ts(self, ts)
        set_severity(self, severity)
        set_values(self, values)
        set_model(self, model)
        set_quality(self, quality)
        set_id(self, new_event_id() if event_id is _NEW_ID else event_id)
        set_schema(self, schema)
        self.__post_init__()

    def __post_init__(self) -> None:
        _check_name("event kind", self.kind)
        _check_text("device", self.device)
        _check_text("event id", self.event_id)
        _check_ts(self.ts)
        if type(self.schema) is not int or not 1 <= self.schema <= SCHEMA_VERSION:
            raise EventValidationError(
                f"schema must be a version from 1 to {SCHEMA_VERSION} (got: {_show(self.schema)})"
            )
        if not isinstance(self.severity, Severity):
            raise EventValidationError(f"severity must be a Severity (got: {_show(self.severity)})")
        if len(self.values) > MAX_VALUES:
            raise EventValidationError(f"an event carries at most {MAX_VALUES} values")
        for value in self.values:
            if not isinstance(value, Measurement):
                raise EventValidationError(f"values must be Measurements (got: {_show(value)})")
        if len(self.quality) > MAX_QUALITY_FLAGS:
            raise EventValidationError(
                f"an event carries at most {MAX_QUALITY_FLAGS} quality flags"
            )
        for flag in self.quality:
            _check_name("quality flag", flag)

    @property
    def lane(self) -> Lane:
        """Alarms and critical events travel in the alarm lane."""
        if self.severity in (Severity.ALARM, Severity.CRITICAL):
            return Lane.ALARM
        return Lane.TELEMETRY


_EVENT_SETTERS = _slot_setters(Event)


def utc_now() -> datetime:
    """The current time, timezone-aware in UTC."""
    return datetime.now(UTC)


class Emit(Protocol):
    """How a source hands a reading or event to the pipeline.

    ``on_stored`` runs once the item is committed to the outbox (a source acknowledges its own
    input only then).
    """

    async def __call__(
        self, item: Reading | Event, on_stored: Callable[[], None] | None = None
    ) -> None: ...


# report_error(kind, detail): a source's expected, per-item failure; counted and logged.
ReportError = Callable[[str, str], None]


def stable_event_id(key: str, ts: datetime) -> str:
    """A deterministic event id for an event derived from an upstream message.

    The same upstream message (e.g. a ChirpStack ``deduplicationId``) always yields the same id,
    so a message redelivered after a restart becomes a duplicate a receiver can drop, not a new
    event. Same shape as :func:`new_event_id`: time part from ``ts``, the rest from a hash.
    """
    return _ulid(int(ts.timestamp() * 1000), hashlib.sha256(key.encode()).digest())
