"""Replay source: feeds a recording of readings (JSON lines) through the pipeline.

Each line is ``{"ts": ISO-8601, "device": str, "values": [{"n", "v", "u"}], "q": [flags]}``.
Used by the embedded demo and for re-running a field recording on a desk.
"""

from __future__ import annotations

import asyncio
import json
from datetime import datetime
from importlib import resources
from pathlib import Path
from typing import Any

from gateway.errors import EventValidationError
from gateway.types import Emit, Measurement, Reading, ReportError

DEMO_RECORDING = "gard-anduze-2020-09.jsonl"


def parse_line(source: str, line: str) -> Reading:
    """Decode one recording line; raises ValueError naming what is wrong."""
    try:
        data: Any = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not JSON: {exc.msg} at column {exc.colno}") from exc
    if not isinstance(data, dict):
        raise ValueError(f"a reading is an object (got: {type(data).__name__})")  # noqa: TRY004 -- callers catch ValueError for every malformed line
    try:
        ts = datetime.fromisoformat(data["ts"])
        values = tuple(Measurement(v["n"], v["v"], v.get("u")) for v in data["values"])
        return Reading(
            source=source,
            device=str(data["device"]),
            ts=ts,
            values=values,
            quality=tuple(data.get("q", ())),
        )
    except KeyError as exc:
        raise ValueError(f"missing key {exc}") from exc
    except (TypeError, AttributeError, EventValidationError) as exc:
        raise ValueError(str(exc)) from exc


def read_recording(path: Path | None) -> tuple[str, list[str]]:
    """The recording's name and lines: a file, or the bundled demo recording."""
    if path is None:
        text = resources.files("gateway.demo").joinpath(DEMO_RECORDING).read_text("utf-8")
        return DEMO_RECORDING, text.splitlines()
    return str(path), path.read_text("utf-8").splitlines()


class ReplaySource:
    """Emits every reading of a recording, optionally paced and looped."""

    def __init__(
        self, name: str, path: Path | None, interval_s: float, *, loop: bool = False
    ) -> None:
        self.name = name
        self._path = path
        self._interval_s = interval_s
        self._loop = loop

    async def run(self, emit: Emit, report_error: ReportError) -> None:
        label, lines = await asyncio.to_thread(read_recording, self._path)
        while True:
            for number, line in enumerate(lines, start=1):
                if not line.strip():
                    continue
                try:
                    reading = parse_line(self.name, line)
                except ValueError as exc:
                    report_error("malformed_reading", f"{label}:{number}: {exc}")
                    continue
                await emit(reading)
                if self._interval_s:
                    await asyncio.sleep(self._interval_s)
            if not self._loop:
                return
