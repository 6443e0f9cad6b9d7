"""The volume cache: each series converted once to int16 ``.npy`` + JSON geometry, then
read by memory map.

Training reads tens of thousands of crops a second; decoding a ``.mhd`` or unpickling a
gzip blob per crop (the book's way) cannot keep up. A memory-mapped ``.npy`` is read
straight from the page cache, and DataLoader workers share those pages instead of each
holding a copy. Entries carry the source file's identity and the format version, so a
changed source or a new format is rebuilt, never served stale.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from lungcad.atomic import atomic_write, atomic_write_text
from lungcad.data.crops import CLASSIFIER_CROP_IRC, crop_irc, slice_stack
from lungcad.data.ct import read_ct
from lungcad.data.geometry import Geometry, Irc, Xyz
from lungcad.errors import LungcadError
from lungcad.progress import make_progress

log = logging.getLogger(__name__)

CACHE_FORMAT_VERSION = 1
CACHE_ENV = "LUNGCAD_CACHE"


def default_cache_dir(data_root: Path) -> Path:
    """``$LUNGCAD_CACHE`` if set, else ``<data_root>/.lungcad-cache``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env) if env else data_root / ".lungcad-cache"


def source_identity(source: Path) -> dict[str, Any]:
    """What must be unchanged for a cache entry to stay valid: path, sizes, mtimes."""
    files = [source]
    if source.suffix.lower() == ".mhd":
        files.append(source.with_suffix(".raw"))
    elif source.is_dir():
        files = sorted(p for p in source.iterdir() if p.is_file())
    stats = []
    for path in files:
        if path.exists():
            stat = path.stat()
            stats.append([path.name, stat.st_size, stat.st_mtime_ns])
    return {"path": str(source.resolve()), "files": stats}


@dataclass(frozen=True)
class CachedVolume:
    """A memory-mapped HU volume (I, R, C) and its geometry."""

    series_uid: str
    hu: np.ndarray
    geometry: Geometry

    def center_irc(self, center_xyz: Xyz | Sequence[float]) -> Irc:
        """Nearest voxel of a patient-mm point; same result as ``geometry.xyz_to_irc``."""
        # Plain float arithmetic: numpy's per-call overhead on a 3-vector would dominate
        # the tens of microseconds a crop takes.
        offset = [float(v) - o for v, o in zip(center_xyz, self.geometry.origin_xyz, strict=True)]
        c, r, i = (
            round(m0 * offset[0] + m1 * offset[1] + m2 * offset[2])
            for m0, m1, m2 in self._xyz_to_cri_rows
        )
        return Irc(i, r, c)

    @cached_property
    def _xyz_to_cri_rows(self) -> tuple[tuple[float, float, float], ...]:
        return tuple(tuple(float(v) for v in row) for row in self.geometry.xyz_to_cri_matrix)  # type: ignore[misc]


class VolumeCache:
    """The embedded default store. Opens memory maps lazily, once per process."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.entries_dir = self.root / f"v{CACHE_FORMAT_VERSION}"
        self._open: dict[str, CachedVolume] = {}

    def __getstate__(self) -> dict[str, Any]:
        # Workers get the path only and map the files themselves: pages shared, not copied.
        return {"root": self.root, "entries_dir": self.entries_dir, "_open": {}}

    def entry_files(self, series_uid: str) -> tuple[Path, Path]:
        """The volume entry of a series: (int16 HU ``.npy``, JSON geometry sidecar)."""
        return self.entries_dir / f"{series_uid}.npy", self.entries_dir / f"{series_uid}.json"

    def array_path(self, series_uid: str, name: str) -> Path:
        """Where a derived per-series array (e.g. a nodule mask) lives beside the volume."""
        return self.entries_dir / f"{series_uid}.{name}.npy"

    def is_fresh(self, series_uid: str, source: Path) -> bool:
        npy, meta_path = self.entry_files(series_uid)
        if not (npy.exists() and meta_path.exists()):
            return False
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, json.JSONDecodeError):
            return False
        return (
            meta.get("format") == CACHE_FORMAT_VERSION
            and meta.get("source") == source_identity(source)
            and npy.stat().st_size >= 2 * int(np.prod(meta.get("shape_irc", [0])))
        )

    def put(self, source: Path) -> int:
        """Convert one scan into the cache (atomically); returns bytes of HU written."""
        volume = read_ct(source)
        self.entries_dir.mkdir(parents=True, exist_ok=True)
        npy, meta_path = self.entry_files(volume.series_uid)
        atomic_write(npy, lambda handle: np.save(handle, volume.hu))
        meta = {
            "format": CACHE_FORMAT_VERSION,
            "series_uid": volume.series_uid,
            "shape_irc": list(volume.shape_irc),
            "geometry": volume.geometry.to_json(),
            "source": source_identity(source),
        }
        # The JSON is written last: an entry without it is incomplete and gets rebuilt.
        atomic_write_text(meta_path, json.dumps(meta))
        self._open.pop(volume.series_uid, None)
        return int(volume.hu.nbytes)

    def series_uids(self) -> list[str]:
        if not self.entries_dir.is_dir():
            return []
        return sorted(p.stem for p in self.entries_dir.glob("*.json"))

    def volume(self, series_uid: str) -> CachedVolume:
        cached = self._open.get(series_uid)
        if cached is not None:
            return cached
        npy, meta_path = self.entry_files(series_uid)
        if not meta_path.exists():
            raise LungcadError(
                f"{self.entries_dir}: series {series_uid} is not in the cache "
                "(run `lungcad prepare`)"
            )
        meta = json.loads(meta_path.read_text())
        if meta.get("format") != CACHE_FORMAT_VERSION:
            raise LungcadError(
                f"{meta_path}: cache format {meta.get('format')} is stale; rerun prepare"
            )
        # A plain ndarray view of the map: slicing an np.memmap subclass costs more per crop.
        hu = np.asarray(np.load(npy, mmap_mode="r"))
        cached = CachedVolume(series_uid, hu, Geometry.from_json(meta["geometry"]))
        self._open[series_uid] = cached
        return cached

    def crop(
        self,
        series_uid: str,
        center_xyz: Xyz | Sequence[float],
        width_irc: Sequence[int] = CLASSIFIER_CROP_IRC,
    ) -> tuple[np.ndarray, Irc]:
        """int16 HU box around a patient-mm point, padded with air at the volume edge."""
        volume = self.volume(series_uid)
        center_irc = volume.center_irc(center_xyz)
        return crop_irc(volume.hu, center_irc, width_irc), center_irc

    def slice_stack(self, series_uid: str, index: int, context: int = 3) -> np.ndarray:
        """int16 (2*context+1, R, C) stack around slice ``index`` for the 2D U-Net."""
        return slice_stack(self.volume(series_uid).hu, index, context)


@dataclass(frozen=True)
class PrepareSummary:
    converted: int
    skipped: int
    megabytes: float
    seconds: float
    workers: int

    @property
    def mb_per_s_per_worker(self) -> float:
        return self.megabytes / max(self.seconds, 1e-9) / max(self.workers, 1)


def _convert(cache_root: Path, source: Path) -> int:
    return VolumeCache(cache_root).put(source)


def prepare_cache(scans: dict[str, Path], cache: VolumeCache, workers: int = 1) -> PrepareSummary:
    """Convert every scan not already fresh in the cache; resumable and Ctrl-C safe."""
    cache.entries_dir.mkdir(parents=True, exist_ok=True)
    for stale in cache.entries_dir.glob("*.tmp-*"):
        stale.unlink(missing_ok=True)
    todo = {uid: path for uid, path in scans.items() if not cache.is_fresh(uid, path)}
    skipped = len(scans) - len(todo)
    start = time.perf_counter()
    total_bytes = 0
    with make_progress(transient=not todo) as progress:
        task = progress.add_task("prepare", total=len(todo))
        if workers <= 1:
            for path in todo.values():
                total_bytes += cache.put(path)
                progress.advance(task)
        else:
            with ProcessPoolExecutor(max_workers=workers) as pool:
                futures = [pool.submit(_convert, cache.root, path) for path in todo.values()]
                try:
                    for future in as_completed(futures):
                        total_bytes += future.result()
                        progress.advance(task)
                except BaseException:
                    pool.shutdown(wait=True, cancel_futures=True)
                    raise
    seconds = time.perf_counter() - start
    return PrepareSummary(len(todo), skipped, total_bytes / 1e6, seconds, max(workers, 1))
