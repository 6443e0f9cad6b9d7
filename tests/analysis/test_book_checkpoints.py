"""The book's published checkpoints on the real 141-slice chest CT find the book's nodules."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from lungcad.cli.analyze import register
from tests.conftest import shared_file

BOOK_SEGMENTER = (
    "models/dlwpt/seg_2020-01-26_19.45.12_w4d3c1-bal_1_nodupe-label_pos-d1_fn8-adam.best.state"
)
BOOK_CLASSIFIER = "models/dlwpt/cls_2020-02-06_14.16.55_final-nodule-nonnodule.best.state"
# ../shared/MEASUREMENTS.md: the book's nodule_analysis.py on this series, detections above
# 0.5 inside the body (p_nodule, x, y, z in mm). It reports the voxel its crop centred on;
# we report the HU-weighted centre, within a voxel or so of it.
BOOK_DETECTIONS = [
    (1.000, (-41.99, 135.80, -88.5)),
    (0.9992, (104.49, 79.16, 29.5)),
    (0.9934, (98.63, 61.59, -20.5)),
    (0.5971, (112.30, 93.81, -112.5)),
]


@pytest.mark.slow
def test_book_checkpoints_find_the_book_nodules(tmp_path: Path) -> None:
    series = shared_file("data/ct/chest-ct-141-dicom")
    app = typer.Typer()

    @app.callback()
    def _root() -> None:
        """Keep ``analyze`` a named sub-command."""

    register(app)
    out = tmp_path / "run"
    result = CliRunner().invoke(
        app,
        [
            "analyze", str(series), "--out", str(out), "--device", "cpu",
            "--seg", str(shared_file(BOOK_SEGMENTER)), "--cls", str(shared_file(BOOK_CLASSIFIER)),
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    (record_path,) = [p for p in out.glob("*.json")]
    record = json.loads(record_path.read_text())
    assert (out / f"{record_path.stem}.html").is_file() and (out / "index.html").is_file()
    assert record["funnel"]["candidates_classified"] == 464  # as the book's run
    with (out / "detections.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 464
    found = np.array([[float(r[c]) for c in ("coordX", "coordY", "coordZ")] for r in rows])
    probability = np.array([float(r["probability"]) for r in rows])
    for book_p, book_xyz in BOOK_DETECTIONS:
        distances = np.linalg.norm(found - np.array(book_xyz), axis=1)
        nearest = int(np.argmin(distances))
        assert distances[nearest] < 3.0, book_xyz
        assert probability[nearest] == pytest.approx(book_p, abs=1e-3)
    assert len(record["nodules"]) == int(np.count_nonzero(probability >= 0.5))
