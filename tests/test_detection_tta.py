"""Horizontal-flip test-time augmentation of detectors (``[params] tta = "hflip"``).

Real onnxruntime on the shipped pool detector; the fixture images are training images
(tests/fixtures/vision/PROVENANCE.md).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import cv2
import numpy as np
import pytest

from gateway.errors import ModelError
from gateway.inference import LoadedModel, load_model
from models.detection import (
    DetectorSpec,
    Transform,
    box_iou,
    decode,
    decode_views,
    detect,
    fuse_views,
    preprocess,
    views,
)
from models.pool import DEFAULT_DETECTOR_CARD

ROOT = Path(__file__).resolve().parents[1]
CARD = ROOT / "models" / DEFAULT_DETECTOR_CARD
SWIMMERS = sorted((ROOT / "tests" / "fixtures" / "vision").glob("swimmers_*.jpg"))


@pytest.fixture(scope="module")
def model() -> LoadedModel:
    return load_model(CARD, threads=1)


def _with_tta(model: LoadedModel, tta: str) -> DetectorSpec:
    card = model.card
    return DetectorSpec.from_card(
        card.model_copy(update={"params": {**card.params, "tta": tta}}), "x.toml"
    )


def test_the_card_option_is_read_and_checked(model: LoadedModel) -> None:
    assert DetectorSpec.from_card(model.card).tta == "hflip"  # the shipped card (1.3.0 on)
    assert DetectorSpec.from_card(model.card.model_copy(update={"params": {}})).tta == "none"
    assert _with_tta(model, "hflip").tta == "hflip"
    assert _with_tta(model, "none").tta == "none"
    with pytest.raises(ModelError, match=r"x\.toml: params\.tta: .*'vflip'"):
        _with_tta(model, "vflip")


def test_views_are_the_tensor_and_its_mirror(model: LoadedModel) -> None:
    image = cv2.imread(str(SWIMMERS[0]))
    tensor, _ = preprocess(image, _with_tta(model, "hflip"))
    one = views(tensor, _with_tta(model, "none"))
    assert len(one) == 1 and one[0] is tensor
    plain, mirror = views(tensor, _with_tta(model, "hflip"))
    assert plain is tensor
    assert np.array_equal(mirror, tensor[:, :, :, ::-1]) and mirror.flags.c_contiguous


@pytest.mark.parametrize("image_path", SWIMMERS, ids=lambda p: p.stem)
def test_tta_off_is_one_run_decoded_as_before(model: LoadedModel, image_path: Path) -> None:
    image = cv2.imread(str(image_path))
    spec = _with_tta(model, "none")
    tensor, transform = preprocess(image, spec)
    outputs = model.run({spec.input_name: tensor})
    expected = decode(outputs, spec, transform, score_threshold=0.2)
    assert expected
    assert decode_views([outputs], spec, transform, score_threshold=0.2) == expected
    assert detect(model, image, spec, score_threshold=0.2) == expected


@pytest.mark.parametrize("image_path", SWIMMERS, ids=lambda p: p.stem)
def test_a_mirrored_image_gives_mirrored_boxes(model: LoadedModel, image_path: Path) -> None:
    image = cv2.imread(str(image_path))
    w = image.shape[1]
    spec = _with_tta(model, "hflip")
    found = detect(model, image, spec, score_threshold=0.3)
    mirrored = detect(model, np.ascontiguousarray(image[:, ::-1]), spec, score_threshold=0.3)
    assert found and len(mirrored) == len(found)
    # The two views of the mirror image are those of the image (up to resize rounding), so
    # the same objects come out, mirrored: x1 -> w - x2, x2 -> w - x1.
    back = np.array([(w - d.box[2], d.box[1], w - d.box[0], d.box[3]) for d in mirrored])
    for d in found:
        ious = box_iou(np.asarray(d.box), back)
        twin = mirrored[int(np.argmax(ious))]
        assert float(ious.max()) > 0.97, (d, twin)
        assert twin.score == pytest.approx(d.score, abs=0.01)


@pytest.mark.parametrize("image_path", SWIMMERS, ids=lambda p: p.stem)
def test_fused_scores_do_not_depend_on_the_threshold(model: LoadedModel, image_path: Path) -> None:
    # An evaluation sweeps a low threshold; the gateway uses the card's: both must see the
    # same fused detections above the card's threshold.
    image = cv2.imread(str(image_path))
    spec = _with_tta(model, "hflip")
    low = detect(model, image, spec, score_threshold=0.05)
    high = detect(model, image, spec, score_threshold=0.4)
    assert high and high == [d for d in low if d.score >= 0.4]


def test_tta_runs_the_model_on_both_views(model: LoadedModel) -> None:
    image = cv2.imread(str(SWIMMERS[0]))
    spec = _with_tta(model, "hflip")
    tensor, transform = preprocess(image, spec)
    plain, mirror = (model.run({spec.input_name: v}) for v in views(tensor, spec))
    both = decode_views([plain, mirror], spec, transform, score_threshold=0.3)
    assert detect(model, image, spec, score_threshold=0.3) == both
    # Each fused score is the mean of two view scores, so at most the best single view's.
    one = decode(plain, spec, transform, score_threshold=0.05)
    other = decode(mirror, spec, transform, score_threshold=0.05)
    best = max(d.score for d in one + other)
    assert max(d.score for d in both) <= best + 1e-6


def test_mirror_boxes_are_mapped_back_through_the_letterbox_and_fused(
    model: LoadedModel,
) -> None:
    # Hand-made PicoDet outputs stand in for the model: one scoring cell per run.
    spec = dataclasses.replace(_with_tta(model, "hflip"), input_width=400, score_threshold=0.5)
    transform = Transform(0.5, 0.5, 600, 300)  # image 600 wide at the left of a 400-wide input
    plain = _picodet_outputs(spec, box=(10.0, 20.0, 110.0, 120.0), score=0.9)
    # In the mirror view the image sits at the right: the object (18, 20, 118, 120) is at
    # 400 - x there.
    mirror = _picodet_outputs(spec, box=(282.0, 20.0, 382.0, 120.0), score=0.6)
    found = decode_views([plain, mirror], spec, transform)
    assert len(found) == 1
    assert found[0].score == pytest.approx((0.9 + 0.6) / 2)
    x1 = (10.0 * 0.9 + 18.0 * 0.6) / 1.5  # score-weighted, in input pixels
    assert found[0].box == pytest.approx((2 * x1, 40.0, 2 * (x1 + 100.0), 240.0), abs=0.1)
    # Seen in the mirror view only, the object scores half: found only below that.
    nothing = _picodet_outputs(spec, box=(10.0, 20.0, 110.0, 120.0), score=0.01)
    assert decode_views([nothing, mirror], spec, transform) == []
    only = decode_views([nothing, mirror], spec, transform, score_threshold=0.25)
    assert [d.score for d in only] == pytest.approx([0.3])
    assert only[0].box == pytest.approx((36.0, 40.0, 236.0, 240.0), abs=0.1)
    with pytest.raises(ValueError, match=r"tta 'hflip' takes 2"):
        decode_views([plain], spec, transform)


def _picodet_outputs(
    spec: DetectorSpec, box: tuple[float, float, float, float], score: float
) -> list[np.ndarray]:
    """PicoDet-style outputs with one scoring cell (stride 8) whose sides give ``box``."""
    levels = []
    for s in spec.strides:
        gw, gh = -(-spec.input_width // s), -(-spec.input_height // s)
        levels.append((s, gw, gh))
    s, gw, _gh = levels[0]
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    gx, gy = int(cx // s), int(cy // s)
    centre = ((gx + 0.5) * s, (gy + 0.5) * s)
    sides = np.array(
        [centre[0] - box[0], centre[1] - box[1], box[2] - centre[0], box[3] - centre[1]]
    )
    bins = spec.reg_max + 1
    outputs_scores, outputs_boxes = [], []
    for i, (_s, w, h) in enumerate(levels):
        scores = np.zeros((1, w * h, 1), np.float32)
        dists = np.full((1, w * h, 4 * bins), -50.0, np.float32)
        if i == 0:
            scores[0, gy * gw + gx, 0] = score
            for k, side in enumerate(sides / s):
                # Two neighbouring bins whose expectation is ``side`` (in strides).
                lo = int(np.floor(side))
                frac = side - lo
                p = np.array([1 - frac, frac]) if frac > 0 else np.array([1.0, 0.0])
                logits = np.log(np.maximum(p, 1e-12))
                dists[0, gy * gw + gx, k * bins + lo] = logits[0]
                if lo + 1 < bins:
                    dists[0, gy * gw + gx, k * bins + lo + 1] = logits[1]
        outputs_scores.append(scores)
        outputs_boxes.append(dists)
    return outputs_scores + outputs_boxes


def test_fusing_only_groups_that_can_reach_the_threshold_changes_nothing_above_it() -> None:
    # fuse_views stops at the first group whose best box is below min_score (the analyzer's
    # threshold): what it returns at or above min_score is what a full pass returns there.
    rng = np.random.default_rng(11)
    for _ in range(200):
        n = int(rng.integers(0, 40))
        xy = rng.uniform(0, 300, (n, 2))
        wh = rng.uniform(5, 80, (n, 2))
        boxes = np.hstack([xy, xy + wh]).astype(np.float32)
        scores = rng.uniform(0.05, 1.0, n).astype(np.float32)
        classes = rng.integers(0, 2, n)
        view = rng.integers(0, 2, n)
        threshold = float(rng.uniform(0.1, 0.9))
        fused = [
            fuse_views(boxes, scores, classes, view, n_views=2, iou_threshold=0.5, min_score=m)
            for m in (0.0, threshold)
        ]
        kept = [(b[s >= threshold], s[s >= threshold], c[s >= threshold]) for b, s, c in fused]
        for full, early in zip(kept[0], kept[1], strict=True):
            np.testing.assert_array_equal(full, early)
