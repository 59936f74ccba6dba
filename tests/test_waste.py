"""Waste classifier: decoding, calibration, the citizen result, the town's rules, the CLI.

Model tests run real onnxruntime on the shipped int8 model and on bundled TrashNet training
images (gateway/demo/waste, MIT, see PROVENANCE.md there).
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import onnx
import onnxruntime as ort
import pytest

from gateway.cli import main
from gateway.config import config_from_dict
from gateway.errors import ModelError
from gateway.inference import load_model
from gateway.waste import WasteService, waste_setup
from gateway.waste_cli import classify_files
from gateway.wire import Encoding, decode
from models.card import load_card
from models.waste.advice import (
    DEFAULT_MUNICIPALITY,
    FRACTIONS,
    citizen_result,
    load_municipality,
    parse_municipality,
)
from models.waste.calibration import expected_calibration_error, fit_temperature, nll
from models.waste.ensemble import merge_members
from models.waste.evaluate import evaluate_classifier
from models.waste.preprocess import (
    LABELS,
    MAX_PIXELS,
    ImageDecodeError,
    decode_image,
    jpeg_size,
    preprocess,
    softmax,
    top_k,
)

ROOT = Path(__file__).resolve().parents[1]
CARD = ROOT / "models" / "waste" / "classifier.toml"
DEMO_IMAGES = ROOT / "gateway" / "demo" / "waste"
MUNICIPALITIES = ROOT / "models" / "waste" / "municipalities"


def _jpeg(rgb: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    assert ok
    return buf.tobytes()


def _png(rgb: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    assert ok
    return buf.tobytes()


def _demo_images() -> dict[str, Path]:
    """label -> a bundled training photo of that label."""
    return {p.stem.rstrip("0123456789"): p for p in sorted(DEMO_IMAGES.glob("*.jpg"))}


# -- decoding and pre-processing ---------------------------------------------------------------


def test_jpeg_and_png_decode_to_the_same_rgb_input() -> None:
    rgb = np.zeros((60, 80, 3), dtype=np.uint8)
    rgb[:, :40] = (255, 0, 0)  # red left half: RGB order must survive
    from_png = decode_image(_png(rgb))
    assert from_png.shape == (60, 80, 3)
    assert tuple(from_png[0, 0]) == (255, 0, 0)
    x = preprocess(from_png)
    assert x.shape == (1, 3, 224, 224)
    assert x.dtype == np.float32
    # Red channel of the red half is (1 - 0.485) / 0.229, the blue channel (0 - 0.406) / 0.225.
    assert x[0, 0, 0, 0] == pytest.approx((1 - 0.485) / 0.229, abs=1e-3)
    assert x[0, 2, 0, 0] == pytest.approx(-0.406 / 0.225, abs=1e-3)
    from_jpeg = preprocess(decode_image(_jpeg(rgb)))
    assert np.abs(from_jpeg - x).mean() < 0.1


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "unknown file signature"),
        (b"%PDF-1.7 not an image", "unknown file signature"),
        (b"\xff\xd8\xff\xe0" + b"\x00" * 100, "malformed JPEG header"),
        (b"\x89PNG\r\n\x1a\n\x00\x00", "malformed PNG header"),
    ],
)
def test_what_is_not_a_decodable_image_is_refused_with_the_reason(data: bytes, reason: str) -> None:
    with pytest.raises(ImageDecodeError, match=reason):
        decode_image(data)


def test_a_png_claiming_a_huge_canvas_is_refused_before_decoding() -> None:
    png = bytearray(_png(np.zeros((4, 4, 3), dtype=np.uint8)))
    png[16:20] = (100_000).to_bytes(4, "big")  # IHDR width
    png[20:24] = (100_000).to_bytes(4, "big")  # IHDR height
    assert MAX_PIXELS < 100_000 * 100_000
    with pytest.raises(ImageDecodeError, match="larger than allowed"):
        decode_image(bytes(png))


def test_a_jpeg_claiming_a_huge_frame_is_refused_before_decoding() -> None:
    jpeg = bytearray(_jpeg(np.zeros((16, 16, 3), dtype=np.uint8)))
    assert jpeg_size(bytes(jpeg)) == (16, 16)
    sof = next(i for i in range(2, len(jpeg) - 1) if jpeg[i] == 0xFF and jpeg[i + 1] == 0xC0)
    jpeg[sof + 5 : sof + 9] = (60_000).to_bytes(2, "big") * 2  # height, width
    with pytest.raises(ImageDecodeError, match="JPEG of 60000x60000 pixels is larger"):
        decode_image(bytes(jpeg))


def test_a_large_jpeg_is_decoded_at_reduced_scale_to_nearly_the_same_input() -> None:
    rng = np.random.default_rng(3)
    small = cv2.resize(
        rng.integers(0, 255, size=(12, 16, 3), dtype=np.uint8), (2000, 1500), cv2.INTER_CUBIC
    )
    data = _jpeg(small)
    assert jpeg_size(data) == (2000, 1500)
    decoded = decode_image(data)
    assert decoded.shape == (750, 1000, 3)  # 1/2: the short side keeps at least 448 px
    full = cv2.cvtColor(
        cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB
    )
    assert np.abs(preprocess(decoded) - preprocess(full)).mean() < 0.02
    # The photo sizes the model was trained and evaluated on are decoded in full.
    assert decode_image(_jpeg(small[:384, :512])).shape == (384, 512, 3)


# -- calibration and the result ------------------------------------------------------------------


def test_temperature_fit_recovers_the_temperature_of_overconfident_logits() -> None:
    rng = np.random.default_rng(0)
    true_logits = rng.normal(0, 2, size=(4000, 6))
    labels = np.array([rng.choice(6, p=p) for p in softmax(true_logits)])
    overconfident = true_logits * 3.0
    temperature = fit_temperature(overconfident, labels)
    assert temperature == pytest.approx(3.0, rel=0.1)
    assert nll(overconfident, labels, temperature) < nll(overconfident, labels)
    before = expected_calibration_error(softmax(overconfident), labels)
    after = expected_calibration_error(softmax(overconfident, temperature), labels)
    assert after < before / 2


def test_expected_calibration_error_of_perfect_and_wrong_predictions() -> None:
    confident = np.eye(6)[[0, 1, 2]]
    assert expected_calibration_error(confident, np.array([0, 1, 2])) == 0.0
    assert expected_calibration_error(confident, np.array([1, 2, 0])) == pytest.approx(1.0)


def test_result_top3_fraction_advice_and_uncertainty() -> None:
    town = load_municipality(DEFAULT_MUNICIPALITY)
    logits = np.array([0.0, 4.0, 1.0, 0.5, 2.0, -1.0])  # glass, then plastic, then metal
    sure = citizen_result(logits, temperature=1.0, uncertain_below=0.5, municipality=town)
    assert [r.label for r in sure.top] == ["glass", "plastic", "metal"]
    assert sure.top[0].score > sure.top[1].score > sure.top[2].score
    assert sure.uncertain is False
    assert sure.fraction == "Glas"
    assert sure.advice == town.labels["glass"].advice
    # A higher temperature flattens the same logits below the threshold: ask for another photo.
    unsure = citizen_result(logits, temperature=4.0, uncertain_below=0.5, municipality=town)
    assert unsure.top[0].label == "glass"
    assert unsure.uncertain is True
    assert unsure.fraction is None
    assert unsure.advice == town.municipality.uncertain_advice
    assert list(unsure.as_json("x.jpg")) == ["image", "top", "uncertain", "fraction", "advice"]


def test_top_k_checks_the_number_of_classes() -> None:
    with pytest.raises(ValueError, match="expected 6 probabilities"):
        top_k(np.ones(5) / 5)


# -- the town's rules ---------------------------------------------------------------------------


def test_shipped_municipality_files_map_every_label_to_a_known_fraction() -> None:
    files = sorted(MUNICIPALITIES.glob("*.toml"))
    assert len(files) >= 2
    for path in files:
        town = load_municipality(path)
        assert set(town.labels) == set(LABELS)
        assert all(rule.fraction in FRACTIONS for rule in town.labels.values())


def test_a_municipality_file_with_problems_is_refused_naming_the_file_and_key(
    tmp_path: Path,
) -> None:
    good = load_municipality(DEFAULT_MUNICIPALITY).model_dump()
    missing = {**good, "labels": {k: v for k, v in good["labels"].items() if k != "trash"}}
    with pytest.raises(ModelError, match=r"town.toml: labels: .*no rule for \['trash'\]"):
        parse_municipality(missing, "town.toml")
    wrong = {**good, "labels": {**good["labels"], "glass": {"fraction": "Altglas", "advice": "x"}}}
    with pytest.raises(ModelError, match=r"town.toml: labels.glass.fraction: "):
        parse_municipality(wrong, "town.toml")
    path = tmp_path / "broken.toml"
    path.write_text("[municipality\n", encoding="utf-8")
    with pytest.raises(ModelError, match=r"broken\.toml: TOML syntax error"):
        load_municipality(path)


# -- the shipped model ----------------------------------------------------------------------------


def test_the_shipped_card_verifies_and_is_small() -> None:
    card = load_card(CARD)
    model = load_model(CARD)
    assert card.labels == list(LABELS)
    assert card.quantization == "int8-qdq-static"
    assert model.model_path.stat().st_size < 5_000_000
    assert float(card.params["temperature"]) > 0  # type: ignore[arg-type]


def test_bundled_training_photos_are_classified_as_their_label() -> None:
    model = load_model(CARD)
    service = WasteService(waste_setup(config_from_dict({}, "test")))
    images = _demo_images()
    assert set(images) == set(LABELS)
    for label, path in images.items():
        result = service.classify(model, path.read_bytes())
        assert result.top[0].label == label, (path.name, result.top)
        assert sum(r.score for r in result.top) <= 1.0 + 1e-9


def test_batched_run_equals_single_runs() -> None:
    model = load_model(CARD)
    size = waste_setup(config_from_dict({}, "test")).image_size
    assert model.card.inputs[0].shape == ["batch", 3, size, size]
    xs = [preprocess(decode_image(p.read_bytes(), size), size) for p in _demo_images().values()]
    batch = model.run({"image": np.concatenate(xs)})[0]
    for i, x in enumerate(xs):
        np.testing.assert_allclose(model.run({"image": x})[0][0], batch[i], atol=1e-4)


# -- edge-gateway waste classify --------------------------------------------------------------


def test_classify_prints_exactly_one_json_line_per_image_and_goes_on_after_a_bad_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    images = _demo_images()
    not_image = tmp_path / "notes.txt"
    not_image.write_text("not a photo", encoding="utf-8")
    missing = tmp_path / "missing.jpg"
    paths = [images["glass"], not_image, missing, images["paper"]]
    code = main(["waste", "classify", *map(str, paths)])
    out, err = capsys.readouterr()
    assert code == 1  # some files failed
    lines = [json.loads(line) for line in out.splitlines()]
    assert [line["image"] for line in lines] == [str(images["glass"]), str(images["paper"])]
    for line in lines:
        assert list(line) == ["image", "top", "uncertain", "fraction", "advice"]
        assert len(line["top"]) == 3
        assert all(set(t) == {"label", "score"} for t in line["top"])
        assert isinstance(line["uncertain"], bool)
    assert lines[0]["top"][0]["label"] == "glass"
    assert lines[0]["fraction"] == "Glas"
    assert f"{not_image}: not a JPEG or PNG image" in err
    assert f"{missing}: No such file or directory" in err
    assert "KI-System" in err
    assert "waste_classifier" in err


def test_swapping_the_municipality_file_changes_the_answer_without_code(tmp_path: Path) -> None:
    town = load_municipality(DEFAULT_MUNICIPALITY).model_dump()
    town["municipality"]["name"] = "Glasfrei"
    town["labels"]["glass"] = {"fraction": "Restmüll", "advice": "Hier gibt es kein Altglas."}
    lines = ["[municipality]"]
    lines += [f"{k} = {json.dumps(v)}" for k, v in town["municipality"].items()]
    for label, rule in town["labels"].items():
        lines += [f"[labels.{label}]"] + [f"{k} = {json.dumps(v)}" for k, v in rule.items()]
    path = tmp_path / "glasfrei.toml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    glass = str(_demo_images()["glass"])
    out = io.StringIO()
    default = config_from_dict({}, "test")
    assert classify_files([Path(glass)], default, out, io.StringIO()) == 0
    assert json.loads(out.getvalue())["fraction"] == "Glas"
    out = io.StringIO()
    swapped = config_from_dict({"waste": {"municipality": str(path)}}, "test")
    assert classify_files([Path(glass)], swapped, out, io.StringIO()) == 0
    answer = json.loads(out.getvalue())
    assert answer["fraction"] == "Restmüll"
    assert answer["advice"] == "Hier gibt es kein Altglas."


def test_the_uncertainty_threshold_is_configurable(tmp_path: Path) -> None:
    glass = _demo_images()["glass"]
    out = io.StringIO()
    strict = config_from_dict({"waste": {"uncertain_below": 0.999999}}, "test")
    assert classify_files([glass], strict, out, io.StringIO()) == 0
    answer = json.loads(out.getvalue())
    assert answer["uncertain"] is True
    assert answer["fraction"] is None


def test_a_card_whose_input_is_not_a_square_image_is_refused_naming_it(tmp_path: Path) -> None:
    text = CARD.read_text(encoding="utf-8")
    side = load_card(CARD).inputs[0].shape[-1]
    card = tmp_path / "wide.toml"
    card.write_text(
        text.replace(f'shape = ["batch", 3, {side}, {side}]', f'shape = ["batch", 3, {side}, 640]'),
        encoding="utf-8",
    )
    (tmp_path / load_card(CARD).file).symlink_to(CARD.parent / load_card(CARD).file)
    cfg = config_from_dict({"waste": {"card": str(card)}}, "test")
    with pytest.raises(
        ModelError, match=r"wide\.toml: inputs\[0\]\.shape: must be \[batch, 3, size, size\]"
    ):
        waste_setup(cfg)


def test_a_missing_card_is_one_clear_error(tmp_path: Path) -> None:
    cfg = config_from_dict({"waste": {"card": str(tmp_path / "none.toml")}}, "test")
    err = io.StringIO()
    assert classify_files([_demo_images()["glass"]], cfg, io.StringIO(), err) == 1
    assert "none.toml: card: file not found" in err.getvalue()


# -- the demo -----------------------------------------------------------------------------------


def test_the_demo_classifies_the_bundled_photos_as_compact_events(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGE_GATEWAY_")}
    result = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "demo", "--interval", "0"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    events = [decode(line.encode(), Encoding.JSON) for line in result.stdout.splitlines()]
    waste = [e for e in events if e.kind == "waste_classified"]
    assert len(waste) == len(LABELS)
    for event in waste:
        values = {m.name: m.value for m in event.values}
        assert values["ai_generated"] is True
        assert event.model is not None
        assert event.model.model_id == "waste_classifier"
        assert event.model.sha256 == load_card(CARD).sha256
    assert sorted(
        str(next(m.value for m in e.values if m.name == "label")) for e in waste
    ) == sorted(LABELS)
    lines = [line for line in result.stdout.splitlines() if '"waste_classified"' in line]
    assert max(len(line) for line in lines) < 700  # compact: labels and scores, no image


def test_evaluation_on_the_unseen_sample_matches_the_documented_figures() -> None:
    data = ROOT.parent / "shared" / "data"
    if not (data / "trashnet-sample" / "labels.csv").is_file():
        pytest.skip(f"{data}/trashnet-sample is not on this machine (evaluation data)")
    model = load_model(CARD)
    evaluation = evaluate_classifier(model.run, model.card, data)
    assert evaluation.samples == 42
    # docs/waste-classifier.md (1.2.0): 40/42 top-1, 42/42 top-3, calibrated ECE 0.071 (from 0.106).
    assert evaluation.metrics["top1"] == pytest.approx(40 / 42)
    assert evaluation.metrics["top3"] == 1.0
    assert evaluation.metrics["ece_calibrated"] < evaluation.metrics["ece_raw"]
    confusion = sum(evaluation.metrics[f"confusion_{label}_as_{label}"] for label in LABELS)
    assert confusion == 40


# -- ensembles ----------------------------------------------------------------------------------


def _tiny_classifier(path: Path, weight: np.ndarray, side: int) -> None:
    """image [batch, 3, side, side] -> mean colour -> linear -> logits [batch, 6]."""
    graph = onnx.helper.make_graph(
        [
            onnx.helper.make_node("ReduceMean", ["image"], ["pooled"], axes=[2, 3], keepdims=0),
            onnx.helper.make_node("Gemm", ["pooled", "w", "b"], ["out"], transB=1),
        ],
        "tiny",
        [onnx.helper.make_tensor_value_info("image", 1, ["batch", 3, side, side])],
        [onnx.helper.make_tensor_value_info("out", 1, ["batch", len(LABELS)])],
        [
            onnx.numpy_helper.from_array(weight.astype(np.float32), "w"),
            onnx.numpy_helper.from_array(np.arange(6, dtype=np.float32), "b"),
        ],
    )
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))


def test_merged_members_return_the_mean_of_their_logits_at_the_new_size(tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    weights = [rng.normal(size=(len(LABELS), 3)) for _ in range(2)]
    members = [tmp_path / "a.onnx", tmp_path / "b.onnx"]
    for path, weight in zip(members, weights, strict=True):
        _tiny_classifier(path, weight, side=4)
    merged = tmp_path / "merged.onnx"
    merge_members(members, 8, merged)
    session = ort.InferenceSession(str(merged), providers=["CPUExecutionProvider"])
    (spec,) = session.get_inputs()
    assert (spec.name, spec.shape) == ("image", ["batch", 3, 8, 8])
    assert [o.name for o in session.get_outputs()] == ["logits"]
    x = rng.normal(size=(2, 3, 8, 8)).astype(np.float32)
    pooled = x.mean(axis=(2, 3))
    expected = np.mean([pooled @ w.T + np.arange(6) for w in weights], axis=0)
    np.testing.assert_allclose(session.run(None, {"image": x})[0], expected, rtol=1e-5, atol=1e-5)
    single = tmp_path / "single.onnx"
    merge_members(members[:1], 8, single)  # one member: only the input size changes
    alone = ort.InferenceSession(str(single), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(
        alone.run(None, {"image": x})[0], pooled @ weights[0].T + np.arange(6), rtol=1e-5, atol=1e-5
    )
