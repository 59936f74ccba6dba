"""``edge-gateway vision detect``: the exact JSON-lines interface, bad files, bad models, cards."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.vision_cli import default_card, main
from models.card import load_card
from models.pool import DEFAULT_DETECTOR_CARD

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures" / "vision"
FASTESTDET = ROOT / "models" / "generic" / "fastestdet" / "fastestdet.toml"
POOL_CARD = ROOT / "models" / DEFAULT_DETECTOR_CARD
SWIMMERS = sorted(FIXTURES.glob("swimmers_*.jpg"))


def _lines(capsys: pytest.CaptureFixture[str]) -> list[dict[str, object]]:
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def test_one_exact_json_line_per_image_with_boxes_in_image_pixels(
    capsys: pytest.CaptureFixture[str],
) -> None:
    image = str(FIXTURES / "fastestdet_3.jpg")
    assert main(["detect", "--card", str(FASTESTDET), image, image]) == 0
    lines = _lines(capsys)
    assert len(lines) == 2
    first = lines[0]
    assert list(first) == ["image", "width", "height", "detections"]
    assert (first["image"], first["width"], first["height"]) == (image, 500, 335)
    detections = first["detections"]
    assert isinstance(detections, list) and detections
    for d in detections:
        assert list(d) == ["label", "score", "box"]
        assert d["label"] == "person"
        assert isinstance(d["score"], float) and 0.65 <= d["score"] <= 1
        x1, y1, x2, y2 = d["box"]
        assert 0 <= x1 < x2 <= 500 and 0 <= y1 < y2 <= 335
    assert [d["score"] for d in detections] == sorted(
        (d["score"] for d in detections), reverse=True
    )
    assert lines[1] == first


def test_unreadable_files_get_an_error_line_naming_them_and_the_rest_goes_on(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    garbage = tmp_path / "garbage.jpg"
    garbage.write_bytes(b"\xff\xd8 not really a jpeg")
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    missing = tmp_path / "missing.jpg"
    good = str(FIXTURES / "fastestdet_3.jpg")
    args = [str(garbage), str(empty), str(missing), str(tmp_path), good]
    assert main(["detect", "--card", str(FASTESTDET), *args]) == 1
    lines = _lines(capsys)
    assert [line["image"] for line in lines] == args
    for line, why in zip(
        lines[:4],
        ["not a decodable image", "empty file", "file not found", "is a directory"],
        strict=True,
    ):
        assert list(line) == ["image", "error"]
        error = line["error"]
        assert isinstance(error, str) and error.startswith(str(line["image"])) and why in error
    assert lines[4]["detections"]


def test_a_corrupt_model_is_refused_with_the_file_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    card = load_card(FASTESTDET)
    broken = tmp_path / card.file
    broken.write_bytes(b"\x08\x07garbage, not a protobuf")
    digest = hashlib.sha256(broken.read_bytes()).hexdigest()
    text = FASTESTDET.read_text().replace(card.sha256, digest)
    (tmp_path / "card.toml").write_text(text)
    code = main(
        ["detect", "--card", str(tmp_path / "card.toml"), str(FIXTURES / "fastestdet_3.jpg")]
    )
    assert code == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "model refused" in captured.err
    assert str(broken) in captured.err and "not a loadable ONNX model" in captured.err


def test_a_tampered_model_fails_its_sha256(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    shutil.copy(FASTESTDET, tmp_path / "card.toml")
    model = tmp_path / load_card(FASTESTDET).file
    model.write_bytes((FASTESTDET.parent / model.name).read_bytes()[:-1] + b"\x00")
    assert main(["detect", "--card", str(tmp_path / "card.toml"), "x.jpg"]) == 1
    assert "sha256" in capsys.readouterr().err


def test_the_default_card_is_the_shipped_pool_detector(tmp_path: Path) -> None:
    assert default_card(None) == POOL_CARD
    config = tmp_path / "gateway.toml"
    config.write_text('[inference]\nmodels_dir = "/opt/models"\n')
    assert default_card(config) == Path("/opt/models") / DEFAULT_DETECTOR_CARD
    config.write_text(
        '[pools.shallow]\ndetector_card = "pool/other.toml"\n[pools.shallow.camera]\n'
        'url = "/dev/video0"\n'
    )
    assert default_card(config).parts[-2:] == ("pool", "other.toml")
    assert default_card(config, "shallow").parts[-2:] == ("pool", "other.toml")


def test_a_bad_config_or_pool_name_exits_78(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text("[inference]\nthreads = 0\n")
    assert main(["detect", "-c", str(config), "x.jpg"]) == 78
    assert "inference.threads" in capsys.readouterr().err
    config.write_text("")
    assert main(["detect", "-c", str(config), "--pool", "deep", "x.jpg"]) == 78
    assert "no pool named 'deep'" in capsys.readouterr().err


def test_the_installed_command_runs_lazily_registered(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"nope")
    image = str(FIXTURES / "fastestdet_3.jpg")
    result = subprocess.run(
        [
            str(Path(sys.executable).parent / "edge-gateway"),
            "vision",
            "detect",
            "--card",
            str(FASTESTDET),
            image,
            str(bad),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 1, result.stderr
    first, second = (json.loads(line) for line in result.stdout.splitlines())
    assert first["image"] == image and first["detections"]
    assert second == {
        "image": str(bad),
        "error": f"{bad}: not a decodable image (JPEG, PNG, BMP, TIFF, WebP, ...)",
    }


def test_without_a_card_the_shipped_pool_detector_finds_the_swimmers(
    capsys: pytest.CaptureFixture[str],
) -> None:
    images = [str(p) for p in SWIMMERS]
    assert len(images) == 3
    assert main(["detect", "--threads", "1", *images]) == 0
    lines = _lines(capsys)
    assert [line["image"] for line in lines] == images
    for line in lines:
        assert (line["width"], line["height"]) == (416, 234)
        detections = line["detections"]
        assert isinstance(detections, list) and detections
        assert {d["label"] for d in detections} == {"person"}
