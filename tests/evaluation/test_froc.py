"""LUNA16 FROC rules on hand-computed cases, and on the real challenge tables."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from lungcad.data.geometry import Xyz
from lungcad.data.luna import (
    Annotation,
    Detection,
    read_annotations,
    read_detections,
    read_series_uids,
)
from lungcad.errors import LungcadError
from lungcad.evaluation.froc import (
    FrocCurve,
    bootstrap_froc,
    evaluate_detections,
    keep_top_marks,
)
from tests.conftest import shared_file

SCAN_A, SCAN_B, SCAN_C, SCAN_D = "1.2.1", "1.2.2", "1.2.3", "1.2.4"
FAR = (900.0, 900.0, 900.0)  # nowhere near any finding


def nodule(uid: str, xyz: tuple[float, float, float], diameter_mm: float) -> Annotation:
    return Annotation(uid, Xyz(*xyz), diameter_mm)


def mark(uid: str, xyz: tuple[float, float, float], probability: float) -> Detection:
    return Detection(uid, Xyz(*xyz), probability)


def test_single_perfect_detection_scores_one() -> None:
    # One nodule, one mark 1 mm from its centre: curve (0, 0) -> (0, 1), flat after: CPM 1.
    result = evaluate_detections(
        [mark(SCAN_A, (1, 0, 0), 0.9)], [nodule(SCAN_A, (0, 0, 0), 10)], [], [SCAN_A]
    )
    assert (result.nodules, result.detected, result.false_positives, result.scans) == (1, 1, 0, 1)
    assert result.cpm == 1.0
    assert list(result.sensitivity_at_fp.values()) == [1.0] * 7


def test_hit_needs_distance_strictly_below_radius() -> None:
    # Radius 5 mm: a mark at 5 mm is outside (an FP), one at 4.99 mm is a hit.
    findings = [nodule(SCAN_A, (0, 0, 0), 10)]
    on_edge = evaluate_detections([mark(SCAN_A, (0, 5, 0), 0.9)], findings, [], [SCAN_A])
    inside = evaluate_detections([mark(SCAN_A, (0, 4.99, 0), 0.9)], findings, [], [SCAN_A])
    assert (on_edge.detected, on_edge.false_positives) == (0, 1)
    assert (inside.detected, inside.false_positives) == (1, 0)


def test_double_detection_keeps_best_score_and_is_not_a_false_positive() -> None:
    # Marks 0.9 and 0.5 on the nodule, an FP at 0.7 elsewhere. The nodule scores 0.9, so the
    # curve is (0,0) -> (0,1) @0.9 -> (1,1) @0.7: CPM 1. Had it scored 0.5 the curve would be
    # (0,0) -> (1,0) -> (1,1) and the CPM 4/7; had the 0.5 mark been an FP there would be 2 FPs.
    marks = [mark(SCAN_A, (0, 0, 0), 0.9), mark(SCAN_A, (2, 0, 0), 0.5), mark(SCAN_A, FAR, 0.7)]
    result = evaluate_detections(marks, [nodule(SCAN_A, (0, 0, 0), 10)], [], [SCAN_A])
    assert (result.detected, result.false_positives, result.double_detections) == (1, 1, 1)
    assert result.cpm == 1.0


def test_marks_on_excluded_findings_are_ignored() -> None:
    # Excluded finding with unknown diameter (-1 -> 10 mm, radius 5): a mark 3 mm away is
    # ignored, one 6 mm away is an FP. Excluded finding of 4 mm (radius 2): 1.5 mm ignored,
    # 2.5 mm FP. A mark on the nodule that is also inside an excluded finding is a hit.
    excluded = [
        nodule(SCAN_A, (50, 0, 0), -1),
        nodule(SCAN_A, (0, 50, 0), 4),
        nodule(SCAN_A, (1, 0, 0), -1),
    ]
    marks = [
        mark(SCAN_A, (53, 0, 0), 0.8),
        mark(SCAN_A, (56, 0, 0), 0.7),
        mark(SCAN_A, (0, 51.5, 0), 0.6),
        mark(SCAN_A, (0, 52.5, 0), 0.5),
        mark(SCAN_A, (0.5, 0, 0), 0.4),
    ]
    result = evaluate_detections(marks, [nodule(SCAN_A, (0, 0, 0), 6)], excluded, [SCAN_A])
    assert (result.detected, result.false_positives, result.ignored_on_excluded) == (1, 2, 2)


def test_false_positives_are_divided_by_all_listed_scans() -> None:
    # 4 listed scans; C and D have no marks. Nodules: A's (hit at 0.9) and C's (never hit), so
    # sensitivity tops at 1/2. FPs: A 0.8, 0.7; B 0.6, 0.5 -> 4 FPs / 4 scans = 1 FP/scan at
    # the end (dividing by the 2 scans with marks would give 2). Sensitivity 1/2 throughout.
    marks = [
        mark(SCAN_A, (0, 0, 0), 0.9),
        mark(SCAN_A, FAR, 0.8),
        mark(SCAN_A, FAR, 0.7),
        mark(SCAN_B, FAR, 0.6),
        mark(SCAN_B, FAR, 0.5),
    ]
    nodules = [nodule(SCAN_A, (0, 0, 0), 8), nodule(SCAN_C, (0, 0, 0), 8)]
    result = evaluate_detections(marks, nodules, [], [SCAN_A, SCAN_B, SCAN_C, SCAN_D])
    np.testing.assert_allclose(result.curve.fps_per_scan, [0, 0, 0.25, 0.5, 0.75, 1.0])
    np.testing.assert_allclose(result.curve.sensitivity, [0, 0.5, 0.5, 0.5, 0.5, 0.5])
    assert (result.nodules, result.detected, result.false_positives) == (2, 1, 4)
    assert result.cpm == pytest.approx(0.5)


@pytest.mark.parametrize(("hit_rank", "detected"), [(100, 1), (101, 0), (120, 0)])
def test_only_the_100_best_marks_of_a_scan_count(hit_rank: int, detected: int) -> None:
    # 150 marks scored 1 - rank/1000; the one on the nodule has rank `hit_rank`. Only ranks
    # 1..100 survive, so the other 149 give 100 FPs minus one if the hit survived (99 or 100).
    marks = [
        mark(SCAN_A, (0, 0, 0) if rank == hit_rank else FAR, 1 - rank / 1000)
        for rank in range(1, 151)
    ]
    result = evaluate_detections(marks, [nodule(SCAN_A, (0, 0, 0), 10)], [], [SCAN_A])
    assert (result.detected, result.false_positives) == (detected, 100 - detected)


def test_tie_at_the_cut_drops_every_tied_mark() -> None:
    # The script keeps scores strictly above the (limit+1)-th best: [3, 2, 2, 1], limit 2 ->
    # cut at 2, only the 3 survives.
    kept = keep_top_marks(np.array([3.0, 2.0, 2.0, 1.0]), limit=2)
    assert kept.tolist() == [True, False, False, False]
    assert keep_top_marks(np.array([3.0, 2.0]), limit=2).all()


def test_operating_points_and_cpm_interpolate_the_curve() -> None:
    # Curve (0,0) (0.25,0.4) (1,0.6) (4,0.8): at 1/8 halfway to 0.4 -> 0.2; at 1/4 0.4;
    # at 1/2 0.4 + 0.2 * 0.25/0.75 = 0.46667; at 1 0.6; at 2 0.6 + 0.2 * 1/3 = 0.66667;
    # at 4 0.8; at 8 flat beyond the end 0.8. Mean = 3.93333/7 = 0.561905.
    curve = FrocCurve(np.array([0, 0.25, 1, 4.0]), np.array([0, 0.4, 0.6, 0.8]))
    expected = [0.2, 0.4, 0.4 + 0.2 / 3, 0.6, 0.6 + 0.2 / 3, 0.8, 0.8]
    np.testing.assert_allclose(curve.sensitivity_at(), expected)
    assert curve.cpm() == pytest.approx(sum(expected) / 7)
    assert curve.cpm() == pytest.approx(0.561905, abs=1e-6)


def test_tied_hit_and_false_positive_enter_the_curve_together() -> None:
    # A hit and an FP both at 0.5 (1 scan, 1 nodule): one step (0,0) -> (1,1), a diagonal, so
    # sensitivity at 1/8, 1/4, 1/2 is 1/8, 1/4, 1/2 and 1 from 1 FP/scan: CPM 4.875/7.
    marks = [mark(SCAN_A, (0, 0, 0), 0.5), mark(SCAN_A, FAR, 0.5)]
    result = evaluate_detections(marks, [nodule(SCAN_A, (0, 0, 0), 10)], [], [SCAN_A])
    np.testing.assert_allclose(result.curve.fps_per_scan, [0, 1])
    assert result.cpm == pytest.approx(4.875 / 7)


def test_marks_on_unlisted_series_are_ignored_with_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The mark on series 9.9 sits at the same coordinates as the nodule but is not listed:
    # neither a hit nor an FP.
    marks = [mark(SCAN_A, FAR, 0.9), mark("9.9", (0, 0, 0), 0.99)]
    nodules = [nodule(SCAN_A, (0, 0, 0), 10), nodule("9.9", (0, 0, 0), 10)]
    with caplog.at_level(logging.WARNING):
        result = evaluate_detections(marks, nodules, [], [SCAN_A])
    assert (result.nodules, result.detected, result.false_positives) == (1, 0, 1)
    assert result.ignored_other_series == 1
    assert "1 marks on 1 series not in the series list" in caplog.text


@pytest.mark.parametrize(
    ("uids", "nodules", "message"),
    [
        ([], [nodule(SCAN_A, (0, 0, 0), 5)], "series list is empty"),
        ([SCAN_A, SCAN_A], [nodule(SCAN_A, (0, 0, 0), 5)], "more than once: 1.2.1"),
        ([SCAN_B], [nodule(SCAN_A, (0, 0, 0), 5)], "no annotated nodule in the 1 listed"),
    ],
)
def test_unusable_inputs_raise(uids: list[str], nodules: list[Annotation], message: str) -> None:
    with pytest.raises(LungcadError, match=message):
        evaluate_detections([], nodules, [], uids)


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ("1.2.1,1,2,abc,0.5", "results.csv:3: bad coordinates"),
        ("1.2.1,1,2,3,high", "results.csv:3: bad probability 'high'"),
        ("1.2.1,1,2,3,nan", "results.csv:3: non-finite"),
        ("1.2.1,1,2", "results.csv:3: bad coordinates"),
        (",1,2,3,0.5", "results.csv:3: empty seriesuid"),
    ],
)
def test_malformed_results_row_names_file_and_line(tmp_path: Path, row: str, message: str) -> None:
    path = tmp_path / "results.csv"
    path.write_text(f"seriesuid,coordX,coordY,coordZ,probability\n1.2.1,1,2,3,0.9\n{row}\n")
    with pytest.raises(LungcadError, match=message):
        read_detections(path)


def test_read_detections_keeps_uids_as_strings(tmp_path: Path) -> None:
    path = tmp_path / "results.csv"
    uid = "1.3.6.1.4.1.14519.5.2.1.6279.6001.100225287222365663678666836860"
    path.write_text(f"probability,seriesuid,coordX,coordY,coordZ\n0.25,{uid},-1.5,2,3e1\n")
    assert read_detections(path) == [Detection(uid, Xyz(-1.5, 2.0, 30.0), 0.25)]


def test_results_without_probability_column_raise(tmp_path: Path) -> None:
    path = tmp_path / "results.csv"
    path.write_text("seriesuid,coordX,coordY,coordZ\n1.2.1,1,2,3\n")
    with pytest.raises(LungcadError, match=r"missing column.*probability"):
        read_detections(path)


def test_bootstrap_is_seeded_and_degenerate_on_identical_scans() -> None:
    # Every scan identical (its nodule hit at 0.9, one FP at 0.5): every resample gives the
    # same curve, so each interval collapses onto the point estimate.
    uids = [f"1.3.{i}" for i in range(5)]
    nodules = [nodule(uid, (0, 0, 0), 10) for uid in uids]
    marks = [m for uid in uids for m in (mark(uid, (0, 0, 0), 0.9), mark(uid, FAR, 0.5))]
    result = evaluate_detections(marks, nodules, [], uids)
    boot = bootstrap_froc(result.entries, replicates=20, seed=3)
    assert boot.cpm.low == boot.cpm.high == pytest.approx(result.cpm)


def test_bootstrap_intervals_bracket_the_mean_and_repeat_with_the_seed() -> None:
    # Scan i has its nodule hit at score i/10 and an FP at 0.45: scans differ, so intervals
    # have width; the same seed gives the same numbers, another seed other numbers.
    uids = [f"1.3.{i}" for i in range(10)]
    nodules = [nodule(uid, (0, 0, 0), 10) for uid in uids]
    marks = [
        m
        for i, uid in enumerate(uids)
        for m in (mark(uid, (0, 0, 0), i / 10), mark(uid, FAR, 0.45))
    ]
    entries = evaluate_detections(marks, nodules, [], uids).entries
    first, again = bootstrap_froc(entries, 200, seed=1), bootstrap_froc(entries, 200, seed=1)
    other = bootstrap_froc(entries, 200, seed=2)
    assert first == again
    assert first.cpm != other.cpm
    assert first.cpm.low <= first.cpm.mean <= first.cpm.high
    assert first.cpm.low < first.cpm.high
    with pytest.raises(LungcadError, match="at least 1 replicate"):
        bootstrap_froc(entries, 0, seed=1)


def test_real_luna16_tables_with_crafted_marks() -> None:
    """Real annotations.csv (1186 nodules), annotations_excluded.csv, seriesuids.csv (888).

    Marks: one exactly on the centre of each of the first 300 nodules of annotations.csv
    (no two of those centres lie inside one another's nodules; every one also lies inside
    excluded findings, which must not hide it), the first 100 scored 0.99..., the next 200
    scored below 0.9; one far-away FP at 0.95 in each of the first 333 listed scans.
    By hand: FP/scan ends at 333/888 = 0.375; the curve rises to 100/1186 at 0 FP, runs flat
    to 0.375 FP/scan, then rises to 300/1186. So sensitivity is 100/1186 at 1/8 and 1/4,
    300/1186 from 1/2 on, and CPM = (2 * 100 + 5 * 300) / (7 * 1186) = 0.204770.
    """
    annotations = read_annotations(shared_file("data/luna16/annotations.csv"))
    excluded = read_annotations(shared_file("data/luna16/annotations_excluded.csv"))
    series = read_series_uids(shared_file("data/luna16/seriesuids.csv"))
    assert (len(annotations), len(series)) == (1186, 888)
    hits = [
        Detection(a.series_uid, a.center_xyz, (0.99 if i < 100 else 0.9) - i * 1e-5)
        for i, a in enumerate(annotations[:300])
    ]
    false_positives = [mark(uid, (5000, 5000, 5000), 0.95) for uid in series[:333]]
    result = evaluate_detections(hits + false_positives, annotations, excluded, series)
    assert (result.nodules, result.detected) == (1186, 300)
    assert (result.false_positives, result.scans) == (333, 888)
    assert result.ignored_on_excluded == 0  # the nodule wins over its surrounding findings
    assert result.curve.fps_per_scan[-1] == pytest.approx(333 / 888)
    low, high = 100 / 1186, 300 / 1186
    expected = [low, low, high, high, high, high, high]
    np.testing.assert_allclose(list(result.sensitivity_at_fp.values()), expected)
    assert result.cpm == pytest.approx((2 * 100 + 5 * 300) / (7 * 1186))
    assert result.cpm == pytest.approx(0.204770, abs=1e-6)
