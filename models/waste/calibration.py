"""Temperature scaling and expected calibration error (pure numpy)."""

from __future__ import annotations

import itertools

import numpy as np

__all__ = ["expected_calibration_error", "fit_temperature", "nll"]


def _log_softmax(logits: np.ndarray, temperature: float) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64) / temperature
    z = z - z.max(axis=1, keepdims=True)
    out: np.ndarray = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return out


def nll(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of ``labels`` under ``softmax(logits / temperature)``."""
    logp = _log_softmax(logits, temperature)
    return float(-logp[np.arange(len(labels)), labels].mean())


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The temperature in [0.05, 20] minimising the NLL (golden-section search on log T).

    The NLL is convex in 1/T for fixed logits, so a one-dimensional search finds the optimum.
    """
    lo, hi = np.log(0.05), np.log(20.0)
    ratio = (np.sqrt(5.0) - 1) / 2
    a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
    fa, fb = nll(logits, labels, float(np.exp(a))), nll(logits, labels, float(np.exp(b)))
    for _ in range(80):
        if fa < fb:
            hi, b, fb = b, a, fa
            a = hi - ratio * (hi - lo)
            fa = nll(logits, labels, float(np.exp(a)))
        else:
            lo, a, fa = a, b, fb
            b = lo + ratio * (hi - lo)
            fb = nll(logits, labels, float(np.exp(b)))
    return float(np.exp((lo + hi) / 2))


def expected_calibration_error(
    probabilities: np.ndarray, labels: np.ndarray, bins: int = 10
) -> float:
    """ECE of the top-1 confidence: |accuracy - confidence| per equal-width bin, weighted."""
    probs = np.asarray(probabilities, dtype=np.float64)
    confidence = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == labels).astype(np.float64)
    edges = np.linspace(0.0, 1.0, bins + 1)
    total = 0.0
    for lo, hi in itertools.pairwise(edges):
        inside = (confidence > lo) & (confidence <= hi)
        if inside.any():
            total += inside.mean() * abs(correct[inside].mean() - confidence[inside].mean())
    return float(total)
