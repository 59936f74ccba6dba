"""Train the water-level forecaster on the training portions, export fp32 ONNX, quantise to int8.

    .venv/bin/python -m models.water_level.train [--data DIR] [--out DIR]

Numpy only: a 16-32-32-1 ReLU MLP, Huber loss, Adam, fixed seed. Inputs and targets come from
:class:`models.water_level.features.ForecastState` run over the *training* portion of every series
(:mod:`models.water_level.data`; the split is documented in README.md), exactly as the gateway
computes them. The anomaly threshold is a high quantile of the int8 model's scores on the same
training portion; nothing here reads the evaluation portion.

Writes ``forecaster.fp32.onnx``, ``forecaster.int8.onnx`` (static QDQ, calibrated on training
windows) and their cards ``forecaster.fp32.toml`` and ``forecaster.toml`` (the shipped, int8 one).
"""

from __future__ import annotations

import argparse
import itertools
import math
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from models.card import ModelCard, TensorSpec, dump_card, sha256_file
from models.quantize import quantize_model
from models.water_level.data import (
    Series,
    default_data_dir,
    load_hubeau,
    load_lro,
    load_nab,
)
from models.water_level.features import ForecastParams, ForecastState

__all__ = ["build_onnx", "main", "training_windows"]

NAME = "water_level_forecaster"
VERSION = "1.0.0"
HIDDEN = (32, 32)
SEED = 20_260_522
# The score quantile on the training portion that becomes the anomaly threshold: about one
# reading in a thousand of ordinary data is called anomalous by the model alone.
THRESHOLD_QUANTILE = 0.999
HERE = Path(__file__).resolve().parent

Predict = Callable[[np.ndarray], np.ndarray]


@dataclass
class Mlp:
    """Weights of the MLP, input to output."""

    weights: list[np.ndarray]
    biases: list[np.ndarray]

    def forward(self, x: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
        activations = [x]
        h = x
        for i, (w, b) in enumerate(zip(self.weights, self.biases, strict=True)):
            h = h @ w + b
            if i < len(self.weights) - 1:
                h = np.maximum(h, 0.0)
            activations.append(h)
        return h[:, 0], activations


def training_windows(
    series: Sequence[Series], params: ForecastParams
) -> tuple[np.ndarray, np.ndarray]:
    """(features, clipped targets) of every scorable reading in the training portions."""
    xs: list[list[float]] = []
    ys: list[float] = []
    for s in series:
        state = ForecastState(params)
        for value in s.training():
            if state.ready:
                xs.append(state.features())
                ys.append(max(-params.clip, min(params.clip, state.target(value))))
            state.push(value)
    return np.asarray(xs, dtype=np.float32), np.asarray(ys, dtype=np.float32)


def training_series(root: Path) -> list[Series]:
    """The real series whose training portions train the model and set its threshold.

    NAB's artificial series are left out: their generated daily shapes switch at sharp corners
    that no sensor produces, and they would set the threshold instead of the real series.
    """
    nab = [s for s in load_nab(root) if not s.name.startswith("artificial")]
    return [*nab, *load_hubeau(root), load_lro(root)]


def _huber_grad(residual: np.ndarray, delta: float = 1.0) -> np.ndarray:
    return np.asarray(np.clip(residual, -delta, delta))


def _huber(residual: np.ndarray, delta: float = 1.0) -> float:
    a = np.abs(residual)
    return float(np.mean(np.where(a <= delta, 0.5 * a * a, delta * (a - 0.5 * delta))))


def train(
    x: np.ndarray, y: np.ndarray, *, epochs: int = 80, batch: int = 256, lr: float = 2e-3
) -> tuple[Mlp, dict[str, float]]:
    """Adam on Huber loss; the last 10 % of the windows (still training portion) pick the epoch."""
    rng = np.random.default_rng(SEED)
    sizes = [x.shape[1], *HIDDEN, 1]
    mlp = Mlp(
        weights=[
            rng.normal(0.0, math.sqrt(2.0 / a), size=(a, b)).astype(np.float64)
            for a, b in itertools.pairwise(sizes)
        ],
        biases=[np.zeros(b) for b in sizes[1:]],
    )
    cut = int(len(x) * 0.9)
    order = rng.permutation(len(x))
    fit, held = order[:cut], order[cut:]
    params = [*mlp.weights, *mlp.biases]
    m = [np.zeros_like(p) for p in params]
    v = [np.zeros_like(p) for p in params]
    beta1, beta2, eps = 0.9, 0.999, 1e-8
    step = 0
    best = (math.inf, [p.copy() for p in params], 0)
    x64, y64 = x.astype(np.float64), y.astype(np.float64)
    for epoch in range(epochs):
        rng.shuffle(fit)
        for start in range(0, len(fit), batch):
            idx = fit[start : start + batch]
            out, acts = mlp.forward(x64[idx])
            grad_out = _huber_grad(out - y64[idx])[:, None] / len(idx)
            grads_w: list[np.ndarray] = []
            grads_b: list[np.ndarray] = []
            g = grad_out
            for layer in range(len(mlp.weights) - 1, -1, -1):
                grads_w.insert(0, acts[layer].T @ g)
                grads_b.insert(0, g.sum(axis=0))
                if layer:
                    g = (g @ mlp.weights[layer].T) * (acts[layer] > 0)
            step += 1
            for i, grad in enumerate([*grads_w, *grads_b]):
                m[i] = beta1 * m[i] + (1 - beta1) * grad
                v[i] = beta2 * v[i] + (1 - beta2) * grad * grad
                m_hat = m[i] / (1 - beta1**step)
                v_hat = v[i] / (1 - beta2**step)
                params[i] -= lr * m_hat / (np.sqrt(v_hat) + eps)
        held_loss = _huber(mlp.forward(x64[held])[0] - y64[held])
        if held_loss < best[0]:
            best = (held_loss, [p.copy() for p in params], epoch)
    for target, saved in zip(params, best[1], strict=True):
        target[...] = saved
    baseline = _huber(-y64[held])  # "no change": predict a standardised difference of 0
    return mlp, {
        "train_windows": float(len(fit)),
        "held_out_windows": float(len(held)),
        "held_out_huber": round(best[0], 5),
        "held_out_huber_no_change": round(baseline, 5),
        "best_epoch": float(best[2]),
    }


def build_onnx(mlp: Mlp, window: int) -> onnx.ModelProto:
    """The MLP as an ONNX graph: window [batch, W] float32 -> forecast [batch, 1]."""
    nodes = []
    inits = []
    current = "window"
    for i, (w, b) in enumerate(zip(mlp.weights, mlp.biases, strict=True)):
        inits.append(numpy_helper.from_array(w.astype(np.float32), f"w{i}"))
        inits.append(numpy_helper.from_array(b.astype(np.float32), f"b{i}"))
        last = i == len(mlp.weights) - 1
        nodes.append(helper.make_node("MatMul", [current, f"w{i}"], [f"mm{i}"]))
        out = "forecast" if last else f"pre{i}"
        nodes.append(helper.make_node("Add", [f"mm{i}", f"b{i}"], [out]))
        if not last:
            nodes.append(helper.make_node("Relu", [out], [f"h{i}"]))
            current = f"h{i}"
    graph = helper.make_graph(
        nodes,
        NAME,
        [helper.make_tensor_value_info("window", TensorProto.FLOAT, ["batch", window])],
        [helper.make_tensor_value_info("forecast", TensorProto.FLOAT, ["batch", 1])],
        inits,
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 17)],
        producer_name="edge-gateway models/water_level/train.py",
    )
    # IR 8 with opset 17: loadable by every onnxruntime >= 1.14, which includes old gateways.
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def _session(path: Path) -> Predict:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def predict(x: np.ndarray) -> np.ndarray:
        out = session.run(["forecast"], {"window": x.astype(np.float32)})[0]
        return np.asarray(out)[:, 0]

    return predict


def training_scores(
    series: Sequence[Series], params: ForecastParams, predict: Predict
) -> list[float]:
    """The score of every scorable reading of the training portions, as the gateway computes it."""
    scores: list[float] = []
    for s in series:
        state = ForecastState(params)
        pending: list[tuple[list[float], float]] = []
        for value in s.training():
            if state.ready:
                pending.append((state.features(), state.target(value)))
            state.push(value)
        if not pending:
            continue
        predictions = predict(np.asarray([f for f, _t in pending], dtype=np.float32))
        # Scores in reading order: the residual spread is updated one reading at a time.
        scores.extend(
            state.score(target, float(p))[1]
            for (_f, target), p in zip(pending, predictions, strict=True)
        )
    return scores


def _calibration(
    x: np.ndarray, size: int = 4096, batch: int = 256
) -> Iterator[dict[str, np.ndarray]]:
    rng = np.random.default_rng(SEED + 1)
    chosen = x[rng.choice(len(x), size=min(size, len(x)), replace=False)]
    for start in range(0, len(chosen), batch):
        yield {"window": chosen[start : start + batch]}


def _card(
    *,
    file: str,
    sha256: str,
    params: ForecastParams,
    threshold: float,
    metrics: dict[str, float | str],
    quantization: Literal["none", "int8-qdq-static"],
    training: str,
) -> ModelCard:
    return ModelCard(
        name=NAME,
        version=VERSION,
        task="forecast",
        file=file,
        sha256=sha256,
        inputs=[TensorSpec(name="window", shape=["batch", params.window], dtype="float32")],
        outputs=[TensorSpec(name="forecast", shape=["batch", 1], dtype="float32")],
        thresholds={"anomaly": threshold},
        preprocess="water_level_diff_window",
        postprocess="standardised_residual_score",
        params=dict(params.to_params()),
        licence="Apache-2.0 (model); training data: MIT (NAB), Etalab 2.0 (Hub'Eau), "
        "BSD-3-Clause (pyhydroqc / Logan River Observatory)",
        training_data=training,
        metrics=metrics,
        quantization=quantization,
        description="Forecasts the next standardised first difference of a level series from "
        "the last 16; the score is the squashed standardised forecast error "
        "(models/water_level/features.py). Trained by models/water_level/train.py.",
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=default_data_dir())
    parser.add_argument("--out", type=Path, default=HERE)
    args = parser.parse_args(argv)
    if not (args.data / "nab-anomaly").is_dir():
        sys.stderr.write(f"train: no data sets in {args.data} (need ../shared/data)\n")
        return 2
    series = training_series(args.data)
    params = ForecastParams()
    x, y = training_windows(series, params)
    mlp, fit = train(x, y)
    out: Path = args.out
    fp32 = out / "forecaster.fp32.onnx"
    int8 = out / "forecaster.int8.onnx"
    onnx.save(build_onnx(mlp, params.window), fp32)
    quantize_model(fp32, int8, calibration=_calibration(x), method="static")

    scores = {
        name: training_scores(series, params, _session(path))
        for name, path in (("fp32", fp32), ("int8", int8))
    }
    threshold = {
        name: round(float(np.quantile(np.asarray(s), THRESHOLD_QUANTILE)), 4)
        for name, s in scores.items()
    }
    training = (
        "first 15 % of each series (cut before any labelled anomaly): 7 real NAB series "
        "(numenta/NAB ea702d7), 5 Hub'Eau stage series (kalisio/water-level-forecasting "
        "1698cfb), Logan River Main Street 2019 raw stage (pyhydroqc 1260f16); "
        f"{len(x)} windows. See models/water_level/README.md."
    )
    for name, path, card_name in (
        ("fp32", fp32, "forecaster.fp32.toml"),
        ("int8", int8, "forecaster.toml"),
    ):
        metrics: dict[str, float | str] = {
            **fit,
            "threshold_quantile": THRESHOLD_QUANTILE,
            "training_scores": float(len(scores[name])),
            "size_bytes": float(path.stat().st_size),
        }
        card = _card(
            file=path.name,
            sha256=sha256_file(path),
            params=params,
            threshold=threshold[name],
            metrics=metrics,
            quantization="int8-qdq-static" if name == "int8" else "none",
            training=training,
        )
        (out / card_name).write_text(dump_card(card), encoding="utf-8")
        sys.stdout.write(
            f"{card_name}: {path.name} {path.stat().st_size} bytes, threshold {threshold[name]}\n"
        )
    sys.stdout.write(f"fit: {fit}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
