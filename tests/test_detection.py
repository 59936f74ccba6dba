"""Detection pre/post-processing: NMS, box mapping, card parsing, decoders on real detectors.

FastestDet ships in models/generic; PicoDet-S and YOLOX-Nano are read from ../shared/data (their
decoders are checked against the reference boxes there) and skip when it is absent.
"""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import onnxruntime as ort
import pytest

from gateway.errors import ModelError
from gateway.inference import load_model
from models.card import ModelCard, dump_card, load_card, sha256_file
from models.detection import (
    Detection,
    DetectorSpec,
    Transform,
    box_iou,
    decode,
    detect,
    nms,
    preprocess,
)

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures" / "vision"
FASTESTDET = ROOT / "models" / "generic" / "fastestdet" / "fastestdet.toml"
ONNX_MODELS = ROOT.parent / "shared" / "data" / "onnx-models"
needs_shared = pytest.mark.skipif(
    not ONNX_MODELS.is_dir(), reason=f"shared ONNX models not found at {ONNX_MODELS}"
)


def _image() -> np.ndarray:
    image = cv2.imread(str(FIXTURES / "fastestdet_3.jpg"))
    assert image is not None
    return image


def _iou(a: tuple[float, ...], b: list[float]) -> float:
    return float(box_iou(np.asarray(a[:4]), np.asarray([b[:4]]))[0])


# -- NMS and boxes ----------------------------------------------------------------------------


def test_nms_keeps_best_of_overlapping_and_separate_boxes() -> None:
    boxes = np.array(
        [[0, 0, 10, 10], [1, 1, 10, 10], [20, 20, 30, 30], [0, 0, 10, 9]], dtype=np.float32
    )
    scores = np.array([0.6, 0.9, 0.5, 0.7], dtype=np.float32)
    kept = nms(boxes, scores, 0.5)
    assert kept.tolist() == [1, 2]


def test_nms_threshold_is_strict_and_empty_input() -> None:
    boxes = np.array([[0, 0, 10, 10], [5, 0, 15, 10]], dtype=np.float32)  # IoU 1/3
    scores = np.array([0.9, 0.8], dtype=np.float32)
    assert nms(boxes, scores, 1 / 3 + 1e-6).tolist() == [0, 1]
    assert nms(boxes, scores, 0.3).tolist() == [0]
    assert nms(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), 0.5).tolist() == []


def test_box_iou_of_degenerate_boxes_is_zero() -> None:
    ious = box_iou(np.array([0, 0, 0, 0.0]), np.array([[0, 0, 0, 0.0], [0, 0, 10, 10.0]]))
    assert ious.tolist() == [0.0, 0.0]


def test_transform_maps_back_and_clips() -> None:
    t = Transform(scale_x=0.5, scale_y=2.0, width=100, height=20)
    out = t.to_original(np.array([[10, 10, 40, 30], [-5, -5, 80, 50]], dtype=np.float32))
    assert out.tolist() == [[20, 5, 80, 15], [0, 0, 100, 20]]


def _toy_spec(preprocess_name: str = "letterbox_bgr_114") -> DetectorSpec:
    card = ModelCard(
        name="toy",
        version="1",
        task="detect",
        file="toy.onnx",
        sha256="0" * 64,
        inputs=[{"name": "x", "shape": [1, 3, 64, 32], "dtype": "float32"}],
        outputs=[{"name": "y", "shape": [1, 1], "dtype": "float32"}],
        labels=["person", "dog"],
        thresholds={"score": 0.5},
        preprocess=preprocess_name,
        postprocess="yolox",
        params={"keep_labels": "person", "strides": [8, 16, 32]},
        licence="test",
        training_data="test",
    )
    return DetectorSpec.from_card(card)


def test_letterbox_keeps_aspect_at_top_left_and_maps_back() -> None:
    spec = _toy_spec()
    image = np.zeros((50, 100, 3), np.uint8)  # w 100, h 50 into w 32, h 64: r = 0.32
    tensor, transform = preprocess(image, spec)
    assert tensor.shape == (1, 3, 64, 32)
    assert transform.scale_x == transform.scale_y == pytest.approx(0.32)
    assert tensor[0, :, 16:, :].min() == 114  # padding below the image
    back = transform.to_original(np.array([[0, 0, 32, 16]], np.float32))
    assert back.tolist() == [[0, 0, 100, 50]]


def test_plain_resize_scales_each_axis() -> None:
    spec = _toy_spec("resize_rgb_imagenet")
    tensor, transform = preprocess(np.full((50, 100, 3), 255, np.uint8), spec)
    assert tensor.shape == (1, 3, 64, 32)
    assert (transform.scale_x, transform.scale_y) == (0.32, 1.28)
    assert tensor[0, 0, 0, 0] == pytest.approx((1 - 0.485) / 0.229, rel=1e-5)


def _numpy_tensor(image: np.ndarray, name: str, spec: DetectorSpec) -> np.ndarray:
    """What each preprocessor means, written out in plain numpy (the models were trained and
    their cards measured on these tensors)."""
    if name == "letterbox_bgr_114":
        h, w = image.shape[:2]
        r = min(spec.input_width / w, spec.input_height / h)
        nw, nh = max(1, round(w * r)), max(1, round(h * r))
        canvas = np.full((spec.input_height, spec.input_width, 3), 114, np.uint8)
        canvas[:nh, :nw] = cv2.resize(image, (nw, nh), interpolation=cv2.INTER_LINEAR)
        return canvas.astype(np.float32).transpose(2, 0, 1)[None]
    resized = cv2.resize(
        image, (spec.input_width, spec.input_height), interpolation=cv2.INTER_LINEAR
    ).astype(np.float32) * np.float32(1 / 255)
    if name == "resize_bgr_unit":
        return resized.transpose(2, 0, 1)[None]
    mean = np.array([0.485, 0.456, 0.406], np.float32)
    std = np.array([0.229, 0.224, 0.225], np.float32)
    return ((resized[:, :, ::-1] - mean) / std).transpose(2, 0, 1)[None]


@pytest.mark.parametrize("name", ["letterbox_bgr_114", "resize_bgr_unit", "resize_rgb_imagenet"])
def test_preprocessors_give_the_plain_numpy_tensor_bit_for_bit(name: str) -> None:
    spec = _toy_spec(name)
    rng = np.random.default_rng(7)
    # Channels on different ranges, so a swapped channel order cannot pass.
    image = np.stack(
        [
            rng.integers(0, 80, (90, 70)),
            rng.integers(80, 170, (90, 70)),
            rng.integers(170, 256, (90, 70)),
        ],
        axis=-1,
    ).astype(np.uint8)
    tensor, _ = preprocess(image, spec)
    assert tensor.dtype == np.float32 and tensor.flags.c_contiguous
    np.testing.assert_array_equal(tensor, _numpy_tensor(image, name, spec))


def test_preprocess_refuses_non_bgr_images() -> None:
    spec = _toy_spec()
    with pytest.raises(ValueError, match="BGR uint8"):
        preprocess(np.zeros((10, 10), np.uint8), spec)
    with pytest.raises(ValueError, match="BGR uint8"):
        preprocess(np.zeros((10, 10, 3), np.float32), spec)


def test_yolox_decode_filters_labels_and_maps_boxes() -> None:
    spec = _toy_spec()  # input 32 wide x 64 high: cells 4x8 + 2x4 + 1x2 = 42
    rows = np.zeros((1, 42, 7), np.float32)
    # Row 5 = stride 8, cell (gx 1, gy 1): a person centred at (12, 12), 16 x 32 input pixels,
    # so (4, -4, 20, 28); twice that in the image, clipped at the top. Row 6 is a dog.
    rows[0, 5] = [0.5, 0.5, np.log(2.0), np.log(4.0), 0.9, 0.9, 0.1]
    rows[0, 6] = [0.5, 0.5, 0.0, 0.0, 0.9, 0.1, 0.95]
    found = decode([rows], spec, Transform(0.5, 0.5, 64, 128))
    assert [(d.label, d.box) for d in found] == [("person", (8.0, 0.0, 40.0, 56.0))]
    assert found[0].score == pytest.approx(0.81)
    assert decode([rows], spec, Transform(0.5, 0.5, 64, 128), score_threshold=0.9) == []


def test_detection_json_form() -> None:
    d = Detection("person", 0.876543, (1.04, 2.0, 3.333, 4.0))
    assert d.to_json() == {"label": "person", "score": 0.8765, "box": [1.0, 2.0, 3.3, 4.0]}


def test_card_without_score_threshold_or_with_unknown_family_is_refused() -> None:
    card = load_card(FASTESTDET)
    with pytest.raises(ModelError, match=r"thresholds\.score"):
        DetectorSpec.from_card(card.model_copy(update={"thresholds": {}}), "x.toml")
    with pytest.raises(ModelError, match=r"unknown detector family.*'ssd'"):
        DetectorSpec.from_card(card.model_copy(update={"postprocess": "ssd"}), "x.toml")
    with pytest.raises(ModelError, match=r"keep_labels.*'swimmer'"):
        DetectorSpec.from_card(
            card.model_copy(update={"params": {"keep_labels": "swimmer"}}), "x.toml"
        )


# -- real detectors ---------------------------------------------------------------------------


def test_fastestdet_finds_the_people_on_its_sample_image() -> None:
    model = load_model(FASTESTDET, threads=1)
    image = _image()
    found = detect(model, image)
    assert found, "FastestDet found no person on its own sample image"
    assert {d.label for d in found} == {"person"}
    assert all(0.65 <= d.score <= 1 for d in found)
    h, w = image.shape[:2]
    for d in found:
        x1, y1, x2, y2 = d.box
        assert 0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h
    # The two large people (left and right) of the picture, as PicoDet's reference has them.
    for ref in ([41.0, 63.9, 174.7, 302.2], [288.6, 142.0, 498.8, 295.7]):
        assert max(_iou(d.box, ref) for d in found) > 0.7


def _shared_card(tmp_path: Path, folder: str, family: str, pre: str, **params: object) -> Path:
    onnx_path = next((ONNX_MODELS / folder).glob("*.onnx"))
    (tmp_path / onnx_path.name).symlink_to(onnx_path)
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    inp = session.get_inputs()[0]
    labels = (ONNX_MODELS / "fastestdet" / "coco.names").read_text().split("\n")
    card = ModelCard(
        name=family,
        version="test",
        task="detect",
        file=onnx_path.name,
        sha256=sha256_file(onnx_path),
        inputs=[{"name": inp.name, "shape": inp.shape, "dtype": "float32"}],
        outputs=[
            {"name": o.name, "shape": o.shape, "dtype": "float32"} for o in session.get_outputs()
        ],
        labels=[name.strip() for name in labels if name.strip()],
        thresholds={"score": 0.3, "nms_iou": 0.45},
        preprocess=pre,
        postprocess=family,
        params={"keep_labels": "person", **params},
        licence="Apache-2.0",
        training_data="COCO",
    )
    path = tmp_path / f"{family}.toml"
    path.write_text(dump_card(card))
    return path


@needs_shared
@pytest.mark.parametrize(
    ("folder", "family", "pre", "params", "box_tol", "score_tol"),
    [
        ("picodet-s-416", "picodet", "resize_rgb_imagenet", {}, 0.9, 0.03),
        # The reference used Pillow's resize; OpenCV's moves YOLOX's weaker boxes a little more.
        ("yolox-nano", "yolox", "letterbox_bgr_114", {"strides": [8, 16, 32]}, 0.85, 0.06),
    ],
)
def test_generic_decoder_matches_the_reference_boxes(  # noqa: PLR0917 (parametrised)
    tmp_path: Path,
    folder: str,
    family: str,
    pre: str,
    params: dict[str, object],
    box_tol: float,
    score_tol: float,
) -> None:
    model = load_model(_shared_card(tmp_path, folder, family, pre, **params), threads=1)
    found = detect(model, _image())
    reference = json.loads((ONNX_MODELS / folder / "reference_3jpg.json").read_text())
    refs = reference["detections_xyxy_score"]
    assert len(found) == len(refs)
    for ref in refs:
        best = max(found, key=lambda d: _iou(d.box, ref))
        assert _iou(best.box, ref) > box_tol
        assert best.score == pytest.approx(ref[4], abs=score_tol)
