"""Train the pool person-in-water detector: PicoDet-S 416's head fine-tuned for one class.

    OMP_NUM_THREADS=1 .venv/bin/python -m models.pool.train [--data DIR] [--out DIR] [--cache DIR]

How (reproducible, CPU only, about half an hour on one core):

1. PP-PicoDet-S 416 (COCO, Apache-2.0, ``../shared/data/onnx-models/picodet-s-416``) is cut at its
   neck: four 96-channel feature maps at strides 8, 16, 32, 64. Backbone and neck stay frozen;
   their outputs are computed once with onnxruntime for every *training* image and its mirror
   image (the train split already holds three augmented copies of each source image) and for the
   valid images.
2. The detection head (per stride two depth-wise 5x5 + point-wise 1x1 blocks with hard-swish,
   then one 1x1 conv) is rebuilt in torch from PicoDet's own weights; the final conv keeps only
   the "person" score row and the 32 box-distribution rows, so training starts from COCO's
   person detector. It is trained on the training features with SimOTA assignment, quality
   focal loss, GIoU and distribution focal loss (the losses PicoDet v1 was trained with).
3. The epoch is chosen by AP50 on ``valid`` (not augmented, never trained on); the trained
   weights are written back into PicoDet's graph (one class instead of 80), giving one ONNX
   file image -> per stride scores [1, N, 1] and distributions [1, N, 32] (decoder ``picodet``).
4. int8: static QDQ (models/quantize.py) calibrated on 128 training images. The score
   threshold is the one on ``valid`` where min(precision, recall) of the int8 model is highest.

Stage 2 (``--stage2 FP32``) fine-tunes neck and head of the stage-1 model from cached backbone
features (``torch_graph.py`` runs that part of the ONNX graph in torch). Stage 3 (``--stage3
FP32``) fine-tunes the whole network, backbone included, of the stage-2 model on the training
images augmented afresh at every step (random scale and crop around the plain resize, mirror,
colour jitter): nothing can be cached, so each step runs the full graph in torch; every epoch is
checkpointed and ``--checkpoint`` exports a saved one (or the mean of several saved ones'
weights); ``--ema DECAY`` keeps a moving average of the weights instead of the live ones.

Nothing here reads ``pool-swimmers-drowning-sample``: that is the evaluation set
(``models/pool/evaluate.py``).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn.functional as F  # noqa: N812 -- torch's own convention
from onnx import helper, numpy_helper, version_converter
from torch import nn

from models.card import ModelCard, TensorSpec, dump_card, sha256_file
from models.detection import DetectorSpec, Transform, decode, preprocess
from models.pool.data import TRAINING_SET, default_data_dir, list_images, read_boxes
from models.pool.metrics import ImageResult, average_precision, match, score_at
from models.pool.torch_graph import GraphModule, write_back
from models.quantize import quantize_model

__all__ = ["main"]

NAME = "pool_person_detector"
VERSION = "1.4.0"
SIZE = 416
STRIDES = (8, 16, 32, 64)
REG_MAX = 7
BINS = REG_MAX + 1
CHANNELS = 96
SEED = 20_261_122
PICODET = Path("onnx-models/picodet-s-416/picodet_s_416_coco.onnx")
HERE = Path(__file__).resolve().parent
# Score threshold used while matching for AP: low enough to trace the whole PR curve.
EVAL_FLOOR = 0.05
# Loss weights as in PicoDet v1 (QFL 1, GIoU 2, DFL 0.25).
W_GIOU = 2.0
W_DFL = 0.25


def _say(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


# ---------------------------------------------------------------------------------------------
# The PicoDet graph: where the neck ends and what the head is


@dataclass(frozen=True)
class HeadNodes:
    """Names in PicoDet's graph for one stride's head."""

    neck: str  # the neck's output feature map (the head's input)
    tower: tuple[tuple[str, str], ...]  # (weight, bias) of dw, pw, dw, pw in order
    final_weight: str
    final_bias: str
    split: str  # the Split node's output[0]: scores, output[1]: distributions


def head_nodes(graph: onnx.GraphProto) -> list[HeadNodes]:
    """Walk back from each stride's final 1x1 conv (80 + 32 channels) to the neck."""
    producer = {out: node for node in graph.node for out in node.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    found = []
    for level in range(len(STRIDES)):
        final = next(
            n
            for n in graph.node
            if n.op_type == "Conv" and n.input[1] == f"conv2d_{131 + level}.w_0"
        )
        chain = []
        tensor = final.input[0]
        for _ in range(4):
            div = producer[tensor]
            conv = producer[producer[div.input[0]].input[0]]
            if div.op_type != "Div" or conv.op_type != "Conv":
                raise ValueError(f"unexpected PicoDet head structure at {tensor}")
            chain.append((conv.input[1], conv.input[2]))
            tensor = conv.input[0]
        split = next(n for n in consumers[final.output[0]] if n.op_type == "Split")
        found.append(
            HeadNodes(
                neck=tensor,
                tower=tuple(reversed(chain)),
                final_weight=final.input[1],
                final_bias=final.input[2],
                split=split.output[0],
            )
        )
    return found


def _tensor_values(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    values = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":
            values[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    return values


def _set_tensor(graph: onnx.GraphProto, name: str, value: np.ndarray) -> None:
    for i, init in enumerate(graph.initializer):
        if init.name == name:
            graph.initializer[i].CopyFrom(numpy_helper.from_array(value, name))
            return
    for node in graph.node:
        if node.op_type == "Constant" and node.output[0] == name:
            node.attribute[0].t.CopyFrom(numpy_helper.from_array(value, name))
            return
    raise KeyError(name)


def _without_weight_inputs(model: onnx.ModelProto) -> None:
    """Paddle's exporter lists every weight as a graph input too; keep only the image."""
    inits = {init.name for init in model.graph.initializer}
    keep = [inp for inp in model.graph.input if inp.name not in inits]
    del model.graph.input[:]
    model.graph.input.extend(keep)


def neck_model(picodet: Path) -> bytes:
    """PicoDet with the four neck feature maps as its outputs (the head is left unused)."""
    model = onnx.load(str(picodet))
    _without_weight_inputs(model)
    nodes = head_nodes(model.graph)
    del model.graph.output[:]
    for h in nodes:
        model.graph.output.append(
            helper.make_tensor_value_info(h.neck, onnx.TensorProto.FLOAT, None)
        )
    return bytes(model.SerializeToString())


# ---------------------------------------------------------------------------------------------
# Features


@dataclass
class FeatureSet:
    """Neck features of a set of images (fp16) and their boxes in 416 x 416 input pixels."""

    levels: list[np.ndarray]  # per stride (images, 96, h, w), float16
    boxes: list[np.ndarray]  # per image (n, 4)
    sizes: list[tuple[int, int]]  # per image original (width, height)
    truths: list[np.ndarray]  # per image boxes in original pixels


def read_image(path: Path) -> np.ndarray:
    """A BGR uint8 image; ValueError naming the file if it cannot be decoded."""
    image = cv2.imread(str(path))
    if image is None:
        raise ValueError(f"{path}: not a readable image")
    return np.asarray(image, dtype=np.uint8)


def _picodet_spec(threshold: float = EVAL_FLOOR) -> DetectorSpec:
    return DetectorSpec(
        preprocess="resize_rgb_imagenet",
        postprocess="picodet",
        input_name="image",
        input_width=SIZE,
        input_height=SIZE,
        labels=("person",),
        score_threshold=threshold,
        nms_iou=0.6,
        keep=None,
        strides=STRIDES,
        reg_max=REG_MAX,
    )


def extract(
    session: ort.InferenceSession, folder: Path, *, flips: bool, limit: int | None = None
) -> FeatureSet:
    """Run the neck over a split folder's images (and their mirror images)."""
    spec = _picodet_spec()
    items = list_images(folder)[:limit]
    per_level: list[list[np.ndarray]] = [[] for _ in session.get_outputs()]
    boxes, sizes, truths = [], [], []
    started = time.perf_counter()
    for n, item in enumerate(items):
        image = read_image(item.image)
        h, w = image.shape[:2]
        truth = read_boxes(item.labels, w, h)
        in_input = truth * np.array([SIZE / w, SIZE / h, SIZE / w, SIZE / h], np.float32)
        variants = [(image, in_input)]
        if flips:
            mirrored = in_input.copy()
            mirrored[:, [0, 2]] = SIZE - in_input[:, [2, 0]]
            variants.append((np.ascontiguousarray(image[:, ::-1]), mirrored))
        for picture, picture_boxes in variants:
            tensor, _ = preprocess(picture, spec)
            outs = session.run(None, {"image": tensor})
            for level, out in enumerate(outs):
                per_level[level].append(out[0].astype(np.float16))
            boxes.append(picture_boxes)
            sizes.append((w, h))
            truths.append(truth)
        if n % 200 == 199:
            took = time.perf_counter() - started
            _say(f"  features {folder.name}: {n + 1}/{len(items)} ({took:.0f} s)")
    return FeatureSet([np.stack(level) for level in per_level], boxes, sizes, truths)


def _save(features: FeatureSet, path: Path) -> None:
    arrays: dict[str, np.ndarray] = {f"level{i}": a for i, a in enumerate(features.levels)}
    arrays["counts"] = np.array([len(b) for b in features.boxes], np.int64)
    arrays["boxes"] = np.concatenate([*features.boxes, np.zeros((0, 4), np.float32)])
    arrays["truths"] = np.concatenate([*features.truths, np.zeros((0, 4), np.float32)])
    arrays["sizes"] = np.array(features.sizes, np.int64)
    np.savez(path, **arrays)  # type: ignore[arg-type]  # numpy's stub: kwargs as allow_pickle


def _load(path: Path, levels: int = len(STRIDES)) -> FeatureSet:
    with np.load(path) as data:
        counts = data["counts"]
        bounds = np.cumsum(counts)[:-1]
        return FeatureSet(
            [data[f"level{i}"] for i in range(levels)],
            list(np.split(data["boxes"], bounds)),
            [(int(w), int(h)) for w, h in data["sizes"]],
            list(np.split(data["truths"], bounds)),
        )


# ---------------------------------------------------------------------------------------------
# The head in torch


class LevelHead(nn.Module):  # type: ignore[misc]  # torch is not type-checked (training only)
    """One stride: dw5x5, pw, dw5x5, pw (hard-swish after each), then scores + distributions."""

    def __init__(self) -> None:
        super().__init__()
        self.tower = nn.ModuleList(
            [
                nn.Conv2d(CHANNELS, CHANNELS, 5, padding=2, groups=CHANNELS),
                nn.Conv2d(CHANNELS, CHANNELS, 1),
                nn.Conv2d(CHANNELS, CHANNELS, 5, padding=2, groups=CHANNELS),
                nn.Conv2d(CHANNELS, CHANNELS, 1),
            ]
        )
        self.out = nn.Conv2d(CHANNELS, 1 + 4 * BINS, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv in self.tower:
            x = F.hardswish(conv(x))
        out: torch.Tensor = self.out(x)
        return out


class Head(nn.Module):  # type: ignore[misc]
    """All strides; returns score logits (B, N) and distribution logits (B, N, 32)."""

    def __init__(self) -> None:
        super().__init__()
        self.levels = nn.ModuleList([LevelHead() for _ in STRIDES])

    def forward(self, feats: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        scores, dists = [], []
        for level, x in zip(self.levels, feats, strict=True):
            out: torch.Tensor = level(x)
            b = out.shape[0]
            flat = out.reshape(b, 1 + 4 * BINS, -1).transpose(1, 2)
            scores.append(flat[:, :, 0])
            dists.append(flat[:, :, 1:])
        return torch.cat(scores, 1), torch.cat(dists, 1)


def init_from_picodet(head: Head, graph: onnx.GraphProto) -> None:
    """PicoDet's head weights; of the 80 class rows only "person" (row 0) is kept."""
    values = _tensor_values(graph)
    with torch.no_grad():
        for level, nodes in zip(head.levels, head_nodes(graph), strict=True):
            assert isinstance(level, LevelHead)
            for conv, (w, b) in zip(level.tower, nodes.tower, strict=True):
                assert isinstance(conv, nn.Conv2d)
                conv.weight.copy_(torch.from_numpy(values[w]))
                assert conv.bias is not None
                conv.bias.copy_(torch.from_numpy(values[b]))
            weight = values[nodes.final_weight]
            bias = values[nodes.final_bias]
            keep = [0, *range(80, 80 + 4 * BINS)]
            level.out.weight.copy_(torch.from_numpy(weight[keep]))
            assert level.out.bias is not None
            level.out.bias.copy_(torch.from_numpy(bias[keep]))


def _grid() -> tuple[torch.Tensor, torch.Tensor]:
    centres, strides = [], []
    for s in STRIDES:
        n = -(-SIZE // s)
        gy, gx = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
        centres.append((torch.stack([gx.reshape(-1), gy.reshape(-1)], 1).float() + 0.5) * s)
        strides.append(torch.full((n * n,), float(s)))
    return torch.cat(centres), torch.cat(strides)


def decode_boxes(dists: torch.Tensor, centres: torch.Tensor, strides: torch.Tensor) -> torch.Tensor:
    """(..., N, 32) distribution logits -> (..., N, 4) boxes x1, y1, x2, y2 in input pixels."""
    prob = dists.reshape(*dists.shape[:-1], 4, BINS).softmax(-1)
    sides = (prob * torch.arange(BINS, dtype=prob.dtype)).sum(-1) * strides[..., None]
    return torch.cat([centres - sides[..., :2], centres + sides[..., 2:]], -1)


def _iou_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    lt = torch.maximum(a[:, None, :2], b[None, :, :2])
    rb = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    area_a = (a[:, 2:] - a[:, :2]).clamp(min=0).prod(-1)
    area_b = (b[:, 2:] - b[:, :2]).clamp(min=0).prod(-1)
    return inter / (area_a[:, None] + area_b[None, :] - inter + 1e-9)


def _giou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    lt = torch.maximum(a[:, :2], b[:, :2])
    rb = torch.minimum(a[:, 2:], b[:, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    area_a = (a[:, 2:] - a[:, :2]).clamp(min=0).prod(-1)
    area_b = (b[:, 2:] - b[:, :2]).clamp(min=0).prod(-1)
    union = area_a + area_b - inter + 1e-9
    hull = (torch.maximum(a[:, 2:], b[:, 2:]) - torch.minimum(a[:, :2], b[:, :2])).prod(-1) + 1e-9
    return inter / union - (hull - union) / hull


def simota(
    logits: torch.Tensor,
    boxes: torch.Tensor,
    truth: torch.Tensor,
    centres: torch.Tensor,
    strides: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SimOTA for one image: (cell indices, their ground-truth index), without gradients."""
    empty = torch.zeros(0, dtype=torch.long)
    if not len(truth):
        return empty, empty
    gc = (truth[:, :2] + truth[:, 2:]) / 2
    in_box = (
        (centres[None, :, 0] > truth[:, None, 0])
        & (centres[None, :, 0] < truth[:, None, 2])
        & (centres[None, :, 1] > truth[:, None, 1])
        & (centres[None, :, 1] < truth[:, None, 3])
    )
    radius = 2.5 * strides[None, :]
    in_centre = ((centres[None, :, 0] - gc[:, None, 0]).abs() < radius) & (
        (centres[None, :, 1] - gc[:, None, 1]).abs() < radius
    )
    candidate = (in_box | in_centre).any(0)
    cand = torch.nonzero(candidate).squeeze(1)
    if not len(cand):
        return empty, empty
    ious = _iou_matrix(truth, boxes[cand])
    cls_cost = F.binary_cross_entropy_with_logits(
        logits[cand][None].expand(len(truth), -1),
        torch.ones(len(truth), len(cand)),
        reduction="none",
    )
    cost = cls_cost + 3.0 * -torch.log(ious + 1e-8) + 1e5 * (~(in_box & in_centre)[:, cand]).float()
    k = torch.clamp(ious.topk(min(10, len(cand)), 1).values.sum(1).int(), min=1)
    matching = torch.zeros_like(cost, dtype=torch.bool)
    for g in range(len(truth)):
        matching[g, cost[g].topk(int(k[g]), largest=False).indices] = True
    several = matching.sum(0) > 1
    if several.any():
        best = cost[:, several].argmin(0)
        matching[:, several] = False
        matching[best, torch.nonzero(several).squeeze(1)] = True
    cols = torch.nonzero(matching.any(0)).squeeze(1)
    return cand[cols], matching[:, cols].float().argmax(0)


def batch_loss(
    head: nn.Module,
    feats: Sequence[torch.Tensor],
    truths: Sequence[torch.Tensor],
    centres: torch.Tensor,
    strides: torch.Tensor,
) -> torch.Tensor:
    """Quality focal loss + GIoU + DFL over a batch (normalised by the positives' weight)."""
    logits, dists = head(feats)
    boxes = decode_boxes(dists, centres, strides)
    target = torch.zeros_like(logits)
    reg_terms = []
    weight_sum = torch.tensor(0.0)
    for i, truth in enumerate(truths):
        with torch.no_grad():
            cells, gt_index = simota(logits[i], boxes[i], truth, centres, strides)
        if not len(cells):
            continue
        assigned = truth[gt_index]
        pred = boxes[i, cells]
        with torch.no_grad():
            quality = _iou_matrix(pred, assigned).diagonal().clamp(min=0.01)
        target[i, cells] = quality
        giou = 1.0 - _giou(pred, assigned)
        # DFL: the distance to each side as two neighbouring bins of the distribution.
        c = centres[cells]
        s = strides[cells][:, None]
        dist = torch.cat([c - assigned[:, :2], assigned[:, 2:] - c], 1) / s
        dist = dist.clamp(0, REG_MAX - 0.01)
        left = dist.floor().long()
        wl = left.float() + 1 - dist
        logp = dists[i, cells].reshape(-1, 4, BINS).log_softmax(-1)
        dfl = -(
            logp.gather(-1, left[..., None]).squeeze(-1) * wl
            + logp.gather(-1, (left + 1)[..., None]).squeeze(-1) * (1 - wl)
        ).mean(1)
        reg_terms.append((quality * (W_GIOU * giou + W_DFL * dfl)).sum())
        weight_sum = weight_sum + quality.sum()
    prob = logits.sigmoid()
    qfl = (
        F.binary_cross_entropy_with_logits(logits, target, reduction="none")
        * (prob - target).abs().pow(2)
    ).sum()
    norm = weight_sum.clamp(min=1.0)
    reg = torch.stack(reg_terms).sum() if reg_terms else torch.tensor(0.0)
    return (qfl + reg) / norm


def _batch(features: FeatureSet, idx: np.ndarray) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    feats = [torch.from_numpy(level[idx].astype(np.float32)) for level in features.levels]
    truths = [torch.from_numpy(features.boxes[i]) for i in idx]
    return feats, truths


# Training samples by index -> (model inputs, boxes in input pixels per sample).
BatchFn = Callable[[np.ndarray], tuple[list[torch.Tensor], list[torch.Tensor]]]


def head_outputs(head: nn.Module, features: FeatureSet, batch: int = 32) -> list[list[np.ndarray]]:
    """Per image the model's outputs as the ONNX model gives them (scores per stride, then
    distributions per stride), from the torch head."""
    counts = [(-(-SIZE // s)) ** 2 for s in STRIDES]
    bounds = np.cumsum(counts)[:-1]
    results = []
    head.eval()
    with torch.no_grad():
        for start in range(0, len(features.boxes), batch):
            idx = np.arange(start, min(start + batch, len(features.boxes)))
            feats, _ = _batch(features, idx)
            logits, dists = head(feats)
            probs = logits.sigmoid().numpy()
            d = dists.numpy()
            for j in range(len(idx)):
                scores = [p[None, :, None] for p in np.split(probs[j], bounds)]
                distributions = [x[None] for x in np.split(d[j], bounds)]
                results.append(scores + distributions)
    head.train()
    return results


def match_outputs(
    outputs: Sequence[Sequence[np.ndarray]],
    sizes: Sequence[tuple[int, int]],
    truths: Sequence[np.ndarray],
) -> list[ImageResult]:
    """Decode each image's outputs (floor threshold, NMS) in original pixels and match them."""
    spec = _picodet_spec()
    results = []
    for out, (w, h), truth in zip(outputs, sizes, truths, strict=True):
        found = decode(out, spec, Transform(SIZE / w, SIZE / h, w, h))
        boxes = np.array([d.box for d in found], np.float32).reshape(-1, 4)
        scores = np.array([d.score for d in found], np.float32)
        results.append(match(boxes, scores, truth))
    return results


def best_threshold(results: Sequence[ImageResult]) -> tuple[float, float, float]:
    """The score threshold where min(precision, recall) is highest: (threshold, P, R)."""
    best = (0.5, 0.0, 0.0)
    best_key = -1.0
    for t in np.arange(0.10, 0.90, 0.01):
        s = score_at(results, float(t))
        key = min(s.precision, s.recall)
        if key > best_key:
            best_key, best = key, (round(float(t), 2), s.precision, s.recall)
    return best


# ---------------------------------------------------------------------------------------------
# Export


def export(picodet: Path, head: Head, out: Path) -> None:
    """PicoDet's graph with the trained one-class head written into it."""
    model = onnx.load(str(picodet))
    _without_weight_inputs(model)
    graph = model.graph
    nodes = head_nodes(graph)
    state = {k: v.detach().numpy().astype(np.float32) for k, v in head.state_dict().items()}
    for level, h in enumerate(nodes):
        for j, (w, b) in enumerate(h.tower):
            _set_tensor(graph, w, state[f"levels.{level}.tower.{j}.weight"])
            _set_tensor(graph, b, state[f"levels.{level}.tower.{j}.bias"])
        _set_tensor(graph, h.final_weight, state[f"levels.{level}.out.weight"])
        _set_tensor(graph, h.final_bias, state[f"levels.{level}.out.bias"])
    for node in graph.node:
        if node.op_type == "Split" and node.output[0] in {h.split for h in nodes}:
            for attr in node.attribute:
                if attr.name == "split":
                    del attr.ints[:]
                    attr.ints.extend([1, 4 * BINS])
    # The score reshape target [1, 80, -1] (one constant for all strides) becomes [1, 1, -1].
    reshapes = [n for n in graph.node if n.op_type == "Reshape"]
    values = _tensor_values(graph)
    for node in reshapes:
        target = values.get(node.input[1])
        if target is not None and target.tolist() == [1, 80, -1]:
            _set_tensor(graph, node.input[1], np.array([1, 1, -1], np.int64))
    # Outputs named by what they are: scores_s8 ... then boxes_s8 ... (the decoder's order).
    renames = {}
    old = [o.name for o in graph.output]
    for i, s in enumerate(STRIDES):
        renames[old[i]] = f"scores_s{s}"
        renames[old[i + len(STRIDES)]] = f"boxes_s{s}"
    for node in graph.node:
        for k, name in enumerate(node.output):
            if name in renames:
                node.output[k] = renames[name]
    del graph.output[:]
    del graph.value_info[:]
    for s in STRIDES:
        n = (-(-SIZE // s)) ** 2
        graph.output.append(
            helper.make_tensor_value_info(f"scores_s{s}", onnx.TensorProto.FLOAT, [1, n, 1])
        )
    for s in STRIDES:
        n = (-(-SIZE // s)) ** 2
        graph.output.append(
            helper.make_tensor_value_info(f"boxes_s{s}", onnx.TensorProto.FLOAT, [1, n, 4 * BINS])
        )
    # Opset 11 (Paddle's export) has no per-channel DequantizeLinear; int8 needs opset 13.
    model = version_converter.convert_version(model, 13)
    onnx.checker.check_model(model)
    onnx.save(model, str(out))


def _session(path: Path, threads: int = 1) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def onnx_outputs(path: Path, images: Sequence[Path]) -> list[list[np.ndarray]]:
    """The exported model's outputs for image files (as the gateway computes them)."""
    session = _session(path)
    spec = _picodet_spec()
    outs = []
    for image_path in images:
        image = read_image(image_path)
        tensor, _ = preprocess(image, spec)
        outs.append([np.asarray(o) for o in session.run(None, {"image": tensor})])
    return outs


def _card(
    file: Path, quantization: str, threshold: float, metrics: dict[str, float | int | str]
) -> ModelCard:
    inputs = [TensorSpec(name="image", shape=[1, 3, SIZE, SIZE], dtype="float32")]
    outputs = [
        TensorSpec(name=f"scores_s{s}", shape=[1, (-(-SIZE // s)) ** 2, 1], dtype="float32")
        for s in STRIDES
    ] + [
        TensorSpec(name=f"boxes_s{s}", shape=[1, (-(-SIZE // s)) ** 2, 4 * BINS], dtype="float32")
        for s in STRIDES
    ]
    return ModelCard(
        name=NAME,
        version=VERSION,
        task="detect",
        file=file.name,
        sha256=sha256_file(file),
        inputs=inputs,
        outputs=outputs,
        labels=["person"],
        thresholds={"score": threshold, "nms_iou": 0.6},
        preprocess="resize_rgb_imagenet",
        postprocess="picodet",
        params={"strides": list(STRIDES), "reg_max": REG_MAX},
        licence=(
            "Apache-2.0 (PP-PicoDet-S 416 by PaddlePaddle, fine-tuned; "
            "LICENSE-Apache-2.0.txt). Training data CC BY 4.0: 'AI Drone Lifeguard' v6, "
            "workspace ai-drone-lifeguard on Roboflow Universe, via "
            "yashpotdar-py/drowning-detection-system @ 21174a7 (see README.md)"
        ),
        training_data=(
            "pool-swimmers-train/train (981 images = 327 sources x 3 augmented copies; mirror "
            "images in stages 1-2, random scale/crop, mirror and colour jitter at every step in "
            "stage 3); epochs and score threshold chosen on pool-swimmers-train/valid "
            "(164 images). Evaluated on pool-swimmers-drowning-sample (39 images), never trained "
            "or tuned on. See models/pool/README.md."
        ),
        quantization=quantization,
        description=(
            "One-class person-in-water detector: PP-PicoDet-S 416 (COCO) fine-tuned on "
            "swimmers in three stages: its GFL head (stage 1), neck and head (stage 2), then the "
            "whole network, backbone included, on augmented images (stage 3; "
            "models/pool/train.py). Outputs per "
            "stride 8/16/32/64: person score (sigmoid) and 4 x 8 box-side distributions. int8: "
            "the head is int8 (static QDQ); backbone and neck stay fp32, which per-tensor int8 "
            "cannot represent (models/pool/README.md)."
        ),
        metrics=metrics,
    )


def train_head(
    picodet: Path, train: FeatureSet, valid: FeatureSet, *, epochs: int, batch: int, lr: float
) -> tuple[Head, int]:
    """Fine-tune PicoDet's head on the training features; the epoch with the best valid AP50."""
    head = Head()
    init_from_picodet(head, onnx.load(str(picodet)).graph)
    best_epoch = fit(
        head,
        len(train.boxes),
        lambda idx: _batch(train, idx),
        valid,
        epochs=epochs,
        batch=batch,
        lr=lr,
    )
    return head, best_epoch


def fit(
    head: nn.Module,
    train_size: int,
    train_batch: BatchFn,
    valid: FeatureSet,
    *,
    epochs: int,
    batch: int,
    lr: float,
    checkpoints: Path | None = None,
    ema: float = 0.0,
) -> int:
    """Train ``head`` (inputs -> score logits, distributions); keep the best valid AP50.

    ``train_batch`` gives the inputs and boxes of training samples by index (``train_size`` of
    them). With ``checkpoints``, every epoch's weights are saved there (``epochNN.pt``) with its
    valid figures, so that a result exists if training is stopped early. With ``ema`` (a decay
    in (0, 1)), an exponential moving average of the weights, starting from the initial ones,
    is updated after every step, and it is what each epoch evaluates, saves and may choose.
    Returns the chosen epoch (0: the starting weights were best).
    """
    rng = np.random.default_rng(SEED)
    centres, strides = _grid()
    start = average_precision(match_outputs(head_outputs(head, valid), valid.sizes, valid.truths))
    _say(f"valid AP50 before training: {start:.4f}")
    optimiser = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=1e-4)
    steps = max(1, epochs * (-(-train_size // batch)))
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimiser, max_lr=lr, total_steps=steps, pct_start=0.1
    )
    best_ap, best_epoch, best_state = start, 0, {k: v.clone() for k, v in head.state_dict().items()}
    averaged = {k: v.clone() for k, v in head.state_dict().items()} if ema > 0 else None
    for epoch in range(1, epochs + 1):
        began = time.perf_counter()
        order = rng.permutation(train_size)
        total = 0.0
        for b in range(0, len(order), batch):
            feats, truths = train_batch(order[b : b + batch])
            loss = batch_loss(head, feats, truths, centres, strides)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            schedule.step()
            if averaged is not None:
                with torch.no_grad():
                    for key, value in head.state_dict().items():
                        averaged[key].mul_(ema).add_(value, alpha=1.0 - ema)
            total += float(loss.detach()) * len(truths)
            if (b // batch) % 20 == 19:
                took = time.perf_counter() - began
                _say(f"  epoch {epoch}: {b + len(truths)}/{len(order)} samples ({took:.0f} s)")
        live = None
        if averaged is not None:
            # Evaluate, save and keep the averaged weights; training goes on from the live ones.
            live = {k: v.clone() for k, v in head.state_dict().items()}
            head.load_state_dict(averaged)
        results = match_outputs(head_outputs(head, valid), valid.sizes, valid.truths)
        ap = average_precision(results)
        t, p, r = best_threshold(results)
        _say(
            f"epoch {epoch}: loss {total / len(order):.4f}  valid AP50 {ap:.4f}  "
            f"best min(P,R) at {t:.2f}: P {p:.3f} R {r:.3f}  ({time.perf_counter() - began:.0f} s)"
        )
        if checkpoints is not None:
            checkpoints.mkdir(parents=True, exist_ok=True)
            torch.save(
                {"state": head.state_dict(), "epoch": epoch, "ap50": ap, "threshold": (t, p, r)},
                checkpoints / f"epoch{epoch:02d}.pt",
            )
        if ap > best_ap:
            best_ap, best_epoch = ap, epoch
            best_state = {k: v.clone() for k, v in head.state_dict().items()}
        if live is not None:
            head.load_state_dict(live)
    head.load_state_dict(best_state)
    _say(f"chosen epoch {best_epoch} (valid AP50 {best_ap:.4f})")
    return best_epoch


# ---------------------------------------------------------------------------------------------
# Stage 2: neck and head together, from the stage-1 model


# ESNet's three stage outputs in PP-PicoDet-S 416 (strides 8, 16, 32; 96, 192, 384 channels):
# everything after them (CSP-PAN neck and head) is fine-tuned in stage 2.
BACKBONE_OUTPUTS = ("reshape2_3.tmp_0", "reshape2_15.tmp_0", "reshape2_19.tmp_0")


def cut_model(model: onnx.ModelProto, outputs: Sequence[str]) -> bytes:
    """The model with ``outputs`` as its only outputs (for feature extraction)."""
    cut = onnx.ModelProto()
    cut.CopyFrom(model)
    del cut.graph.output[:]
    for name in outputs:
        cut.graph.output.append(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    return bytes(cut.SerializeToString())


class NeckHead(nn.Module):  # type: ignore[misc]
    """The model's neck and head run from the backbone outputs, conv weights trainable.

    With ``inputs=("image",)`` the whole model (backbone too) is run: stage 3.
    """

    def __init__(self, model: onnx.ModelProto, inputs: Sequence[str] = BACKBONE_OUTPUTS) -> None:
        super().__init__()
        wanted = {h.split for h in head_nodes(model.graph)}
        splits = [n for n in model.graph.node if n.op_type == "Split" and n.output[0] in wanted]
        order = {h.split: i for i, h in enumerate(head_nodes(model.graph))}
        splits.sort(key=lambda n: order[n.output[0]])
        names = [name for node in splits for name in node.output[:2]]
        self.graph = GraphModule(model, inputs, names)

    def forward(self, feats: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        outs = self.graph(feats)
        b = feats[0].shape[0]
        logits = torch.cat([outs[2 * i].reshape(b, -1) for i in range(len(STRIDES))], 1)
        dists = torch.cat(
            [outs[2 * i + 1].reshape(b, 4 * BINS, -1).transpose(1, 2) for i in range(len(STRIDES))],
            1,
        )
        return logits, dists


def stage2(args: argparse.Namespace, root: Path, start: Path) -> int:
    """Fine-tune neck and head of the stage-1 model ``start``; export, quantise, cards."""
    model = onnx.load(str(start))
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    session = ort.InferenceSession(
        cut_model(model, BACKBONE_OUTPUTS), options, providers=["CPUExecutionProvider"]
    )
    sets = {}
    for split, flips in (("train", True), ("valid", False)):
        cached = args.cache / f"{split}_backbone{args.limit or ''}.npz"
        if cached.is_file():
            sets[split] = _load(cached, len(BACKBONE_OUTPUTS))
        else:
            sets[split] = extract(session, root / split, flips=flips, limit=args.limit)
            _save(sets[split], cached)
        _say(f"{split}: {len(sets[split].boxes)} backbone feature sets")
    neck_head = NeckHead(model)
    train = sets["train"]
    best_epoch = fit(
        neck_head,
        len(train.boxes),
        lambda idx: _batch(train, idx),
        sets["valid"],
        epochs=args.epochs,
        batch=args.batch,
        lr=args.lr,
    )
    write_back(neck_head.graph, model.graph)
    torch_out = head_outputs(neck_head, sets["valid"])[:4]
    fp32 = _export_checked(
        model, args.out, root, limit=args.limit, torch_out=torch_out, what="neck and head"
    )
    if fp32 is None:
        return 1
    return finish(root, fp32, args.out, best_epoch=best_epoch, epochs=args.epochs, limit=args.limit)


def _reproduces(
    fp32: Path,
    root: Path,
    *,
    limit: int | None,
    torch_out: list[list[np.ndarray]],
    what: str,
) -> bool:
    """Whether onnxruntime on the export gives what torch gave, on the first 4 valid images."""
    valid_images = [item.image for item in list_images(root / "valid")][:limit]
    onnx_out = onnx_outputs(fp32, valid_images[:4])
    diff = max(
        float(np.abs(a - b).max())
        for o, t in zip(onnx_out, torch_out, strict=True)
        for a, b in zip(o, t, strict=True)
    )
    _say(f"export check: max |onnx - torch| {diff:.2e}")
    if diff > 1e-2:
        sys.stderr.write(f"the exported model does not reproduce the trained {what}\n")
        return False
    return True


def _export_checked(
    model: onnx.ModelProto,
    out: Path,
    root: Path,
    *,
    limit: int | None,
    torch_out: list[list[np.ndarray]],
    what: str,
) -> Path | None:
    """Save the fp32 export and check that onnxruntime reproduces torch on 4 valid images."""
    out.mkdir(parents=True, exist_ok=True)
    fp32 = out / "person_detector.fp32.onnx"
    onnx.checker.check_model(model)
    onnx.save(model, str(fp32))
    if not _reproduces(fp32, root, limit=limit, torch_out=torch_out, what=what):
        return None
    return fp32


# ---------------------------------------------------------------------------------------------
# Stage 3: the whole network, backbone included, on images augmented at every step


@dataclass(frozen=True)
class Augmentation:
    """Training-time augmentation of one image (the ranges are drawn uniformly)."""

    scale: tuple[float, float] = (0.6, 1.4)  # relative to the plain resize to the input
    aspect: float = 0.15  # log of the largest width / height stretch
    hue: float = 6.0  # OpenCV hue units (0-180)
    saturation: tuple[float, float] = (0.6, 1.4)
    value: tuple[float, float] = (0.6, 1.4)
    contrast: tuple[float, float] = (0.75, 1.25)
    keep_area: float = 0.4  # a box cut by the crop is kept if this share of it remains
    min_side: float = 4.0  # ... and it is at least this many input pixels wide and high


# PicoDet's normalisation maps the ImageNet mean to zero: padding with it is padding with zeros.
_MEAN_BGR = (124, 116, 104)


def augment(
    image: np.ndarray, boxes: np.ndarray, rng: np.random.Generator, aug: Augmentation
) -> tuple[np.ndarray, np.ndarray]:
    """A random ``SIZE`` x ``SIZE`` BGR view of ``image`` and its boxes in that view's pixels.

    Random scale and aspect around the plain resize inference does, a random crop (scale > 1)
    or placement on a mean-grey canvas (scale < 1), mirror half the time, colour jitter (hue,
    saturation, brightness, contrast). Boxes cut by the crop are clipped, and dropped when too
    little of them remains.
    """
    h, w = image.shape[:2]
    s = rng.uniform(*aug.scale)
    a = float(np.exp(rng.uniform(-aug.aspect, aug.aspect)))
    nw = max(8, round(SIZE * s * a))
    nh = max(8, round(SIZE * s / a))
    resized = cv2.resize(image, (nw, nh), interpolation=cv2.INTER_LINEAR)
    # Where the resized image's top-left corner lands on the canvas (negative: cropped).
    ox = int(rng.integers(SIZE - nw, 1)) if nw > SIZE else int(rng.integers(0, SIZE - nw + 1))
    oy = int(rng.integers(SIZE - nh, 1)) if nh > SIZE else int(rng.integers(0, SIZE - nh + 1))
    canvas = np.empty((SIZE, SIZE, 3), np.uint8)
    canvas[:] = _MEAN_BGR
    x0, y0 = max(0, ox), max(0, oy)
    x1, y1 = min(SIZE, ox + nw), min(SIZE, oy + nh)
    canvas[y0:y1, x0:x1] = resized[y0 - oy : y1 - oy, x0 - ox : x1 - ox]
    scaled = boxes * np.array([nw / w, nh / h, nw / w, nh / h], np.float32)
    scaled += np.array([ox, oy, ox, oy], np.float32)
    clipped = np.clip(scaled, 0, SIZE)
    area = (scaled[:, 2] - scaled[:, 0]) * (scaled[:, 3] - scaled[:, 1])
    left = (clipped[:, 2] - clipped[:, 0]) * (clipped[:, 3] - clipped[:, 1])
    keep = (
        (left >= aug.keep_area * np.maximum(area, 1e-6))
        & (clipped[:, 2] - clipped[:, 0] >= aug.min_side)
        & (clipped[:, 3] - clipped[:, 1] >= aug.min_side)
    )
    out_boxes = clipped[keep].astype(np.float32)
    if rng.random() < 0.5:
        canvas = np.ascontiguousarray(canvas[:, ::-1])
        out_boxes[:, [0, 2]] = SIZE - out_boxes[:, [2, 0]]
    hsv = cv2.cvtColor(canvas, cv2.COLOR_BGR2HSV).astype(np.float32)
    hsv[..., 0] = (hsv[..., 0] + rng.uniform(-aug.hue, aug.hue)) % 180
    hsv[..., 1] *= rng.uniform(*aug.saturation)
    hsv[..., 2] *= rng.uniform(*aug.value)
    jittered = cv2.cvtColor(np.clip(hsv, 0, 255).astype(np.uint8), cv2.COLOR_HSV2BGR)
    c = rng.uniform(*aug.contrast)
    mean = float(jittered.mean())
    out = np.clip((jittered.astype(np.float32) - mean) * c + mean, 0, 255).astype(np.uint8)
    return out, out_boxes


class AugmentedImages:
    """The training images in memory; a batch is a fresh random augmentation of each."""

    def __init__(self, folder: Path, *, seed: int, aug: Augmentation, limit: int | None) -> None:
        self.images: list[np.ndarray] = []
        self.boxes: list[np.ndarray] = []
        for item in list_images(folder)[:limit]:
            image = read_image(item.image)
            h, w = image.shape[:2]
            self.images.append(image)
            self.boxes.append(read_boxes(item.labels, w, h))
        self.rng = np.random.default_rng(seed)
        self.aug = aug
        self.spec = _picodet_spec()

    def __len__(self) -> int:
        return len(self.images)

    def __call__(self, idx: np.ndarray) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        tensors, truths = [], []
        for i in idx:
            image, boxes = augment(self.images[i], self.boxes[i], self.rng, self.aug)
            tensors.append(preprocess(image, self.spec)[0])
            truths.append(torch.from_numpy(boxes))
        return [torch.from_numpy(np.concatenate(tensors))], truths


def image_set(folder: Path, *, limit: int | None) -> FeatureSet:
    """Valid images as the model's inputs (plain resize, as inference does), for selection."""
    spec = _picodet_spec()
    tensors, boxes, sizes, truths = [], [], [], []
    for item in list_images(folder)[:limit]:
        image = read_image(item.image)
        h, w = image.shape[:2]
        truth = read_boxes(item.labels, w, h)
        tensors.append(preprocess(image, spec)[0][0])
        boxes.append(truth * np.array([SIZE / w, SIZE / h, SIZE / w, SIZE / h], np.float32))
        sizes.append((w, h))
        truths.append(truth)
    return FeatureSet([np.stack(tensors)], boxes, sizes, truths)


def mean_state(checkpoints: Sequence[Path]) -> dict[str, torch.Tensor]:
    """The weights of one saved epoch, or the element-wise mean of several epochs' weights.

    Averaging the weights of a run's last epochs (as stochastic weight averaging does) is sound
    here because the export has no BatchNorm statistics to re-estimate: BN is folded into the
    convs, so every tensor in the state is a conv weight or bias.
    """
    total: dict[str, torch.Tensor] = {}
    for path in checkpoints:
        saved = torch.load(path)
        _say(f"{path}: epoch {int(saved['epoch'])}, valid AP50 {saved['ap50']:.4f}")
        for key, value in saved["state"].items():
            total[key] = total[key] + value.double() if key in total else value.double()
    return {key: (value / len(checkpoints)).float() for key, value in total.items()}


def stage3(args: argparse.Namespace, root: Path, start: Path) -> int:
    """Fine-tune the whole model ``start`` (stage 2's) on augmented images; export, quantise."""
    model = onnx.load(str(start))
    valid = image_set(root / "valid", limit=args.limit)
    network = NeckHead(model, ("image",))
    if args.checkpoint:
        network.load_state_dict(mean_state(args.checkpoint))
        best_epoch = int(torch.load(args.checkpoint[-1])["epoch"])
    else:
        train = AugmentedImages(root / "train", seed=SEED + 3, aug=Augmentation(), limit=args.limit)
        _say(f"train: {len(train)} images (augmented at every step); valid: {len(valid.boxes)}")
        best_epoch = fit(
            network,
            len(train),
            train,
            valid,
            epochs=args.epochs,
            batch=args.batch,
            lr=args.lr,
            checkpoints=args.out / "checkpoints",
            ema=args.ema,
        )
    write_back(network.graph, model.graph)
    four = FeatureSet([valid.levels[0][:4]], valid.boxes[:4], valid.sizes[:4], valid.truths[:4])
    torch_out = head_outputs(network, four)
    fp32 = _export_checked(
        model, args.out, root, limit=args.limit, torch_out=torch_out, what="network"
    )
    if fp32 is None:
        return 1
    return finish(root, fp32, args.out, best_epoch=best_epoch, epochs=args.epochs, limit=args.limit)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m models.pool.train", description=__doc__)
    parser.add_argument("--data", type=Path, default=default_data_dir())
    parser.add_argument("--out", type=Path, default=HERE)
    parser.add_argument(
        "--cache", type=Path, default=Path(tempfile.gettempdir()) / "edge-gateway-pool-features"
    )
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--limit", type=int, default=None, help="first N images (smoke test)")
    parser.add_argument(
        "--finish",
        type=Path,
        default=None,
        help="skip training: quantise this exported fp32 model and write the cards",
    )
    parser.add_argument("--best-epoch", type=int, default=0, help="with --finish: for the card")
    parser.add_argument(
        "--stage2",
        type=Path,
        default=None,
        help="fine-tune neck and head of this stage-1 fp32 model (then quantise, cards)",
    )
    parser.add_argument(
        "--stage3",
        type=Path,
        default=None,
        help="fine-tune the whole network (backbone too) of this stage-2 fp32 model on "
        "augmented images (then quantise, cards)",
    )
    parser.add_argument(
        "--checkpoint",
        type=Path,
        nargs="+",
        default=None,
        help="with --stage3: skip training, export this saved epoch (OUT/checkpoints/epochNN.pt); "
        "several: the mean of their weights",
    )
    parser.add_argument(
        "--ema",
        type=float,
        default=0.0,
        help="with --stage3: evaluate and keep an exponential moving average of the weights "
        "with this decay per step (0: off)",
    )
    args = parser.parse_args(argv)
    torch.manual_seed(SEED)
    torch.set_num_threads(1)
    root = args.data / TRAINING_SET
    picodet = args.data / PICODET
    if not (root / "train").is_dir() or not picodet.is_file():
        sys.stderr.write(f"train: {root} or {picodet} not found (need ../shared/data)\n")
        return 1
    if args.finish is not None:
        return finish(
            root,
            args.finish,
            args.out,
            best_epoch=args.best_epoch,
            epochs=args.epochs,
            limit=args.limit,
        )
    args.cache.mkdir(parents=True, exist_ok=True)
    if args.stage2 is not None:
        return stage2(args, root, args.stage2)
    if args.stage3 is not None:
        return stage3(args, root, args.stage3)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    neck = ort.InferenceSession(neck_model(picodet), options, providers=["CPUExecutionProvider"])
    sets = {}
    for split, flips in (("train", True), ("valid", False)):
        cached = args.cache / f"{split}{args.limit or ''}.npz"
        if cached.is_file():
            sets[split] = _load(cached)
        else:
            sets[split] = extract(neck, root / split, flips=flips, limit=args.limit)
            _save(sets[split], cached)
        _say(f"{split}: {len(sets[split].boxes)} feature sets")
    train, valid = sets["train"], sets["valid"]

    head, best_epoch = train_head(
        picodet, train, valid, epochs=args.epochs, batch=args.batch, lr=args.lr
    )
    args.out.mkdir(parents=True, exist_ok=True)
    fp32 = args.out / "person_detector.fp32.onnx"
    export(picodet, head, fp32)
    # The exported graph must give what the torch head gave.
    torch_out = head_outputs(head, valid)[:4]
    if not _reproduces(fp32, root, limit=args.limit, torch_out=torch_out, what="head"):
        return 1
    return finish(root, fp32, args.out, best_epoch=best_epoch, epochs=args.epochs, limit=args.limit)


def fp32_nodes(model: onnx.ModelProto) -> list[str]:
    """The backbone and neck (every node the neck outputs depend on): left in fp32.

    ESNet's blocks concatenate an untouched shortcut (values in the hundreds) with a processed
    branch (values of a few units): one per-tensor int8 scale for both erases the small branch,
    and fully quantised, the model's outputs correlate only about 0.5 with fp32 ones. The head
    alone quantises cleanly (correlation about 0.99), see README.md.
    """
    producer = {out: node for node in model.graph.node for out in node.output}
    names: set[str] = set()
    seen: set[str] = set()
    stack = [h.neck for h in head_nodes(model.graph)]
    while stack:
        tensor = stack.pop()
        node = producer.get(tensor)
        if node is None or tensor in seen:
            continue
        seen.add(tensor)
        if node.name:
            names.add(node.name)
        stack.extend(node.input)
    return sorted(names)


def finish(
    root: Path, fp32: Path, out: Path, *, best_epoch: int, epochs: int, limit: int | None = None
) -> int:
    """Quantise the exported model, choose thresholds on valid, write both cards."""
    int8 = out / "person_detector.int8.onnx"
    spec = _picodet_spec()
    rng = np.random.default_rng(SEED + 1)
    train_items = list_images(root / "train")
    calibration_items = [train_items[i] for i in rng.permutation(len(train_items))[:128]]
    feeds = []
    for item in calibration_items:
        image = read_image(item.image)
        feeds.append({"image": preprocess(image, spec)[0]})
    quantize_model(
        fp32,
        int8,
        calibration=feeds,
        method="static",
        exclude_nodes=fp32_nodes(onnx.load(str(fp32))),
    )
    valid_items = list_images(root / "valid")[:limit]
    sizes, truths = [], []
    for item in valid_items:
        image = read_image(item.image)
        h, w = image.shape[:2]
        sizes.append((w, h))
        truths.append(read_boxes(item.labels, w, h))
    metrics: dict[str, dict[str, float | int | str]] = {}
    thresholds = {}
    for kind, path in (("fp32", fp32), ("int8", int8)):
        results = match_outputs(onnx_outputs(path, [i.image for i in valid_items]), sizes, truths)
        ap = average_precision(results)
        t, p, r = best_threshold(results)
        thresholds[kind] = t
        metrics[kind] = {
            "valid_ap50": round(ap, 4),
            "valid_precision": round(p, 4),
            "valid_recall": round(r, 4),
            "valid_images": len(valid_items),
            "best_epoch": best_epoch,
            "epochs": epochs,
            "size_bytes": path.stat().st_size,
        }
        _say(
            f"{kind}: valid AP50 {ap:.4f}, threshold {t:.2f}: P {p:.3f} R {r:.3f}, "
            f"{path.stat().st_size} B"
        )
    (out / "person_detector.fp32.toml").write_text(
        dump_card(_card(fp32, "none", thresholds["fp32"], metrics["fp32"])), encoding="utf-8"
    )
    (out / "person_detector.toml").write_text(
        dump_card(_card(int8, "int8-qdq-static", thresholds["int8"], metrics["int8"])),
        encoding="utf-8",
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
