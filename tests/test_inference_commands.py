"""The model_swap / model_shadow upstream commands, through Commands.handle, on a real engine."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest

from gateway.commands import Commands
from gateway.config import InferenceSection
from gateway.inference import InferenceEngine
from gateway.model_commands import model_commands
from gateway.types import Event
from tests.support.tiny_models import linear_card, linear_card_data, linear_model, write_card


@pytest.fixture
async def setup(tmp_path: Path) -> AsyncIterator[tuple[Commands, InferenceEngine, Path]]:
    models = tmp_path / "models"
    linear_card(models / "v1")
    model = linear_model(models / "v2" / "m.onnx", seed=1)
    write_card(models / "v2" / "c.toml", linear_card_data(model, version="2.0.0"))
    section = InferenceSection(models_dir=models, cards=[Path("v1/tiny_linear.toml")])
    async with InferenceEngine(section) as engine:
        await engine.load_configured()
        commands = Commands("gw", model_commands(engine, section))
        yield commands, engine, models


def _values(event: Event) -> dict[str, object]:
    return {m.name: m.value for m in event.values}


async def _send(commands: Commands, name: str, args: dict[str, object]) -> Event:
    return await commands.handle(name, json.dumps(args).encode())


async def test_swap_command_activates_the_new_model(
    setup: tuple[Commands, InferenceEngine, Path],
) -> None:
    commands, engine, _ = setup
    reply = await _send(commands, "model_swap", {"model": "tiny_linear", "card": "v2/c.toml"})
    assert reply.kind == "command_result"
    values = _values(reply)
    assert values["version"] == "2.0.0"
    assert values["sha256"] == engine.active("tiny_linear").sha256
    assert engine.active("tiny_linear").version == "2.0.0"


async def test_failed_swap_command_keeps_the_model_and_says_why(
    setup: tuple[Commands, InferenceEngine, Path],
) -> None:
    commands, engine, models = setup
    (models / "v2" / "m.onnx").write_bytes(b"tampered")
    reply = await _send(commands, "model_swap", {"model": "tiny_linear", "card": "v2/c.toml"})
    assert reply.kind == "command_error"
    error = str(_values(reply)["error"])
    assert error.startswith("swap refused, the active model stays: ")
    assert "sha256" in error
    assert engine.active("tiny_linear").version == "1.0.0"
    assert engine.stats()["models"]["tiny_linear"]["swap_failures"] == 1


@pytest.mark.parametrize(
    "card", ["/etc/passwd", "../outside.toml", "v1/../../x.toml", "", 5, "v1\\..\\x.toml"]
)
async def test_cards_outside_the_models_dir_are_refused(
    setup: tuple[Commands, InferenceEngine, Path], card: object
) -> None:
    commands, engine, _ = setup
    reply = await _send(commands, "model_swap", {"model": "tiny_linear", "card": card})
    assert reply.kind == "command_error"
    assert str(_values(reply)["error"]).startswith("card: ")
    assert engine.stats()["models"]["tiny_linear"]["swap_failures"] == 0


@pytest.mark.parametrize(
    ("command", "card", "expected"),
    [
        # A path through a file, a name too long: OSErrors other than "not found" used to
        # escape the handler and end the gateway.
        ("model_swap", "v2/c.toml/x.toml", "swap refused, the active model stays: "),
        ("model_swap", "x" * 300 + ".toml", "swap refused, the active model stays: "),
        ("model_shadow", "v2/c.toml/x.toml", "shadow refused: "),
    ],
)
async def test_unreadable_card_paths_are_refused_not_fatal(
    setup: tuple[Commands, InferenceEngine, Path], command: str, card: str, expected: str
) -> None:
    commands, engine, _ = setup
    reply = await _send(commands, command, {"model": "tiny_linear", "card": card})
    assert reply.kind == "command_error"
    error = str(_values(reply)["error"])
    assert error.startswith(expected)
    # (The reply's text is cut at 250 characters: the long name leaves no room for the reason.)
    assert "cannot read" in error or len(card) > 250
    assert engine.active("tiny_linear").version == "1.0.0"


async def test_shadow_command_starts_and_stops(
    setup: tuple[Commands, InferenceEngine, Path],
) -> None:
    commands, engine, _ = setup
    reply = await _send(commands, "model_shadow", {"model": "tiny_linear", "card": "v2/c.toml"})
    assert reply.kind == "command_result"
    assert _values(reply)["shadow_version"] == "2.0.0"
    await engine.run("tiny_linear", {"x": np.ones((1, 4), np.float32)})
    await engine.wait_idle()
    assert engine.stats()["models"]["tiny_linear"]["shadow"]["runs"] == 1
    reply = await _send(commands, "model_shadow", {"model": "tiny_linear", "card": ""})
    assert _values(reply)["shadow"] == "stopped"
    assert engine.stats()["models"]["tiny_linear"]["shadow"] is None
    reply = await _send(commands, "model_shadow", {"model": "absent", "card": "v2/c.toml"})
    assert reply.kind == "command_error"
    assert "not loaded" in str(_values(reply)["error"])
