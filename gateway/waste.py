"""Waste image recognition for a citizen service: photo bytes -> citizen result and event.

The photo is decoded, classified and dropped inside this module's calls: the event that leaves
carries the label, calibrated scores, the town's fraction, the AI notice and the model's
provenance, and nothing from which the image could be rebuilt. Used by the daemon (an
``image_inbox`` source) and by ``edge-gateway waste classify``.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import orjson
import structlog

from drivers.inbox import BrokerInbox, ImageInbox, InboxImage
from gateway.errors import ModelError
from gateway.types import Emit, Event, Measurement, ReportError, Severity, utc_now
from gateway.waste_config import ImageInboxSourceConfig, WasteSection
from models.card import load_card
from models.waste.advice import (
    AI_NOTICE,
    DEFAULT_MUNICIPALITY,
    CitizenResult,
    Municipality,
    citizen_result,
    load_municipality,
)
from models.waste.preprocess import IMAGE_SIZE, ImageDecodeError, decode_image, preprocess, views

if TYPE_CHECKING:
    from gateway.config import GatewayConfig
    from gateway.inference import InferenceEngine, LoadedModel

__all__ = ["WasteInboxSource", "WasteService", "WasteSetup", "waste_setup"]

log = structlog.get_logger(__name__)

KIND_RESULT = "waste_classified"
KIND_REJECTED = "image_rejected"


@dataclass(frozen=True, slots=True)
class WasteSetup:
    """What the configuration selects: the card, the town's rules, the threshold."""

    card_path: Path
    model_name: str
    temperature: float
    tta: str  # "none" | "hflip": the views of one photo whose logits are averaged
    image_size: int  # the model's square input side in pixels (the card's input shape)
    uncertain_below: float
    municipality: Municipality
    municipality_path: Path


def waste_setup(cfg: GatewayConfig) -> WasteSetup:
    """Resolve ``[waste]``; ModelError naming the card or municipality file on a problem."""
    waste: WasteSection = cfg.waste
    card_path = cfg.inference.card_path(waste.card)
    card = load_card(card_path)
    temperature = card.params.get("temperature", 1.0)
    if not isinstance(temperature, int | float) or temperature <= 0:
        raise ModelError(f"{card_path}: params.temperature: must be a positive number")
    tta = card.params.get("tta", "none")
    if tta not in ("none", "hflip"):
        raise ModelError(f"{card_path}: params.tta: must be none or hflip (got: {tta!r})")
    shape = card.inputs[0].shape if card.inputs else []
    if len(shape) != 4 or not isinstance(shape[-1], int) or shape[-1] != shape[-2]:
        raise ModelError(
            f"{card_path}: inputs[0].shape: must be [batch, 3, size, size] (got: {shape})"
        )
    threshold = waste.uncertain_below
    if threshold is None:
        threshold = float(card.thresholds.get("uncertain_below", 0.5))
    path = waste.municipality or DEFAULT_MUNICIPALITY
    return WasteSetup(
        card_path=card_path,
        model_name=card.name,
        temperature=float(temperature),
        tta=str(tta),
        image_size=int(shape[-1]),
        uncertain_below=threshold,
        municipality=load_municipality(path),
        municipality_path=path,
    )


def prepare(data: bytes, tta: str = "none", size: int = IMAGE_SIZE) -> np.ndarray:
    """Image bytes -> the model's input (one row per view); ImageDecodeError with the reason.

    ``size`` is the model's square input side (:attr:`WasteSetup.image_size`). CPU-bound: the
    daemon calls it off the event loop.
    """
    return views(preprocess(decode_image(data, size), size), tta)


class WasteService:
    """Classifies photos with a loaded model (directly, or through the inference engine)."""

    def __init__(self, setup: WasteSetup) -> None:
        self.setup = setup

    def result(self, logits: np.ndarray) -> CitizenResult:
        """The citizen's result for one image's logits (one row per view, averaged)."""
        return citizen_result(
            np.asarray(logits).reshape(-1, logits.shape[-1]).mean(axis=0),
            temperature=self.setup.temperature,
            uncertain_below=self.setup.uncertain_below,
            municipality=self.setup.municipality,
        )

    def classify(self, model: LoadedModel, data: bytes) -> CitizenResult:
        """Synchronous: decode, run, post-process (the CLI's path)."""
        x = prepare(data, self.setup.tta, self.setup.image_size)
        return self.result(model.run({model.card.inputs[0].name: x})[0])

    async def classify_async(self, engine: InferenceEngine, data: bytes) -> CitizenResult:
        """Decode off the loop (a phone photo takes ~100 ms), run through the engine."""
        x = await asyncio.to_thread(prepare, data, self.setup.tta, self.setup.image_size)
        outputs = await engine.run(self.setup.model_name, {"image": x})
        return self.result(outputs[0])

    def event(self, result: CitizenResult, device: str, origin: str, provenance: Any) -> Event:
        """The upstream event: labels, calibrated scores, fraction, AI flag; no image data."""
        values = [
            Measurement("label", result.top[0].label),
            Measurement("score", round(result.top[0].score, 4)),
        ]
        for rank, ranked in enumerate(result.top[1:], start=2):
            values += [
                Measurement(f"label_{rank}", ranked.label),
                Measurement(f"score_{rank}", round(ranked.score, 4)),
            ]
        values += [
            Measurement("uncertain", result.uncertain),
            Measurement("municipality", result.municipality),
            Measurement("ai_generated", True),
            Measurement("origin", origin),
        ]
        if result.fraction is not None:
            values.append(Measurement("fraction", result.fraction))
        return Event(
            kind=KIND_RESULT,
            device=device,
            ts=utc_now(),
            severity=Severity.INFO,
            values=tuple(values),
            model=provenance,
            quality=("uncertain",) if result.uncertain else (),
        )

    def reply(self, result: CitizenResult, name: str, provenance: Any) -> bytes:
        """The answer for the sender of a photo over the local broker (stays local)."""
        body = result.as_json(name)
        body.update(
            ai_generated=True,
            notice=AI_NOTICE,
            municipality=result.municipality,
            model={
                "id": provenance.model_id,
                "version": provenance.version,
                "sha256": provenance.sha256,
            },
        )
        return orjson.dumps(body)


def rejected_event(device: str, origin: str, reason: str) -> Event:
    """An input that was not analysed, and why (the reason never quotes the input's bytes)."""
    return Event(
        kind=KIND_REJECTED,
        device=device,
        ts=utc_now(),
        severity=Severity.WARNING,
        values=(Measurement("reason", reason[:200]), Measurement("origin", origin)),
    )


class WasteInboxSource:
    """An ``image_inbox`` source: photos in, waste results out as events (never the photos)."""

    def __init__(
        self,
        cfg: ImageInboxSourceConfig,
        gateway_id: str,
        service: WasteService | None,
        engine: InferenceEngine | None,
        unavailable_reason: str = "",
    ) -> None:
        self.name = cfg.name
        self._service = service
        self._engine = engine
        self._unavailable = unavailable_reason or "the waste classifier is not loaded"
        broker = None
        if cfg.topic:
            broker = BrokerInbox(
                host=cfg.host,
                port=cfg.port,
                topic=cfg.topic,
                client_id=f"edge-gateway-{gateway_id}-{cfg.name}",
            )
        self.inbox = ImageInbox(
            cfg.name,
            directory=cfg.directory,
            broker=broker,
            max_bytes=cfg.max_bytes,
            poll_interval_s=cfg.poll_interval_s,
            settle_s=cfg.settle_s,
            keep_files=cfg.keep_files,
            once=cfg.once,
        )

    async def run(self, emit: Emit, report_error: ReportError) -> None:
        async def reject(origin: str, name: str, reason: str) -> None:
            # The file name is the citizen's or the kiosk's; the log keeps the reason only.
            report_error("image_rejected", f"{origin}: {reason}")
            await emit(rejected_event(self.name, origin, reason))

        async def handle(image: InboxImage) -> bytes | None:
            service, engine = self._service, self._engine
            if service is None or engine is None:
                await reject(image.origin, image.name, self._unavailable)
                return orjson.dumps({"error": self._unavailable})
            try:
                result = await service.classify_async(engine, image.data)
            except ImageDecodeError as exc:
                await reject(image.origin, image.name, str(exc))
                return orjson.dumps({"error": f"image rejected: {exc}"})
            except ModelError as exc:
                await reject(image.origin, image.name, f"classification failed: {exc}")
                return orjson.dumps({"error": "classification failed"})
            model = engine.active(service.setup.model_name)
            provenance = model.provenance(result.top[0].score, result.threshold)
            await emit(service.event(result, self.name, image.origin, provenance))
            log.info(
                "waste_classified",
                source=self.name,
                origin=image.origin,
                label=result.top[0].label,
                score=round(result.top[0].score, 3),
                uncertain=result.uncertain,
            )
            return service.reply(result, image.name.rsplit("/", 1)[-1], provenance)

        await self.inbox.run(handle, reject)
