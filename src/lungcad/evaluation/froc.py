"""LUNA16 FROC analysis and its one-number summary, the CPM.

Follows the challenge's ``noduleCADEvaluationLUNA16.py`` rule for rule, so numbers are
comparable with published ones:

* only series listed in ``seriesuids.csv`` count, and their number divides the false positives;
* per scan at most 100 marks: if there are more, only marks scoring strictly above the
  101st-highest score survive (a tie at the cut can leave fewer than 100);
* a mark hits a finding when its Euclidean distance to the centre is strictly below the
  radius; an unknown diameter (-1, most of ``annotations_excluded.csv``) counts as 10 mm;
* every mark inside an annotated nodule counts for that nodule (even if it is inside another
  one too); the nodule scores its best mark, the other marks are ignored, not false positives;
* marks inside an excluded finding and no annotated nodule are ignored. Each of the 1186 real
  LUNA16 nodules has excluded findings within its radius: the annotated nodule wins;
* every other mark is a false positive;
* the curve sweeps a threshold down the distinct scores (tied marks enter together), from
  (0, 0); sensitivity is over all annotated nodules, missed ones included;
* sensitivity at 1/8 ... 8 FP/scan by linear interpolation (``np.interp``, flat beyond the ends),
  CPM = their mean. (The script interpolates on a 10001-point grid first; same up to 1e-4 FP.)
* bootstrap: scans drawn with replacement, bounds from the sorted replicates as in the script.

Coordinates are patient mm (LPS); scores are any monotone suspicion, higher = surer.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from lungcad.data.luna import (
    Annotation,
    Detection,
    finding_arrays,
    group_by_series,
    inside_findings,
)
from lungcad.errors import LungcadError

log = logging.getLogger(__name__)

OPERATING_POINTS_FP_PER_SCAN = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
MAX_MARKS_PER_SCAN = 100


def keep_top_marks(scores: np.ndarray, limit: int = MAX_MARKS_PER_SCAN) -> np.ndarray:
    """Mask of the marks a scan keeps: all if at most ``limit``, else those above the cut score."""
    if len(scores) <= limit:
        return np.ones(len(scores), dtype=bool)
    cut = np.sort(scores)[::-1][limit]
    return scores > cut


@dataclass(frozen=True)
class ScanMatch:
    """One scan's marks sorted out against its findings."""

    nodule_scores: np.ndarray  # (K,) best hitting score per annotated nodule, NaN if missed
    false_positive_scores: np.ndarray  # (F,)
    ignored_on_excluded: int
    double_detections: int  # extra marks on an already hit nodule


def match_scan(
    marks_xyz: np.ndarray,
    scores: np.ndarray,
    nodules_xyz: np.ndarray,
    nodule_diameters_mm: np.ndarray,
    excluded_xyz: np.ndarray,
    excluded_diameters_mm: np.ndarray,
) -> ScanMatch:
    """Match marks (M, 3) mm to nodules (K, 3) and excluded findings (E, 3) of one scan."""
    on_nodule = inside_findings(marks_xyz, nodules_xyz, nodule_diameters_mm)  # (M, K)
    hits_a_nodule = on_nodule.any(axis=1)
    ignored = (
        inside_findings(marks_xyz, excluded_xyz, excluded_diameters_mm).any(axis=1) & ~hits_a_nodule
    )
    best = np.where(on_nodule, scores[:, None], -np.inf).max(axis=0, initial=-np.inf)
    detected = on_nodule.any(axis=0)
    marks_per_nodule = on_nodule.sum(axis=0)
    return ScanMatch(
        nodule_scores=np.where(detected, best, np.nan),
        false_positive_scores=scores[~hits_a_nodule & ~ignored],
        ignored_on_excluded=int(ignored.sum()),
        double_detections=int(np.clip(marks_per_nodule - 1, 0, None).sum()),
    )


@dataclass(frozen=True)
class FrocEntries:
    """What the threshold sweeps over, pooled from all scans, sorted by decreasing score."""

    scores: np.ndarray  # (N,)
    is_hit: np.ndarray  # (N,) bool: a detected nodule's best score, else a false positive
    scan_index: np.ndarray  # (N,) position of the entry's scan in the series list
    nodules_per_scan: np.ndarray  # (S,) annotated nodules per scan, detected or not


def pool_matches(matches: Sequence[ScanMatch]) -> FrocEntries:
    """Pool per-scan matches (in series-list order) into sorted FROC entries."""
    scores, is_hit, scan_index = [], [], []
    for index, match in enumerate(matches):
        hit_scores = match.nodule_scores[~np.isnan(match.nodule_scores)]
        for values, hit in ((hit_scores, True), (match.false_positive_scores, False)):
            scores.append(values)
            is_hit.append(np.full(len(values), hit))
            scan_index.append(np.full(len(values), index))
    all_scores = np.concatenate(scores) if scores else np.zeros(0)
    order = np.argsort(-all_scores, kind="stable")
    return FrocEntries(
        scores=all_scores[order],
        is_hit=np.concatenate(is_hit).astype(bool)[order] if is_hit else np.zeros(0, bool),
        scan_index=np.concatenate(scan_index).astype(int)[order]
        if scan_index
        else np.zeros(0, int),
        nodules_per_scan=np.array([len(m.nodule_scores) for m in matches], dtype=int),
    )


@dataclass(frozen=True)
class FrocCurve:
    """FROC points, one per distinct score threshold, starting at (0, 0)."""

    fps_per_scan: np.ndarray
    sensitivity: np.ndarray

    def sensitivity_at(
        self, fps_per_scan: Sequence[float] | np.ndarray = OPERATING_POINTS_FP_PER_SCAN
    ) -> np.ndarray:
        """Linear interpolation between curve points, flat beyond either end."""
        points = np.asarray(fps_per_scan, dtype=float)
        return np.interp(points, self.fps_per_scan, self.sensitivity)

    def cpm(self) -> float:
        """Competition performance metric: mean sensitivity at 1/8, 1/4, ..., 8 FP/scan."""
        return float(np.mean(self.sensitivity_at(OPERATING_POINTS_FP_PER_SCAN)))


def froc_curve(entries: FrocEntries, scan_counts: np.ndarray | None = None) -> FrocCurve:
    """Sweep the threshold; ``scan_counts`` (S,) weighs each scan (a bootstrap draw), else 1.

    With no nodule among the counted scans the sensitivity is 0 throughout.
    """
    scans = len(entries.nodules_per_scan)
    counts = np.ones(scans) if scan_counts is None else np.asarray(scan_counts, dtype=float)
    weights = counts[entries.scan_index]
    if len(entries.scores):
        last_of_tie = np.flatnonzero(np.r_[entries.scores[1:] != entries.scores[:-1], True])
    else:
        last_of_tie = np.zeros(0, dtype=int)
    hits = np.cumsum(weights * entries.is_hit)[last_of_tie]
    false_positives = np.cumsum(weights * ~entries.is_hit)[last_of_tie]
    nodules = float(counts @ entries.nodules_per_scan)
    sensitivity = hits / nodules if nodules > 0 else np.zeros_like(hits)
    return FrocCurve(np.r_[0.0, false_positives / scans], np.r_[0.0, sensitivity])


@dataclass(frozen=True)
class FrocResult:
    """The FROC analysis of one results file against the reference tables."""

    curve: FrocCurve
    entries: FrocEntries
    cpm: float
    sensitivity_at_fp: dict[float, float]
    nodules: int
    detected: int
    false_positives: int
    scans: int
    ignored_on_excluded: int
    double_detections: int
    ignored_other_series: int  # marks on series missing from the series list


def evaluate_detections(
    detections: Sequence[Detection],
    annotations: Sequence[Annotation],
    excluded: Sequence[Annotation],
    series_uids: Sequence[str],
    max_marks: int = MAX_MARKS_PER_SCAN,
) -> FrocResult:
    """LUNA16 FROC of ``detections`` over the scans in ``series_uids`` (see module docstring)."""
    if not series_uids:
        raise LungcadError("the series list is empty: no scan to evaluate")
    repeated = sorted(uid for uid, times in Counter(series_uids).items() if times > 1)
    if repeated:
        raise LungcadError(f"series listed more than once: {', '.join(repeated[:3])}")
    marks = group_by_series(detections)
    others = set(marks) - set(series_uids)
    ignored_other = sum(len(marks[uid]) for uid in others)
    if others:
        log.warning(
            "ignored %d marks on %d series not in the series list", ignored_other, len(others)
        )
    nodules, findings = group_by_series(annotations), group_by_series(excluded)

    matches = []
    for uid in series_uids:
        scan_marks = marks.get(uid, [])
        xyz = np.array([m.center_xyz for m in scan_marks], dtype=float).reshape(-1, 3)
        scores = np.array([m.probability for m in scan_marks], dtype=float)
        kept = keep_top_marks(scores, max_marks)
        matches.append(
            match_scan(
                xyz[kept],
                scores[kept],
                *finding_arrays(nodules.get(uid, [])),
                *finding_arrays(findings.get(uid, [])),
            )
        )
    entries = pool_matches(matches)
    nodule_count = int(entries.nodules_per_scan.sum())
    if nodule_count == 0:
        raise LungcadError(f"no annotated nodule in the {len(series_uids)} listed series")
    curve = froc_curve(entries)
    return FrocResult(
        curve=curve,
        entries=entries,
        cpm=curve.cpm(),
        sensitivity_at_fp=dict(
            zip(OPERATING_POINTS_FP_PER_SCAN, map(float, curve.sensitivity_at()), strict=True)
        ),
        nodules=nodule_count,
        detected=int(entries.is_hit.sum()),
        false_positives=int((~entries.is_hit).sum()),
        scans=len(series_uids),
        ignored_on_excluded=sum(m.ignored_on_excluded for m in matches),
        double_detections=sum(m.double_detections for m in matches),
        ignored_other_series=ignored_other,
    )


@dataclass(frozen=True)
class Interval:
    """Bootstrap mean and confidence bounds of one statistic."""

    mean: float
    low: float
    high: float


@dataclass(frozen=True)
class BootstrapResult:
    replicates: int
    seed: int
    confidence: float
    sensitivity_at_fp: dict[float, Interval]
    cpm: Interval


def _interval(values: np.ndarray, confidence: float) -> Interval:
    """The script's bounds: sorted replicates at floor(tail * n) and floor((1 - tail) * n)."""
    ordered = np.sort(values)
    tail = (1.0 - confidence) / 2.0
    last = len(ordered) - 1
    return Interval(
        mean=float(ordered.mean()),
        low=float(ordered[min(int(np.floor(tail * len(ordered))), last)]),
        high=float(ordered[min(int(np.floor((1.0 - tail) * len(ordered))), last)]),
    )


def bootstrap_froc(
    entries: FrocEntries, replicates: int, seed: int, confidence: float = 0.95
) -> BootstrapResult:
    """Resample scans with replacement ``replicates`` times (seeded) for CIs of the 7 points and
    the CPM. A scan drawn twice counts twice; the FP divisor stays the number of scans."""
    if replicates < 1:
        raise LungcadError(f"bootstrap needs at least 1 replicate, got {replicates}")
    if not 0 < confidence < 1:
        raise LungcadError(f"confidence must be between 0 and 1, got {confidence}")
    rng = np.random.default_rng(seed)
    scans = len(entries.nodules_per_scan)
    points = len(OPERATING_POINTS_FP_PER_SCAN)
    values = np.empty((replicates, points + 1))  # 7 sensitivities, then the CPM
    for row in values:
        counts = np.bincount(rng.integers(0, scans, size=scans), minlength=scans)
        row[:points] = froc_curve(entries, counts).sensitivity_at()
        row[points] = row[:points].mean()
    intervals = [_interval(values[:, column], confidence) for column in range(points + 1)]
    return BootstrapResult(
        replicates=replicates,
        seed=seed,
        confidence=confidence,
        sensitivity_at_fp=dict(zip(OPERATING_POINTS_FP_PER_SCAN, intervals[:points], strict=True)),
        cpm=intervals[points],
    )
