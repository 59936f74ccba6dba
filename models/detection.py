"""Object detection: pre-processing, decoders per model family, NMS, and one call to detect.

Pure functions over numpy arrays (no I/O, no logging, no asyncio). An image is a BGR ``uint8``
array of shape ``(H, W, 3)``, as OpenCV decodes it. A detector is an ONNX model whose card says
how to feed and decode it:

* ``preprocess``: ``"resize_rgb_imagenet"`` (plain resize, RGB, /255, ImageNet mean/std: PicoDet
  and the pool detector), ``"resize_bgr_unit"`` (plain resize, BGR, /255: FastestDet) or
  ``"letterbox_bgr_114"`` (aspect kept, image at the top-left, pad 114, values 0..255: YOLOX);
* ``postprocess``: the family's decoder, a key of :data:`DECODERS` (``"fastestdet"``,
  ``"yolox"``, ``"picodet"``; the pool detector is a one-class PicoDet-style head);
* ``labels``: class names by index; ``[thresholds] score`` and ``nms_iou``;
  ``[params] keep_labels`` (comma-separated; empty = all), ``strides`` and ``reg_max`` where
  the family needs them;
* ``[params] tta``: ``"none"`` (default) or ``"hflip"``: test-time augmentation, the model is
  run on the image and on its mirror image (:func:`views`), the mirror's boxes are mirrored
  back and the two views' boxes of one object are fused (:func:`decode_views`).

:func:`detect` runs any object with ``.card`` and ``.run(feeds)`` (``gateway.inference``'s
``LoadedModel``) on an image and returns :class:`Detection` objects with boxes in the original
image's pixels. Callers that run the model themselves (the pool analyzer through the inference
engine, the evaluator) do the same three steps: :func:`preprocess`, one run per tensor of
:func:`views`, :func:`decode_views`.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import cv2
import numpy as np

from gateway.errors import ModelError
from models.card import ModelCard

__all__ = [
    "DECODERS",
    "PREPROCESSORS",
    "TTA_MODES",
    "Detection",
    "DetectorSpec",
    "Transform",
    "decode",
    "decode_views",
    "detect",
    "fuse_views",
    "nms",
    "preprocess",
    "views",
]

Box = tuple[float, float, float, float]

# ImageNet channel statistics (RGB), as PicoDet was trained with them.
_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
# YOLOX pads its letterbox with grey 114, as in its training pipeline.
_PAD_VALUE = 114
# ``[params] tta``: the views of one image the model is run on (see :func:`views`).
TTA_MODES = ("none", "hflip")
# With TTA, a view's candidates scoring below this count as "not seen in that view".
TTA_FLOOR = 0.05


@dataclass(frozen=True, slots=True)
class Detection:
    """One detected object: class name, score in [0, 1], box (x1, y1, x2, y2) in image pixels."""

    label: str
    score: float
    box: Box

    def to_json(self) -> dict[str, Any]:
        """The ``vision detect`` form: boxes rounded to 0.1 px, scores to 4 digits."""
        return {
            "label": self.label,
            "score": round(self.score, 4),
            "box": [round(v, 1) for v in self.box],
        }


@dataclass(frozen=True, slots=True)
class Transform:
    """How input-tensor pixels map back to the original image: ``orig = (x - offset) / scale``."""

    scale_x: float
    scale_y: float
    width: int
    height: int
    offset_x: float = 0.0
    offset_y: float = 0.0

    def to_original(self, boxes: np.ndarray) -> np.ndarray:
        """(N, 4) x1, y1, x2, y2 in input pixels -> original-image pixels, clipped to the image."""
        out = np.empty_like(boxes, dtype=np.float32)
        out[:, 0::2] = (boxes[:, 0::2] - self.offset_x) / self.scale_x
        out[:, 1::2] = (boxes[:, 1::2] - self.offset_y) / self.scale_y
        np.clip(out[:, 0::2], 0.0, float(self.width), out=out[:, 0::2])
        np.clip(out[:, 1::2], 0.0, float(self.height), out=out[:, 1::2])
        return out


@dataclass(frozen=True, slots=True)
class DetectorSpec:
    """What a detector card says about feeding and decoding its model."""

    preprocess: str
    postprocess: str
    input_name: str
    input_width: int
    input_height: int
    labels: tuple[str, ...]
    score_threshold: float
    nms_iou: float
    keep: frozenset[int] | None  # class indices kept; None = all
    strides: tuple[int, ...]
    reg_max: int
    tta: str = "none"  # one of TTA_MODES

    @classmethod
    def from_card(cls, card: ModelCard, source: str = "") -> DetectorSpec:
        """Read a detector card; ModelError naming ``source`` (or the card) if it does not fit."""
        where = source or f"card {card.name}"
        if card.preprocess not in PREPROCESSORS:
            raise ModelError(
                f"{where}: preprocess: unknown for a detector, expected one of "
                f"{sorted(PREPROCESSORS)} (got: {card.preprocess!r})"
            )
        if card.postprocess not in DECODERS:
            raise ModelError(
                f"{where}: postprocess: unknown detector family, expected one of "
                f"{sorted(DECODERS)} (got: {card.postprocess!r})"
            )
        if len(card.inputs) != 1:
            raise ModelError(f"{where}: inputs: a detector takes one image tensor")
        spec = card.inputs[0]
        shape = spec.shape
        if len(shape) != 4 or not all(isinstance(d, int) for d in shape[1:]) or shape[1] != 3:
            raise ModelError(
                f"{where}: inputs.{spec.name}: shape must be [N, 3, H, W] with fixed H, W "
                f"(got: {shape})"
            )
        if not card.labels:
            raise ModelError(f"{where}: labels: a detector needs its class names")
        score = card.thresholds.get("score")
        iou = card.thresholds.get("nms_iou", 0.45)
        if score is None or not 0.0 <= score <= 1.0:
            raise ModelError(f"{where}: thresholds.score: required, in [0, 1] (got: {score})")
        if not 0.0 < iou <= 1.0:
            raise ModelError(f"{where}: thresholds.nms_iou: must be in (0, 1] (got: {iou})")
        keep_text = card.params.get("keep_labels", "")
        if not isinstance(keep_text, str):
            raise ModelError(
                f"{where}: params.keep_labels: comma-separated names (got: {keep_text!r})"
            )
        keep: frozenset[int] | None = None
        if keep_text:
            names = [n.strip() for n in keep_text.split(",") if n.strip()]
            unknown = [n for n in names if n not in card.labels]
            if unknown:
                raise ModelError(f"{where}: params.keep_labels: not in labels (got: {unknown})")
            keep = frozenset(card.labels.index(n) for n in names)
        strides = card.params.get("strides", [8, 16, 32, 64])
        reg_max = card.params.get("reg_max", 7)
        if not isinstance(strides, list) or not all(isinstance(s, int) and s > 0 for s in strides):
            raise ModelError(f"{where}: params.strides: a list of positive ints (got: {strides})")
        if not isinstance(reg_max, int) or reg_max < 1:
            raise ModelError(f"{where}: params.reg_max: a positive int (got: {reg_max!r})")
        tta = card.params.get("tta", "none")
        if tta not in TTA_MODES:
            raise ModelError(f"{where}: params.tta: one of {list(TTA_MODES)} (got: {tta!r})")
        return cls(
            preprocess=card.preprocess,
            postprocess=card.postprocess,
            input_name=spec.name,
            input_width=int(shape[3]),
            input_height=int(shape[2]),
            labels=tuple(card.labels),
            score_threshold=float(score),
            nms_iou=float(iou),
            keep=keep,
            strides=tuple(int(s) for s in strides),
            reg_max=reg_max,
            tta=str(tta),
        )


# ---------------------------------------------------------------------------------------------
# Pre-processing


def _check_image(image: np.ndarray) -> None:
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(
            f"expected a BGR uint8 image of shape (H, W, 3) (got: {image.dtype} {image.shape})"
        )
    if image.shape[0] < 1 or image.shape[1] < 1:
        raise ValueError(f"empty image (got: {image.shape})")


def _resize(image: np.ndarray, spec: DetectorSpec) -> tuple[np.ndarray, Transform]:
    h, w = image.shape[:2]
    resized = cv2.resize(
        image, (spec.input_width, spec.input_height), interpolation=cv2.INTER_LINEAR
    )
    return resized, Transform(spec.input_width / w, spec.input_height / h, w, h)


# The tensors are built by OpenCV's blobFromImage (HWC uint8 -> NCHW float32, scaling and channel
# swap in one C++ pass) rather than numpy's cast, arithmetic and transpose: at 416 x 416 that is
# 0.5 ms instead of 2.3 ms per frame, a tenth of the pool pipeline's overhead over a bare run, with
# bit-identical tensors (the same float32 products; tests/test_detection.py compares them).


def _resize_rgb_imagenet(image: np.ndarray, spec: DetectorSpec) -> tuple[np.ndarray, Transform]:
    resized, transform = _resize(image, spec)
    blob = cv2.dnn.blobFromImage(resized, 1.0 / 255.0, swapRB=True)
    tensor = np.asarray(blob, dtype=np.float32)  # a float32 blob already: no copy, only the type
    tensor -= _MEAN[None, :, None, None]
    tensor /= _STD[None, :, None, None]
    return tensor, transform


def _resize_bgr_unit(image: np.ndarray, spec: DetectorSpec) -> tuple[np.ndarray, Transform]:
    resized, transform = _resize(image, spec)
    return cv2.dnn.blobFromImage(resized, 1.0 / 255.0), transform


def _letterbox_bgr_114(image: np.ndarray, spec: DetectorSpec) -> tuple[np.ndarray, Transform]:
    h, w = image.shape[:2]
    r = min(spec.input_width / w, spec.input_height / h)
    nw, nh = max(1, round(w * r)), max(1, round(h * r))
    canvas = np.full((spec.input_height, spec.input_width, 3), _PAD_VALUE, dtype=np.uint8)
    canvas[:nh, :nw] = cv2.resize(image, (nw, nh), interpolation=cv2.INTER_LINEAR)
    return cv2.dnn.blobFromImage(canvas), Transform(r, r, w, h)


Preprocessor = Callable[[np.ndarray, DetectorSpec], tuple[np.ndarray, Transform]]

PREPROCESSORS: dict[str, Preprocessor] = {
    "resize_rgb_imagenet": _resize_rgb_imagenet,
    "resize_bgr_unit": _resize_bgr_unit,
    "letterbox_bgr_114": _letterbox_bgr_114,
}


def preprocess(image: np.ndarray, spec: DetectorSpec) -> tuple[np.ndarray, Transform]:
    """BGR uint8 (H, W, 3) -> the model's float32 [1, 3, h, w] input and the way back.

    ValueError if ``image`` is not a BGR uint8 image.
    """
    _check_image(image)
    return PREPROCESSORS[spec.preprocess](image, spec)


def views(tensor: np.ndarray, spec: DetectorSpec) -> list[np.ndarray]:
    """The model inputs for one pre-processed image: itself, and with ``tta = "hflip"`` its
    mirror image (the tensor flipped left-right; letterbox padding moves to the other side,
    which :func:`decode_views` undoes by mirroring in input pixels)."""
    if spec.tta == "hflip":
        return [tensor, np.ascontiguousarray(tensor[..., ::-1])]
    return [tensor]


# ---------------------------------------------------------------------------------------------
# NMS


def box_iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """IoU of one (4,) box with each of (N, 4) boxes (x1, y1, x2, y2)."""
    x1 = np.maximum(box[0], boxes[:, 0])
    y1 = np.maximum(box[1], boxes[:, 1])
    x2 = np.minimum(box[2], boxes[:, 2])
    y2 = np.minimum(box[3], boxes[:, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    area = max(0.0, float(box[2] - box[0])) * max(0.0, float(box[3] - box[1]))
    areas = np.clip(boxes[:, 2] - boxes[:, 0], 0, None) * np.clip(
        boxes[:, 3] - boxes[:, 1], 0, None
    )
    union = area + areas - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float) -> np.ndarray:
    """Indices of the boxes kept by greedy NMS, best score first.

    A box is suppressed when its IoU with a better kept box exceeds ``iou_threshold``.
    """
    order = np.argsort(-scores, kind="stable")
    keep: list[int] = []
    while order.size:
        best = int(order[0])
        keep.append(best)
        if order.size == 1:
            break
        rest = order[1:]
        order = rest[box_iou(boxes[best], boxes[rest]) <= iou_threshold]
    return np.asarray(keep, dtype=np.int64)


# ---------------------------------------------------------------------------------------------
# Decoders: model outputs -> candidate boxes (input pixels), scores and class indices


Candidates = tuple[np.ndarray, np.ndarray, np.ndarray]  # boxes (N,4), scores (N,), classes (N,)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return np.asarray(1.0 / (1.0 + np.exp(-x)))


def _best_class(cls_scores: np.ndarray, spec: DetectorSpec) -> tuple[np.ndarray, np.ndarray]:
    """Per row the best kept class and its score (rows, classes) -> (rows,), (rows,)."""
    if spec.keep is not None:
        kept = np.asarray(sorted(spec.keep), dtype=np.int64)
        sub = cls_scores[:, kept]
        arg = np.argmax(sub, axis=1)
        return kept[arg], sub[np.arange(len(sub)), arg]
    arg = np.argmax(cls_scores, axis=1)
    return arg, cls_scores[np.arange(len(cls_scores)), arg]


def decode_fastestdet(outputs: Sequence[np.ndarray], spec: DetectorSpec) -> Candidates:
    """FastestDet: one [1, 5 + C, H, W] map; score = obj^0.6 * cls^0.4, boxes per cell."""
    out = np.asarray(outputs[0], dtype=np.float32)[0]
    channels, gh, gw = out.shape
    flat = out.reshape(channels, -1).T  # (cells, 5 + C)
    classes, cls_score = _best_class(flat[:, 5:], spec)
    obj = np.clip(flat[:, 0], 0.0, None)
    scores = np.power(obj, 0.6) * np.power(np.clip(cls_score, 0.0, None), 0.4)
    gy, gx = np.divmod(np.arange(gh * gw), gw)
    cx = (gx + np.tanh(flat[:, 1])) / gw * spec.input_width
    cy = (gy + np.tanh(flat[:, 2])) / gh * spec.input_height
    bw = _sigmoid(flat[:, 3]) * spec.input_width
    bh = _sigmoid(flat[:, 4]) * spec.input_height
    boxes = np.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], axis=1)
    return boxes, scores, classes


@functools.lru_cache(maxsize=16)
def _grid(size_w: int, size_h: int, strides: tuple[int, ...]) -> list[tuple[np.ndarray, int]]:
    """Cell coordinates per stride. Cached: the same few input sizes every frame (two views per
    frame with test-time augmentation); read-only, so no caller can change the shared copy."""
    cells = []
    for s in strides:
        gw, gh = -(-size_w // s), -(-size_h // s)
        gy, gx = np.divmod(np.arange(gh * gw), gw)
        xy = np.stack([gx, gy], axis=1).astype(np.float32)
        xy.setflags(write=False)
        cells.append((xy, s))
    return cells


def decode_yolox(outputs: Sequence[np.ndarray], spec: DetectorSpec) -> Candidates:
    """YOLOX: [1, cells, 5 + C] (strides 8/16/32), obj and cls already sigmoid."""
    out = np.asarray(outputs[0], dtype=np.float32)[0]
    grids = _grid(spec.input_width, spec.input_height, spec.strides)
    xy = np.concatenate([g for g, _s in grids])
    stride = np.concatenate([np.full(len(g), s, dtype=np.float32) for g, s in grids])
    if len(xy) != len(out):
        raise ModelError(
            f"yolox decoder: {len(out)} rows, the strides {list(spec.strides)} give {len(xy)}"
        )
    classes, cls_score = _best_class(out[:, 5:], spec)
    scores = out[:, 4] * cls_score
    cx = (out[:, 0] + xy[:, 0]) * stride
    cy = (out[:, 1] + xy[:, 1]) * stride
    w = np.exp(np.clip(out[:, 2], None, 20.0)) * stride
    h = np.exp(np.clip(out[:, 3], None, 20.0)) * stride
    boxes = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=1)
    return boxes, scores, classes


def decode_picodet(outputs: Sequence[np.ndarray], spec: DetectorSpec) -> Candidates:
    """PicoDet (GFL): per stride a score map [1, N, C] (sigmoid) then per stride a
    distribution map [1, N, 4 * (reg_max + 1)]; sides are expected values times the stride."""
    levels = len(spec.strides)
    if len(outputs) != 2 * levels:
        raise ModelError(
            f"picodet decoder: {len(outputs)} outputs, expected {2 * levels} "
            f"(scores and boxes for strides {list(spec.strides)})"
        )
    bins = spec.reg_max + 1
    project = np.arange(bins, dtype=np.float32)
    all_boxes, all_scores, all_classes = [], [], []
    for (xy, stride), score_map, dist_map in zip(
        _grid(spec.input_width, spec.input_height, spec.strides),
        outputs[:levels],
        outputs[levels:],
        strict=True,
    ):
        cls_scores = np.asarray(score_map, dtype=np.float32)[0]
        classes, scores = _best_class(cls_scores, spec)
        # Only cells that can pass the threshold need their distributions decoded.
        rows = np.flatnonzero(scores >= spec.score_threshold)
        if rows.size == 0:
            continue
        dist = np.asarray(dist_map, dtype=np.float32)[0][rows].reshape(-1, 4, bins)
        dist = np.exp(dist - dist.max(axis=2, keepdims=True))
        dist /= dist.sum(axis=2, keepdims=True)
        sides = (dist @ project) * stride  # (rows, 4): left, top, right, bottom
        centre = (xy[rows] + 0.5) * stride
        all_boxes.append(np.concatenate([centre - sides[:, :2], centre + sides[:, 2:]], axis=1))
        all_scores.append(scores[rows])
        all_classes.append(classes[rows])
    if not all_boxes:
        return np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(0, np.int64)
    return (
        np.concatenate(all_boxes),
        np.concatenate(all_scores),
        np.concatenate(all_classes),
    )


Decoder = Callable[[Sequence[np.ndarray], DetectorSpec], Candidates]

DECODERS: dict[str, Decoder] = {
    "fastestdet": decode_fastestdet,
    "yolox": decode_yolox,
    "picodet": decode_picodet,
}


def decode(
    outputs: Sequence[np.ndarray],
    spec: DetectorSpec,
    transform: Transform,
    *,
    score_threshold: float | None = None,
) -> list[Detection]:
    """Model outputs -> detections in original-image pixels: threshold, per-class NMS, best first.

    ``score_threshold`` overrides the card's (evaluation sweeps use a low one). The outputs of
    one run on the image as pre-processed, whatever ``spec.tta`` says; :func:`decode_views`
    takes one run per view.
    """
    spec = _at(spec, score_threshold)
    boxes, scores, classes = DECODERS[spec.postprocess](outputs, spec)
    return _detections(boxes, scores, classes, spec, transform)


def decode_views(
    outputs: Sequence[Sequence[np.ndarray]],
    spec: DetectorSpec,
    transform: Transform,
    *,
    score_threshold: float | None = None,
) -> list[Detection]:
    """The outputs of one run per tensor of :func:`views`, in that order -> detections in
    original-image pixels, best first.

    With ``tta = "hflip"`` the mirror view's boxes are mirrored back and the two views' boxes
    are fused (:func:`fuse_views`): an object's score is the mean of its best score in each
    view (0 in a view that does not see it), its box the score-weighted mean of its boxes. The
    threshold applies to the fused score. With ``tta = "none"`` this is :func:`decode` of the
    one run. ValueError if the number of runs does not fit ``spec.tta``.
    """
    expected = 2 if spec.tta == "hflip" else 1
    if len(outputs) != expected:
        raise ValueError(
            f"tta {spec.tta!r} takes {expected} set(s) of model outputs (got: {len(outputs)})"
        )
    if expected == 1:
        return decode(outputs[0], spec, transform, score_threshold=score_threshold)
    threshold = spec.score_threshold if score_threshold is None else score_threshold
    # Candidates are decoded at a fixed floor, not at the threshold, so that the fused score of
    # an object does not depend on the threshold asked for (an evaluation's sweep and the
    # gateway's threshold see the same fused detections).
    low = _at(spec, min(threshold, TTA_FLOOR))
    decoder = DECODERS[spec.postprocess]
    boxes, scores, classes = decoder(outputs[0], low)
    m_boxes, m_scores, m_classes = decoder(outputs[1], low)
    # In the mirror view x runs the other way: x -> input_width - x, and x1, x2 swap.
    back = np.empty_like(m_boxes)
    back[:, 0] = spec.input_width - m_boxes[:, 2]
    back[:, 1] = m_boxes[:, 1]
    back[:, 2] = spec.input_width - m_boxes[:, 0]
    back[:, 3] = m_boxes[:, 3]
    fused_boxes, fused_scores, fused_classes = fuse_views(
        np.concatenate([boxes, back]),
        np.concatenate([scores, m_scores]),
        np.concatenate([classes, m_classes]),
        np.repeat(np.arange(2), [len(scores), len(m_scores)]),
        n_views=2,
        iou_threshold=spec.nms_iou,
        min_score=threshold,
    )
    chosen = fused_scores >= threshold
    if spec.keep is not None:
        chosen &= np.isin(fused_classes, np.fromiter(spec.keep, dtype=np.int64))
    return _as_detections(
        transform.to_original(fused_boxes[chosen]),
        fused_scores[chosen],
        fused_classes[chosen],
        spec,
    )


def fuse_views(
    boxes: np.ndarray,
    scores: np.ndarray,
    classes: np.ndarray,
    view: np.ndarray,
    *,
    n_views: int,
    iou_threshold: float,
    min_score: float = 0.0,
) -> Candidates:
    """Fuse the candidate boxes of several views of one image (all in the same pixels).

    Per class, greedily by score: the best remaining box and every remaining box whose IoU with
    it exceeds ``iou_threshold`` form one object (as NMS would suppress them). Its score is the
    mean over the ``n_views`` views of each view's best score in the group (0 for a view with
    none), its box the score-weighted mean of the group's boxes (a weighted box fusion).
    ``view`` gives each candidate's view index. Returns fused boxes, scores, classes.

    Groups whose best box scores below ``min_score`` are not formed: a fused score is at most
    its group's best, and the groups before them are already complete, so the result above
    ``min_score`` is the same, without one pass per low-scoring candidate (at the 0.05 floor,
    most of them).
    """
    out_boxes: list[np.ndarray] = []
    out_scores: list[float] = []
    out_classes: list[int] = []
    for cls in np.unique(classes):
        idx = np.flatnonzero(classes == cls)
        b, s, v = boxes[idx].astype(np.float32), scores[idx].astype(np.float32), view[idx]
        left = np.argsort(-s, kind="stable")
        while left.size:
            lead = left[0]
            if s[lead] < min_score:
                break
            group = left[box_iou(b[lead], b[left]) > iou_threshold]
            group = np.union1d(group, [lead])
            best = np.zeros(n_views, np.float32)
            np.maximum.at(best, v[group], s[group])
            weights = s[group]
            out_boxes.append((b[group] * weights[:, None]).sum(axis=0) / weights.sum())
            out_scores.append(float(best.sum()) / n_views)
            out_classes.append(int(cls))
            left = left[~np.isin(left, group)]
    if not out_boxes:
        return np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(0, np.int64)
    return (
        np.stack(out_boxes).astype(np.float32),
        np.asarray(out_scores, np.float32),
        np.asarray(out_classes, np.int64),
    )


def _at(spec: DetectorSpec, score_threshold: float | None) -> DetectorSpec:
    if score_threshold is None or score_threshold == spec.score_threshold:
        return spec
    return dataclasses.replace(spec, score_threshold=score_threshold)


def _detections(
    boxes: np.ndarray,
    scores: np.ndarray,
    classes: np.ndarray,
    spec: DetectorSpec,
    transform: Transform,
) -> list[Detection]:
    """Candidates in input pixels -> thresholded, per-class NMS, original pixels, best first."""
    chosen = scores >= spec.score_threshold
    if spec.keep is not None:
        chosen &= np.isin(classes, np.fromiter(spec.keep, dtype=np.int64))
    boxes, scores, classes = boxes[chosen], scores[chosen], classes[chosen]
    if not len(scores):
        return []
    boxes = transform.to_original(boxes.astype(np.float32))
    kept = [
        i
        for cls in np.unique(classes)
        for i in np.flatnonzero(classes == cls)[
            nms(boxes[classes == cls], scores[classes == cls], spec.nms_iou)
        ]
    ]
    return _as_detections(boxes[kept], scores[kept], classes[kept], spec)


def _as_detections(
    boxes: np.ndarray, scores: np.ndarray, classes: np.ndarray, spec: DetectorSpec
) -> list[Detection]:
    """Rows of boxes (image pixels), scores, classes -> Detection objects, best first."""
    found = [
        Detection(
            spec.labels[int(c)] if int(c) < len(spec.labels) else str(int(c)),
            float(s),
            (float(b[0]), float(b[1]), float(b[2]), float(b[3])),
        )
        for b, s, c in zip(boxes, scores, classes, strict=True)
    ]
    found.sort(key=lambda d: -d.score)
    return found


# ---------------------------------------------------------------------------------------------
# One call


class RunnableModel(Protocol):
    """What :func:`detect` needs of a model (``gateway.inference.LoadedModel`` fits)."""

    @property
    def card(self) -> ModelCard: ...

    def run(self, feeds: Mapping[str, np.ndarray], *, check: bool = True) -> list[np.ndarray]: ...


def detect(
    model: RunnableModel,
    image: np.ndarray,
    spec: DetectorSpec | None = None,
    *,
    score_threshold: float | None = None,
) -> list[Detection]:
    """Run ``model`` on a BGR uint8 image; detections in the image's pixels, best first.

    ``spec`` defaults to the model card's (pass it to avoid re-reading the card per frame).
    With ``tta = "hflip"`` the model runs twice (the image and its mirror image).
    ValueError for an image that is not BGR uint8; ModelError for a failed run.
    """
    if spec is None:
        spec = DetectorSpec.from_card(model.card)
    tensor, transform = preprocess(image, spec)
    outputs = [model.run({spec.input_name: view}, check=False) for view in views(tensor, spec)]
    return decode_views(outputs, spec, transform, score_threshold=score_threshold)
