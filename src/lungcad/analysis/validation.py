"""The book's confusion table of a detection run against annotated nodules.

Rows are the truth (non-nodule, benign, malignant), columns what the pipeline made of
it (complete miss, filtered out, predicted benign, predicted malignant). A detection
matches a nodule when their centres are closer than 0.7 times the nodule's diameter.
As in the book's ``match_and_score``: a nodule matched by several detections takes the
most advanced column among them; a detection matching several nodules counts for each;
detections matching none land in the non-nodule row (whose "complete miss" cell stays
0: there is no list of the non-nodules nobody found).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from lungcad.analysis.pipeline import Detection
from lungcad.atomic import atomic_write_text
from lungcad.data.luna import (
    ANNOTATIONS_CSV,
    MALIGNANCY_CSV,
    Annotation,
    find_table,
    group_by_series,
    read_annotations,
    read_malignancy_annotations,
)

CONFUSION_ROWS = ("non-nodule", "benign", "malignant")
CONFUSION_COLUMNS = ("complete miss", "filtered out", "predicted benign", "predicted malignant")
MATCH_DIAMETER_FRACTION = 0.7
CONFUSION_JSON = "confusion.json"
CONFUSION_TXT = "confusion.txt"


def detection_column(
    detection: Detection, nodule_threshold: float, malignancy_threshold: float
) -> int:
    """1: filtered out by the classifier, 2: predicted benign, 3: predicted malignant.

    Without a malignancy score every accepted nodule counts as predicted benign.
    """
    if detection.p_nodule < nodule_threshold:
        return 1
    if detection.p_malignant is None or detection.p_malignant < malignancy_threshold:
        return 2
    return 3


def match_and_score(
    detections: Sequence[Detection],
    truth: Sequence[Annotation],
    nodule_threshold: float = 0.5,
    malignancy_threshold: float = 0.5,
) -> np.ndarray:
    """(3, 4) int counts for one series; all positions patient mm (LPS)."""
    confusion = np.zeros((len(CONFUSION_ROWS), len(CONFUSION_COLUMNS)), dtype=np.int64)
    columns = np.array(
        [detection_column(d, nodule_threshold, malignancy_threshold) for d in detections],
        dtype=np.int64,
    )
    truth_rows = np.array([2 if a.is_malignant else 1 for a in truth], dtype=np.int64)
    if not truth:
        np.add.at(confusion[0], columns, 1)
        return confusion
    if not detections:
        np.add.at(confusion[:, 0], truth_rows, 1)
        return confusion
    truth_xyz = np.array([a.center_xyz for a in truth], dtype=np.float64)
    detected_xyz = np.array([d.center_xyz for d in detections], dtype=np.float64)
    diameters = np.array([a.diameter_mm for a in truth], dtype=np.float64)
    distances = np.linalg.norm(truth_xyz[:, None] - detected_xyz[None], axis=-1)
    matches = distances < MATCH_DIAMETER_FRACTION * diameters[:, None]  # (nodules, detections)
    best_column = np.where(matches, columns[None], 0).max(axis=1)
    np.add.at(confusion, (truth_rows, best_column), 1)
    unmatched = ~matches.any(axis=0)
    np.add.at(confusion[0], columns[unmatched], 1)
    return confusion


def load_truth(data_root: Path) -> dict[str, list[Annotation]] | None:
    """Annotated nodules by series, or None when the root has no ``annotations.csv``.

    Like the book, the malignancy table (when present) is the nodule list, since it
    carries ``mal_bool``; otherwise ``annotations.csv`` is, with every nodule benign.
    """
    annotations_path = find_table(data_root, ANNOTATIONS_CSV)
    if annotations_path is None:
        return None
    malignancy_path = find_table(data_root, MALIGNANCY_CSV)
    nodules = (
        read_malignancy_annotations(malignancy_path)
        if malignancy_path is not None
        else read_annotations(annotations_path)
    )
    return group_by_series(nodules)


def format_confusion(confusion: np.ndarray, title: str) -> str:
    """The table as aligned text, headed by ``title``."""
    width = max(len(c) for c in CONFUSION_COLUMNS)
    label_width = max(len(r) for r in CONFUSION_ROWS)
    lines = [
        title,
        " " * label_width + " | " + " | ".join(c.rjust(width) for c in CONFUSION_COLUMNS),
    ]
    for name, row in zip(CONFUSION_ROWS, confusion, strict=True):
        cells = [str(int(v)).rjust(width) for v in row]
        if name == CONFUSION_ROWS[0]:
            cells[0] = "".rjust(width)  # unknowable: nobody lists the non-nodules missed
        lines.append(name.rjust(label_width) + " | " + " | ".join(cells))
    return "\n".join(lines)


def write_confusion(out_dir: Path, per_series: Mapping[str, np.ndarray]) -> str:
    """Write ``confusion.json`` (per series and total) and ``confusion.txt``; return the text."""
    total = sum(
        (np.asarray(t) for t in per_series.values()),
        np.zeros((len(CONFUSION_ROWS), len(CONFUSION_COLUMNS)), dtype=np.int64),
    )
    ordered = dict(sorted(per_series.items()))
    text = "\n\n".join(
        [format_confusion(t, f"series {uid}") for uid, t in ordered.items()]
        + [format_confusion(total, f"total over {len(ordered)} series")]
    )
    record = {
        "rows": list(CONFUSION_ROWS),
        "columns": list(CONFUSION_COLUMNS),
        "match_rule": f"centre distance < {MATCH_DIAMETER_FRACTION} x nodule diameter",
        "total": np.asarray(total).tolist(),
        "series": {uid: np.asarray(t).tolist() for uid, t in ordered.items()},
    }
    atomic_write_text(out_dir / CONFUSION_JSON, json.dumps(record, indent=2) + "\n")
    atomic_write_text(out_dir / CONFUSION_TXT, text + "\n")
    return text
