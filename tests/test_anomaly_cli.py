"""``edge-gateway anomaly replay``: the exact interface, bad input, and the daemon's equivalence."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from importlib import resources
from pathlib import Path
from typing import Any

import pytest

from gateway.analyzers.config import AnalyzerConfig
from gateway.anomaly_cli import _Progress, main
from gateway.app import Gateway
from gateway.config import config_from_dict
from gateway.types import Event, Severity
from gateway.wire import Encoding, decode
from models.water_level.features import ForecastParams
from tests.support.tiny_models import linear_card_data, linear_model, write_card

T0 = datetime(2020, 9, 18, 12, 15, tzinfo=UTC)


def gard_levels_cm() -> list[tuple[str, float]]:
    """The demo's real flood (Le Gard at Anduze, Hub'Eau, Etalab 2.0), levels in cm."""
    text = resources.files("gateway.demo").joinpath("gard-anduze-2020-09.jsonl").read_text()
    rows = []
    for line in text.splitlines():
        data = json.loads(line)
        (value,) = data["values"]
        assert value["u"] == "mm"
        rows.append((data["ts"], value["v"] / 10))
    return rows


def write_csv(path: Path, rows: list[tuple[str, Any]], header: str = "time,level") -> Path:
    path.write_text(header + "\n" + "".join(f"{t},{v}\n" for t, v in rows), encoding="utf-8")
    return path


def read_out(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def replay_args(src: Path, out: Path, *extra: str) -> list[str]:
    """``replay`` with the columns ``write_csv`` writes."""
    return [
        "replay",
        "--input",
        str(src),
        "--time-column",
        "time",
        "--value-column",
        "level",
        "--out",
        str(out),
        *extra,
    ]


def replay(tmp_path: Path, src: Path, *extra: str) -> tuple[int, list[dict[str, str]]]:
    out = tmp_path / "out.csv"
    code = main(replay_args(src, out, *extra))
    return code, read_out(out) if out.exists() else []


def test_the_exact_interface_through_the_installed_command(tmp_path: Path) -> None:
    rows = gard_levels_cm()
    src = write_csv(tmp_path / "gard.csv", rows)
    out = tmp_path / "verdicts.csv"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "gateway.cli",
            "anomaly",
            *replay_args(src, out, "--profile", "water-level"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "\r" not in result.stderr  # no progress bar: stderr is not a terminal
    assert f"{len(rows)} rows" in result.stderr and "sha256" in result.stderr
    lines = out.read_text().splitlines()
    assert lines[0] == "timestamp,value,score,anomaly,flags"
    verdicts = read_out(out)
    assert [(v["timestamp"], float(v["value"])) for v in verdicts] == rows
    assert all(0.0 <= float(v["score"]) < 1.0 for v in verdicts)
    assert {v["anomaly"] for v in verdicts} == {"0", "1"}
    flags = [set(v["flags"].split(";")) - {""} for v in verdicts]
    onset = next(i for i, f in enumerate(flags) if "rate_of_rise" in f)
    assert verdicts[onset]["timestamp"] == "2020-09-19T10:15:00Z"  # the first flood reading
    assert {"outlier", "unconfirmed", "stage_1"} <= flags[onset]
    assert {"stage_2", "rate_of_rise"} <= flags[onset + 1]
    assert any("stage_4" in f for f in flags)  # the peak of 7.4 m
    assert all(
        v["anomaly"] == "1"
        for v, f in zip(verdicts, flags, strict=True)
        if f - {"stage_entered", "stage_left"}
    )


def test_generic_profile_is_the_default_and_knows_no_stages(tmp_path: Path) -> None:
    src = write_csv(tmp_path / "gard.csv", gard_levels_cm())
    code, verdicts = replay(tmp_path, src)
    assert code == 0
    flags = {f for v in verdicts for f in v["flags"].split(";") if f}
    assert "outlier" in flags and "learned_anomaly" in flags
    assert not {f for f in flags if f.startswith("stage") or f == "rate_of_rise"}


def test_a_missing_column_names_the_file_and_the_columns(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = write_csv(tmp_path / "in.csv", [("2024-01-01T00:00:00Z", 1.0)], header="ts,level")
    code, _ = replay(tmp_path, src)
    assert code == 2
    err = capsys.readouterr().err
    assert f"{src}: row 1: no column 'time' (--time-column); the columns are 'ts', 'level'" in err
    assert not (tmp_path / "out.csv").exists()
    assert not (tmp_path / "out.csv.part").exists()


def test_an_unparsable_time_names_the_row_and_column(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = [("2024-01-01T00:00:00Z", 1.0), ("2024-01-01T00:15:00Z", 1.1), ("yesterday", 1.2)]
    src = write_csv(tmp_path / "in.csv", rows)
    code, _ = replay(tmp_path, src)
    assert code == 2
    assert f"{src}: row 4: column 'time': not a time" in capsys.readouterr().err
    assert not (tmp_path / "out.csv").exists()


def test_blank_and_non_numeric_values_are_flagged_invalid_and_the_replay_goes_on(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rows: list[tuple[str, Any]] = [
        ((T0 + timedelta(minutes=15 * i)).isoformat(), 100.0 + (i % 3) * 0.1) for i in range(40)
    ]
    rows[10] = (rows[10][0], "")
    rows[20] = (rows[20][0], "n/a")
    rows[30] = (rows[30][0], "nan")
    src = write_csv(tmp_path / "in.csv", rows)
    code, verdicts = replay(tmp_path, src, "--profile", "water-level")
    assert code == 0
    assert len(verdicts) == 40
    assert verdicts[10]["flags"] == "invalid;missing" and verdicts[10]["anomaly"] == "1"
    assert verdicts[20]["flags"] == "invalid;not_a_number" and verdicts[20]["value"] == "n/a"
    assert verdicts[30]["flags"] == "invalid;not_a_number"
    assert verdicts[11]["anomaly"] == "0"
    err = capsys.readouterr().err
    assert f"{src}: row 12: column 'level': missing (got: ''); flagged invalid" in err
    assert f"{src}: row 22: column 'level': not a number (got: 'n/a'); flagged invalid" in err
    assert "3 without a usable value" in err


def test_semicolons_epoch_seconds_and_naive_times(tmp_path: Path) -> None:
    src = tmp_path / "in.csv"
    src.write_text(
        "time;level\n1600000000;5\n2020-09-13 12:41:40;5\n1600001800;5\n", encoding="utf-8"
    )
    code, verdicts = replay(tmp_path, src)
    assert code == 0
    assert [v["timestamp"] for v in verdicts] == ["1600000000", "2020-09-13 12:41:40", "1600001800"]
    # The naive time is UTC: 1600000000 s is 2020-09-13 12:26:40 UTC, so it is 15 min later.
    assert [v["flags"] for v in verdicts] == ["", "", ""]


def test_rows_out_of_time_order_are_flagged(tmp_path: Path) -> None:
    rows = [("2024-01-01T01:00:00Z", 1.0), ("2024-01-01T00:00:00Z", 2.0)]
    code, verdicts = replay(tmp_path, write_csv(tmp_path / "in.csv", rows))
    assert code == 0
    assert [v["flags"] for v in verdicts] == ["", "out_of_order"]


def test_a_model_that_fails_on_the_series_is_an_error_not_a_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The card's feature window (16) disagrees with its model's input (8): the warm-up with
    # zeros passes, the first real batch does not.
    model = linear_model(tmp_path / "m.onnx", in_dim=8, out_dim=1)
    data = linear_card_data(
        model,
        inputs=[{"name": "x", "shape": ["batch", 8], "dtype": "float32"}],
        outputs=[{"name": "y", "shape": ["batch", 1], "dtype": "float32"}],
        params=ForecastParams().to_params(),
        thresholds={"anomaly": 0.5},
    )
    card = write_card(tmp_path / "m.toml", data)
    rows = [((T0 + timedelta(minutes=15 * i)).isoformat(), 100.0 + i % 3) for i in range(40)]
    code, _ = replay(tmp_path, write_csv(tmp_path / "in.csv", rows), "--model", str(card))
    assert code == 2
    assert "inputs.x: shape must be [batch, 8]" in capsys.readouterr().err
    assert not (tmp_path / "out.csv").exists()
    assert not (tmp_path / "out.csv.part").exists()


def test_the_progress_bar_is_drawn_on_a_terminal_only() -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    tty = Terminal()
    bar = _Progress(tty, 1000)
    bar.update(500, 10)
    bar.update(501, 11)  # same percentage: not redrawn
    bar.update(1000, 20)
    bar.close()
    assert tty.getvalue() == (
        "\ranomaly replay [############             ]  50% 10 rows"
        "\ranomaly replay [#########################] 100% 20 rows\n"
    )
    plain = io.StringIO()
    quiet = _Progress(plain, 1000)
    quiet.update(500, 10)
    quiet.close()
    assert plain.getvalue() == ""


# -- replay and daemon: the same verdicts for the same input ----------------------------------


async def run_daemon(tmp_path: Path, recording: Path, extra: dict[str, Any]) -> list[Event]:
    out = tmp_path / "published.jsonl"
    cfg = {
        "gateway": {"id": "t", "state_dir": str(tmp_path / "state"), "log_level": "error"},
        "uplink": {"type": "file", "path": str(out), "fsync": False},
        "sources": [{"type": "replay", "name": "gauge", "file": str(recording)}],
        **extra,
    }
    gateway = Gateway(config_from_dict(cfg, "test"), {})
    assert await gateway.run(stop_when_sources_done=True) == 0
    return [decode(line, Encoding.JSON) for line in out.read_bytes().splitlines()]


def recording_of(path: Path, rows: list[tuple[str, float]]) -> Path:
    path.write_text(
        "".join(
            json.dumps({"ts": t, "device": "gauge-1", "values": [{"n": "water_level", "v": v}]})
            + "\n"
            for t, v in rows
        )
    )
    return path


@pytest.mark.parametrize("profile", ["water-level", "generic"])
async def test_replay_writes_what_the_daemon_publishes(tmp_path: Path, profile: str) -> None:
    rows = gard_levels_cm()
    # A spike and a flatline of a broken sensor on top of the real flood.
    rows[30] = (rows[30][0], 95.0)
    rows[110:140] = [(t, 300.0) for t, _v in rows[110:140]]
    code, verdicts = replay(tmp_path, write_csv(tmp_path / "in.csv", rows), "--profile", profile)
    assert code == 0
    analyzer = AnalyzerConfig(profile=profile, devices=["gauge-1"]).model_dump(mode="json")
    events = await run_daemon(
        tmp_path,
        recording_of(tmp_path / "rec.jsonl", rows),
        {
            "inference": {"cards": ["water_level/forecaster.toml"]},
            "analyzers": {"gauge": analyzer},
        },
    )
    assert len(events) == len(verdicts) == len(rows)
    events.sort(key=lambda e: e.ts)
    for event, verdict in zip(events, verdicts, strict=True):
        assert event.ts == datetime.fromisoformat(verdict["timestamp"])
        assert ";".join(event.quality) == verdict["flags"]
        assert (event.severity != Severity.INFO) == (verdict["anomaly"] == "1")
        score = 0.0 if event.model is None else event.model.score
        assert f"{score:.6f}" == verdict["score"]
    kinds = {e.kind for e in events}
    assert kinds == {"water_level" if profile == "water-level" else "series_analysis"}
    assert sum(v["anomaly"] == "1" for v in verdicts) > 10
    assert any("flatline" in v["flags"] for v in verdicts)


def refused_card(models: Path) -> Path:
    """The shipped int8 model with a card whose sha256 does not match the file."""
    models.mkdir()
    shipped = Path(__file__).resolve().parents[1] / "models" / "water_level"
    (models / "forecaster.int8.onnx").write_bytes((shipped / "forecaster.int8.onnx").read_bytes())
    card = (shipped / "forecaster.toml").read_text()
    bad = card.replace(card.split('sha256 = "')[1].split('"')[0], "0" * 64)
    (models / "forecaster.toml").write_text(bad)
    return models


async def test_the_daemon_keeps_warning_when_the_model_is_refused(tmp_path: Path) -> None:
    # The engine refuses the model (sha256 mismatch); the gauge's rules still raise the flood
    # warnings, and every scorable reading says it went unscored.
    models = refused_card(tmp_path / "models")
    rows = gard_levels_cm()
    events = await run_daemon(
        tmp_path,
        recording_of(tmp_path / "rec.jsonl", rows),
        {
            "inference": {"models_dir": str(models), "cards": ["forecaster.toml"]},
            "analyzers": {"gauge": {"devices": ["gauge-1"], "stages_cm": [250, 400, 550, 700]}},
        },
    )
    assert len(events) == len(rows)
    assert all(e.model is None for e in events)
    assert any("no_score" in e.quality for e in events)
    assert any(e.severity == Severity.CRITICAL and "stage_4" in e.quality for e in events)
    assert any("rate_of_rise" in e.quality for e in events)
