"""The pool person-in-water detector: training, export and evaluation scripts, card and model.

:data:`DEFAULT_DETECTOR_CARD` is the card the default configuration selects (relative to the
models directory, resolved like every ``[inference]`` card); ``edge-gateway vision detect`` and
the pool analyzer use it unless told otherwise.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["DEFAULT_DETECTOR_CARD"]

DEFAULT_DETECTOR_CARD = Path("pool/person_detector.toml")
