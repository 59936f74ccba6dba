"""The real series the forecaster is trained and evaluated on, and the documented split.

Reads ``../shared/data`` (see each data set's PROVENANCE.md): NAB (``nab-anomaly``), Hub'Eau river
floods (``hubeau-river-level-floods``) and the Logan River stage series with technician QC
(``lro-stream-stage-qc``). Used by ``train.py`` and ``evaluate.py`` only; the gateway never
imports it.

The split (documented in ``models/water_level/README.md``): the first :data:`TRAIN_FRACTION` of
every series, by row, is the training portion, cut short before any labelled NAB anomaly window
that starts inside it; the rest is the evaluation portion. This follows NAB's own convention of a
15 % "probationary" start that is never scored.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

__all__ = [
    "FAULT_LABELS",
    "HUBEAU_FILES",
    "NAB_FILES",
    "TRAIN_FRACTION",
    "Series",
    "default_data_dir",
    "load_hubeau",
    "load_lro",
    "load_nab",
    "parse_time",
]

TRAIN_FRACTION = 0.15

# Stage-series labels that mean the technician changed or removed the raw value.
FAULT_LABELS = frozenset({"removed", "replaced", "corrected"})

NAB_FILES = (
    "realKnownCause/machine_temperature_system_failure.csv",
    "realKnownCause/ambient_temperature_system_failure.csv",
    "realKnownCause/nyc_taxi.csv",
    "realKnownCause/ec2_request_latency_system_failure.csv",
    "realAWSCloudwatch/ec2_cpu_utilization_825cc2.csv",
    "realAWSCloudwatch/rds_cpu_utilization_e47b3b.csv",
    "realTraffic/occupancy_6005.csv",
    "artificialWithAnomaly/art_daily_jumpsup.csv",
    "artificialWithAnomaly/art_daily_flatmiddle.csv",
    "artificialWithAnomaly/art_increase_spike_density.csv",
    "artificialNoAnomaly/art_daily_small_noise.csv",
)

# file -> (label, flood peak time as computed in the data set's PROVENANCE.md, or None: control)
HUBEAU_FILES: dict[str, tuple[str, str | None]] = {
    "hubeau_site_V7144010_2020-08-26_30d_30m_Le_Gard.csv": ("Le Gard at Anduze", "2020-09-19"),
    "hubeau_site_Y2100020_2020-08-26_30d_30m_LHerault.csv": (
        "L'Herault at Laroque",
        "2020-09-19",
    ),
    "hubeau_site_Y1612040_30d_30m_LAude.csv": ("L'Aude at Coursan", "2020-01-24"),
    "hubeau_site_Y0634020_30d_30m_LAgly.csv": ("L'Agly at Cassagnes", "2020-01-22"),
    "hubeau_site_Y1232010_2020-04-15_30d_30m_LAude.csv": ("L'Aude at Carcassonne", None),
}


@dataclass
class Series:
    """One real series, oldest first, with its split and labels."""

    name: str
    times: list[datetime]
    values: list[float | None]
    unit: str | None = None
    # Rows [0, train_end) are the training portion; [train_end, n) the evaluation portion.
    train_end: int = 0
    windows: list[tuple[datetime, datetime]] = field(default_factory=list)
    # Per-row labels for the stage series (fault kinds), empty elsewhere.
    labels: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.values)

    def training(self) -> list[float]:
        """The training portion's values (missing ones left out)."""
        return [v for v in self.values[: self.train_end] if v is not None]


def default_data_dir() -> Path:
    """``../shared/data`` next to the repository (the layout of this project's machines)."""
    return Path(__file__).resolve().parents[3] / "shared" / "data"


def parse_time(text: str) -> datetime:
    """ISO 8601 with or without a zone; a time without one is taken as UTC."""
    ts = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    return ts if ts.tzinfo is not None else ts.replace(tzinfo=UTC)


def _split(n: int, times: list[datetime], windows: list[tuple[datetime, datetime]]) -> int:
    end = int(n * TRAIN_FRACTION)
    for start, _stop in windows:
        # Never train on a labelled anomaly: stop the training portion before it.
        first = next((i for i, t in enumerate(times) if t >= start), n)
        end = min(end, first)
    return end


def load_nab(root: Path) -> list[Series]:
    """The NAB series with their labelled windows."""
    base = root / "nab-anomaly"
    windows_by_file = json.loads((base / "labels" / "combined_windows.json").read_text("utf-8"))
    out = []
    for name in NAB_FILES:
        times: list[datetime] = []
        values: list[float | None] = []
        with (base / "data" / name).open(newline="", encoding="utf-8") as fh:
            for row in csv.DictReader(fh):
                times.append(parse_time(row["timestamp"]))
                values.append(float(row["value"]))
        windows = [(parse_time(a), parse_time(b)) for a, b in windows_by_file.get(name, [])]
        series = Series(name, times, values, None, windows=windows)
        series.train_end = _split(len(values), times, windows)
        out.append(series)
    return out


def load_hubeau(root: Path) -> list[Series]:
    """The five Hub'Eau stage series in cm, oldest first (the files are newest first)."""
    base = root / "hubeau-river-level-floods"
    out = []
    for name, (label, _peak_day) in HUBEAU_FILES.items():
        rows: list[tuple[datetime, float]] = []
        stations: list[str] = []
        with (base / name).open(newline="", encoding="utf-8") as fh:
            for row in csv.DictReader(fh, delimiter=";"):
                rows.append((parse_time(row["date_obs"]), float(row["resultat_obs"]) / 10.0))
                stations.append(row["code_station"])
        # One file holds a stray row of a second station (PROVENANCE.md): keep the main one.
        main = max(set(stations), key=stations.count)
        kept = sorted(r for r, s in zip(rows, stations, strict=True) if s == main)
        times = [t for t, _v in kept]
        values: list[float | None] = [v for _t, v in kept]
        series = Series(f"{label} ({name.split('_')[2]})", times, values, "cm")
        series.train_end = _split(len(values), times, [])
        out.append(series)
    return out


# The labels of the stage series: what the technician did to a row (see README and evaluate.py).
def load_lro(root: Path) -> Series:
    """Logan River at Main Street, 2019: raw stage, and per-row fault labels from the QC."""
    path = root / "lro-stream-stage-qc" / "MainStreet2019_stage.csv"
    times: list[datetime] = []
    values: list[float | None] = []
    offsets: list[float] = []
    quals: list[str] = []
    removed: list[bool] = []
    with path.open(newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            times.append(parse_time(row["datetime"]))
            raw = float(row["stage"])
            cor = float(row["stage_cor"])
            values.append(raw)
            removed.append(cor == -9999)
            offsets.append(raw - cor)
            quals.append(row["stage_qual"])
    labels = []
    n = len(values)
    for i in range(n):
        if removed[i]:
            labels.append("removed")
        elif quals[i] == "1":
            labels.append("replaced")
        elif _off_datum(offsets, removed, i):
            labels.append("corrected")
        elif quals[i] == "4":
            labels.append("qualified")
        else:
            labels.append("")
    series = Series("Logan River at Main Street 2019 (raw stage)", times, values, "cm")
    series.labels = labels
    # As for NAB's windows: the training portion ends before the first row the technician
    # corrected or removed.
    first_fault = next((i for i, label in enumerate(labels) if label in FAULT_LABELS), n)
    series.train_end = min(_split(n, times, []), first_fault)
    return series


# A row whose raw-minus-corrected offset differs by more than this from the offset of the rows
# around it was corrected on its own (a datum change moves all rows together; drift corrections
# move by millimetres per row).
_POINT_CORRECTION = 0.5
_NEIGHBOURS = 8


def _off_datum(offsets: list[float], removed: list[bool], i: int) -> bool:
    around = [
        offsets[j]
        for j in range(max(0, i - _NEIGHBOURS), min(len(offsets), i + _NEIGHBOURS + 1))
        if j != i and not removed[j]
    ]
    if not around:
        return False
    around.sort()
    median = around[len(around) // 2]
    return not math.isclose(offsets[i], median, abs_tol=_POINT_CORRECTION)
