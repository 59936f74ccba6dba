"""Configuration of waste image recognition: ``[waste]`` and ``type = "image_inbox"`` sources.

Kept apart from :mod:`gateway.config` (which imports these) so the waste service's keys are read
in one place::

    [waste]
    card = "waste/classifier.toml"      # relative to [inference] models_dir
    municipality = "/etc/edge-gateway/abfall-musterstadt.toml"   # empty: general German rules
    uncertain_below = 0.5               # calibrated top-1 probability; empty: the card's

    [[sources]]
    type = "image_inbox"
    name = "kiosk"
    directory = "/var/lib/edge-gateway/inbox"
    topic = "edge-gateway/waste/image/+"
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = ["ImageInboxSourceConfig", "WasteSection"]

_TOPIC_FILTER = re.compile(r"^[^#+]*(/\+)*(/#)?$|^[^#]*$")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class WasteSection(_Section):
    """Waste image recognition: which model, which town's rules, when to ask for another photo."""

    card: Path = Field(
        Path("waste/classifier.toml"),
        description="The classifier's model card, relative to [inference] models_dir (default: "
        "the shipped models).",
    )
    municipality: Path | None = Field(
        None,
        description="The town's label -> waste fraction and advice file (TOML); empty: general "
        "German rules (models/waste/municipalities/default-de.toml).",
    )
    uncertain_below: float | None = Field(
        None,
        gt=0,
        lt=1,
        description="Calibrated top-1 probability below which a result is 'uncertain' (the "
        "citizen is asked for another photo); empty: the card's threshold.",
    )


class ImageInboxSourceConfig(_Section):
    """Photos to classify: files dropped into a directory and/or messages on the local broker.

    Images are held in memory only; each is deleted from the directory after analysis (unless
    ``keep_files``). Events carry the result, never the image.
    """

    type: Literal["image_inbox"]
    name: str = Field("inbox", min_length=1, max_length=64)
    directory: Path | None = Field(
        None, description="Watched directory; writers should write elsewhere and rename in."
    )
    poll_interval_s: float = Field(0.5, gt=0, le=60, description="How often it is scanned.")
    settle_s: float = Field(
        0.5, ge=0, le=60, description="A file changed more recently than this is left for later."
    )
    keep_files: bool = Field(
        False, description="Leave files in the directory after analysis (off: delete them)."
    )
    once: bool = Field(
        False,
        description="Take the files in the directory at start, then finish (batch runs, the "
        "demo); not with a topic.",
    )
    host: str = Field("127.0.0.1", description="The local broker for topic.")
    port: int = Field(1883, ge=1, le=65535)
    topic: str = Field(
        "",
        description="Topic filter carrying JPEG/PNG payloads; a result is published on the "
        "message's topic + '/result'. Empty: no broker intake.",
    )
    max_bytes: int = Field(
        8_000_000, ge=1024, le=64_000_000, description="Larger images are rejected unread."
    )

    @model_validator(mode="after")
    def _has_input(self) -> ImageInboxSourceConfig:
        if self.directory is None and not self.topic:
            raise ValueError("needs a directory, a topic, or both")
        if self.once and (self.topic or self.directory is None):
            raise ValueError("once takes a directory's files and finishes: not with a topic")
        if self.topic and ("#" in self.topic[:-1] or not _TOPIC_FILTER.match(self.topic)):
            raise ValueError(f"topic: not a valid MQTT topic filter (got: {self.topic!r})")
        return self
