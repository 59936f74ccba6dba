"""Model cards: what a model file is, where it came from, and what it takes and returns.

A card is a small TOML file next to its ``.onnx`` file::

    name = "water_level_forecaster"
    version = "1.0.0"
    task = "forecast"
    file = "forecaster.int8.onnx"          # relative to this card's directory
    sha256 = "9f86d0...(64 hex digits)"
    licence = "Apache-2.0"
    training_data = "hubeau-river-level-floods, stations ..., 2015-2019 (training portion)"
    quantization = "int8-qdq-static"

    [[inputs]]
    name = "window"
    shape = ["batch", 48]                  # a string is a symbolic dim (batchable if first)
    dtype = "float32"

    [[outputs]]
    name = "forecast"
    shape = ["batch", 1]
    dtype = "float32"

    [thresholds]
    anomaly = 0.5

The engine (``gateway.inference``) refuses a model whose file does not hash to ``sha256`` or whose
signature differs from ``inputs``/``outputs``. Pure: reading and writing card text, hashing a file;
no logging, no asyncio.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictFloat,
    StrictInt,
    StrictStr,
    ValidationError,
    field_validator,
    model_validator,
)

from gateway.errors import ModelError

__all__ = [
    "DTYPES",
    "ModelCard",
    "TensorSpec",
    "dump_card",
    "load_card",
    "parse_card",
    "sha256_file",
]

# Card dtype -> onnxruntime's type string for the same tensor element type.
DTYPES: dict[str, str] = {
    "float32": "tensor(float)",
    "float64": "tensor(double)",
    "float16": "tensor(float16)",
    "int64": "tensor(int64)",
    "int32": "tensor(int32)",
    "int16": "tensor(int16)",
    "int8": "tensor(int8)",
    "uint8": "tensor(uint8)",
    "bool": "tensor(bool)",
}
Dtype = Literal["float32", "float64", "float16", "int64", "int32", "int16", "int8", "uint8", "bool"]

_NAME_RE = re.compile(r"[a-z][a-z0-9_]{0,63}")
_SYMBOL_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
_SHA256_RE = re.compile(r"[0-9a-f]{64}")
# Hash in chunks: a model file may be larger than what we want in memory twice.
_CHUNK = 1 << 20

Dim = StrictInt | StrictStr
Param = StrictInt | StrictFloat | StrictStr | list[StrictFloat | StrictInt]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TensorSpec(_Strict):
    """One input or output: its name, shape (str = symbolic dim such as "batch") and dtype."""

    name: str = Field(min_length=1, max_length=256)
    shape: list[Dim]
    dtype: Dtype

    @field_validator("shape")
    @classmethod
    def _dims(cls, shape: list[int | str]) -> list[int | str]:
        for dim in shape:
            if isinstance(dim, int) and dim < 1:
                raise ValueError(f"a fixed dim must be at least 1 (got: {dim})")
            if isinstance(dim, str) and not _SYMBOL_RE.fullmatch(dim):
                raise ValueError(f"a symbolic dim must be an identifier (got: {dim!r})")
        return shape

    @property
    def batched(self) -> bool:
        """Whether the first dim is symbolic, so several calls can be stacked along it."""
        return bool(self.shape) and isinstance(self.shape[0], str)


class ModelCard(_Strict):
    """What a model is, where it came from, and what it takes and returns."""

    name: str = Field(description="lower_snake_case; the model id in every event.")
    version: str = Field(min_length=1, max_length=64)
    task: str = Field(description="forecast, detect, classify, ... (lower_snake_case).")
    file: str = Field(min_length=1, description="The .onnx file, relative to the card.")
    sha256: str = Field(description="Digest of the model file, 64 lowercase hex digits.")
    inputs: list[TensorSpec] = Field(min_length=1)
    outputs: list[TensorSpec] = Field(min_length=1)
    labels: list[str] = Field(default_factory=list)
    thresholds: dict[str, StrictFloat | StrictInt] = Field(default_factory=dict)
    preprocess: str = "none"
    postprocess: str = "none"
    params: dict[str, Param] = Field(default_factory=dict)
    licence: str = Field(min_length=1)
    training_data: str = Field(min_length=1)
    metrics: dict[str, StrictFloat | StrictInt | StrictStr] = Field(default_factory=dict)
    quantization: Literal["none", "int8-qdq-static", "int8-dynamic"] = "none"
    description: str = ""
    sample: str = Field(
        "",
        description="An .npz with one input set (relative to the card) for the warm-up run; "
        "empty: zeros.",
    )

    @field_validator("name", "task")
    @classmethod
    def _lower_snake(cls, value: str) -> str:
        if not _NAME_RE.fullmatch(value):
            raise ValueError("must be lower_snake_case (a-z, 0-9, _), at most 64 characters")
        return value

    @field_validator("sha256")
    @classmethod
    def _hex_digest(cls, value: str) -> str:
        if not _SHA256_RE.fullmatch(value):
            raise ValueError("must be 64 lowercase hex digits")
        return value

    @field_validator("file", "sample")
    @classmethod
    def _relative(cls, value: str) -> str:
        # Relative paths keep a card and its model relocatable as one directory.
        if value and Path(value).is_absolute():
            raise ValueError("must be relative to the card's directory")
        return value

    @field_validator("thresholds")
    @classmethod
    def _finite(cls, value: dict[str, float]) -> dict[str, float]:
        for key, number in value.items():
            if not math.isfinite(number):
                raise ValueError(f"{key} must be finite (got: {number})")
        return {key: float(number) for key, number in value.items()}

    @model_validator(mode="after")
    def _unique_names(self) -> ModelCard:
        for kind, specs in (("inputs", self.inputs), ("outputs", self.outputs)):
            names = [spec.name for spec in specs]
            if len(set(names)) != len(names):
                raise ValueError(f"{kind}: names must be unique (got: {names})")
        return self

    def model_path(self, card_path: Path) -> Path:
        """The model file this card describes, resolved against the card's directory."""
        return card_path.parent / self.file

    def sample_path(self, card_path: Path) -> Path | None:
        """The warm-up sample, if the card names one."""
        return card_path.parent / self.sample if self.sample else None

    @property
    def batched(self) -> bool:
        """Whether every input's first dim is symbolic (calls can be stacked along it)."""
        return all(spec.batched for spec in self.inputs) and all(
            spec.batched for spec in self.outputs
        )


def sha256_file(path: Path) -> str:
    """The lowercase hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _loc(loc: tuple[int | str, ...]) -> str:
    parts: list[str] = []
    for item in loc:
        parts.append(f"[{item}]" if isinstance(item, int) else (f".{item}" if parts else item))
    return "".join(parts) or "(top level)"


def _problems(exc: ValidationError) -> list[str]:
    lines = []
    for err in exc.errors(include_url=False):
        got = err.get("input")
        message = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            message = "unknown key"
        show = err["type"] != "missing" and not isinstance(got, dict)
        text = repr(got) if show else ""
        if len(text) > 80:
            text = text[:77] + "..."
        lines.append(f"{_loc(tuple(err['loc']))}: {message}" + (f" (got: {text})" if show else ""))
    return lines


def parse_card(data: dict[str, Any], source: str) -> ModelCard:
    """Validate card data already parsed from TOML; ``source`` names it in errors."""
    try:
        return ModelCard.model_validate(data)
    except ValidationError as exc:
        raise ModelError("; ".join(f"{source}: {p}" for p in _problems(exc))) from exc


def load_card(path: Path) -> ModelCard:
    """Read and validate a model card; every problem raises ModelError naming the file."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise ModelError(f"{path}: card: file not found") from exc
    except IsADirectoryError as exc:
        raise ModelError(f"{path}: card: is a directory") from exc
    except PermissionError as exc:
        raise ModelError(f"{path}: card: permission denied") from exc
    except OSError as exc:
        # A path through a file, a name too long, a symlink loop: a remote model_swap can name
        # any of these, and the caller handles ModelError only.
        raise ModelError(f"{path}: card: cannot read ({exc.strerror or exc})") from exc
    except UnicodeDecodeError as exc:
        raise ModelError(f"{path}: card: not UTF-8 text ({exc.reason})") from exc
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ModelError(f"{path}: card: TOML syntax error: {exc}") from exc
    return parse_card(data, str(path))


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        # TOML basic strings share JSON's escapes, except DEL which TOML wants escaped.
        return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} into a card")


def _toml_key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else _toml_value(key)


def dump_card(card: ModelCard) -> str:
    """The card as TOML text that :func:`load_card` reads back to an equal card."""
    data = card.model_dump()
    tables = ("thresholds", "params", "metrics")
    arrays = ("inputs", "outputs")
    lines = [
        f"{key} = {_toml_value(value)}"
        for key, value in data.items()
        if key not in tables and key not in arrays
    ]
    for key in arrays:
        for spec in data[key]:
            lines += ["", f"[[{key}]]"]
            lines += [f"{k} = {_toml_value(v)}" for k, v in spec.items()]
    for key in tables:
        if data[key]:
            lines += ["", f"[{key}]"]
            lines += [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in data[key].items()]
    return "\n".join(lines) + "\n"
