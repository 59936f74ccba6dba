"""The waste classifier's evaluation on images it never saw (``edge-gateway models eval``).

Data: ``trashnet-sample`` (42 photos, 7 per class, from TrashNet's *test* split; the model is
trained on the train split and its epoch and temperature are chosen on the validation split).
Metrics: top-1 (primary) and top-3 accuracy, expected calibration error with the card's
temperature and without it, and the confusion matrix (rows: true label, columns: predicted, in
:data:`LABELS` order) as ``confusion_<true>`` entries of six counts each.

``python -m models.waste.evaluate CARD [CARD...]`` prints them as a table for each card (fp32
and int8 side by side in docs/waste-classifier.md).
"""

from __future__ import annotations

import argparse
import csv
import sys
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from models.card import ModelCard, load_card
from models.evaluation import Evaluation, EvaluationUnavailableError, Runner
from models.waste.calibration import expected_calibration_error
from models.waste.preprocess import IMAGE_SIZE, LABELS, decode_image, preprocess, softmax

__all__ = ["SAMPLE", "confusion_matrix", "evaluate_classifier", "load_sample"]

SAMPLE = "trashnet-sample"


def load_sample(data_dir: Path, size: int = IMAGE_SIZE) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(files, model inputs [n, 3, size, size], label indices) of the evaluation sample."""
    root = data_dir / SAMPLE
    if not (root / "labels.csv").is_file():
        raise EvaluationUnavailableError(f"{root}: the TrashNet evaluation sample is not here")
    files, inputs, labels = [], [], []
    with (root / "labels.csv").open(newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            files.append(row["file"])
            inputs.append(preprocess(decode_image((root / row["file"]).read_bytes(), size), size))
            labels.append(LABELS.index(row["label"]))
    return files, np.concatenate(inputs), np.asarray(labels, dtype=np.int64)


def confusion_matrix(predicted: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Counts [true, predicted] over :data:`LABELS`."""
    matrix = np.zeros((len(LABELS), len(LABELS)), dtype=np.int64)
    np.add.at(matrix, (truth, predicted), 1)
    return matrix


def evaluate_classifier(run: Runner, card: ModelCard, data_dir: Path) -> Evaluation:
    """Score a waste classifier on the sample; EvaluationUnavailableError without it."""
    side = card.inputs[0].shape[-1]
    _files, x, y = load_sample(data_dir, side if isinstance(side, int) else IMAGE_SIZE)
    name = card.inputs[0].name

    def logits_of(inputs: np.ndarray) -> np.ndarray:
        return np.concatenate(
            [np.asarray(run({name: inputs[i : i + 8]})[0]) for i in range(0, len(inputs), 8)]
        )

    single = logits_of(x)
    logits = single
    if card.params.get("tta", "none") == "hflip":
        # As the service runs it: the mean of the photo's and its mirror image's logits.
        logits = (single + logits_of(np.ascontiguousarray(x[..., ::-1]))) / 2
    temperature = float(card.params.get("temperature", 1.0))  # type: ignore[arg-type]
    order = np.argsort(-logits, axis=1)
    metrics: dict[str, float] = {
        "top1": float((order[:, 0] == y).mean()),
        "top3": float((order[:, :3] == y[:, None]).any(axis=1).mean()),
        "top1_single_view": float((single.argmax(axis=1) == y).mean()),
        "ece_raw": expected_calibration_error(softmax(logits), y),
        "ece_calibrated": expected_calibration_error(softmax(logits, temperature), y),
        "mean_top1_probability": float(softmax(logits, temperature).max(axis=1).mean()),
    }
    # What the citizen sees: below the card's threshold the result is "uncertain" (another
    # photo is asked for), so how often that happens and how right the confident answers are.
    threshold = float(card.thresholds.get("uncertain_below", 0.5))
    confident = softmax(logits, temperature).max(axis=1) >= threshold
    metrics["uncertain_share"] = float(1.0 - confident.mean())
    metrics["top1_when_confident"] = (
        float((order[confident, 0] == y[confident]).mean()) if confident.any() else 0.0
    )
    matrix = confusion_matrix(order[:, 0], y)
    for i, label in enumerate(LABELS):
        for j, other in enumerate(LABELS):
            metrics[f"confusion_{label}_as_{other}"] = float(matrix[i, j])
    return Evaluation(
        metrics=metrics,
        primary="top1",
        higher_is_better=True,
        dataset=f"{SAMPLE}: 42 TrashNet test-split photos, 7 per class (never trained on)",
        samples=len(y),
    )


def _print(card_path: Path, evaluation: Evaluation) -> None:
    m = evaluation.metrics
    lines = [
        f"{card_path}: top-1 {m['top1']:.4f}  top-3 {m['top3']:.4f}  ECE raw {m['ece_raw']:.4f}"
        f"  calibrated {m['ece_calibrated']:.4f}  ({evaluation.samples} images)",
        f"uncertain: {m['uncertain_share']:.3f} of images; top-1 of the others "
        f"{m['top1_when_confident']:.4f}",
        "confusion (rows true, columns predicted): " + " ".join(f"{lb[:5]:>5}" for lb in LABELS),
    ]
    for label in LABELS:
        row = " ".join(f"{int(m[f'confusion_{label}_as_{o}']):>5}" for o in LABELS)
        lines.append(f"  {label:>9}: {row}")
    sys.stdout.write("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    import onnxruntime as ort  # noqa: PLC0415  # only this command needs a bare session

    parser = argparse.ArgumentParser(description="Evaluate waste classifier cards on the sample.")
    parser.add_argument("cards", type=Path, nargs="+")
    parser.add_argument(
        "--data", type=Path, default=Path(__file__).resolve().parents[3] / "shared" / "data"
    )
    args = parser.parse_args(argv)
    for card_path in args.cards:
        card = load_card(card_path)
        session = ort.InferenceSession(
            str(card.model_path(card_path)), providers=["CPUExecutionProvider"]
        )
        names = [spec.name for spec in card.outputs]

        def run(
            feeds: Mapping[str, np.ndarray],
            s: ort.InferenceSession = session,
            out: list[str] = names,
        ) -> list[np.ndarray]:
            return [np.asarray(a) for a in s.run(out, dict(feeds))]

        try:
            _print(card_path, evaluate_classifier(run, card, args.data))
        except EvaluationUnavailableError as exc:
            sys.stderr.write(f"{exc}\n")
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
