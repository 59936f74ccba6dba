"""The demo's flood gauges: the water-level analyzer on the two gauges of the Gard recording.

The Gard at Anduze recording (``gard-anduze-2020-09.jsonl``, Hub'Eau levels in mm) and the
simulated LoRaWAN radar gauge of the ChirpStack capture (the same flood, every third level, as
distance frames of a Dragino LMDS200 mounted 900 cm above the gauge datum) are both analysed:
warning stages, rate of rise, outliers and the learned score of the shipped int8 model, each
reading one ``water_level`` event with its reasons and the model's provenance.

The stage levels are illustrative (about 2.5, 4, 5.5 and 7 m above the gauge datum), not the
flood service's thresholds for Anduze.
"""

from __future__ import annotations

from typing import Any

RECORDING_DEVICE = "hubeau-V714401001"
RADAR_GAUGE_DEVICE = "a84041000181c071"
STAGES_CM = [250.0, 400.0, 550.0, 700.0]


def config() -> dict[str, Any]:
    """The ``[inference]`` and ``[analyzers]`` tables of the embedded demo config."""
    return {
        "inference": {"cards": ["water_level/forecaster.toml"]},
        "analyzers": {
            "anduze": {
                "profile": "water-level",
                "devices": [RECORDING_DEVICE, RADAR_GAUGE_DEVICE],
                "stages_cm": STAGES_CM,
            }
        },
    }
