"""The gateway's data model: readings that sources produce and events that leave the gateway.

Pure and dependency-free so ``drivers`` and ``models`` can import it. Every string an event can
carry is length-limited and no field accepts ``bytes``: an event has nowhere to put a frame or an
image, which is how "images never leave the analyzer" is enforced by the type, not by discipline.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import IntEnum, StrEnum
from typing import Protocol

from gateway.errors import EventValidationError

SCHEMA_VERSION = 1

# Long enough for any label, unit, device id or reason; far too short for even a thumbnail.
MAX_TEXT = 256
MAX_VALUES = 64
MAX_QUALITY_FLAGS = 16

_NAME_RE = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"

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
    value = (ms << 80) | int.from_bytes(os.urandom(10), "big")
    chars = []
    for _ in range(26):
        chars.append(_CROCKFORD[value & 31])
        value >>= 5
    return "".join(reversed(chars))


def _check_text(what: str, value: str) -> None:
    if not isinstance(value, str):
        raise EventValidationError(f"{what} must be a string (got: {type(value).__name__})")
    if len(value) > MAX_TEXT:
        raise EventValidationError(
            f"{what} is longer than {MAX_TEXT} characters (got: {len(value)})"
        )


def _check_name(what: str, value: str) -> None:
    if not isinstance(value, str) or not _NAME_RE.match(value):
        raise EventValidationError(
            f"{what} must be lower_snake_case, at most 64 characters (got: {value!r:.80})"
        )


def _check_ts(ts: datetime) -> None:
    if not isinstance(ts, datetime) or ts.tzinfo is None or ts.utcoffset() is None:
        raise EventValidationError(f"timestamp must be timezone-aware (got: {ts!r:.80})")


@dataclass(frozen=True, slots=True)
class Measurement:
    """One named value with its UCUM unit (``cm``, ``Cel``, ``%``, ``V``) or no unit."""

    name: str
    value: Scalar
    unit: str | None = None

    def __post_init__(self) -> None:
        _check_name("measurement name", self.name)
        if isinstance(self.value, str):
            _check_text(f"value of {self.name}", self.value)
        elif not isinstance(self.value, bool | int | float):
            raise EventValidationError(
                f"value of {self.name} must be a number, bool or short string "
                f"(got: {type(self.value).__name__})"
            )
        if self.unit is not None:
            _check_text(f"unit of {self.name}", self.unit)


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
        if not re.fullmatch(r"[0-9a-f]{64}", self.sha256):
            raise EventValidationError(
                f"model sha256 must be 64 hex digits (got: {self.sha256!r:.80})"
            )


@dataclass(frozen=True, slots=True)
class Reading:
    """What a source observed at one moment, before any analysis."""

    source: str
    device: str
    ts: datetime
    values: tuple[Measurement, ...]
    quality: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _check_text("source", self.source)
        _check_text("device", self.device)
        _check_ts(self.ts)


@dataclass(frozen=True, slots=True)
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

    def __post_init__(self) -> None:
        _check_name("event kind", self.kind)
        _check_text("device", self.device)
        _check_text("event id", self.event_id)
        _check_ts(self.ts)
        if not isinstance(self.severity, Severity):
            raise EventValidationError(f"severity must be a Severity (got: {self.severity!r:.80})")
        if len(self.values) > MAX_VALUES:
            raise EventValidationError(f"an event carries at most {MAX_VALUES} values")
        for value in self.values:
            if not isinstance(value, Measurement):
                raise EventValidationError(f"values must be Measurements (got: {value!r:.80})")
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
