"""The analyzers in the running gateway: readings of configured devices → one analysed event each.

The composition root (``gateway/app.py``) calls :meth:`Analyzers.analyze` in a source's emit path,
before the pipeline: the rules run on the event loop (microseconds), the model runs through the
:class:`~gateway.inference.InferenceEngine`, off the loop, within its thread budget and timeout.
Readings of devices without an analyzer pass by with one dictionary lookup.

A model that is unavailable, fails or times out never stops a warning: the rules' verdict goes out
with the flag ``no_score`` (counted), and the model is tried again on the next reading.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import structlog

from gateway.analyzers.config import AnalyzerConfig
from gateway.analyzers.water_level import DeviceAnalyzers, ModelRef, to_event
from gateway.errors import EventValidationError, ModelError
from gateway.health import Metrics
from gateway.inference import InferenceEngine, LoadedModel
from gateway.pipeline import reading_to_event
from gateway.types import Event, Reading
from models.water_level.features import ForecastParams

__all__ = ["Analyzers", "model_ref"]

log = structlog.get_logger(__name__)


def model_ref(model: LoadedModel) -> ModelRef:
    """Provenance and threshold of a loaded forecaster (its card's ``thresholds.anomaly``)."""
    threshold = model.card.thresholds.get("anomaly")
    if threshold is None:
        raise ModelError(f"{model.card_path}: thresholds.anomaly: missing")
    return ModelRef(model.model_id, model.version, model.sha256, threshold)


def _params(model: LoadedModel) -> ForecastParams:
    try:
        return ForecastParams.from_params(model.card.params)
    except ValueError as exc:
        raise ModelError(f"{model.card_path}: {exc}") from exc


class Analyzers:
    """The configured analyzers of a running gateway."""

    def __init__(
        self,
        configs: Mapping[str, AnalyzerConfig],
        engine: InferenceEngine,
        metrics: Metrics,
    ) -> None:
        """Build after ``engine.load_configured()``: the models' feature definitions are read
        from their cards here (a model unavailable now gets the default definition and its
        analyzers run on rules alone until it loads)."""
        self._engine = engine
        self._metrics = metrics
        self._configs = {device: cfg for cfg in configs.values() for device in cfg.devices}
        params: dict[str, ForecastParams] = {}
        for name, cfg in configs.items():
            if not cfg.model or cfg.model in params:
                continue
            if engine.available(cfg.model):
                try:
                    params[cfg.model] = _params(engine.active(cfg.model))
                    model_ref(engine.active(cfg.model))
                except ModelError as exc:
                    log.error("analyzer_model_unusable", analyzer=name, error=str(exc))
            else:
                log.error(
                    "analyzer_degraded",
                    analyzer=name,
                    model=cfg.model,
                    reason=engine.unavailable().get(cfg.model, "not loaded ([inference] cards)"),
                )
        self._params = params
        self._devices = DeviceAnalyzers(configs, params)

    def handles(self, device: str) -> bool:
        return device in self._configs

    async def analyze(self, reading: Reading) -> Event:
        """The reading's one event: its values, the verdict, the reasons and the provenance."""
        cfg = self._configs[reading.device]
        pending = self._devices.observe(reading)
        prediction: float | None = None
        ref: ModelRef | None = None
        if pending.features is not None and cfg.model:
            prediction, ref = await self._predict(cfg.model, pending.features, reading.device)
        analysis = pending.analyzer.complete(pending, prediction, ref)
        self._metrics.inc("readings_analyzed")
        if analysis.anomaly:
            self._metrics.inc("analyzer_warnings")
        try:
            return to_event(reading, analysis, cfg)
        except EventValidationError as exc:
            # Cannot happen with valid readings; if it does, the reading still goes out as it is.
            self._metrics.inc("analyzer_event_invalid")
            log.warning("analyzer_event_invalid", device=reading.device, error=str(exc))
            return reading_to_event(reading)

    async def _predict(
        self, name: str, features: list[float], device: str
    ) -> tuple[float | None, ModelRef | None]:
        engine = self._engine
        try:
            # The model that answers is read before the call: a swap during it changes the
            # next reading's provenance, not this one's.
            model = engine.active(name)
            if name not in self._params:
                self._params[name] = _params(model)
            ref = model_ref(model)
            spec = model.card.inputs[0]
            outputs = await engine.run(name, {spec.name: np.asarray([features], np.float32)})
            return float(outputs[0].reshape(-1)[0]), ref
        except ModelError as exc:
            self._metrics.inc("analyzer_no_score")
            log.warning("analyzer_no_score", device=device, model=name, error=str(exc))
            return None, None
