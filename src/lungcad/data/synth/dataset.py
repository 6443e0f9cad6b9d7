"""Write phantoms as a LUNA16 dataset: ``subsetK/<uid>.mhd`` + ``.raw`` and the six tables.

Everything is built in a hidden sibling folder and renamed into place at the end, so an
interrupted run never leaves a folder that looks like a finished dataset.
"""

from __future__ import annotations

import csv
import logging
import os
import shutil
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from lungcad.data.ct import write_metaimage
from lungcad.data.luna import (
    ANNOTATIONS_CSV,
    CANDIDATES_CSVS,
    EXCLUDED_CSV,
    MALIGNANCY_CSV,
    SERIESUIDS_CSV,
)
from lungcad.data.synth.scan import PhantomScan, generate_scan
from lungcad.errors import LungcadError
from lungcad.progress import track

log = logging.getLogger(__name__)

CANDIDATES_CSV = CANDIDATES_CSVS[-1]  # the original LUNA16 name, not the later _V2
ANNOTATION_COLUMNS = ("seriesuid", "coordX", "coordY", "coordZ", "diameter_mm")
CANDIDATE_COLUMNS = ("seriesuid", "coordX", "coordY", "coordZ", "class")
MALIGNANCY_COLUMNS = (
    *ANNOTATION_COLUMNS,
    "mal_bool",
    "mal_details",
    "bboxLowX",
    "bboxLowY",
    "bboxLowZ",
    "bboxHighX",
    "bboxHighY",
    "bboxHighZ",
    "len_mal_details",
)


@dataclass(frozen=True)
class SynthSummary:
    """What ``write_dataset`` wrote."""

    scans: int
    nodules: int
    candidates: int
    seconds: float
    malignant: int = 0
    excluded: int = 0


def _mm(value: float) -> str:
    return f"{value:.4f}"


def _rows(scan: PhantomScan) -> dict[str, list[list[str]]]:
    """This scan's rows of each table, formatted as the LUNA16 files are."""
    uid = scan.series_uid
    return {
        ANNOTATIONS_CSV: [[uid, *map(_mm, n.center_xyz), _mm(n.diameter_mm)] for n in scan.nodules],
        EXCLUDED_CSV: [
            [uid, *map(_mm, f.center_xyz), "-1" if f.diameter_mm < 0 else _mm(f.diameter_mm)]
            for f in scan.findings
        ],
        CANDIDATES_CSV: [
            [uid, *map(_mm, c.center_xyz), "1" if c.is_nodule else "0"] for c in scan.candidates
        ],
        MALIGNANCY_CSV: [
            [
                uid,
                *map(_mm, n.center_xyz),
                _mm(n.diameter_mm),
                str(n.malignant),
                str(list(n.reader_ratings)),
                *map(_mm, n.bbox_low_xyz),
                *map(_mm, n.bbox_high_xyz),
                str(len(n.reader_ratings)),
            ]
            for n in scan.nodules
        ],
    }


def _write_csv(path: Path, columns: Sequence[str], rows: Iterable[list[str]]) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(columns)
        writer.writerows(rows)


def _check_target(out_dir: Path) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise LungcadError(f"{out_dir}: exists and is not a folder")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        raise LungcadError(
            f"{out_dir}: folder is not empty; choose a new or empty folder for the phantoms"
        )


def write_dataset(
    out_dir: Path, *, scans: int, seed: int, size: int = 512, subsets: int = 1
) -> SynthSummary:
    """Write ``scans`` phantoms (``size`` x ``size`` pixels a slice) in the LUNA16 layout.

    Scan i goes to ``subset{i % subsets}``; the same (scans, seed, size, subsets) always
    writes identical bytes. Refuses a non-empty ``out_dir``.
    """
    out_dir = Path(out_dir)
    if scans < 1 or subsets < 1:
        raise LungcadError(
            f"need at least one scan and one subset, got scans={scans}, subsets={subsets}"
        )
    _check_target(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = out_dir.parent / f".{out_dir.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    started = time.perf_counter()
    tables: dict[str, list[list[str]]] = {
        name: [] for name in (ANNOTATIONS_CSV, EXCLUDED_CSV, CANDIDATES_CSV, MALIGNANCY_CSV)
    }
    uids: list[str] = []
    try:
        for subset in range(min(subsets, scans)):
            (staging / f"subset{subset}").mkdir(parents=True)
        for index in track(range(scans), f"synthesising {scans} phantoms"):
            scan = generate_scan(seed, index, size)
            write_metaimage(
                staging / f"subset{index % subsets}" / f"{scan.series_uid}.mhd",
                scan.hu,
                scan.geometry,
            )
            for name, rows in _rows(scan).items():
                tables[name].extend(rows)
            uids.append(scan.series_uid)
            log.debug(
                "%s: %d nodules, %d candidates",
                scan.series_uid,
                len(scan.nodules),
                len(scan.candidates),
            )
        _write_csv(staging / ANNOTATIONS_CSV, ANNOTATION_COLUMNS, tables[ANNOTATIONS_CSV])
        _write_csv(staging / EXCLUDED_CSV, ANNOTATION_COLUMNS, tables[EXCLUDED_CSV])
        _write_csv(staging / CANDIDATES_CSV, CANDIDATE_COLUMNS, tables[CANDIDATES_CSV])
        _write_csv(staging / MALIGNANCY_CSV, MALIGNANCY_COLUMNS, tables[MALIGNANCY_CSV])
        (staging / SERIESUIDS_CSV).write_text("".join(f"{uid}\n" for uid in uids))
        _check_target(out_dir)
        if out_dir.is_dir():
            out_dir.rmdir()
        os.replace(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    summary = SynthSummary(
        scans=scans,
        nodules=len(tables[ANNOTATIONS_CSV]),
        candidates=len(tables[CANDIDATES_CSV]),
        seconds=time.perf_counter() - started,
        malignant=sum(row[5] == "True" for row in tables[MALIGNANCY_CSV]),
        excluded=len(tables[EXCLUDED_CSV]),
    )
    log.info(
        "%s: %d phantoms, %d nodules (%d malignant), %d candidates, %d excluded findings in %.1f s",
        out_dir,
        summary.scans,
        summary.nodules,
        summary.malignant,
        summary.candidates,
        summary.excluded,
        summary.seconds,
    )
    return summary
