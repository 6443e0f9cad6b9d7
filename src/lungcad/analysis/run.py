"""Analyse many scans: resolve the inputs, shard them across ranks, write every output.

Under ``torchrun`` each rank analyses every ``world_size``-th scan and writes its
per-scan files; rank 0 gathers the small per-scan records and writes the run-wide
files (``detections.csv``, ``index.html``, the confusion table). A scan that cannot be
read is reported and skipped so the other ranks never wait on a dead one.
"""

from __future__ import annotations

import ctypes
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from lungcad.analysis.pipeline import AnalysisOptions, ModelBundle, StageProgress, analyze_ct
from lungcad.analysis.report import (
    DETECTIONS_CSV,
    DetectionRow,
    ScanSummary,
    detection_rows,
    write_detections_csv,
    write_index_html,
    write_scan_html,
    write_scan_json,
)
from lungcad.analysis.validation import (
    CONFUSION_TXT,
    load_truth,
    match_and_score,
    write_confusion,
)
from lungcad.data.ct import read_ct
from lungcad.data.luna import Annotation, dataset_split, discover_scans
from lungcad.errors import LungcadError
from lungcad.training.distributed import DistributedContext

log = logging.getLogger(__name__)

SPLITS = ("val", "train", "all")
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters (malloc.h)
_KEEP_BLOCKS_BELOW = 1 << 30


@dataclass(frozen=True)
class AnalysisInputs:
    """The scan files to analyse, and annotated nodules by series when a LUNA16 root gave them."""

    scans: tuple[Path, ...]
    truth: dict[str, list[Annotation]] | None = None


def is_luna_root(path: Path) -> bool:
    """A folder with ``subset*/`` sub-folders (a DICOM series folder has files instead)."""
    return path.is_dir() and any(p.is_dir() for p in path.glob("subset*"))


def resolve_inputs(
    inputs: Sequence[Path],
    *,
    series: Sequence[str] = (),
    split: str | None = None,
    val_stride: int = 10,
) -> AnalysisInputs:
    """Expand CT files, DICOM folders and LUNA16 roots (with ``series`` or ``split``)."""
    if split is not None and split not in SPLITS:
        raise LungcadError(f"--split {split!r}: expected one of {', '.join(SPLITS)}")
    scans: list[Path] = []
    truth: dict[str, list[Annotation]] | None = None
    roots = [path for path in inputs if is_luna_root(path)]
    if (series or split) and not roots:
        raise LungcadError("--series and --split select scans of a LUNA16 data root (subset*/)")
    for path in inputs:
        if not path.exists():
            raise LungcadError(f"{path}: input not found")
        if path not in roots:
            scans.append(path)
            continue
        available = discover_scans(path)
        scans.extend(
            available[uid] for uid in _select_series(path, available, series, split, val_stride)
        )
        root_truth = load_truth(path)
        if root_truth is not None:
            truth = {**(truth or {}), **root_truth}
    unique = tuple(dict.fromkeys(path.resolve() for path in scans))
    if not unique:
        raise LungcadError("no scans selected")
    return AnalysisInputs(unique, truth)


def _select_series(
    root: Path, available: dict[str, Path], series: Sequence[str], split: str | None, stride: int
) -> list[str]:
    if series:
        unknown = [uid for uid in series if uid not in available]
        if unknown:
            raise LungcadError(
                f"{root}: no scan for series {', '.join(unknown)} ({len(available)} scans there)"
            )
        return list(series)
    if split is None:
        raise LungcadError(
            f"{root}: a LUNA16 data root needs --series UID[,UID] or --split {'|'.join(SPLITS)}"
        )
    if split == "all":
        return list(available)
    chosen = dataset_split(root, stride)
    side = chosen.validation if split == "val" else chosen.train
    return [uid for uid in side if uid in available]


def configure_process(ctx: DistributedContext) -> None:
    """CPU settings for a process that analyses scans: share cores, reuse freed memory.

    Ranks on one machine split its cores instead of oversubscribing them. And glibc by
    default hands every freed block over 32 MB back to the OS, so each U-Net activation
    of a 512x512 batch is a fresh mapping the kernel zeroes page by page: measured here,
    that is 30-50% of the segmentation's CPU time (sys time). Raising the mmap and trim
    thresholds keeps those blocks in the heap for the next batch (Linux/glibc only).
    """
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if local_ranks > 1:
        cores = len(os.sched_getaffinity(0))
        torch.set_num_threads(max(1, cores // local_ranks))
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return  # not glibc: its allocator has its own policy
    for option in (_M_MMAP_THRESHOLD, _M_TRIM_THRESHOLD):
        if not libc.mallopt(option, _KEEP_BLOCKS_BELOW):
            log.debug("mallopt(%d) refused; keeping the allocator's defaults", option)


@dataclass
class RunSummary:
    """What the whole run (all ranks) produced; complete on rank 0 only."""

    scans: int = 0
    candidates: int = 0
    nodules: int = 0
    malignant: int | None = None
    failures: list[str] = field(default_factory=list)
    confusion_text: str | None = None
    seconds: float = 0.0


@dataclass
class _RankRecords:
    rows: list[DetectionRow] = field(default_factory=list)
    summaries: list[ScanSummary] = field(default_factory=list)
    confusion: dict[str, np.ndarray] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)


def run_analysis(
    inputs: AnalysisInputs,
    models: ModelBundle,
    options: AnalysisOptions,
    out_dir: Path,
    ctx: DistributedContext,
    *,
    on_scan: Callable[[str], None] | None = None,
    progress: StageProgress | None = None,
) -> RunSummary:
    """Analyse this rank's share of the scans; rank 0 writes the run-wide files."""
    start = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    records = _RankRecords()
    for path in ctx.shard(list(inputs.scans)):
        try:
            clock = time.perf_counter()
            volume = read_ct(path)
            load_seconds = time.perf_counter() - clock
        except LungcadError as exc:
            log.error("%s", exc)
            records.failures.append(str(exc))
            if on_scan is not None:
                on_scan(path.name)
            continue
        result = analyze_ct(volume, models, options, progress, load_seconds=load_seconds)
        write_scan_json(out_dir, result)
        write_scan_html(out_dir, result, volume.hu)
        records.rows.extend(detection_rows(result))
        records.summaries.append(ScanSummary.from_result(result))
        if inputs.truth is not None:
            records.confusion[result.series_uid] = match_and_score(
                result.candidates,
                inputs.truth.get(result.series_uid, []),
                options.nodule_threshold,
                options.malignancy_threshold,
            )
        if on_scan is not None:
            on_scan(result.series_uid)
        del volume
    gathered: list[_RankRecords] = ctx.all_gather(records)
    summary = RunSummary()
    if ctx.is_main:
        merged = _RankRecords()
        for part in gathered:
            merged.rows += part.rows
            merged.summaries += part.summaries
            merged.confusion.update(part.confusion)
            merged.failures += part.failures
        summary = _write_run_files(out_dir, merged, inputs.truth is not None)
    summary.seconds = time.perf_counter() - start
    return summary


def _write_run_files(out_dir: Path, merged: _RankRecords, validating: bool) -> RunSummary:
    uids = [s.series_uid for s in merged.summaries]
    repeated = sorted({uid for uid in uids if uids.count(uid) > 1})
    if repeated:
        log.warning(
            "series analysed twice (same UID, different files); reports keep one: %s", repeated
        )
    write_detections_csv(out_dir / DETECTIONS_CSV, merged.rows)
    confusion_text = write_confusion(out_dir, merged.confusion) if validating else None
    write_index_html(out_dir, merged.summaries, (CONFUSION_TXT,) if validating else ())
    malignant = [s.malignant for s in merged.summaries if s.malignant is not None]
    return RunSummary(
        scans=len(merged.summaries),
        candidates=sum(s.candidates for s in merged.summaries),
        nodules=sum(s.nodules for s in merged.summaries),
        # Only meaningful when every scan had a malignancy model (all runs have or none).
        malignant=sum(malignant) if malignant and len(malignant) == len(uids) else None,
        failures=merged.failures,
        confusion_text=confusion_text,
    )
