"""Configuration of the series analyzers: ``[analyzers.<name>]`` tables in ``gateway.toml``.

One table per gauge (or group of gauges sharing thresholds), attached to devices by their id as
it appears in events (a LoRaWAN devEUI, a serial source's ``device``, a recording's device)::

    [analyzers.anduze]
    profile = "water-level"
    devices = ["a84041000181c071"]
    stages_cm = [250.0, 400.0, 550.0, 700.0]

``profile`` chooses the defaults of every key not given: ``water-level`` reads the measurement as
a level (converted to cm from its unit) and adds warning stages and rate of rise; ``generic``
knows nothing of units (learned score, robust outliers, flatline, gap only).
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

__all__ = ["PROFILE_DEFAULTS", "AnalyzerConfig", "Profile"]

Profile = Literal["generic", "water-level"]

_NAME = re.compile(r"[a-z][a-z0-9_]{0,63}")

# What differs between the profiles; everything else has one default. The water-level values are
# the published or reasoned defaults of a small-river gauge, not fitted to any data set:
# - rise_cm / rise_window_s: > 22 cm in 3 h, a published flash-flood criterion;
# - stages_cm: placeholders for four Meldestufen of a small river (every gauge needs its own);
# - outlier_min_scale 2 cm: a radar or ultrasonic gauge resolves about 1 cm; an echo spike is
#   tens of cm, so deviations under 6 x 2 cm are never called spikes;
# - sentinel 0: what gauges and their data loggers write when no echo or no value came (a
#   real level of exactly 0.000 at a gauge's datum is rarer than a dropout);
# - flatline over 12 h and 24 readings: a calm river read to the cm can sit on one value for a
#   few hours, a stuck sensor stays there for days.
PROFILE_DEFAULTS: dict[str, dict[str, Any]] = {
    "generic": {
        "stages_cm": [],
        "rise_cm": None,
        "sentinel_values": [],
        "outlier_min_scale": 0.0,
        "flatline_duration_s": 0.0,
    },
    "water-level": {
        "stages_cm": [200.0, 300.0, 400.0, 500.0],
        "rise_cm": 22.0,
        "sentinel_values": [0.0],
        "outlier_min_scale": 2.0,
        "flatline_duration_s": 12 * 3600.0,
    },
}


class AnalyzerConfig(BaseModel):
    """A series analyzer (water level or generic) attached to devices."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    profile: Profile = Field(
        "water-level",
        description="water-level: the value is a level (cm), with stages and rate of rise; "
        "generic: no units (learned score, outliers, flatline, gap). Sets the defaults below.",
    )
    devices: list[str] = Field(
        default_factory=list,
        description="Device ids as in events (LoRaWAN devEUI, serial device, recording device).",
    )
    measurement: str = Field("water_level", description="The measurement analysed.")
    model: str = Field(
        "water_level_forecaster",
        description="The learned model ([inference] model name); empty: rules only.",
    )
    anomaly_threshold: float | None = Field(
        None,
        gt=0,
        lt=1,
        description="Score at or above which a reading is anomalous; "
        "empty: the model card's threshold.",
    )
    valid_min: float | None = Field(
        None, description="Plausible range of the value (cm for water-level); outside: invalid."
    )
    valid_max: float | None = None
    sentinel_values: list[float] = Field(
        default_factory=lambda: [0.0],
        description="Values a sensor reports instead of a measurement (e.g. 0, -9999): invalid.",
    )
    outlier_window: int = Field(12, ge=5, le=500, description="Readings in the rolling median/MAD.")
    outlier_k: float = Field(6.0, gt=0, description="Robust deviations that make an outlier.")
    outlier_min_scale: float = Field(
        2.0, ge=0, description="Floor of the robust deviation (cm for water-level)."
    )
    flatline_readings: int = Field(
        24, ge=2, description="Identical readings in a row that make a flatline (stuck sensor)..."
    )
    flatline_duration_s: float = Field(12 * 3600.0, ge=0, description="...spanning this long.")
    flatline_tolerance: float = Field(
        0.0, ge=0, description="Readings this close to the first of the run count as identical."
    )
    gap_after_s: float | None = Field(
        None,
        gt=0,
        description="A reading this long after the previous one reports a gap; "
        "empty: gap_factor x the usual interval (learned).",
    )
    gap_factor: float = Field(3.0, gt=1)
    stages_cm: list[float] = Field(
        default_factory=lambda: [200.0, 300.0, 400.0, 500.0],
        max_length=4,
        description="Warning stages 1..4 (Meldestufen), ascending levels in cm.",
    )
    stage_hysteresis_cm: float = Field(
        10.0, ge=0, description="A stage is left only below its level minus this."
    )
    rise_cm: float | None = Field(
        22.0, gt=0, description="Rate-of-rise warning: a rise of more than this..."
    )
    rise_window_s: float = Field(3 * 3600.0, gt=0, description="...within this time.")
    rise_hysteresis_cm: float = Field(
        5.0, ge=0, description="The warning ends once the rise is this much below rise_cm."
    )
    battery_measurement: str = Field("battery", description="Unit V or %.")
    battery_low_v: float = Field(3.3, ge=0)
    battery_low_pct: float = Field(20.0, ge=0, le=100)
    battery_drop_v: float = Field(
        0.2, gt=0, description="battery_falling: a drop of this much within battery_window_s."
    )
    battery_drop_pct: float = Field(10.0, gt=0, le=100)
    battery_window_s: float = Field(7 * 86400.0, gt=0)

    @model_validator(mode="before")
    @classmethod
    def _profile_defaults(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        profile = data.get("profile", "water-level")
        defaults = PROFILE_DEFAULTS.get(profile) if isinstance(profile, str) else None
        if defaults is None:
            return data  # the Literal check names the bad profile
        return {**defaults, **data}

    @field_validator("measurement", "battery_measurement")
    @classmethod
    def _measurement_name(cls, value: str) -> str:
        if not _NAME.fullmatch(value):
            raise ValueError("must be lower_snake_case (a-z, 0-9, _), at most 64 characters")
        return value

    @field_validator("devices")
    @classmethod
    def _unique_devices(cls, value: list[str]) -> list[str]:
        duplicates = sorted({d for d in value if value.count(d) > 1})
        if duplicates:
            raise ValueError(f"listed more than once: {duplicates}")
        if any(not d for d in value):
            raise ValueError("a device id cannot be empty")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> AnalyzerConfig:
        if self.profile == "generic" and (self.stages_cm or self.rise_cm is not None):
            raise ValueError(
                "stages_cm and rise_cm are level rules: they need profile = 'water-level'"
            )
        if any(b <= a for a, b in zip(self.stages_cm, self.stages_cm[1:], strict=False)):
            raise ValueError(f"stages_cm must ascend (got: {self.stages_cm})")
        if (
            self.valid_min is not None
            and self.valid_max is not None
            and self.valid_max <= self.valid_min
        ):
            raise ValueError(f"valid_max must be above valid_min (got: {self.valid_max})")
        return self
