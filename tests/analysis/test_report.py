"""Run outputs: LUNA16-format CSV, JSON, self-contained HTML pages and the index."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest

from lungcad.analysis.pipeline import ModelBundle, ScanResult, analyze_ct
from lungcad.analysis.report import (
    ScanSummary,
    detection_rows,
    output_stem,
    scan_html,
    write_detections_csv,
    write_index_html,
    write_scan_json,
)
from lungcad.data.ct import CtVolume
from tests.analysis.conftest import TINY_GEOMETRY, tiny_hu


@pytest.fixture(scope="module")
def bundle(model_dir: Path) -> ModelBundle:
    return ModelBundle.from_dir(model_dir, device="cpu")


@pytest.fixture(scope="module")
def volume() -> CtVolume:
    return CtVolume("1.2.3.4", tiny_hu(), TINY_GEOMETRY, Path("tiny.mhd"))


@pytest.fixture(scope="module")
def result(bundle: ModelBundle, volume: CtVolume) -> ScanResult:
    return analyze_ct(volume, bundle)


def test_detections_csv_is_luna16_submission_format(tmp_path: Path) -> None:
    rows = [("1.2", 1.0, 2.0, 3.0, 0.25), ("1.1", -4.5, 5.25, 6.0, 0.5), ("1.2", 0, 0, 0, 0.75)]
    path = write_detections_csv(tmp_path / "detections.csv", rows)
    with path.open(newline="") as handle:
        table = list(csv.reader(handle))
    assert table[0] == ["seriesuid", "coordX", "coordY", "coordZ", "probability"]
    assert [(r[0], float(r[4])) for r in table[1:]] == [("1.1", 0.5), ("1.2", 0.75), ("1.2", 0.25)]
    assert table[1][1:4] == ["-4.500", "5.250", "6.000"]


def test_rows_cover_every_candidate(result: ScanResult) -> None:
    rows = detection_rows(result)
    assert len(rows) == len(result.candidates) == 2
    assert {row[4] for row in rows} == {d.p_nodule for d in result.candidates}


def test_scan_json_round_trips(tmp_path: Path, result: ScanResult) -> None:
    path = write_scan_json(tmp_path, result)
    assert path.name == "1.2.3.4.json"
    assert json.loads(path.read_text()) == json.loads(json.dumps(result.to_json()))


def test_html_is_self_contained_with_table_and_pictures(
    result: ScanResult, volume: CtVolume
) -> None:
    page = scan_html(result, volume.hu)
    assert "http" not in page  # no external stylesheet, script, font or image
    assert not re.search(r"""(src|href)=["'](?!data:|#|[\w.-]+\.(html|csv|txt)["'])""", page)
    assert page.count('src="data:image/png;base64,') == len(result.nodules) == 2
    assert "<table>" in page and "p nodule" in page
    assert page.count('href="#nodule-') == 2


def test_index_links_every_scan(tmp_path: Path, result: ScanResult) -> None:
    summaries = [ScanSummary.from_result(result), ScanSummary("9.9", 0, 0, None, None, 1.0)]
    page = write_index_html(tmp_path, summaries, ["confusion.txt"]).read_text()
    assert 'href="1.2.3.4.html"' in page and 'href="9.9.html"' in page
    assert 'href="detections.csv"' in page and 'href="confusion.txt"' in page
    assert "http" not in page


def test_output_names_are_safe_file_names() -> None:
    assert output_stem("1.2.840.113654") == "1.2.840.113654"
    assert output_stem("../scan 1") == ".._scan_1"
