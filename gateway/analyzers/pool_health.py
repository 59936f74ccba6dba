"""Camera health for pool monitoring: is the camera giving frames a lifeguard could rely on?

A pool camera that stopped, froze on one picture, went dark, lost focus or is fogged by steam
must never look like a quiet pool: :class:`CameraHealth` turns per-frame statistics into a
``monitoring`` / ``not_monitoring`` state with the reasons, within ``no_frames_after_s`` /
``frozen_after_s`` / ``persist_s`` (all well under the 10 s the gateway promises).

Pure: :func:`frame_stats` computes four numbers from a frame (on a 160-px-wide grey copy, so a
1080p camera costs about as little as a small one); :class:`CameraHealth` is a state machine over
them and a clock the caller passes in. No asyncio, no I/O, no logging.

Default thresholds, measured at 160 px on the first 40 images of the pool training set's
``valid`` split: brightness mean 84-168 (dark < 30), grey standard deviation 21-53 (low
visibility < 10), variance of the Laplacian 111-2267, and 3-30 for the same images blurred with
a Gaussian of sigma 4 px at full size (blurred < 40).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import cv2
import numpy as np
import numpy.typing as npt

__all__ = ["CameraHealth", "FrameStats", "HealthChange", "HealthParams", "frame_stats"]

STATS_WIDTH = 160


@dataclass(frozen=True, slots=True)
class FrameStats:
    """Four numbers describing one frame (grey levels 0-255 at 160 px width)."""

    brightness: float
    contrast: float
    sharpness: float
    change: float | None  # mean absolute difference from the previous frame; None for the first


def small_grey(image: npt.NDArray[np.uint8]) -> npt.NDArray[np.uint8]:
    """A 160-px-wide grey copy of a BGR (or grey) frame."""
    h, w = image.shape[:2]
    size = (STATS_WIDTH, max(1, round(h * STATS_WIDTH / max(w, 1))))
    small = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
    if small.ndim == 3:
        small = cv2.cvtColor(small, cv2.COLOR_BGR2GRAY)
    return np.asarray(small, dtype=np.uint8)


def frame_stats(grey: npt.NDArray[np.uint8], previous: npt.NDArray[np.uint8] | None) -> FrameStats:
    """Brightness, contrast, sharpness and change of a small grey frame (see small_grey)."""
    change: float | None = None
    if previous is not None and previous.shape == grey.shape:
        change = float(cv2.absdiff(grey, previous).mean())
    return FrameStats(
        brightness=float(grey.mean()),
        contrast=float(grey.std()),
        sharpness=float(cv2.Laplacian(grey, cv2.CV_32F).var()),
        change=change,
    )


@dataclass(frozen=True, slots=True)
class HealthParams:
    """When a camera stops counting as a usable view."""

    no_frames_after_s: float = 5.0
    frozen_after_s: float = 5.0
    # Below this mean absolute change the frame counts as a repeat of the previous one: real
    # sensors have noise, a frozen stream or a stalled decoder repeats the same bytes.
    frozen_change_max: float = 0.05
    dark_brightness_max: float = 30.0
    low_visibility_contrast_max: float = 10.0
    blurred_sharpness_max: float = 40.0
    # A condition must hold this long to count, and be gone this long to clear.
    persist_s: float = 3.0
    recover_s: float = 3.0


@dataclass(frozen=True, slots=True)
class HealthChange:
    """A change of the monitoring state, with every reason now active."""

    monitoring: bool
    reasons: tuple[str, ...]


@dataclass(slots=True)
class _Condition:
    present_since: float | None = None
    absent_since: float | None = None
    active: bool = False


@dataclass
class CameraHealth:
    """monitoring / not_monitoring from frame statistics and the time frames arrive."""

    params: HealthParams
    monitoring: bool | None = None  # None until the first verdict
    last_frame_s: float | None = None
    _conditions: dict[str, _Condition] = field(default_factory=dict)
    _frozen_since: float | None = None

    @property
    def reasons(self) -> tuple[str, ...]:
        return tuple(sorted(name for name, c in self._conditions.items() if c.active))

    def _set(self, name: str, present: bool, now_s: float, hold_s: float) -> None:
        cond = self._conditions.setdefault(name, _Condition())
        if present:
            cond.absent_since = None
            if cond.present_since is None:
                cond.present_since = now_s
            if now_s - cond.present_since >= hold_s:
                cond.active = True
        else:
            cond.present_since = None
            if cond.absent_since is None:
                cond.absent_since = now_s
            if cond.active and now_s - cond.absent_since >= self.params.recover_s:
                cond.active = False

    def observe(self, now_s: float, stats: FrameStats) -> HealthChange | None:
        """One frame arrived at ``now_s`` with these statistics."""
        p = self.params
        self.last_frame_s = now_s
        # "No frames" ends with the first frame: a camera that delivers again is back at once.
        cond = self._conditions.setdefault("no_frames", _Condition())
        cond.active, cond.present_since = False, None
        if stats.change is not None and stats.change <= p.frozen_change_max:
            if self._frozen_since is None:
                self._frozen_since = now_s
        else:
            self._frozen_since = None
        frozen = self._frozen_since is not None
        # Frozen counts from the first repeated frame; it clears on the first changing one.
        self._set("frozen", frozen, now_s, p.frozen_after_s)
        if not frozen:
            self._conditions["frozen"].active = False
        # A dark frame is also flat and unsharp, a flat one unsharp: name the cause, not every
        # symptom.
        dark = stats.brightness < p.dark_brightness_max
        flat = not dark and stats.contrast < p.low_visibility_contrast_max
        blurred = not dark and not flat and stats.sharpness < p.blurred_sharpness_max
        self._set("dark", dark, now_s, p.persist_s)
        self._set("low_visibility", flat, now_s, p.persist_s)
        self._set("blurred", blurred, now_s, p.persist_s)
        return self._verdict()

    def tick(self, silent_s: float) -> HealthChange | None:
        """Called periodically with the time since the camera last delivered a frame (or since
        the start): notices a camera that delivers nothing at all."""
        if silent_s >= self.params.no_frames_after_s:
            self._conditions.setdefault("no_frames", _Condition()).active = True
        return self._verdict()

    def _verdict(self) -> HealthChange | None:
        reasons = self.reasons
        monitoring = not reasons
        if monitoring == self.monitoring:
            return None
        if monitoring and self.last_frame_s is None:
            return None  # nothing seen yet: not a verdict either way
        self.monitoring = monitoring
        return HealthChange(monitoring, reasons)
