from pathlib import Path

import numpy as np
import pytest

from lungcad.data.geometry import Xyz
from lungcad.data.luna import (
    Annotation,
    Candidate,
    discover_scans,
    find_table,
    finding_arrays,
    group_by_series,
    inside_findings,
    merge_candidates,
    read_annotations,
    read_candidates,
    read_malignancy_annotations,
    read_series_uids,
    report_missing_series,
    split_series,
)
from lungcad.errors import LungcadError
from tests.conftest import shared_file


def test_official_annotations() -> None:
    annotations = read_annotations(shared_file("data/luna16/annotations.csv"))
    assert len(annotations) == 1186
    assert len({a.series_uid for a in annotations}) == 601
    assert all(
        isinstance(a.series_uid, str) and a.series_uid.startswith("1.3.6.1.4.1.14519")
        for a in annotations
    )
    assert (
        annotations[0].series_uid
        == "1.3.6.1.4.1.14519.5.2.1.6279.6001.100225287222365663678666836860"
    )
    assert annotations[0].center_xyz == Xyz(-128.6994211, -175.3192718, -298.3875064)


def test_official_series_uids_without_header() -> None:
    uids = read_series_uids(shared_file("data/luna16/seriesuids.csv"))
    assert len(uids) == 888 == len(set(uids))
    assert uids[0] == "1.3.6.1.4.1.14519.5.2.1.6279.6001.100225287222365663678666836860"


def test_excluded_and_malignancy_tables() -> None:
    excluded = read_annotations(shared_file("data/luna16/annotations_excluded.csv"))
    assert len(excluded) == 35192
    assert any(a.diameter_mm == -1 for a in excluded)
    malignancy = read_malignancy_annotations(
        shared_file("data/luna16/annotations_with_malignancy.csv")
    )
    assert len(malignancy) == 1182
    assert sum(bool(a.is_malignant) for a in malignancy) == 378


def test_real_split_has_no_leak() -> None:
    uids = read_series_uids(shared_file("data/luna16/seriesuids.csv"))
    split = split_series(uids)
    assert not set(split.train) & set(split.validation)
    assert len(split.validation) == 89 and len(split.train) == 799
    assert split_series(reversed(uids)) == split


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_candidates_merge_like_the_book(tmp_path: Path) -> None:
    annotations = [Annotation("1.2.3", Xyz(10.0, 10.0, 10.0), 8.0)]
    malignancy = [Annotation("1.2.3", Xyz(10.5, 10.0, 10.0), 8.0, is_malignant=True)]
    candidates = [
        Candidate("1.2.3", Xyz(11.9, 8.1, 10.0), True),  # within 8/4 = 2 mm on every axis
        Candidate("1.2.3", Xyz(12.1, 10.0, 10.0), True),  # 2.1 mm off in x: no match
        Candidate("1.2.4", Xyz(10.0, 10.0, 10.0), False),  # other series
        Candidate("1.2.3", Xyz(-50.0, 0.0, 0.0), False),
    ]
    merged = merge_candidates(candidates, annotations, malignancy)
    assert [(c.is_nodule, c.diameter_mm, c.is_malignant) for c in merged] == [
        (True, 8.0, True),
        (True, 8.0, True),  # malignancy annotation is 0.5 mm closer in x: 12.1 - 10.5 = 1.6 <= 2
        (False, 0.0, None),
        (False, 0.0, None),
    ]
    assert merged[0].center_xyz == Xyz(11.9, 8.1, 10.0)
    assert merged == merge_candidates(list(reversed(candidates)), annotations, malignancy)


def test_non_nodules_inside_an_excluded_finding_are_flagged_by_the_evaluation_rule() -> None:
    excluded = [
        Annotation("1.2.3", Xyz(0.0, 0.0, 0.0), 4.0),  # reach 2 mm
        Annotation("1.2.3", Xyz(50.0, 0.0, 0.0), -1.0),  # unknown size: reach 5 mm
    ]
    candidates = [
        Candidate("1.2.3", Xyz(1.9, 0.0, 0.0), False),
        Candidate("1.2.3", Xyz(2.0, 0.0, 0.0), False),  # on the edge: strictly inside only
        Candidate("1.2.3", Xyz(50.0, 4.9, 0.0), False),
        Candidate("1.2.3", Xyz(50.0, 5.1, 0.0), False),
        Candidate("1.2.4", Xyz(0.0, 0.0, 0.0), False),  # other series
        Candidate("1.2.3", Xyz(0.5, 0.0, 0.0), True),  # a nodule stays a nodule
    ]
    merged = merge_candidates(candidates, [], excluded=excluded)
    flags = {(c.series_uid, c.center_xyz): c.on_excluded_finding for c in merged}
    assert [flags[(c.series_uid, c.center_xyz)] for c in candidates] == [
        True,
        False,
        True,
        False,
        False,
        False,
    ]


def test_malformed_rows_name_file_and_line(tmp_path: Path) -> None:
    path = _write(
        tmp_path / "candidates.csv",
        "seriesuid,coordX,coordY,coordZ,class\n1.2,1,2,3,0\n1.2,x,2,3,1\n",
    )
    with pytest.raises(LungcadError, match=r"candidates\.csv:3: bad coordinates"):
        read_candidates(path)
    path = _write(tmp_path / "c2.csv", "seriesuid,coordX,coordY,coordZ,class\n1.2,1,2,3,7\n")
    with pytest.raises(LungcadError, match=r"c2\.csv:2: bad class"):
        read_candidates(path)
    path = _write(tmp_path / "a.csv", "seriesuid,coordX,coordY\n")
    with pytest.raises(LungcadError, match="missing column"):
        read_annotations(path)
    path = _write(tmp_path / "s.csv", "seriesuid\n")
    with pytest.raises(LungcadError, match=r"s\.csv:1: 'seriesuid' is not a DICOM UID"):
        read_series_uids(path)


def test_uids_stay_strings(tmp_path: Path) -> None:
    path = _write(tmp_path / "a.csv", "seriesuid,coordX,coordY,coordZ,diameter_mm\n1.30,1,2,3,4\n")
    assert read_annotations(path)[0].series_uid == "1.30"


def test_discovery_and_missing_report(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with pytest.raises(LungcadError, match="no scans found"):
        discover_scans(tmp_path)
    with pytest.raises(LungcadError, match="not a directory"):
        discover_scans(tmp_path / "absent")
    (tmp_path / "subset1").mkdir()
    (tmp_path / "subset1" / "1.2.9.mhd").write_text("")
    (tmp_path / "subset1" / "1.2.9.raw").write_text("")
    scans = discover_scans(tmp_path)
    assert scans == {"1.2.9": tmp_path / "subset1" / "1.2.9.mhd"}
    missing = report_missing_series(["1.2.9", "1.2.10", "1.2.11"], scans, tmp_path)
    assert missing == ["1.2.10", "1.2.11"]
    assert "2 annotated series have no scan file" in caplog.text


def test_find_table_looks_in_luna_folders(tmp_path: Path) -> None:
    (tmp_path / "CSVFILES").mkdir()
    _write(tmp_path / "CSVFILES" / "candidates.csv", "")
    assert (
        find_table(tmp_path, "candidates_V2.csv", "candidates.csv")
        == tmp_path / "CSVFILES" / "candidates.csv"
    )
    assert find_table(tmp_path, "annotations.csv") is None


def test_split_every_tenth_and_side() -> None:
    uids = [f"1.2.{i:03d}" for i in range(25)]
    split = split_series(uids)
    assert split.validation == ("1.2.000", "1.2.010", "1.2.020")
    assert split.side("1.2.010") == "val" and split.side("1.2.011") == "train"
    with pytest.raises(LungcadError):
        split.side("9.9")


def test_detections_round_trip(tmp_path: Path) -> None:
    from lungcad.data.luna import Detection, read_detections, write_detections

    marks = [
        Detection("1.2.840.10", Xyz(-1.5, 2.25, 30.0), 0.875),
        Detection("1.3", Xyz(0, 0, 0), 1e-7),
    ]
    path = write_detections(tmp_path / "detections.csv", marks)
    assert path.read_text().splitlines()[0] == "seriesuid,coordX,coordY,coordZ,probability"
    assert read_detections(path) == marks


def test_dataset_split_ignores_which_scans_are_present(tmp_path: Path) -> None:
    from lungcad.data.luna import dataset_split

    uids = [f"1.2.{i}" for i in range(30)]
    (tmp_path / "seriesuids.csv").write_text("\n".join(uids) + "\n")
    (tmp_path / "subset0").mkdir()
    for uid in uids[5:12]:  # a partial download
        (tmp_path / "subset0" / f"{uid}.mhd").write_text("")
    assert dataset_split(tmp_path) == split_series(uids)
    (tmp_path / "seriesuids.csv").unlink()
    _write(
        tmp_path / "annotations.csv", "seriesuid,coordX,coordY,coordZ,diameter_mm\n1.2.99,0,0,0,5\n"
    )
    assert dataset_split(tmp_path).validation == ("1.2.99",)
    (tmp_path / "annotations.csv").unlink()
    assert dataset_split(tmp_path) == split_series(uids[5:12])


def test_group_by_series_keeps_table_order_and_finding_arrays_fit_inside_findings() -> None:
    rows = [
        Annotation("b", (0.0, 0.0, 0.0), 6.0),
        Annotation("a", (1.0, 0.0, 0.0), 4.0),
        Annotation("b", (6.0, 0.0, 0.0), -1.0),
    ]
    grouped = group_by_series(rows)
    assert list(grouped) == ["b", "a"]
    assert grouped["b"] == [rows[0], rows[2]]
    centers, diameters = finding_arrays(grouped["b"])
    assert centers.shape == (2, 3) and diameters.tolist() == [6.0, -1.0]
    inside = inside_findings(np.array([[2.0, 0.0, 0.0]]), centers, diameters)
    assert inside.tolist() == [[True, True]]  # 2 mm < 6/2; 4 mm < 10/2 (unknown size)
    empty_centers, empty_diameters = finding_arrays([])
    assert empty_centers.shape == (0, 3) and empty_diameters.shape == (0,)
    assert inside_findings(np.zeros((1, 3)), empty_centers, empty_diameters).shape == (1, 0)
