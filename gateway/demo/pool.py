"""The demo's pool camera: the pool-safety analyzer on a bundled synthetic clip.

``pool-demo.mp4`` (22 s, 4 frames/s, 320x240, made by ``models/pool/synth.py``, scenario
``demo``): two people in a drawn pool; one swims for 3 s and then floats still, the other swims
lengths all the time. The camera source reads the file in ``fast`` pace: frames are analysed as
fast as the detector goes, and every time (tracking, stillness, T1 = 10 s, T2 = 15 s) is the
clip's own, so the demo shows a ``pool_candidate`` about 10 s and a ``pool_alarm`` about 15 s
into the stillness (clip time) after one or two seconds of wall time. Nobody acknowledges it
here; the running daemon would repeat it every ``alarm_repeat_s`` until an ``ack`` command.
"""

from __future__ import annotations

from importlib import resources
from typing import Any

from models.pool import DEFAULT_DETECTOR_CARD

CLIP = "pool-demo.mp4"
# The water of the drawn pool: the picture less the deck along the top and a 16 px margin.
WATER_AREA = [[16.0, 16.0], [304.0, 16.0], [304.0, 224.0], [16.0, 224.0]]
# The pool person detector the default configuration selects (models/pool/README.md).
DETECTOR_CARD = str(DEFAULT_DETECTOR_CARD)


def config() -> dict[str, Any]:
    """The ``[pools]`` table of the embedded demo config."""
    clip = resources.files("gateway.demo").joinpath(CLIP)
    return {
        "pools": {
            "demo_pool": {
                "camera": {"url": str(clip), "pace": "fast", "analysis_fps": 4.0},
                "water_area": WATER_AREA,
                "detector_card": DETECTOR_CARD,
            }
        }
    }
