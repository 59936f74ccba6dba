"""Upstream commands for the model lifecycle: ``model_swap`` and ``model_shadow``.

``.../command/model_swap``   ``{"model": "water_level_forecaster", "card": "water_level/v2.toml"}``
    Verify and warm up the card's model, then make it the active one. On any failure the active
    model stays and the reply is a ``command_error`` naming the reason.
``.../command/model_shadow`` ``{"model": "...", "card": "water_level/v2.toml"}``
    Run the candidate beside the active model and compare (stats ``inference.models.X.shadow``);
    ``"card": ""`` stops it.

Cards are named relative to ``[inference] models_dir`` (or the shipped models) and may not leave
it: a remote command can choose among the models installed on the gateway, never point the
gateway at an arbitrary file. Installing a model file is an operator's deployment step.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from gateway.commands import CommandError, Handler
from gateway.config import InferenceSection
from gateway.errors import ModelError
from gateway.inference import InferenceEngine
from gateway.types import Measurement

__all__ = ["model_commands"]


def _text(args: Mapping[str, Any], key: str, *, empty: bool = False) -> str:
    value = args.get(key)
    if not isinstance(value, str) or (not value and not empty):
        raise CommandError(f"{key}: a non-empty string is required (got: {value!r})"[:200])
    return value


def _card(section: InferenceSection, text: str) -> Path:
    relative = Path(text)
    if relative.is_absolute() or ".." in relative.parts or "\\" in text:
        raise CommandError(
            f"card: must be a path below the models directory, without '..' (got: {text!r})"[:200]
        )
    return section.card_path(relative)


def model_commands(engine: InferenceEngine, section: InferenceSection) -> dict[str, Handler]:
    """The ``model_swap`` and ``model_shadow`` command handlers for one engine."""

    async def swap(args: Mapping[str, Any]) -> tuple[Measurement, ...]:
        name = _text(args, "model")
        path = _card(section, _text(args, "card"))
        try:
            model = await engine.swap(name, path)
        except ModelError as exc:
            raise CommandError(f"swap refused, the active model stays: {exc}"[:250]) from exc
        return (
            Measurement("model", model.model_id[:64]),
            Measurement("version", model.version),
            Measurement("sha256", model.sha256),
        )

    async def shadow(args: Mapping[str, Any]) -> tuple[Measurement, ...]:
        name = _text(args, "model")
        card = _text(args, "card", empty=True)
        if not card:
            engine.clear_shadow(name)
            return (Measurement("model", name[:64]), Measurement("shadow", "stopped"))
        try:
            candidate = await engine.set_shadow(name, _card(section, card))
        except ModelError as exc:
            raise CommandError(f"shadow refused: {exc}"[:250]) from exc
        return (
            Measurement("model", candidate.model_id[:64]),
            Measurement("shadow_version", candidate.version),
            Measurement("shadow_sha256", candidate.sha256),
        )

    return {"model_swap": swap, "model_shadow": shadow}
