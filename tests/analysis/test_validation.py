"""The book's confusion table on hand-placed detections and nodules (positions in mm)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from lungcad.analysis.pipeline import Detection
from lungcad.analysis.validation import (
    CONFUSION_COLUMNS,
    CONFUSION_ROWS,
    load_truth,
    match_and_score,
    write_confusion,
)
from lungcad.data.geometry import Xyz
from lungcad.data.luna import Annotation


def detection(x: float, y: float, z: float, p: float, p_mal: float | None = None) -> Detection:
    return Detection(Xyz(x, y, z), (0, 0, 0), 5.0, 10, p, p_mal)


def nodule(x: float, y: float, z: float, diameter: float, malignant: bool) -> Annotation:
    return Annotation("1.1", Xyz(x, y, z), diameter, is_malignant=malignant)


BENIGN_A = nodule(0, 0, 0, 10, malignant=False)  # matched within 7 mm
MALIGNANT_B = nodule(50, 0, 0, 6, malignant=True)  # matched within 4.2 mm
BENIGN_C = nodule(0, 50, 0, 8, malignant=False)  # nothing near it


def test_each_cell_on_a_hand_made_series() -> None:
    detections = [
        detection(3, 0, 0, p=0.9, p_mal=0.2),  # A, predicted benign
        detection(0, 0, 6.5, p=0.3),  # A again, filtered out: A keeps the better column
        detection(52, 0, 0, p=0.8, p_mal=0.9),  # B, predicted malignant
        detection(0, 0, 7.5, p=0.9),  # 7.5 mm from A: not < 0.7 x 10 -> a false positive
        detection(100, 100, 100, p=0.95, p_mal=0.1),  # false positive, predicted benign
        detection(-100, 0, 0, p=0.1),  # false positive, filtered out
    ]
    table = match_and_score(detections, [BENIGN_A, MALIGNANT_B, BENIGN_C])
    assert table.tolist() == [
        # miss, filtered, benign, malignant
        [0, 1, 2, 0],  # non-nodule
        [1, 0, 1, 0],  # benign: C missed, A predicted benign
        [0, 0, 0, 1],  # malignant: B
    ]


def test_a_filtered_match_is_filtered_out_not_a_miss() -> None:
    table = match_and_score([detection(50, 0, 1, p=0.2)], [MALIGNANT_B])
    assert table[2].tolist() == [0, 1, 0, 0]
    assert table[0].sum() == 0


def test_thresholds_move_detections_between_columns() -> None:
    found = [detection(52, 0, 0, p=0.8, p_mal=0.9)]
    assert match_and_score(found, [MALIGNANT_B], nodule_threshold=0.85)[2].tolist() == [0, 1, 0, 0]
    assert match_and_score(found, [MALIGNANT_B], malignancy_threshold=0.95)[2].tolist() == [
        0,
        0,
        1,
        0,
    ]


def test_one_detection_between_two_nodules_counts_for_both() -> None:
    left, right = nodule(-2, 0, 0, 10, False), nodule(2, 0, 0, 10, True)
    table = match_and_score([detection(0, 0, 0, p=0.9, p_mal=0.8)], [left, right])
    assert table.tolist() == [[0, 0, 0, 0], [0, 0, 0, 1], [0, 0, 0, 1]]


def test_no_detections_or_no_nodules() -> None:
    assert match_and_score([], [BENIGN_A, MALIGNANT_B])[:, 0].tolist() == [0, 1, 1]
    assert match_and_score([detection(0, 0, 0, p=0.9)], [])[0].tolist() == [0, 0, 1, 0]
    assert match_and_score([], []).sum() == 0


def test_written_table_has_series_and_total(tmp_path: Path) -> None:
    per_series = {
        "1.2": np.array([[0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1]]),
        "1.1": np.array([[0, 2, 1, 0], [0, 0, 1, 0], [0, 0, 0, 0]]),
    }
    text = write_confusion(tmp_path, per_series)
    record = json.loads((tmp_path / "confusion.json").read_text())
    assert record["total"] == [[0, 3, 1, 0], [1, 0, 1, 0], [0, 0, 0, 1]]
    assert list(record["series"]) == ["1.1", "1.2"]
    assert (record["rows"], record["columns"]) == (list(CONFUSION_ROWS), list(CONFUSION_COLUMNS))
    assert (tmp_path / "confusion.txt").read_text() == text + "\n"
    total = text.split("total over 2 series\n")[1].splitlines()
    cells = [[cell.strip() for cell in line.split("|")] for line in total]
    assert cells[0][1:] == list(CONFUSION_COLUMNS)
    # The non-nodule "complete miss" cell is unknowable and left blank.
    assert cells[1:] == [
        ["non-nodule", "", "3", "1", "0"],
        ["benign", "1", "0", "1", "0"],
        ["malignant", "0", "0", "0", "1"],
    ]


def test_truth_prefers_the_malignancy_table(tmp_path: Path) -> None:
    header = "seriesuid,coordX,coordY,coordZ,diameter_mm"
    (tmp_path / "annotations.csv").write_text(f"{header}\n1.1,0,0,0,5\n")
    assert load_truth(tmp_path) == {"1.1": [Annotation("1.1", Xyz(0, 0, 0), 5.0)]}
    (tmp_path / "annotations_with_malignancy.csv").write_text(
        f"{header},mal_bool\n1.1,0,0,0,5,True\n1.2,1,2,3,4,False\n"
    )
    truth = load_truth(tmp_path)
    assert truth is not None and truth["1.1"][0].is_malignant and not truth["1.2"][0].is_malignant
    assert load_truth(tmp_path / "nowhere") is None
