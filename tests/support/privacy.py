"""Shared checks of the privacy tests: no image data in what the gateway sent, logged or wrote.

A test builds its own needles (pieces of its images, in the encodings a leak could take); these
helpers look for them in files the gateway owns and in files that appeared in the temp directory.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

# Files larger than this in the temp directory are not read (none of the gateway's are).
_MAX_SCANNED_BYTES = 50_000_000


def leaks(data: bytes, needles: Sequence[bytes]) -> bool:
    """Whether ``data`` contains any of the needles."""
    return any(needle in data for needle in needles)


def temp_entries() -> set[Path]:
    """What is in the temp directory now (compare before and after a run)."""
    return set(Path(tempfile.gettempdir()).iterdir())


def files(root: Path) -> Iterator[Path]:
    """Every regular file below ``root`` (symlinks not followed)."""
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            yield path


def assert_state_clean(state: Path, needles: Sequence[bytes]) -> None:
    """The gateway's state directory holds its outbox, and no file in it holds a needle."""
    state_files = list(files(state))
    assert any(p.name.startswith("outbox.sqlite3") for p in state_files)
    for path in state_files:
        assert not leaks(path.read_bytes(), needles), path


def assert_new_temp_files_clean(
    before: set[Path],
    needles: Sequence[bytes],
    *,
    frame_bytes: int | None = None,
    allowed_large: frozenset[str] = frozenset({".so", ".onnx"}),
) -> None:
    """No file that appeared in the temp directory since ``before`` holds a needle, nor (with
    ``frame_bytes``) is as large as a frame unless it is a library or a model."""
    for entry in temp_entries() - before:
        paths = [entry] if entry.is_file() else list(files(entry))
        for path in paths:
            if os.access(path, os.R_OK) and path.stat().st_size < _MAX_SCANNED_BYTES:
                data = path.read_bytes()
                assert not leaks(data, needles), path
                if frame_bytes is not None:
                    assert len(data) < frame_bytes or path.suffix in allowed_large, path
