"""Camera health: no frames, frozen, dark, blurred, low visibility → not_monitoring, and back."""

from __future__ import annotations

import cv2
import numpy as np
import numpy.typing as npt
import pytest

from gateway.analyzers.pool_health import (
    CameraHealth,
    HealthChange,
    HealthParams,
    frame_stats,
    small_grey,
)

FPS = 4


def scene(seed: int, noise: float = 4.0) -> npt.NDArray[np.uint8]:
    """A textured 320x240 'pool' with sensor noise (every frame differs a little)."""
    rng = np.random.default_rng(seed)
    base = np.zeros((240, 320, 3), np.uint8)
    base[:] = (170, 140, 60)
    for i in range(0, 320, 40):
        cv2.line(base, (i, 0), (i, 239), (230, 230, 230), 3)  # lane ropes
    cv2.rectangle(base, (120, 90), (170, 120), (80, 120, 200), -1)
    noisy = base.astype(np.float32) + rng.normal(0, noise, base.shape)
    return np.clip(noisy, 0, 255).astype(np.uint8)


def feed(
    health: CameraHealth,
    frames: list[npt.NDArray[np.uint8]],
    t0: float,
    previous: npt.NDArray[np.uint8] | None = None,
) -> list[tuple[float, HealthChange]]:
    out = []
    for i, frame in enumerate(frames):
        grey = small_grey(frame)
        t = t0 + i / FPS
        change = health.observe(t, frame_stats(grey, previous))
        previous = grey
        if change is not None:
            out.append((t, change))
    return out


def test_a_good_camera_is_monitoring() -> None:
    health = CameraHealth(HealthParams())
    changes = feed(health, [scene(i) for i in range(40)], 0.0)
    assert changes == [(0.0, HealthChange(True, ()))]


@pytest.mark.parametrize(
    ("name", "spoil"),
    [
        ("dark", lambda f: (f * 0.08).astype(np.uint8)),
        ("blurred", lambda f: cv2.GaussianBlur(f, (0, 0), 6)),
        ("low_visibility", lambda f: (np.full_like(f, 200) * 0.9 + f * 0.1).astype(np.uint8)),
    ],
)
def test_a_spoiled_view_is_reported_within_10_s_and_recovers(name: str, spoil: object) -> None:
    health = CameraHealth(HealthParams())
    feed(health, [scene(i) for i in range(8)], 0.0)
    assert health.monitoring is True
    bad = [spoil(scene(100 + i)) for i in range(40)]  # type: ignore[operator]
    changes = feed(health, bad, 2.0)
    assert len(changes) == 1
    t, change = changes[0]
    assert change == HealthChange(False, (name,))
    assert t - 2.0 < 10.0
    good = feed(health, [scene(200 + i) for i in range(40)], 12.0)
    assert len(good) == 1 and good[0][1] == HealthChange(True, ())
    assert good[0][0] - 12.0 < 10.0


def test_a_frozen_picture_is_reported() -> None:
    health = CameraHealth(HealthParams())
    feed(health, [scene(i) for i in range(8)], 0.0)
    frozen = scene(99)
    changes = feed(health, [frozen] * 40, 2.0)
    assert [c for _t, c in changes] == [HealthChange(False, ("frozen",))]
    assert changes[0][0] - 2.0 < 10.0
    # Moving again: back at once.
    changes = feed(health, [scene(300 + i) for i in range(4)], 12.0, small_grey(frozen))
    assert [c for _t, c in changes] == [HealthChange(True, ())]


def test_no_frames_is_reported_and_ends_with_the_next_frame() -> None:
    health = CameraHealth(HealthParams(no_frames_after_s=5.0))
    assert health.tick(1.0) is None  # nothing seen yet, and not long enough
    assert health.tick(5.0) == HealthChange(False, ("no_frames",))
    assert health.tick(6.0) is None  # said once
    changes = feed(health, [scene(i) for i in range(2)], 7.0)
    assert [c for _t, c in changes] == [HealthChange(True, ())]
