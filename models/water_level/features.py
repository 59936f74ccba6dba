"""What the water-level forecaster sees and how its error becomes a score.

The one definition that training (``models/water_level/train.py``), evaluation and the gateway's
streaming analyzer (``gateway/analyzers/water_level.py``) share, so the model is served exactly
the features it was trained on.

The model sees the last ``window`` first differences of a series, standardised by the series' own
running (EWMA) mean and spread of first differences, and predicts the next standardised
difference. Working on differences makes it indifferent to the gauge's datum and to the unit; the
running statistics are per sensor and keep adapting while the gateway runs (the "online
normalisation"): a calm brook and a tidal river end up on the same scale.

The score of a reading is its standardised forecast error ``z = |r| / sd(r)`` (``sd`` is again a
running estimate, per sensor) squashed into [0, 1) by ``z**2 / (z**2 + score_scale**2)``: 0.5 at
``z = score_scale``, 0.9 at three times that.

Pure: plain floats, no numpy, no I/O (a per-reading call must cost microseconds, not a
numpy dispatch per value).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields

__all__ = ["ForecastParams", "ForecastState", "squash"]


@dataclass(frozen=True, slots=True)
class ForecastParams:
    """The feature and score definition; written into the model card's ``params``."""

    # First differences the model sees (16 x 30 min = 8 h of a Hub'Eau gauge).
    window: int = 16
    # Standardised inputs and targets are clipped to +-clip: an echo spike of a thousand
    # standard deviations must not leave the range the int8 model was calibrated on.
    clip: float = 8.0
    # EWMA weight of the difference statistics (memory of about 1/alpha readings).
    alpha: float = 0.02
    # EWMA weight of the residual variance (slower: the score's yardstick should be steady).
    alpha_residual: float = 0.01
    # Differences seen before the first score: the running statistics need some history (24 x
    # 15 min = 6 h of a LoRaWAN gauge; the demo recording has 44 readings before its flood).
    warmup: int = 24
    # z at which the score is 0.5.
    score_scale: float = 4.0
    # Smallest residual spread (standardised units): a perfectly predictable stretch must not
    # make the next tiny wobble look infinitely surprising.
    residual_floor: float = 0.05
    # Smallest difference spread: absolute (the sensor's resolution, in its unit) and relative to
    # the running mean absolute level. A stuck sensor has a spread of 0; a division by it is not
    # a measurement.
    scale_floor_abs: float = 1e-9
    scale_floor_rel: float = 1e-4
    # Updates of the running statistics are winsorised at this many spreads, so one spike does
    # not blow them up; a lasting change still moves them, a step at a time.
    winsor: float = 6.0

    def to_params(self) -> dict[str, float | int]:
        """The card's ``params`` table."""
        return dict(asdict(self))

    @classmethod
    def from_params(cls, params: Mapping[str, object]) -> ForecastParams:
        """Read the card's ``params``; raises ValueError naming a missing or mistyped key."""
        values: dict[str, float | int] = {}
        for spec in fields(cls):
            if spec.name not in params:
                raise ValueError(f"params.{spec.name}: missing")
            value = params[spec.name]
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(f"params.{spec.name}: must be a number (got: {value!r})")  # noqa: TRY004 -- card problems are ValueErrors for the caller
            if spec.name in ("window", "warmup"):
                if not isinstance(value, int) or value < 1:
                    raise ValueError(
                        f"params.{spec.name}: must be a positive integer (got: {value!r})"
                    )
                values[spec.name] = value
            else:
                number = float(value)
                if not math.isfinite(number) or number < 0:
                    raise ValueError(
                        f"params.{spec.name}: must be finite and >= 0 (got: {value!r})"
                    )
                values[spec.name] = number
        return cls(**values)  # type: ignore[arg-type]  # keys are exactly the dataclass fields


def squash(z: float, scale: float) -> float:
    """A standardised error in [0, inf) → a score in [0, 1)."""
    z2 = z * z
    return z2 / (z2 + scale * scale)


class ForecastState:
    """The running statistics and recent differences of one sensor.

    Call order per reading: :meth:`features` and :meth:`target` (state up to the previous
    reading), then :meth:`push` with the new value; once the model's prediction is known,
    :meth:`score`. ``features`` of the next reading do not depend on ``score``, so a batch of
    readings can be pushed first and scored together.
    """

    __slots__ = ("_diffs", "_last", "_level", "_mean", "_n", "_n_res", "_var", "_var_res", "p")

    def __init__(self, params: ForecastParams) -> None:
        self.p = params
        self._diffs: deque[float] = deque(maxlen=params.window)
        self._last: float | None = None
        self._n = 0
        self._mean = 0.0
        self._var = 0.0
        self._level = 0.0
        self._n_res = 0
        # A model no better than "no change" leaves residuals of about one spread.
        self._var_res = 1.0

    @property
    def ready(self) -> bool:
        """Whether enough history was seen to score the next reading."""
        return self._n >= max(self.p.window, self.p.warmup)

    def scale(self) -> float:
        """The current spread of first differences, floored."""
        return max(
            math.sqrt(self._var), self.p.scale_floor_abs, self.p.scale_floor_rel * self._level
        )

    def features(self) -> list[float]:
        """The standardised, clipped last ``window`` differences (oldest first)."""
        mean, scale, clip = self._mean, self.scale(), self.p.clip
        return [min(clip, max(-clip, (d - mean) / scale)) for d in self._diffs]

    def target(self, value: float) -> float:
        """The standardised difference ``value`` makes (unclipped); needs a previous value."""
        assert self._last is not None
        return (value - self._last - self._mean) / self.scale()

    def push(self, value: float) -> None:
        """Take the reading's value into the running statistics."""
        self._level += max(self.p.alpha, 1.0 / (self._n + 1)) * (abs(value) - self._level)
        last, self._last = self._last, value
        if last is None:
            return
        diff = value - last
        self._diffs.append(diff)
        self._n += 1
        update = diff
        if self._n > self.p.warmup:
            bound = self.p.winsor * self.scale()
            update = min(self._mean + bound, max(self._mean - bound, diff))
        # Cumulative averages at first, then an EWMA: the start does not hang on one value.
        alpha = max(self.p.alpha, 1.0 / self._n)
        delta = update - self._mean
        self._mean += alpha * delta
        self._var = (1.0 - alpha) * (self._var + alpha * delta * delta)

    def score(self, target: float, prediction: float) -> tuple[float, float]:
        """(z, score) of a reading whose standardised difference was ``target``.

        Updates the residual spread afterwards (winsorised), so a reading is judged by the
        yardstick of the readings before it.
        """
        residual = target - prediction
        spread = max(math.sqrt(self._var_res), self.p.residual_floor)
        z = abs(residual) / spread
        self._n_res += 1
        alpha = max(self.p.alpha_residual, 1.0 / (self._n_res + 1))
        bounded = min(abs(residual), self.p.winsor * spread)
        self._var_res += alpha * (bounded * bounded - self._var_res)
        return z, squash(z, self.p.score_scale)
