"""Helpers for the broker tests: configs, recordings and a gateway in a child process."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from gateway.types import Event
from gateway.wire import Encoding, decode, decode_batch
from tests.support.mosquitto import Received

ROOT = Path(__file__).resolve().parents[2]


def write_recording(path: Path, n: int, device: str = "gauge-1") -> list[str]:
    """A recording of n readings; returns their timestamps in order (the readings' identity)."""
    start = datetime(2024, 6, 1, tzinfo=UTC)
    stamps = []
    with path.open("w", encoding="utf-8") as f:
        for i in range(n):
            ts = (start + timedelta(seconds=i)).isoformat().replace("+00:00", "Z")
            stamps.append(ts)
            line = {"ts": ts, "device": device, "values": [{"n": "water_level", "v": i, "u": "cm"}]}
            f.write(json.dumps(line) + "\n")
    return stamps


def mqtt_config(
    state_dir: Path,
    port: int,
    *,
    gateway_id: str = "gw-test",
    sources: list[dict[str, Any]] | None = None,
    **uplink: Any,
) -> dict[str, Any]:
    """A config dict for a plaintext local broker (tests opt into allow_insecure explicitly)."""
    up: dict[str, Any] = {
        "type": "mqtt",
        "host": "127.0.0.1",
        "port": port,
        "tls": {"enabled": False},
        "allow_insecure": True,
        "reconnect_min_s": 0.1,
        "reconnect_max_s": 0.5,
        "stats_interval_s": 3600,
    }
    up.update(uplink)
    return {
        "gateway": {"id": gateway_id, "state_dir": str(state_dir), "shutdown_flush_s": 5.0},
        "uplink": up,
        "sources": sources or [],
    }


def to_toml(data: dict[str, Any]) -> str:
    """Just enough TOML for the configs above (tables, arrays of tables, scalars)."""

    def scalar(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, int | float):
            return repr(v)
        return json.dumps(str(v))

    def table(prefix: str, body: dict[str, Any], out: list[str], header: str) -> None:
        out.append(header)
        nested = []
        for k, v in body.items():
            if isinstance(v, dict):
                nested.append((k, v))
            elif isinstance(v, list):
                continue
            else:
                out.append(f"{k} = {scalar(v)}")
        for k, v in nested:
            table(f"{prefix}.{k}", v, out, f"[{prefix}.{k}]")

    out: list[str] = []
    for key, value in data.items():
        if isinstance(value, dict):
            table(key, value, out, f"[{key}]")
        elif isinstance(value, list):
            for item in value:
                table(key, item, out, f"[[{key}]]")
    text = "\n".join(out) + "\n"
    assert tomllib.loads(text) == {k: v for k, v in data.items() if v != []}
    return text


def events_of(messages: list[Received], encoding: Encoding = Encoding.JSON) -> list[Event]:
    """Every event in the received messages, batches unpacked (state messages skipped)."""
    events: list[Event] = []
    for m in messages:
        if "/event/" not in m.topic:
            continue
        if m.topic.endswith("/event/batch"):
            events.extend(decode_batch(m.payload, encoding))
        else:
            events.append(decode(m.payload, encoding))
    return events


class Tally:
    """Events decoded from a recorder's messages incrementally (a predicate runs per message)."""

    def __init__(self, messages: list[Received], encoding: Encoding = Encoding.JSON) -> None:
        self._messages = messages
        self._encoding = encoding
        self._seen = 0
        self.events: list[Event] = []
        self.ids: set[str] = set()

    def update(self) -> Tally:
        new = self._messages[self._seen :]
        self._seen += len(new)
        for event in events_of(new, self._encoding):
            self.events.append(event)
            self.ids.add(event.event_id)
        return self

    def readings(self) -> list[Event]:
        return [e for e in self.update().events if e.kind == "reading"]

    def unique_readings(self) -> int:
        return len({e.event_id for e in self.readings()})


class GatewayProcess:
    """``edge-gateway run`` in a child process, its stdout (JSON log lines) collected."""

    def __init__(self, config_file: Path, env: dict[str, str] | None = None) -> None:
        self.config_file = config_file
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen[str] | None = None
        self.lines: list[str] = []
        self._reader: threading.Thread | None = None

    def start(self) -> GatewayProcess:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gateway.cli", "run", "-c", str(self.config_file)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=self.env,
            cwd=ROOT,
        )
        # A reader thread keeps the pipe drained so the child never blocks on a full pipe.
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        return self

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)

    def log(self) -> str:
        return "".join(self.lines)

    async def wait_log(self, needle: str, timeout: float = 15.0) -> None:
        """Wait (without blocking the event loop) until the gateway logs ``needle``."""
        deadline = time.monotonic() + timeout
        while needle not in self.log():
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"gateway exited {self.proc.returncode}:\n{self.log()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{needle!r} not logged in {timeout}s:\n{self.log()}")
            await asyncio.sleep(0.02)

    async def wait_exit(self, timeout: float = 15.0) -> int:
        return await asyncio.to_thread(self.wait, timeout)

    def signal(self, signum: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    def kill(self) -> None:
        self.signal(signal.SIGKILL)
        self.wait(10)

    def wait(self, timeout: float = 15.0) -> int:
        assert self.proc is not None
        code = self.proc.wait(timeout)
        if self._reader is not None:
            self._reader.join(5)
        return code


@contextmanager
def gateway_process(
    config_file: Path, env: dict[str, str] | None = None
) -> Iterator[GatewayProcess]:
    gw = GatewayProcess(config_file, env).start()
    try:
        yield gw
    finally:
        if gw.proc is not None and gw.proc.poll() is None:
            gw.kill()
