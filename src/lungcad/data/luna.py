"""LUNA16 tables and dataset layout.

Series UIDs stay strings everywhere: they are long dotted numbers that a float parser
would destroy. All coordinates are patient mm (LPS), as in the challenge files.
"""

from __future__ import annotations

import csv
import io
import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, TypeVar

import numpy as np

from lungcad.atomic import atomic_write_text
from lungcad.data.geometry import Xyz
from lungcad.errors import LungcadError

log = logging.getLogger(__name__)

ANNOTATIONS_CSV = "annotations.csv"
CANDIDATES_CSVS = ("candidates_V2.csv", "candidates.csv")
EXCLUDED_CSV = "annotations_excluded.csv"
SERIESUIDS_CSV = "seriesuids.csv"
DETECTION_COLUMNS = ("seriesuid", "coordX", "coordY", "coordZ", "probability")
MALIGNANCY_CSV = "annotations_with_malignancy.csv"
# The evaluation kit's radius for a finding of unknown size (diameter -1): most of the
# excluded table.
UNKNOWN_DIAMETER_MM = 10.0
# Where LUNA16 downloads and the evaluation kit keep their tables, relative to the data root.
_TABLE_DIRS = (".", "CSVFILES", "evaluationScript/annotations")


@dataclass(frozen=True)
class Annotation:
    """One annotated nodule (or, in the excluded table, an irrelevant finding)."""

    series_uid: str
    center_xyz: Xyz
    diameter_mm: float
    is_malignant: bool | None = None


@dataclass(frozen=True)
class Candidate:
    """A detection candidate as listed in ``candidates.csv``: a position and a class."""

    series_uid: str
    center_xyz: Xyz
    is_nodule: bool


@dataclass(frozen=True)
class CandidateInfo:
    """A candidate merged with what the annotations say about it."""

    series_uid: str
    center_xyz: Xyz
    is_nodule: bool
    diameter_mm: float
    is_malignant: bool | None
    has_annotation: bool
    # A non-nodule inside an excluded finding: the LUNA16 evaluation neither rewards nor
    # penalises a mark there.
    on_excluded_finding: bool = False


def hit_radius_mm(diameters_mm: np.ndarray) -> np.ndarray:
    """The LUNA16 evaluation's reach of a finding: half its diameter, or half of
    ``UNKNOWN_DIAMETER_MM`` where the diameter is unknown (negative)."""
    return np.where(diameters_mm < 0, UNKNOWN_DIAMETER_MM, diameters_mm) / 2


def inside_findings(
    points_xyz: np.ndarray, centers_xyz: np.ndarray, diameters_mm: np.ndarray
) -> np.ndarray:
    """(M, K) mask: point m is strictly within finding k's reach (``hit_radius_mm``)."""
    offsets = points_xyz[:, None, :] - centers_xyz[None, :, :]  # (M, K, 3)
    return np.einsum("mkc,mkc->mk", offsets, offsets) < hit_radius_mm(diameters_mm) ** 2


def finding_arrays(findings: Sequence[Annotation]) -> tuple[np.ndarray, np.ndarray]:
    """Centres (K, 3) and diameters (K,) of ``findings``, in the form ``inside_findings``
    takes; (0, 3) and (0,) for none."""
    centers = np.array([f.center_xyz for f in findings], dtype=np.float64).reshape(-1, 3)
    return centers, np.array([f.diameter_mm for f in findings], dtype=np.float64)


class _InSeries(Protocol):
    @property
    def series_uid(self) -> str: ...


_Row = TypeVar("_Row", bound=_InSeries)


def group_by_series(rows: Iterable[_Row]) -> dict[str, list[_Row]]:
    """Table rows by series UID, in their original order within each series."""
    grouped: dict[str, list[_Row]] = {}
    for row in rows:
        grouped.setdefault(row.series_uid, []).append(row)
    return grouped


@dataclass(frozen=True)
class Detection:
    """One CAD mark in the LUNA16 submission format: where (mm, LPS) and how suspicious."""

    series_uid: str
    center_xyz: Xyz
    probability: float


def _rows(path: Path, columns: Sequence[str]) -> Iterable[tuple[int, dict[str, str]]]:
    try:
        handle = path.open(newline="")
    except OSError as exc:
        raise LungcadError(f"{path}: cannot open ({exc.strerror})") from None
    with handle:
        reader = csv.DictReader(handle)
        missing = [c for c in columns if c not in (reader.fieldnames or [])]
        if missing:
            raise LungcadError(f"{path}: missing column(s) {', '.join(missing)}")
        for row in reader:
            yield reader.line_num, row


def _parse_xyz(path: Path, line: int, row: dict[str, str]) -> Xyz:
    try:
        return Xyz(float(row["coordX"]), float(row["coordY"]), float(row["coordZ"]))
    except (TypeError, ValueError):
        coords = (row.get("coordX"), row.get("coordY"), row.get("coordZ"))
        raise LungcadError(f"{path}:{line}: bad coordinates {coords}") from None


def _parse_float(path: Path, line: int, row: dict[str, str], column: str) -> float:
    try:
        return float(row[column])
    except (TypeError, ValueError):
        raise LungcadError(f"{path}:{line}: bad {column} {row.get(column)!r}") from None


def _parse_uid(path: Path, line: int, row: dict[str, str]) -> str:
    uid = (row.get("seriesuid") or "").strip()
    if not uid:
        raise LungcadError(f"{path}:{line}: empty seriesuid")
    return uid


def read_annotations(path: Path) -> list[Annotation]:
    """``annotations.csv`` or ``annotations_excluded.csv`` (diameter -1 means unknown)."""
    columns = ("seriesuid", "coordX", "coordY", "coordZ", "diameter_mm")
    return [
        Annotation(
            _parse_uid(path, line, row),
            _parse_xyz(path, line, row),
            _parse_float(path, line, row, "diameter_mm"),
        )
        for line, row in _rows(path, columns)
    ]


def read_malignancy_annotations(path: Path) -> list[Annotation]:
    """The book's ``annotations_with_malignancy.csv``; ``mal_bool`` becomes ``is_malignant``."""
    columns = ("seriesuid", "coordX", "coordY", "coordZ", "diameter_mm", "mal_bool")
    result = []
    for line, row in _rows(path, columns):
        flag = (row["mal_bool"] or "").strip().lower()
        if flag not in ("true", "false", "1", "0"):
            raise LungcadError(f"{path}:{line}: bad mal_bool {row['mal_bool']!r}")
        result.append(
            Annotation(
                _parse_uid(path, line, row),
                _parse_xyz(path, line, row),
                _parse_float(path, line, row, "diameter_mm"),
                is_malignant=flag in ("true", "1"),
            )
        )
    return result


def read_candidates(path: Path) -> list[Candidate]:
    """``candidates.csv`` / ``candidates_V2.csv`` (class 1 = nodule)."""
    columns = ("seriesuid", "coordX", "coordY", "coordZ", "class")
    result = []
    for line, row in _rows(path, columns):
        label = (row["class"] or "").strip()
        if label not in ("0", "1"):
            raise LungcadError(f"{path}:{line}: bad class {row['class']!r} (expected 0 or 1)")
        result.append(
            Candidate(_parse_uid(path, line, row), _parse_xyz(path, line, row), label == "1")
        )
    return result


def read_series_uids(path: Path) -> list[str]:
    """``seriesuids.csv``: one UID per line, no header row."""
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise LungcadError(f"{path}: cannot open ({exc.strerror})") from None
    uids = [line.strip().strip(",") for line in lines if line.strip()]
    for number, uid in enumerate(uids, start=1):
        if not all(part.isdigit() for part in uid.split(".")):
            raise LungcadError(f"{path}:{number}: {uid!r} is not a DICOM UID")
    return uids


def read_detections(path: Path) -> list[Detection]:
    """A results CSV (``seriesuid,coordX,coordY,coordZ,probability``)."""
    detections = []
    for line, row in _rows(path, DETECTION_COLUMNS):
        center = _parse_xyz(path, line, row)
        probability = _parse_float(path, line, row, "probability")
        if not all(math.isfinite(v) for v in (*center, probability)):
            raise LungcadError(f"{path}:{line}: non-finite value in {(*center, probability)}")
        detections.append(Detection(_parse_uid(path, line, row), center, probability))
    return detections


def write_detections(path: Path, detections: Iterable[Detection]) -> Path:
    """Write marks in the LUNA16 submission format, atomically."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(DETECTION_COLUMNS)
    for mark in detections:
        x, y, z = mark.center_xyz
        writer.writerow(
            [mark.series_uid, f"{x:.4f}", f"{y:.4f}", f"{z:.4f}", f"{mark.probability:.6g}"]
        )
    return atomic_write_text(path, buffer.getvalue())


def _first_match(center: Xyz, annotations: Sequence[Annotation]) -> Annotation | None:
    """The first annotation ``center`` falls on by the book's rule: within a quarter of
    its diameter on every axis."""
    for annotation in annotations:
        limit = annotation.diameter_mm / 4
        if all(abs(c - a) <= limit for c, a in zip(center, annotation.center_xyz, strict=True)):
            return annotation
    return None


def _on_excluded_findings(
    candidates: Sequence[Candidate], excluded: Sequence[Annotation]
) -> set[Candidate]:
    """The non-nodule candidates within an excluded finding's reach (the evaluation's
    rule), one distance matrix per series: LUNA16 lists 750,000 candidates."""
    negatives = group_by_series(c for c in candidates if not c.is_nodule)
    flagged: set[Candidate] = set()
    for uid, findings in group_by_series(excluded).items():
        series = negatives.get(uid, [])
        points = np.array([c.center_xyz for c in series], dtype=np.float64).reshape(-1, 3)
        inside = np.any(inside_findings(points, *finding_arrays(findings)), axis=1)
        flagged.update(c for c, hit in zip(series, inside, strict=True) if hit)
    return flagged


def merge_candidates(
    candidates: Sequence[Candidate],
    annotations: Sequence[Annotation],
    malignancy: Sequence[Annotation] = (),
    excluded: Sequence[Annotation] = (),
) -> list[CandidateInfo]:
    """Give each candidate the diameter (and malignancy) of the annotation it falls on,
    and flag the non-nodules within an excluded finding's reach (the evaluation's rule).

    Ordered nodules first, then by decreasing diameter, then series and position, so the
    same tables always give the same list.
    """
    by_series = group_by_series(annotations)
    malignant_by_series = group_by_series(malignancy)
    on_excluded = _on_excluded_findings(candidates, excluded)

    merged = []
    for candidate in candidates:
        match = _first_match(candidate.center_xyz, by_series.get(candidate.series_uid, []))
        malignant_match = _first_match(
            candidate.center_xyz, malignant_by_series.get(candidate.series_uid, [])
        )
        diameter = (
            match.diameter_mm if match else malignant_match.diameter_mm if malignant_match else 0.0
        )
        merged.append(
            CandidateInfo(
                series_uid=candidate.series_uid,
                center_xyz=candidate.center_xyz,
                is_nodule=candidate.is_nodule,
                diameter_mm=diameter,
                is_malignant=malignant_match.is_malignant if malignant_match else None,
                has_annotation=match is not None or malignant_match is not None,
                on_excluded_finding=candidate in on_excluded,
            )
        )
    merged.sort(key=lambda c: (not c.is_nodule, -c.diameter_mm, c.series_uid, tuple(c.center_xyz)))
    return merged


def find_table(data_root: Path, *names: str) -> Path | None:
    """First of ``names`` present in the data root or the usual LUNA16 sub-folders."""
    for name in names:
        for folder in _TABLE_DIRS:
            path = data_root / folder / name
            if path.is_file():
                return path
    return None


def require_table(data_root: Path, *names: str) -> Path:
    path = find_table(data_root, *names)
    if path is None:
        raise LungcadError(f"{data_root}: no {' or '.join(names)} found")
    return path


def discover_scans(data_root: Path) -> dict[str, Path]:
    """Map series UID -> ``subset*/<uid>.mhd`` under the data root (sorted by UID)."""
    if not data_root.is_dir():
        raise LungcadError(f"{data_root}: data root is not a directory")
    scans = {path.stem: path for path in data_root.glob("subset*/*.mhd")}
    if not scans:
        raise LungcadError(f"{data_root}: no scans found (expected subset*/<series_uid>.mhd)")
    return dict(sorted(scans.items()))


def report_missing_series(
    wanted: Iterable[str], scans: dict[str, Path], data_root: Path
) -> list[str]:
    """Log, in one message, which annotated series have no scan file; return them."""
    missing = sorted(set(wanted) - set(scans))
    if missing:
        shown = ", ".join(missing[:3]) + (" ..." if len(missing) > 3 else "")
        log.warning(
            "%s: %d annotated series have no scan file (partial download?): %s",
            data_root,
            len(missing),
            shown,
        )
    return missing


@dataclass(frozen=True)
class SeriesSplit:
    """Which series train and which validate; no series is ever on both sides."""

    train: tuple[str, ...]
    validation: tuple[str, ...]

    def side(self, series_uid: str) -> str:
        if series_uid in self.validation:
            return "val"
        if series_uid in self.train:
            return "train"
        raise LungcadError(f"unknown series UID {series_uid}")


def dataset_series(data_root: Path) -> list[str]:
    """Every series the dataset defines, whether or not its scan file is present.

    ``seriesuids.csv`` when present, else every series the candidate and annotation tables
    name, else the scans on disk. The split is computed over this, so a partial download or
    a half-filled cache never moves a series from validation to training.
    """
    if (listed := find_table(data_root, SERIESUIDS_CSV)) is not None:
        return sorted(set(read_series_uids(listed)))
    named: set[str] = set()
    if (candidates := find_table(data_root, *CANDIDATES_CSVS)) is not None:
        named |= {c.series_uid for c in read_candidates(candidates)}
    for name in (ANNOTATIONS_CSV, MALIGNANCY_CSV):
        if (table := find_table(data_root, name)) is not None:
            named |= {a.series_uid for a in read_annotations(table)}
    return sorted(named) if named else sorted(discover_scans(data_root))


def dataset_split(data_root: Path, val_stride: int = 10) -> SeriesSplit:
    """THE train/validation split of a data root, shared by every trainer and the analysis."""
    return split_series(dataset_series(data_root), val_stride)


def split_series(series_uids: Iterable[str], val_stride: int = 10) -> SeriesSplit:
    """Every ``val_stride``-th series of the sorted list validates, the rest train."""
    if val_stride < 2:
        raise LungcadError(f"val_stride must be at least 2, got {val_stride}")
    ordered = sorted(set(series_uids))
    validation = tuple(ordered[::val_stride])
    held_out = set(validation)
    return SeriesSplit(train=tuple(u for u in ordered if u not in held_out), validation=validation)
