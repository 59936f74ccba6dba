"""Configuration of the pool-safety analyzer: ``[pools.<name>]`` tables in ``gateway.toml``.

One table per camera::

    [pools.main]
    camera.url = "rtsp://pool-cam-1.local/stream1"
    camera.analysis_fps = 4
    water_area = [[40, 60], [600, 60], [620, 460], [20, 460]]
    candidate_after_s = 10
    alarm_after_s = 15
    local_alarm = { type = "mqtt", host = "127.0.0.1", topic = "pool/main/alarm" }

Frames never leave the analyzer; only compact events (track ids, boxes as numbers, states,
durations, model provenance) do.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from models.pool import DEFAULT_DETECTOR_CARD

__all__ = [
    "CameraConfig",
    "HealthConfig",
    "MqttAlarmConfig",
    "PoolConfig",
    "SerialAlarmConfig",
]

_TOPIC = re.compile(r"^[^#+\x00]{1,200}$")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CameraConfig(_Section):
    """Where frames come from (OpenCV: FFmpeg for streams and files, V4L2 for /dev/video*)."""

    url: str = Field(
        min_length=1,
        description="rtsp://..., http(s)://..., /dev/videoN, or a video file. Credentials in "
        "the URL are never logged.",
    )
    analysis_fps: float = Field(
        4.0, gt=0, le=30, description="Frames analysed per second; the newest frame wins."
    )
    pace: Literal["realtime", "fast"] = Field(
        "realtime",
        description="Video files only. realtime: played at their frame rate like a camera; "
        "fast: every analysis frame in file order, times from the file (tests, the demo).",
    )
    loop: bool = Field(False, description="Video files: start again at the end.")
    open_timeout_s: float = Field(10.0, gt=0)
    read_timeout_s: float = Field(5.0, gt=0)
    reconnect_min_s: float = Field(1.0, gt=0)
    reconnect_max_s: float = Field(30.0, gt=0)


class HealthConfig(_Section):
    """When the camera's view is not good enough to count as monitoring (see pool_health)."""

    no_frames_after_s: float = Field(5.0, gt=0, le=9)
    frozen_after_s: float = Field(5.0, gt=0, le=9)
    frozen_change_max: float = Field(0.05, ge=0)
    dark_brightness_max: float = Field(30.0, ge=0, le=255)
    low_visibility_contrast_max: float = Field(10.0, ge=0, le=128)
    blurred_sharpness_max: float = Field(40.0, ge=0)
    persist_s: float = Field(
        3.0, ge=0, le=6, description="A condition counts once it held this long."
    )
    recover_s: float = Field(3.0, ge=0, description="...and clears once gone this long.")


class MqttAlarmConfig(_Section):
    """Local alarm output: a topic on the pool's own broker (works with the uplink down)."""

    type: Literal["mqtt"]
    host: str = Field("127.0.0.1", min_length=1)
    port: int = Field(1883, ge=1, le=65535)
    topic: str = Field(
        "pool/alarm",
        description="Alarms, repeats and the all-clear; camera status goes to TOPIC/status.",
    )
    client_id: str = Field("", description="Empty: edge-gateway-<gateway id>-<pool>-alarm.")
    reconnect_max_s: float = Field(5.0, gt=0)

    @field_validator("topic")
    @classmethod
    def _topic(cls, value: str) -> str:
        if not _TOPIC.fullmatch(value):
            raise ValueError("a topic name without wildcards (+, #), 1-200 characters")
        return value


class SerialAlarmConfig(_Section):
    """Local alarm output: a relay (siren, light) switched by bytes written to a serial port."""

    type: Literal["serial"]
    port: str = Field(min_length=1, description="e.g. /dev/serial/by-id/usb-...relay...")
    baud: int = Field(9600, ge=50, le=4_000_000)
    # The widespread single-channel USB relay boards (CH340 "LCUS-1") switch with A0 01 01 A2 and
    # A0 01 00 A1; other boards differ, hence configurable.
    on_hex: str = Field("A00101A2", pattern=r"^([0-9a-fA-F]{2}){1,64}$")
    off_hex: str = Field("A00100A1", pattern=r"^([0-9a-fA-F]{2}){1,64}$")


AlarmOutputConfig = Annotated[MqttAlarmConfig | SerialAlarmConfig, Field(discriminator="type")]


class PoolConfig(_Section):
    """A pool camera watched for people who stop moving or go under in the water."""

    camera: CameraConfig
    device: str = Field("", max_length=256, description="Device id in events; empty: the name.")
    detector_card: Path = Field(
        DEFAULT_DETECTOR_CARD,
        description="The person detector's card (relative to [inference] models_dir).",
    )
    score_threshold: float | None = Field(
        None, gt=0, lt=1, description="Detection score threshold; empty: the card's."
    )
    water_area: list[tuple[float, float]] = Field(
        default_factory=list,
        description="Polygon of the water in image pixels [[x, y], ...]; empty: the whole "
        "image. Detections outside are ignored; a person lost far from its edge went under.",
    )
    candidate_after_s: float = Field(
        10.0, ge=5, le=30, description="T1: still (or gone under) this long → candidate."
    )
    alarm_after_s: float = Field(
        15.0, ge=5, le=30, description="T2: still this long (from the same onset) → alarm."
    )
    still_displacement: float = Field(
        0.3,
        gt=0,
        le=3,
        description="Moving less than this many person sizes (longer box side) counts as still.",
    )
    edge_margin: float = Field(
        0.5, ge=0, description="A person lost within this many sizes of the edge left the water."
    )
    disappearance: bool = Field(True, description="A person lost in the water counts as still.")
    min_hits: int = Field(2, ge=1, le=10, description="Detections before a track counts.")
    alarm_repeat_s: float = Field(
        10.0, ge=1, le=300, description="An unacknowledged alarm is repeated this often."
    )
    max_off_zone_s: float = Field(
        4 * 3600.0, gt=0, description="Longest detection-off duration a command may set."
    )
    health: HealthConfig = HealthConfig()
    local_alarm: AlarmOutputConfig | None = Field(
        None, description="Where the alarm sounds on site, independent of the uplink."
    )

    @field_validator("water_area")
    @classmethod
    def _polygon(cls, value: list[tuple[float, float]]) -> list[tuple[float, float]]:
        if value and len(value) < 3:
            raise ValueError("a polygon needs at least 3 points [[x, y], ...]")
        if any(x < 0 or y < 0 for x, y in value):
            raise ValueError("image coordinates cannot be negative")
        return value

    @model_validator(mode="after")
    def _timers(self) -> PoolConfig:
        if self.alarm_after_s < self.candidate_after_s:
            raise ValueError(
                f"alarm_after_s ({self.alarm_after_s:g}) must be at least candidate_after_s "
                f"({self.candidate_after_s:g}): both count from the moment a person stopped"
            )
        return self
