"""Build the waste classifier: MobileNetV2 (ImageNet) fine-tuned on TrashNet's train split.

    OMP_NUM_THREADS=1 .venv/bin/python -m models.waste.train [--data DIR] [--out DIR]

Needs the optional ``train`` extra (torch, CPU build). Steps, all seeded:

1. **Backbone.** The only ImageNet weights available offline are the ONNX Model Zoo's
   ``mobilenetv2-12-int8`` (QLinear int8 operators). Its graph is rebuilt in torch layer by layer
   with the *dequantised* weights (``(w - zero_point) * scale`` per output channel, int32 bias
   times input scale times weight scale); a convolution whose output range starts at zero had a
   ReLU6 folded into its quantisation, so ReLU6 follows it. The rebuilt network is checked
   against onnxruntime's logits on training images before anything else happens.
2. **Fine-tuning.** The early blocks stay frozen (run without gradients, which also halves the
   cost on a shared 2-core machine); the last blocks and a new 6-class head are trained on
   TrashNet's *train* split with augmentation (random resized crop, flips, rotation by quarter
   turns, colour jitter), label smoothing, AdamW and a cosine schedule. TrashNet's *validation*
   split chooses the epoch (best validation accuracy, ties by loss). A further stage from those
   weights can train the int8 model itself (``--qat``: the quantiser's rounding simulated in the
   forward pass, :class:`Int8Sim`) and average its epochs' weights (``--swa``): 1.2.0.
3. **Export and int8.** fp32 ONNX, then static QDQ int8 with :func:`models.quantize.quantize_model`,
   calibrated on training images.
4. **Calibration.** One temperature for the int8 model's logits, fitted on the validation split
   (negative log-likelihood), with the expected calibration error before and after.

Nothing here reads ``trashnet-sample`` (the evaluation set): that is :mod:`models.waste.evaluate`.
Writes ``OUT/classifier.fp32.onnx`` + ``classifier.fp32.toml`` (not shipped: 9 MB) and
``OUT/classifier.int8.onnx`` + ``classifier.toml`` (shipped).
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import cv2
import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import numpy_helper
from torch import Tensor, nn

from models.card import ModelCard, TensorSpec, dump_card, load_card, sha256_file
from models.quantize import quantize_model
from models.waste.calibration import expected_calibration_error, fit_temperature, nll
from models.waste.ensemble import merge_members
from models.waste.preprocess import IMAGE_SIZE, LABELS, decode_image, preprocess, softmax

__all__ = ["main"]

NAME = "waste_classifier"
VERSION = "1.2.0"
SEED = 20_261_122
HERE = Path(__file__).resolve().parent
BACKBONE = Path("onnx-models/mobilenetv2-12-int8/mobilenetv2-12-int8.onnx")
# MobileNetV2's block 6 starts the 64-channel stage (14 x 14): it and the 96-, 160- and
# 320-channel stages, the final 1x1 conv and the head are trained; the stem and blocks 0-5 (the
# high-resolution, generic edge and texture layers, most of the compute) stay frozen. Measured
# here, one thread: 21 ms/image frozen forward + 16 ms forward and backward for the rest.
DEFAULT_TRAIN_FROM_BLOCK = 6


def _say(text: str, *, err: bool = False) -> None:
    stream = sys.stderr if err else sys.stdout
    stream.write(text + "\n")
    stream.flush()


# -- the backbone, rebuilt from the int8 ONNX graph ------------------------------------------


@dataclass(frozen=True)
class _Step:
    kind: str  # "conv" | "add" | "pool"
    inputs: tuple[str, ...]
    output: str
    conv: int = -1  # index into the ModuleList for "conv"
    relu6: bool = False
    # The ONNX output's uint8 quantisation (scale, zero point), for the reproduction check.
    quant: tuple[float, int] | None = None


def _arrays(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def _fake_quant(x: Tensor, quant: tuple[float, int]) -> Tensor:
    scale, zero = quant
    return (torch.clamp(torch.round(x / scale) + zero, 0, 255) - zero) * scale


class Backbone(nn.Module):  # type: ignore[misc]  # torch is not type-checked (training only)
    """MobileNetV2 from the int8 ONNX graph, with fp32 (dequantised) weights; GAP features out."""

    def __init__(self, onnx_path: Path) -> None:  # noqa: PLR0915  # one branch per ONNX op
        super().__init__()
        model = onnx.load(str(onnx_path))
        arr = _arrays(model)
        self.convs = nn.ModuleList()
        steps: list[_Step] = []
        names: dict[str, str] = {"input_quantized": "x"}
        self.imagenet_head: nn.Linear | None = None
        matmul: tuple[np.ndarray, float] | None = None
        for node in model.graph.node:
            ins = list(node.input)
            if node.op_type == "QLinearConv":
                attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
                wq = arr[ins[3]].astype(np.float32)
                wscale = arr[ins[4]].astype(np.float32).reshape(-1, 1, 1, 1)
                wzp = arr[ins[5]].astype(np.float32).reshape(-1, 1, 1, 1)
                weight = (wq - wzp) * wscale
                xscale = float(arr[ins[1]])
                bias = arr[ins[8]].astype(np.float64) * xscale * wscale.reshape(-1)
                out_ch, in_per_group, kh, kw = weight.shape
                group = int(attrs.get("group", 1))
                pads = list(attrs.get("pads", [0, 0, 0, 0]))
                conv = nn.Conv2d(
                    in_per_group * group,
                    out_ch,
                    (kh, kw),
                    stride=tuple(attrs.get("strides", [1, 1])),
                    padding=(pads[0], pads[1]),
                    groups=group,
                    bias=True,
                )
                with torch.no_grad():
                    conv.weight.copy_(torch.from_numpy(weight))
                    conv.bias.copy_(torch.from_numpy(bias.astype(np.float32)))
                # uint8 output with zero point 0: the range starts at 0, a folded ReLU6.
                relu6 = int(arr[ins[7]]) == 0
                quant = (float(arr[ins[6]]), int(arr[ins[7]]))
                steps.append(
                    _Step("conv", (names[ins[0]],), node.output[0], len(self.convs), relu6, quant)
                )
                names[node.output[0]] = node.output[0]
                self.convs.append(conv)
            elif node.op_type == "QLinearAdd" and ins[0] in names and ins[3] in names:
                quant = (float(arr[ins[6]]), int(arr[ins[7]]))
                steps.append(
                    _Step("add", (names[ins[0]], names[ins[3]]), node.output[0], quant=quant)
                )
                names[node.output[0]] = node.output[0]
            elif node.op_type == "QLinearGlobalAveragePool":
                steps.append(_Step("pool", (names[ins[0]],), "features"))
                names[node.output[0]] = "features"
            elif node.op_type == "QLinearMatMul":
                w = (arr[ins[3]].astype(np.float32) - arr[ins[5]].astype(np.float32)) * arr[
                    ins[4]
                ].astype(np.float32)
                matmul = (w, 0.0)
            elif node.op_type == "QLinearAdd" and matmul is not None:
                # The classifier's bias, added to the MatMul's output.
                bias_name = ins[3] if ins[0].startswith("output_MatMul") else ins[0]
                zp_name, scale_name = (ins[5], ins[4]) if bias_name == ins[3] else (ins[2], ins[1])
                b = (arr[bias_name].astype(np.float32) - arr[zp_name].astype(np.float32)) * arr[
                    scale_name
                ].astype(np.float32)
                head = nn.Linear(matmul[0].shape[0], matmul[0].shape[1])
                with torch.no_grad():
                    head.weight.copy_(torch.from_numpy(matmul[0].T.copy()))
                    head.bias.copy_(torch.from_numpy(b.reshape(-1)))
                self.imagenet_head = head
        self.steps = steps
        self.features = 1280
        self.input_quant = (float(arr["input_scale"]), int(arr["input_zero_point"]))

    def block_start(self, block: int) -> int:
        """The step index where MobileNetV2 block ``block`` (0..16) begins."""
        # Stem conv, block 0 (two convs), then three convs per block; adds do not shift convs.
        first_conv = 1 if block == 0 else 3 + 3 * (block - 1)
        for index, step in enumerate(self.steps):
            if step.kind == "conv" and step.conv == first_conv:
                return index
        raise ValueError(f"no block {block}")

    def run(
        self, x: Tensor, start: int = 0, stop: int | None = None, *, fake_quant: bool = False
    ) -> Tensor:
        """Steps ``start`` up to ``stop`` (exclusive); ``x`` is the input of step ``start``.

        ``fake_quant`` rounds every activation to the ONNX model's uint8 grid, to check that the
        rebuilt graph computes what the int8 one does (then only rounding differs).
        """
        if fake_quant:
            x = _fake_quant(x, self.input_quant)

        def rounded(step: _Step, out: Tensor) -> Tensor:
            if fake_quant and step.quant is not None:
                return _fake_quant(out, step.quant)
            return out

        return self.walk(x, start, stop, lambda conv, h: cast(Tensor, conv(h)), rounded)

    def walk(
        self,
        x: Tensor,
        start: int,
        stop: int | None,
        conv: Callable[[nn.Conv2d, Tensor], Tensor],
        after: Callable[[_Step, Tensor], Tensor],
    ) -> Tensor:
        """The steps' graph walk: ``conv`` applies a conv module, ``after`` sees every output."""
        env: dict[str, Tensor] = {self.steps[start].inputs[0]: x}
        out = x
        for step in self.steps[start:stop]:
            if step.kind == "conv":
                out = conv(self.convs[step.conv], env[step.inputs[0]])
                if step.relu6:
                    out = torch.clamp(out, 0.0, 6.0)
            elif step.kind == "add":
                out = env[step.inputs[0]] + env[step.inputs[1]]
            else:
                out = env[step.inputs[0]].mean(dim=(2, 3))
            out = after(step, out)
            env[step.output] = out
        return out

    def forward(self, x: Tensor) -> Tensor:
        return self.run(x)


class Classifier(nn.Module):  # type: ignore[misc]
    """Backbone (frozen up to ``split``) + dropout + a new linear head over :data:`LABELS`."""

    def __init__(self, backbone: Backbone, split: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.split = split
        self.dropout = nn.Dropout(0.2)
        self.head = nn.Linear(backbone.features, len(LABELS))
        # Set for quantisation-aware fine-tuning: the forward pass then computes what the int8
        # model will (fake quantisation). Not a module: it adds nothing to the weights.
        self.sim: Int8Sim | None = None

    def trunk(self, x: Tensor) -> Tensor:
        """The frozen part: the input of step ``split``."""
        if self.sim is not None:
            return torch.cat([self.sim.run(self.backbone, p, 0, self.split) for p in _pieces(x)])
        return self.backbone.run(x, 0, self.split)

    def tail(self, h: Tensor) -> Tensor:
        """The trained part: features of step ``split``'s input -> logits."""
        if self.sim is not None:
            feats = self.sim.run(self.backbone, h, self.split)
            return self.sim.head(self.head, self.dropout(feats))
        feats = self.backbone.run(h, self.split)
        return cast(Tensor, self.head(self.dropout(feats)))

    def forward(self, x: Tensor) -> Tensor:
        if self.sim is not None and not torch.is_grad_enabled():
            return torch.cat([self.tail(self.trunk(p)) for p in _pieces(x)])
        return self.tail(self.trunk(x))


def _pieces(x: Tensor) -> tuple[Tensor, ...]:
    """A batch in pieces of 4 images for the simulated int8 model, which rounds every
    activation. Whole batches of 32-64 make activations of 25-200 MB, which the C allocator
    takes from and returns to the kernel each time (over 32 MB): measured here, the page faults
    cost 4-6 times the arithmetic. Pieces of 4 stay below that and reuse memory."""
    return tuple(x.split(4))


# -- the int8 model, simulated (quantisation-aware fine-tuning) -------------------------------


def _activation_grid(lo: float, hi: float) -> tuple[float, float] | None:
    """(scale, zero point) onnxruntime gives a tensor whose calibrated range is [lo, hi].

    Asymmetric int8 ([-128, 127]) over the range widened to include 0, as in its
    ``compute_scale_zp``; None for an all-zero tensor (onnxruntime's scale 1 then changes nothing).
    """
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = (hi - lo) / 255.0
    if scale < float(np.finfo(np.float32).tiny):
        return None
    zero = float(np.round(-128.0 - lo / scale))
    return float(np.float32(scale)), zero


def _quant_activation(
    x: Tensor, grid: tuple[float, float] | None, *, in_place: bool = False
) -> Tensor:
    """``x`` after QuantizeLinear + DequantizeLinear on ``grid``.

    The gradient passes straight through the rounding and is zero where the value saturates
    (the usual straight-through estimator). ``in_place`` overwrites ``x`` when it needs no
    gradient (the frozen trunk's large activations: the same arithmetic without new tensors).
    """
    if grid is None:
        return x
    scale, zero = grid
    # zero is an integer: round(x / s) + z clamped to [-128, 127] is round(x / s) clamped to
    # [-128 - z, 127 - z].
    if not x.requires_grad and in_place:
        return x.div_(scale).round_().clamp_(-128.0 - zero, 127.0 - zero).mul_(scale)
    q = torch.clamp(torch.round(x / scale), -128.0 - zero, 127.0 - zero) * scale
    if not x.requires_grad:
        return q
    inside = torch.clamp(x, (-128.0 - zero) * scale, (127.0 - zero) * scale)
    return inside + (q - inside).detach()


def _quant_weight(w: Tensor) -> Tensor:
    """``w`` rounded as onnxruntime stores it: int8 per output channel, symmetric ([-127, 127],
    scale max|w| / 127, zero point 0); straight-through gradient."""
    absmax = w.detach().abs().flatten(1).amax(1).clamp_min(float(np.finfo(np.float32).tiny))
    scale = (absmax / 127.0).reshape(-1, *([1] * (w.dim() - 1)))
    q = torch.clamp(torch.round(w / scale), -127.0, 127.0) * scale
    return q if not w.requires_grad else w + (q - w).detach()


class Int8Sim:
    """The model :func:`models.quantize.quantize_model` will make, computed in torch.

    Static QDQ as onnxruntime builds it from this script's export: every conv's and the head's
    weights int8 per output channel (symmetric); the image, every conv output (after its ReLU6,
    which onnxruntime folds into the output range), every residual sum, the pooled features and
    the logits int8 per tensor, over the MinMax range the fp32 network has on the calibration
    images. :meth:`calibrate` recomputes those ranges for the current weights, as the quantiser
    does for the final ones. Biases stay fp32 (int32 in the int8 model, at the product of the
    input and weight scales: far finer than the activations' rounding).
    """

    def __init__(self, calibration: np.ndarray) -> None:
        self.calibration = calibration
        self.grids: dict[str, tuple[float, float] | None] = {}
        self._record: dict[str, tuple[float, float]] | None = None

    def calibrate(self, model: Classifier, batch: int = 64) -> None:
        """MinMax ranges of every quantised tensor of the fp32 network on the calibration set."""
        self._record = {}
        model.eval()
        try:
            with torch.no_grad():
                for i in range(0, len(self.calibration), batch):
                    model(torch.from_numpy(self.calibration[i : i + batch]))
            self.grids = {k: _activation_grid(lo, hi) for k, (lo, hi) in self._record.items()}
        finally:
            self._record = None

    def point(self, name: str, x: Tensor, *, in_place: bool = False) -> Tensor:
        """QuantizeLinear + DequantizeLinear on tensor ``name`` (records it when calibrating)."""
        if self._record is not None:
            lo, hi = float(x.min()), float(x.max())
            old = self._record.get(name)
            self._record[name] = (lo, hi) if old is None else (min(old[0], lo), max(old[1], hi))
            return x
        return _quant_activation(x, self.grids[name], in_place=in_place)

    def weight(self, w: Tensor) -> Tensor:
        # Calibration runs the fp32 network, as onnxruntime's calibrator does.
        return w if self._record is not None else _quant_weight(w)

    def run(self, backbone: Backbone, x: Tensor, start: int = 0, stop: int | None = None) -> Tensor:
        """:meth:`Backbone.run` with the int8 model's rounding."""
        if start == 0:
            x = self.point("image", x)

        def conv(module: nn.Conv2d, h: Tensor) -> Tensor:
            return cast(
                Tensor,
                torch.nn.functional.conv2d(
                    h,
                    self.weight(module.weight),
                    module.bias,
                    module.stride,
                    module.padding,
                    module.dilation,
                    module.groups,
                ),
            )

        # Every output is a new tensor (not the caller's input): rounding it in place is safe.
        return backbone.walk(
            x, start, stop, conv, lambda step, out: self.point(step.output, out, in_place=True)
        )

    def head(self, head: nn.Linear, feats: Tensor) -> Tensor:
        logits = torch.nn.functional.linear(feats, self.weight(head.weight), head.bias)
        return self.point("logits", logits)


# -- data ------------------------------------------------------------------------------------


@dataclass
class Split:
    """Decoded images (RGB uint8, as stored: 256x192) and label indices of one split."""

    images: list[np.ndarray]
    labels: np.ndarray
    files: list[str]


def load_split(root: Path, split: str) -> Split:
    """TrashNet's ``train`` or ``val`` split from ``trashnet-train/index.csv``."""
    images, labels, files = [], [], []
    with (root / "index.csv").open(newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            if row["trashnet_split"] != split:
                continue
            images.append(decode_image((root / row["file"]).read_bytes()))
            labels.append(LABELS.index(row["class"]))
            files.append(row["file"])
    return Split(images, np.array(labels, dtype=np.int64), files)


_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


def augment(rgb: np.ndarray, rng: np.random.Generator, size: int) -> np.ndarray:
    """One augmented training view -> float32 [3, size, size], normalised like preprocess()."""
    h, w = rgb.shape[:2]
    area = h * w
    for _ in range(10):
        target = area * rng.uniform(0.45, 1.0)
        # Width/height of the crop; the full 4:3 frame (what inference sees) is inside the range.
        aspect = math.exp(rng.uniform(math.log(0.75), math.log(1.8)))
        cw = round(math.sqrt(target * aspect))
        ch = round(math.sqrt(target / aspect))
        if 0 < cw <= w and 0 < ch <= h:
            x0 = int(rng.integers(0, w - cw + 1))
            y0 = int(rng.integers(0, h - ch + 1))
            crop = rgb[y0 : y0 + ch, x0 : x0 + cw]
            break
    else:
        crop = rgb
    # Photos from citizens come at any orientation: flips and quarter turns.
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    if rng.random() < 0.3:
        crop = crop[::-1]
    if rng.random() < 0.25:
        crop = np.rot90(crop, k=int(rng.integers(1, 4)))
    crop = np.ascontiguousarray(crop)
    shrink = crop.shape[0] >= size and crop.shape[1] >= size
    small = cv2.resize(
        crop,
        (size, size),
        interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR,
    ).astype(np.float32)
    # Colour jitter: brightness, contrast, saturation (+-25 %), a small hue-free tint.
    small *= rng.uniform(0.75, 1.25)
    mean = small.mean()
    small = (small - mean) * rng.uniform(0.75, 1.25) + mean
    grey = small.mean(axis=2, keepdims=True)
    small = (small - grey) * rng.uniform(0.75, 1.25) + grey
    small *= rng.uniform(0.95, 1.05, size=(1, 1, 3)).astype(np.float32)
    small = np.clip(small, 0, 255) / 255.0
    out: np.ndarray = ((small - _MEAN) / _STD).transpose(2, 0, 1).astype(np.float32)
    return out


def batches(n: int, size: int, rng: np.random.Generator | None) -> Iterator[np.ndarray]:
    order = rng.permutation(n) if rng is not None else np.arange(n)
    for i in range(0, n, size):
        yield order[i : i + size]


def plain_inputs(split: Split, size: int) -> np.ndarray:
    """Every image of a split as the model takes it at inference, float32 [n, 3, size, size]."""
    return np.concatenate([preprocess(img, size) for img in split.images])


# -- training --------------------------------------------------------------------------------


def logits_of(model: Classifier, x: np.ndarray, batch: int = 64) -> np.ndarray:
    model.eval()
    with torch.no_grad():
        outs = [model(torch.from_numpy(x[i : i + batch])).numpy() for i in range(0, len(x), batch)]
    return np.concatenate(outs)


def check_backbone(backbone: Backbone, onnx_path: Path, x: np.ndarray) -> float:
    """Correlation of the rebuilt network's ImageNet logits with onnxruntime's on ``x``."""
    assert backbone.imagenet_head is not None
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    ref = session.run(None, {"input": x})[0]
    corr = 0.0
    for fake_quant in (False, True):
        with torch.no_grad():
            feats = backbone.run(torch.from_numpy(x), fake_quant=fake_quant)
            ours = backbone.imagenet_head(feats).numpy()
        agree = float((ref.argmax(1) == ours.argmax(1)).mean())
        corr = float(np.corrcoef(ref.ravel(), ours.ravel())[0, 1])
        what = "fp32 activations" if not fake_quant else "activations on the int8 grid"
        _say(f"backbone check ({what}): ImageNet top-1 agreement {agree:.2f}, corr {corr:.4f}")
    # The int8 reference is itself noisy (per-tensor activations); on its own activation grid
    # the rebuilt graph must agree closely, or a layer was mapped wrongly.
    return corr


def train(
    model: Classifier,
    train_split: Split,
    val_x: np.ndarray,
    val_y: np.ndarray,
    *,
    epochs: int,
    batch: int,
    lr: float,
    seed: int,
    size: int,
    checkpoint: Callable[[int | str, float], None] | None = None,
    options: Regularisation | None = None,
) -> dict[str, float | str]:
    """Fine-tune the tail; keep the weights of the best validation epoch.

    ``checkpoint(epoch, val_accuracy)`` is called at every new best, with the model holding
    that epoch's weights, so a long run that is stopped early still leaves its best result.
    ``options`` (all off by default) adds mixup/cutmix, a constant learning rate and averaged
    weights (EMA, SWA) as further candidates for the best validation result. With
    ``model.sim`` set (quantisation-aware fine-tuning) training and validation run the
    simulated int8 model, its ranges recalibrated for the weights at the start of every epoch
    and for every candidate before it is validated.
    """
    opts = options or Regularisation()
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    for p in model.backbone.parameters():
        p.requires_grad_(False)
    trained = [
        conv
        for step in model.backbone.steps[model.split :]
        if step.kind == "conv"
        for conv in [model.backbone.convs[step.conv]]
    ]
    tail_params = [p for conv in trained for p in conv.parameters()]
    for p in tail_params:
        p.requires_grad_(True)
    opt, sched = _optimiser(
        model,
        tail_params,
        lr=lr,
        total_steps=epochs * math.ceil(len(train_split.images) / batch),
        constant=opts.constant_lr,
    )
    loss_fn = nn.CrossEntropyLoss(label_smoothing=0.1)

    def evaluate(current: Classifier) -> np.ndarray:
        if current.sim is not None:
            current.sim.calibrate(current)
        return logits_of(current, val_x)

    # The starting point competes too: a second stage must beat the first on validation.
    start_logits = evaluate(model)
    best = _Best(
        model, (_accuracy(start_logits, val_y), -nll(start_logits, val_y)), checkpoint, evaluate
    )
    _say(f"start: val acc {best.score[0]:.4f} nll {-best.score[1]:.3f}")
    averages = _Averages(model, opts)
    mix_rng = np.random.default_rng(seed + 7)

    for epoch in range(epochs):
        started = time.perf_counter()
        if model.sim is not None:
            model.sim.calibrate(model)
        model.train()
        seen, loss_sum, correct = 0, 0.0, 0
        for idx in batches(len(train_split.images), batch, rng):
            views = [augment(train_split.images[i], rng, size) for i in idx]
            xb = torch.from_numpy(np.stack(views))
            yb = torch.from_numpy(train_split.labels[idx])
            xb, partner, lam = _mix(xb, mix_rng, opts)
            with torch.no_grad():
                h = model.trunk(xb)
            out = model.tail(h)
            loss = loss_fn(out, yb)
            if partner is not None:
                loss = lam * loss + (1 - lam) * loss_fn(out, yb[partner])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            averages.after_step(model)
            seen += len(idx)
            loss_sum += loss.item() * len(idx)
            correct += int((out.argmax(1) == yb).sum())
        val_logits = evaluate(model)
        val_acc = float((val_logits.argmax(1) == val_y).mean())
        val_nll = float(-np.log(softmax(val_logits)[np.arange(len(val_y)), val_y] + 1e-12).mean())
        took = time.perf_counter() - started
        _say(
            f"epoch {epoch + 1}/{epochs}: train loss {loss_sum / seen:.3f} acc "
            f"{correct / seen:.3f} | val acc {val_acc:.4f} nll {val_nll:.3f} | {took:.0f} s",
        )
        best.offer(epoch + 1, model, (val_acc, -val_nll))
        for label, state in averages.after_epoch(model, epoch + 1):
            best.offer_state(label, model, state, val_y)
    model.load_state_dict(best.state)
    return {"val_top1_fp32_torch": best.score[0], "best_epoch": best.epoch}


def _optimiser(
    model: Classifier, tail_params: list[Tensor], *, lr: float, total_steps: int, constant: bool
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """AdamW (the trained blocks at 0.3 x the head's rate) with a one-cycle or constant rate."""
    opt = torch.optim.AdamW(
        [
            {"params": tail_params, "lr": lr * 0.3},
            {"params": list(model.head.parameters()), "lr": lr},
        ],
        weight_decay=1e-4,
    )
    sched = (
        torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=[lr * 0.3, lr], total_steps=total_steps, pct_start=0.1
        )
        if not constant
        else torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    )
    return opt, sched


class _Best:
    """The best weights on validation so far: (accuracy, -NLL), the state and its label."""

    def __init__(
        self,
        model: Classifier,
        score: tuple[float, float],
        checkpoint: Callable[[int | str, float], None] | None,
        evaluate: Callable[[Classifier], np.ndarray],
    ) -> None:
        self.score = score
        self.state = _state_copy(model)
        self.epoch: int | str = 0
        self.checkpoint = checkpoint
        self.evaluate = evaluate

    def offer(self, label: int | str, model: Classifier, score: tuple[float, float]) -> None:
        """Keep the model's current weights if ``score`` beats the best."""
        if score > self.score:
            self.score, self.epoch = score, label
            self.state = _state_copy(model)
            if self.checkpoint is not None:
                self.checkpoint(label, score[0])

    def offer_state(
        self,
        label: str,
        model: Classifier,
        state: dict[str, Tensor],
        val_y: np.ndarray,
    ) -> None:
        """Validate other weights (an average) as a candidate; the model's own come back."""
        current = _state_copy(model)
        model.load_state_dict(state)
        logits = self.evaluate(model)
        score = (_accuracy(logits, val_y), -nll(logits, val_y))
        _say(f"  {label}: val acc {score[0]:.4f} nll {-score[1]:.3f}")
        self.offer(label, model, score)
        model.load_state_dict(current)


def _state_copy(model: Classifier) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


class _Averages:
    """Averaged weights (every float tensor of the state; frozen ones stay as they are)."""

    def __init__(self, model: Classifier, opts: Regularisation) -> None:
        self.opts = opts
        self.ema = _state_copy(model) if opts.ema > 0 else None
        self.swa: dict[str, Tensor] | None = None
        self.swa_count = 0
        self.steps = 0

    def after_step(self, model: Classifier) -> None:
        self.steps += 1
        if self.ema is None:
            return
        # Warm-up: early on the average follows the weights more closely.
        decay = min(self.opts.ema, (1 + self.steps) / (10 + self.steps))
        with torch.no_grad():
            for key, value in model.state_dict().items():
                if value.is_floating_point():
                    self.ema[key].mul_(decay).add_(value, alpha=1 - decay)

    def after_epoch(self, model: Classifier, epoch: int) -> list[tuple[str, dict[str, Tensor]]]:
        """The averages to validate after ``epoch`` (1-based), labelled for the card."""
        if epoch < self.opts.average_from:
            return []
        out = [] if self.ema is None else [(f"ema{epoch}", self.ema)]
        if self.opts.swa:
            # Equal-weight running mean of the weights at the end of each epoch from
            # average_from.
            self.swa_count += 1
            now = _state_copy(model)
            if self.swa is None:
                self.swa = now
            else:
                for key, value in now.items():
                    if value.is_floating_point():
                        self.swa[key] += (value - self.swa[key]) / self.swa_count
            if self.swa_count > 1:
                out.append((f"swa{self.opts.average_from}-{epoch}", self.swa))
        return out


@dataclass(frozen=True)
class Regularisation:
    """Training options beyond the default recipe (all off by default)."""

    mixup: float = 0.0  # Beta(a, a) parameter of mixup; 0: off
    cutmix: float = 0.0  # Beta(a, a) parameter of cutmix; 0: off (both on: one per batch)
    ema: float = 0.0  # decay of an exponential moving average of the weights; 0: off
    swa: bool = False  # average the weights at the end of every epoch from average_from
    average_from: int = 1  # the first epoch whose end is averaged (SWA) / validated (EMA)
    constant_lr: bool = False  # constant learning rate instead of the one-cycle schedule


def _mix(
    xb: Tensor, rng: np.random.Generator, opts: Regularisation
) -> tuple[Tensor, Tensor | None, float]:
    """Mixup or cutmix of a batch with a permutation of itself: (inputs, partner, weight)."""
    kinds = [k for k, a in (("mixup", opts.mixup), ("cutmix", opts.cutmix)) if a > 0]
    if not kinds:
        return xb, None, 1.0
    kind = kinds[int(rng.integers(len(kinds)))]
    partner = torch.from_numpy(rng.permutation(len(xb)))
    if kind == "mixup":
        lam = float(rng.beta(opts.mixup, opts.mixup))
        return lam * xb + (1 - lam) * xb[partner], partner, lam
    lam = float(rng.beta(opts.cutmix, opts.cutmix))
    size_h, size_w = xb.shape[2], xb.shape[3]
    cut_h, cut_w = round(size_h * math.sqrt(1 - lam)), round(size_w * math.sqrt(1 - lam))
    cy, cx = int(rng.integers(size_h)), int(rng.integers(size_w))
    y0, y1 = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, size_h)
    x0, x1 = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, size_w)
    mixed = xb.clone()
    mixed[:, :, y0:y1, x0:x1] = xb[partner][:, :, y0:y1, x0:x1]
    # The weight is the share of the image that is still the first one's.
    lam = 1 - (y1 - y0) * (x1 - x0) / (size_h * size_w)
    return mixed, partner, lam


def load_onnx_weights(model: Classifier, path: Path) -> None:
    """Set the weights from a classifier this script exported (initializer names = state keys)."""
    weights = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}
    # The ImageNet head is only for the reproduction check; it is not part of the export.
    state = {k: v for k, v in model.state_dict().items() if "imagenet_head" not in k}
    missing = [key for key in state if key not in weights]
    if missing:
        raise ValueError(f"{path}: not a classifier exported by this script (no {missing[:3]})")
    new = {key: torch.from_numpy(weights[key].copy()) for key in state}
    model.load_state_dict(new, strict=False)


# -- export ----------------------------------------------------------------------------------


def export_onnx(model: Classifier, path: Path, size: int) -> None:
    """The fp32 network (without the int8 simulation: the quantiser makes the int8 model)."""
    model.eval()
    dummy = torch.zeros(1, 3, size, size)
    sim, model.sim = model.sim, None
    try:
        torch.onnx.export(
            model,
            (dummy,),
            str(path),
            input_names=["image"],
            output_names=["logits"],
            dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}},
            opset_version=17,
            dynamo=False,
        )
    finally:
        model.sim = sim
    # Keep the weights inside the one file (no external data) and drop training-only metadata.
    onnx.save(onnx.load(str(path)), str(path))


def ort_logits(path: Path, x: np.ndarray, batch: int = 32) -> np.ndarray:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = int(os.environ.get("OMP_NUM_THREADS", "1"))
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    outs = [session.run(None, {"image": x[i : i + batch]})[0] for i in range(0, len(x), batch)]
    return np.concatenate(outs).astype(np.float32)


def _accuracy(logits: np.ndarray, y: np.ndarray, k: int = 1) -> float:
    top = np.argsort(-logits, axis=1)[:, :k]
    return float((top == y[:, None]).any(axis=1).mean())


def _card(
    file: Path,
    quantization: str,
    params: dict[str, float | int | str],
    metrics: dict[str, float | int | str],
    trained: str,
    *,
    size: int,
) -> ModelCard:
    return ModelCard(
        name=NAME,
        version=VERSION,
        task="classify_waste",
        file=file.name,
        sha256=sha256_file(file),
        inputs=[TensorSpec(name="image", shape=["batch", 3, size, size], dtype="float32")],
        outputs=[TensorSpec(name="logits", shape=["batch", len(LABELS)], dtype="float32")],
        labels=list(LABELS),
        thresholds={"uncertain_below": 0.5},
        preprocess=f"rgb_resize{size}_imagenet_norm",
        postprocess="mean_over_views_softmax_temperature",
        params=params,
        licence=(
            "Apache-2.0 (MobileNetV2 backbone: ONNX Model Zoo mobilenetv2-12-int8); fine-tuned "
            "head and layers: trained on TrashNet (MIT, Gary Thung and Mindy Yang, "
            "github.com/garythung/trashnet)"
        ),
        training_data=(
            "TrashNet train split (1,764 images) for the weights, its validation split "
            "(327 images) for the epoch, input size, members, mirror-view choice and the "
            "temperature; "
            "../shared/data/trashnet-train"
        ),
        metrics=metrics,
        quantization=quantization,
        description=(
            "Waste photo -> TrashNet class (cardboard, glass, metal, paper, plastic, trash). "
            "MobileNetV2 whose ImageNet weights were dequantised from the ONNX Model Zoo int8 "
            f"model; {trained}. Built by models/waste/train.py."
        ),
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=HERE.parents[2] / "shared" / "data")
    parser.add_argument("--out", type=Path, default=HERE)
    parser.add_argument("--epochs", type=int, default=14)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--train-from-block", type=int, default=DEFAULT_TRAIN_FROM_BLOCK)
    parser.add_argument(
        "--image-size",
        type=int,
        default=IMAGE_SIZE,
        help="square model input in pixels (the card records it; the service resizes to it)",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=SEED,
        help="training seed (augmentation, order, head init); another seed gives another "
        "ensemble member",
    )
    parser.add_argument("--limit", type=int, default=0, help="use only N training images (smoke)")
    parser.add_argument("--mixup", type=float, default=0.0, help="mixup Beta(a, a); 0: off")
    parser.add_argument("--cutmix", type=float, default=0.0, help="cutmix Beta(a, a); 0: off")
    parser.add_argument(
        "--ema",
        type=float,
        default=0.0,
        help="decay of an exponential moving average of the weights, validated after every "
        "epoch as a further candidate; 0: off",
    )
    parser.add_argument(
        "--swa",
        action="store_true",
        help="average the weights at the end of every epoch from --average-from on (SWA), "
        "validated as a further candidate",
    )
    parser.add_argument(
        "--average-from",
        type=int,
        default=1,
        help="first epoch whose weights SWA averages and after which the averages are validated",
    )
    parser.add_argument(
        "--constant-lr", action="store_true", help="constant learning rate (no one-cycle)"
    )
    parser.add_argument(
        "--qat",
        action="store_true",
        help="quantisation-aware fine-tuning: train and validate the int8 model the quantiser "
        "will make (simulated in torch, ranges recalibrated every epoch); for a stage from "
        "--init-fp32 at a small constant learning rate",
    )
    parser.add_argument(
        "--select-size",
        type=int,
        default=0,
        help="validate at this input size during training (epoch choice); 0: --image-size",
    )
    parser.add_argument(
        "--init-fp32",
        type=Path,
        default=None,
        help="start from the weights of an exported fp32 classifier (a second, longer stage)",
    )
    parser.add_argument(
        "--members",
        type=Path,
        nargs="+",
        default=None,
        help="skip training: merge these exported fp32 classifiers (each with its .toml card) "
        "into one averaging their logits at --image-size, then quantise and calibrate it",
    )
    parser.add_argument(
        "--from-fp32",
        action="store_true",
        help="skip training: quantise, calibrate and write the cards from OUT/classifier.fp32.onnx",
    )
    return parser


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.qat and args.select_size not in (0, args.image_size):
        parser.error("--qat validates at --image-size (no --select-size)")
    return args


def _trained(args: argparse.Namespace, size: int) -> str:
    """How the network was trained, for the card's description."""
    text = f"blocks {args.train_from_block}-16 and a new head fine-tuned on TrashNet at "
    init_card = None if args.init_fp32 is None else args.init_fp32.with_suffix(".toml")
    if init_card is not None and init_card.is_file():
        first = load_card(init_card).params.get("image_size", IMAGE_SIZE)
        text += f"{first} x {first} px, then a further stage at {size} x {size} px"
    else:
        text += f"{size} x {size} px"
    if args.qat:
        text += " on the int8 model simulated (quantisation-aware)"
    if args.swa:
        text += ", the mean of the stage's epoch-end weights (SWA)"
    return text


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    torch.manual_seed(args.seed)
    root = args.data / "trashnet-train"
    if not (root / "index.csv").is_file():
        _say(f"{root}: TrashNet training data not found", err=True)
        return 1
    backbone_path = args.data / BACKBONE
    train_split = load_split(root, "train")
    val_split = load_split(root, "val")
    if args.limit:
        keep = np.random.default_rng(SEED).permutation(len(train_split.images))[: args.limit]
        train_split = Split(
            [train_split.images[i] for i in keep],
            train_split.labels[keep],
            [train_split.files[i] for i in keep],
        )
    _say(f"train {len(train_split.images)} images, val {len(val_split.images)}")
    size = args.image_size
    val_x = plain_inputs(val_split, size)
    fp32 = args.out / "classifier.fp32.onnx"
    trained = _trained(args, size)
    if args.members:
        # Several exported classifiers (each trained by this script) as one file whose logits
        # are their mean, run at this input size.
        args.out.mkdir(parents=True, exist_ok=True)
        merge_members(args.members, size, fp32)
        cards = [load_card(m.with_suffix(".toml")) for m in args.members]
        sizes = " and ".join(f"{c.params.get('image_size', IMAGE_SIZE)} px" for c in cards)
        trained = (
            f"{len(cards)} networks (blocks {args.train_from_block}-16 and a new head "
            f"fine-tuned on TrashNet, trained at {sizes}) in one graph averaging their logits, "
            f"run at {size} x {size} px"
            if len(cards) > 1
            else f"blocks {args.train_from_block}-16 and a new head fine-tuned on TrashNet at "
            f"{sizes}, run at {size} x {size} px"
        )
        epochs = [c.metrics["best_epoch"] for c in cards]
        best: int | str = (
            (epochs[0] if isinstance(epochs[0], str) else int(epochs[0]))
            if len(epochs) == 1
            else ",".join(str(e) for e in epochs)
        )
        return finish(fp32, train_split, val_split, val_x, best_epoch=best, trained=trained)
    if args.from_fp32:
        epoch = load_card(args.out / "classifier.fp32.toml").metrics["best_epoch"]
        best_epoch = epoch if isinstance(epoch, str) else int(epoch)
        return finish(fp32, train_split, val_split, val_x, best_epoch=best_epoch, trained=trained)
    backbone = Backbone(backbone_path)
    corr = check_backbone(
        backbone,
        backbone_path,
        plain_inputs(Split(train_split.images[:16], train_split.labels[:16], []), IMAGE_SIZE),
    )
    if corr < 0.98:
        _say("the rebuilt backbone does not reproduce the ONNX model", err=True)
        return 1
    model = Classifier(backbone, backbone.block_start(args.train_from_block))
    if args.init_fp32 is not None:
        load_onnx_weights(model, args.init_fp32)
    # Quantisation-aware: the int8 model, simulated, is what trains and is validated.
    model.sim = Int8Sim(np.concatenate(calibration_inputs(train_split, size))) if args.qat else None
    args.out.mkdir(parents=True, exist_ok=True)

    def checkpoint(epoch: int | str, val_accuracy: float) -> None:
        # The best weights so far, exported with a minimal card: `--from-fp32` finishes from
        # them if the run is stopped before its last epoch.
        export_onnx(model, fp32, size)
        metrics: dict[str, float | int | str] = {
            "best_epoch": epoch,
            "val_top1_fp32_torch": round(val_accuracy, 4),
        }
        card = _card(fp32, "none", {"image_size": size}, metrics, trained, size=size)
        (args.out / "classifier.fp32.toml").write_text(dump_card(card), encoding="utf-8")
        _say(f"checkpoint: epoch {epoch} -> {fp32}")

    select_x = val_x if args.select_size in (0, size) else plain_inputs(val_split, args.select_size)
    fit = train(
        model,
        train_split,
        select_x,
        val_split.labels,
        epochs=args.epochs,
        batch=args.batch,
        lr=args.lr,
        seed=args.seed,
        size=size,
        checkpoint=checkpoint,
        options=Regularisation(
            mixup=args.mixup,
            cutmix=args.cutmix,
            ema=args.ema,
            swa=args.swa,
            average_from=args.average_from,
            constant_lr=args.constant_lr,
        ),
    )
    _end_simulation(model, val_x, val_split.labels)
    export_onnx(model, fp32, size)
    torch_val = logits_of(model, val_x)
    gap = np.abs(ort_logits(fp32, val_x) - torch_val).max()
    _say(f"export check: max |onnx - torch| logit {gap:.2e}")
    return finish(
        fp32,
        train_split,
        val_split,
        val_x,
        best_epoch=fit_epoch if isinstance(fit_epoch := fit["best_epoch"], str) else int(fit_epoch),
        trained=trained,
    )


def _end_simulation(model: Classifier, val_x: np.ndarray, val_y: np.ndarray) -> None:
    """Report the simulated int8 model's validation figures (to compare with onnxruntime's
    int8 model) and return the model to fp32."""
    if model.sim is None:
        return
    model.sim.calibrate(model)
    logits = logits_of(model, val_x)
    _say(
        f"simulated int8 on validation: top-1 {_accuracy(logits, val_y):.4f} "
        f"top-3 {_accuracy(logits, val_y, 3):.4f}"
    )
    model.sim = None


def calibration_inputs(train_split: Split, size: int) -> list[np.ndarray]:
    """The int8 calibration set: 256 training images as inference sees them (no augmentation)."""
    calib_idx = np.random.default_rng(SEED + 1).permutation(len(train_split.images))[:256]
    return [preprocess(train_split.images[i], size) for i in calib_idx]


def finish(
    fp32: Path,
    train_split: Split,
    val_split: Split,
    val_x: np.ndarray,
    *,
    best_epoch: int | str,
    trained: str,
) -> int:
    """int8, test-time augmentation choice, temperature, cards: everything after training."""
    out = fp32.parent
    size = int(val_x.shape[-1])
    val_fp32 = ort_logits(fp32, val_x)
    calib = calibration_inputs(train_split, size)
    int8 = out / "classifier.int8.onnx"
    quantize_model(fp32, int8, calibration=({"image": x} for x in calib), method="static")
    y = val_split.labels
    # Mirror-image test-time augmentation is kept only if it helps on the validation split
    # (accuracy, then NLL at each one's own temperature): it doubles the run time.
    single = ort_logits(int8, val_x)
    mirrored = (single + ort_logits(int8, np.ascontiguousarray(val_x[..., ::-1]))) / 2
    scores = {
        name: (_accuracy(logits, y), -nll(logits, y, fit_temperature(logits, y)))
        for name, logits in (("none", single), ("hflip", mirrored))
    }
    tta = "hflip" if scores["hflip"] > scores["none"] else "none"
    val_int8 = mirrored if tta == "hflip" else single
    if tta == "hflip":
        val_fp32 = (val_fp32 + ort_logits(fp32, np.ascontiguousarray(val_x[..., ::-1]))) / 2
    temperature = fit_temperature(val_int8, y)
    metrics: dict[str, float | int | str] = {
        "val_top1_int8_single_view": round(scores["none"][0], 4),
        "val_top1_int8_hflip_tta": round(scores["hflip"][0], 4),
        "val_top1_fp32": round(_accuracy(val_fp32, y), 4),
        "val_top3_fp32": round(_accuracy(val_fp32, y, 3), 4),
        "val_top1_int8": round(_accuracy(val_int8, y), 4),
        "val_top3_int8": round(_accuracy(val_int8, y, 3), 4),
        "val_ece_int8_before": round(expected_calibration_error(softmax(val_int8), y), 4),
        "val_ece_int8_after": round(
            expected_calibration_error(softmax(val_int8, temperature), y), 4
        ),
        "best_epoch": best_epoch,
    }
    temperature_fp32 = fit_temperature(val_fp32, y)
    _say(f"validation split (chooses epoch and temperature): {metrics}")
    params: dict[str, float | int | str] = {
        "temperature": round(temperature, 4),
        "tta": tta,
        "image_size": size,
        "mean": "0.485,0.456,0.406",
        "std": "0.229,0.224,0.225",
    }
    fp32_card = _card(
        fp32,
        "none",
        {**params, "temperature": round(temperature_fp32, 4)},
        metrics,
        trained,
        size=size,
    )
    (out / "classifier.fp32.toml").write_text(dump_card(fp32_card), encoding="utf-8")
    card = _card(int8, "int8-qdq-static", params, metrics, trained, size=size)
    (out / "classifier.toml").write_text(dump_card(card), encoding="utf-8")
    _say(
        f"wrote {int8} ({int8.stat().st_size / 1e6:.2f} MB), {fp32} "
        f"({fp32.stat().st_size / 1e6:.2f} MB), temperature {temperature:.3f}, tta {tta}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
