"""The codec registry, the error type it exports, and the codecs' purity."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import drivers.codecs
from drivers.codecs import CODECS, CodecError, get_codec
from gateway import errors


def test_get_codec_returns_the_registered_function() -> None:
    assert get_codec("elsys-ers") is CODECS["elsys-ers"]


def test_unknown_name_lists_the_known_ones() -> None:
    with pytest.raises(KeyError) as raised:
        get_codec("dragino-ldds99")
    message = str(raised.value)
    assert "'dragino-ldds99'" in message
    assert "milesight-em410-rdl" in message
    assert "dragino-lht65" in message


def test_codec_error_is_the_gateways() -> None:
    assert CodecError is errors.CodecError
    assert issubclass(CodecError, ValueError)


def test_names_are_stable_vendor_prefixed_slugs() -> None:
    for name, codec in CODECS.items():
        vendor = name.split("-", 1)[0]
        assert vendor in {"dragino", "decentlab", "elsys", "milesight"}
        assert name == name.lower()
        assert codec.__module__ == f"drivers.codecs.{vendor}"
        assert codec.__name__.startswith("decode_")


# Codecs are pure functions (ARCHITECTURE.md): no event loop, logging, clocks or I/O, and nothing
# from the gateway but its error type.
_ALLOWED_IMPORTS = {
    "__future__",
    "collections.abc",
    "dataclasses",
    "decimal",
    "struct",  # byte layouts, nothing else
    "typing",
    "gateway.errors",
}


def test_codec_modules_import_nothing_impure() -> None:
    package = Path(drivers.codecs.__file__).parent
    for source in sorted(package.glob("*.py")):
        tree = ast.parse(source.read_text("utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                modules = [node.module or ""]
            else:
                continue
            for module in modules:
                assert module in _ALLOWED_IMPORTS or module.startswith("drivers.codecs"), (
                    f"{source.name} imports {module}"
                )
