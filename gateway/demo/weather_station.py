"""The demo's serial sensor: a weather station printing ``T=..,H=..,P=..*hh`` lines on a pty.

``socat`` makes a pseudo-terminal pair; the gateway's ``serial_ascii`` source opens one end (as it
would open ``/dev/serial/by-id/...``), and :func:`feed` writes the station's lines on the other,
once the source has opened its port (a port flushes its input when opened, so earlier lines
would be lost, as with a real sensor). One line has a wrong checksum: the gateway rejects and
counts it. The source is configured with ``max_lines`` = the number of lines, so it ends and
the demo with it.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from drivers.ascii_lines import nmea_checksum

SOURCE_NAME = "weather-station"
DEVICE = "weather-station-anduze"

# A morning on the Gard: temperature rising, humidity falling, pressure dropping before a storm.
_READINGS = [
    (14.2, 91, 1012.4),
    (14.6, 90, 1012.3),
    (15.1, 88, 1012.1),
    (15.9, 85, 1011.9),
    (16.8, 81, 1011.6),
    (17.4, 78, 1011.2),
    (18.1, 74, 1010.9),
    (18.9, 71, 1010.5),
    (19.6, 69, 1010.0),
    (20.2, 66, 1009.6),
    (20.9, 64, 1009.1),
    (21.4, 62, 1008.7),
]
# This line's checksum is computed for 16.8 degrees and one digit is flipped on the way, as
# noise on a long cable would: the gateway must reject it, not report 66.8 degrees.
_CORRUPTED = 4


def station_lines() -> list[bytes]:
    """The station's output: one CRLF-terminated line per reading, one of them corrupted."""
    lines = []
    for index, (t, h, p) in enumerate(_READINGS):
        body = f"T={t:.1f},H={h},P={p:.1f}"
        checksum = nmea_checksum(body)
        if index == _CORRUPTED:
            body = body.replace("T=1", "T=6", 1)
        lines.append(f"{body}*{checksum:02X}\r\n".encode("ascii"))
    return lines


def source_config(port: Path, lines: int) -> dict[str, Any]:
    """The demo's serial_ascii source for the station (ends after ``lines`` lines)."""
    return {
        "type": "serial_ascii",
        "name": SOURCE_NAME,
        "device": DEVICE,
        "port": str(port),
        "baud": 9600,
        "format": "keyvalue",
        "checksum": "nmea",
        "max_lines": lines,
        "fields": [
            {"key": "T", "name": "air_temperature", "unit": "Cel"},
            {"key": "H", "name": "relative_humidity", "unit": "%"},
            {"key": "P", "name": "air_pressure", "unit": "hPa"},
        ],
    }


def socat_available() -> bool:
    return shutil.which("socat") is not None


@asynccontextmanager
async def pty_pair(directory: Path) -> AsyncIterator[tuple[Path, Path]]:
    """socat's pty pair as (gateway side, station side) links in ``directory``."""
    gateway_side, station_side = directory / "weather-station", directory / "station"
    proc = await asyncio.create_subprocess_exec(
        "socat",
        f"pty,raw,echo=0,link={gateway_side}",
        f"pty,raw,echo=0,link={station_side}",
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        async with asyncio.timeout(5):
            # socat makes the links once both ptys exist; there is nothing to await but them.
            while not (gateway_side.exists() and station_side.exists()):
                if proc.returncode is not None:
                    raise RuntimeError(f"socat exited {proc.returncode}")
                await asyncio.sleep(0.01)
        yield gateway_side, station_side
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        await proc.wait()


async def feed(station_side: Path, lines: list[bytes], interval_s: float) -> None:
    """Write the lines on the station's side, paced like a (fast) real station."""
    fd = await asyncio.to_thread(os.open, station_side, os.O_RDWR | os.O_NOCTTY)
    try:
        for line in lines:
            await asyncio.to_thread(os.write, fd, line)
            await asyncio.sleep(interval_s)
    finally:
        os.close(fd)
