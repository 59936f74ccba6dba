"""The upstream wire format: the one module that knows how an event looks on the wire.

Compact JSON (default) and CBOR (RFC 8949) carry the same map with short keys. Measurements use
SenML's (RFC 8428) short names ``n``, ``v``, ``u`` so platform teams recognise them.
"""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

import cbor2
import orjson

from gateway.errors import EventValidationError
from gateway.types import Event, Measurement, Provenance, Severity


class Encoding(StrEnum):
    """Payload encodings offered upstream."""

    JSON = "json"
    CBOR = "cbor"


CONTENT_TYPES = {Encoding.JSON: "application/json", Encoding.CBOR: "application/cbor"}

# CBOR indefinite-length array framing (RFC 8949 §3.2.2): lets a batch be the concatenation of
# already-encoded events without decoding them again.
_CBOR_ARRAY_START = b"\x9f"
_CBOR_BREAK = b"\xff"


def to_wire(event: Event) -> dict[str, Any]:
    """The event as the documented wire map (empty optional fields left out)."""
    out: dict[str, Any] = {
        "v": event.schema,
        "id": event.event_id,
        # Always UTC on the wire, whatever zone the source used.
        "ts": event.ts.astimezone(UTC),
        "kind": event.kind,
        "dev": event.device,
        "sev": event.severity.value,
    }
    if event.values:
        out["vals"] = [
            {"n": m.name, "v": m.value}
            if m.unit is None
            else {"n": m.name, "v": m.value, "u": m.unit}
            for m in event.values
        ]
    if event.model is not None:
        p = event.model
        out["model"] = {
            "id": p.model_id,
            "ver": p.version,
            "sha256": p.sha256,
            "score": p.score,
            "thr": p.threshold,
        }
    if event.quality:
        out["q"] = list(event.quality)
    return out


def from_wire(data: dict[str, Any]) -> Event:
    """Rebuild an event from its wire map; raises EventValidationError on anything malformed."""
    try:
        ts = data["ts"]
        if isinstance(ts, str):
            ts = datetime.fromisoformat(ts)
        elif isinstance(ts, int | float):
            ts = datetime.fromtimestamp(ts, UTC)
        model = data.get("model")
        vals = data.get("vals", [])
        flags = data.get("q", [])
        if not isinstance(vals, list) or not isinstance(flags, list):
            raise EventValidationError("vals and q must be arrays")
        return Event(
            kind=data["kind"],
            device=data["dev"],
            ts=ts,
            severity=Severity(data["sev"]),
            values=tuple(Measurement(m["n"], m["v"], m.get("u")) for m in vals),
            model=None
            if model is None
            else Provenance(
                model["id"], model["ver"], model["sha256"], model["score"], model["thr"]
            ),
            quality=tuple(flags),
            event_id=data["id"],
            schema=data["v"],
        )
    # OverflowError/OSError: an epoch number that no datetime can hold (fromtimestamp).
    except (KeyError, TypeError, ValueError, AttributeError, OverflowError, OSError) as exc:
        raise EventValidationError(f"not an event: {exc!r:.200}") from exc


def encode(event: Event, encoding: Encoding) -> bytes:
    """Serialise one event."""
    wire = to_wire(event)
    if encoding is Encoding.CBOR:
        # datetime_as_timestamp: tag 1 (epoch seconds) is 9 bytes against ~30 for the ISO string;
        # canonical: floats in the shortest exact width (712.0 takes 3 bytes, not 9).
        encoded: bytes = cbor2.dumps(wire, datetime_as_timestamp=True, canonical=True)
        return encoded
    # orjson hands back a bytes object inside its 4 KiB write buffer; an event waiting for its
    # commit would pin all of it (5 MB for a thousand queued events), so keep an exact copy.
    return bytes(memoryview(orjson.dumps(wire, option=orjson.OPT_UTC_Z)))


def decode(payload: bytes, encoding: Encoding) -> Event:
    """Parse one event."""
    try:
        data = cbor2.loads(payload) if encoding is Encoding.CBOR else orjson.loads(payload)
    except (ValueError, cbor2.CBORDecodeError) as exc:
        raise EventValidationError(f"undecodable {encoding.value} payload: {exc}") from exc
    if not isinstance(data, dict):
        raise EventValidationError(f"an event is a map (got: {type(data).__name__})")
    return from_wire(data)


def encode_batch(payloads: list[bytes], encoding: Encoding) -> bytes:
    """Join already-encoded events into one array payload without re-encoding them."""
    if encoding is Encoding.CBOR:
        return _CBOR_ARRAY_START + b"".join(payloads) + _CBOR_BREAK
    return b"[" + b",".join(payloads) + b"]"


def decode_batch(payload: bytes, encoding: Encoding) -> list[Event]:
    """Parse an array payload produced by :func:`encode_batch`."""
    try:
        data = cbor2.loads(payload) if encoding is Encoding.CBOR else orjson.loads(payload)
    except (ValueError, cbor2.CBORDecodeError) as exc:
        raise EventValidationError(f"undecodable {encoding.value} batch: {exc}") from exc
    if not isinstance(data, list):
        raise EventValidationError(f"a batch is an array (got: {type(data).__name__})")
    return [from_wire(item) for item in data]


def dumps_json(data: Any) -> bytes:
    """Compact JSON for state and command messages (not events)."""
    return orjson.dumps(data, option=orjson.OPT_UTC_Z | orjson.OPT_NON_STR_KEYS)


def loads_json(payload: bytes) -> Any:
    """Parse JSON; raises ValueError on malformed input."""
    return orjson.loads(payload)
