"""The book's published checkpoints on the real 141-slice chest CT find the book's nodules."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

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


def analyze(series: Path, out: Path, *options: str) -> dict[str, Any]:
    """``lungcad analyze`` with the book's checkpoints; the scan's JSON record."""
    app = typer.Typer()

    @app.callback()
    def _root() -> None:
        """Keep ``analyze`` a named sub-command."""

    register(app)
    result = CliRunner().invoke(
        app,
        [
            "analyze", str(series), "--out", str(out), "--device", "cpu",
            "--seg", str(shared_file(BOOK_SEGMENTER)), "--cls", str(shared_file(BOOK_CLASSIFIER)),
            *options,
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    (record_path,) = [p for p in out.glob("*.json")]
    assert (out / f"{record_path.stem}.html").is_file() and (out / "index.html").is_file()
    return dict(json.loads(record_path.read_text()))


def detections(out: Path) -> tuple[np.ndarray, np.ndarray]:
    """(N, 3) mm centres and (N,) p_nodule of every candidate in ``detections.csv``."""
    with (out / "detections.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    found = np.array([[float(r[c]) for c in ("coordX", "coordY", "coordZ")] for r in rows])
    return found, np.array([float(r["probability"]) for r in rows])


def assert_has_book_detections(found: np.ndarray, probability: np.ndarray) -> None:
    for book_p, book_xyz in BOOK_DETECTIONS:
        distances = np.linalg.norm(found - np.array(book_xyz), axis=1)
        nearest = int(np.argmin(distances))
        assert distances[nearest] < 3.0, book_xyz
        assert probability[nearest] == pytest.approx(book_p, abs=1e-3)


@pytest.mark.slow
def test_book_checkpoints_find_the_book_nodules(tmp_path: Path) -> None:
    series = shared_file("data/ct/chest-ct-141-dicom")
    record = analyze(series, tmp_path / "book", "--no-blobs")
    assert record["funnel"]["candidates_classified"] == 464  # as the book's run
    found, probability = detections(tmp_path / "book")
    assert len(probability) == 464
    assert_has_book_detections(found, probability)
    assert len(record["nodules"]) == int(np.count_nonzero(probability >= 0.5))

    # By default large components also give their blobs: the same 464 components and
    # the book's detections, plus candidates inside the large components.
    record = analyze(series, tmp_path / "blobs")
    funnel = record["funnel"]
    assert funnel["components"] == 464 and funnel["blobs_in_large_components"] > 0
    assert funnel["candidates_classified"] == 464 + funnel["blobs_in_large_components"]
    assert_has_book_detections(*detections(tmp_path / "blobs"))
