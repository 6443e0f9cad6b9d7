"""Random 32x48x48 crops per second: our memory-mapped cache vs the book's ways.

Baselines, measured in the same run on the same scans and crop centres:
  (a) re-reading the ``.mhd`` for every crop (what a cache-less loader does);
  (b) a gzip diskcache store like the book's (``FanoutCache`` + gzip-pickled crops).
Also reports ``prepare`` throughput in MB/s of HU per worker.

    python benchmarks/cache_crops.py [--scans 20] [--size 256] [--workdir /tmp/lungcad-bench]
"""

from __future__ import annotations

import argparse
import gzip
import io
import pickle
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from lungcad.data.cache import VolumeCache, prepare_cache
from lungcad.data.crops import CLASSIFIER_CROP_IRC, crop_irc
from lungcad.data.ct import read_ct
from lungcad.data.geometry import irc_to_xyz, xyz_to_irc
from lungcad.data.luna import discover_scans
from lungcad.data.synth import write_dataset


def _gzip_disk_class() -> Any:
    import diskcache

    class GzipDisk(diskcache.Disk):  # type: ignore[misc]
        """Stores every value as a gzip-compressed pickle, as the book's cache does."""

        def store(self, value: Any, read: bool, key: Any = diskcache.UNKNOWN) -> Any:
            if not read:
                buffer = io.BytesIO()
                with gzip.GzipFile(mode="wb", compresslevel=1, fileobj=buffer) as handle:
                    handle.write(pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL))
                value = buffer.getvalue()
            return super().store(value, read, key=key)

        def fetch(self, mode: int, filename: str, value: Any, read: bool) -> Any:
            value = super().fetch(mode, filename, value, read)
            if mode == diskcache.core.MODE_BINARY:
                value = pickle.loads(gzip.decompress(value))
            return value

    return GzipDisk


def _random_centres(
    cache: VolumeCache, count: int, rng: np.random.Generator
) -> list[tuple[str, tuple]]:
    uids = cache.series_uids()
    centres = []
    for _ in range(count):
        uid = uids[int(rng.integers(len(uids)))]
        volume = cache.volume(uid)
        irc = tuple(int(rng.integers(0, n)) for n in volume.hu.shape)
        centres.append((uid, tuple(irc_to_xyz(irc, volume.geometry))))
    return centres


def bench_ours(cache: VolumeCache, centres: list[tuple[str, tuple]]) -> float:
    for uid, xyz in centres[:200]:  # warm: maps open, pages resident
        cache.crop(uid, xyz)
    start = time.perf_counter()
    for uid, xyz in centres:
        cache.crop(uid, xyz)
    return len(centres) / (time.perf_counter() - start)


def bench_reread(scans: dict[str, Path], centres: list[tuple[str, tuple]]) -> float:
    start = time.perf_counter()
    for uid, xyz in centres:
        volume = read_ct(scans[uid])
        crop_irc(volume.hu, xyz_to_irc(xyz, volume.geometry), CLASSIFIER_CROP_IRC)
    return len(centres) / (time.perf_counter() - start)


def bench_diskcache(cache: VolumeCache, centres: list[tuple[str, tuple]], directory: Path) -> float:
    import diskcache

    shutil.rmtree(directory, ignore_errors=True)
    store = diskcache.FanoutCache(str(directory), shards=8, timeout=1, disk=_gzip_disk_class())
    for uid, xyz in centres:  # populate (the book's first epoch), then time warm reads
        store.set((uid, xyz), cache.crop(uid, xyz)[0])
    start = time.perf_counter()
    for uid, xyz in centres:
        store.get((uid, xyz))
    rate = len(centres) / (time.perf_counter() - start)
    store.close()
    return rate


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--scans", type=int, default=20)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--crops", type=int, default=20000)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/lungcad-bench"))
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()

    data_root = args.workdir / f"synth-{args.scans}x{args.size}"
    if not (data_root / "seriesuids.csv").exists():
        shutil.rmtree(data_root, ignore_errors=True)
        write_dataset(data_root, scans=args.scans, seed=1234, size=args.size, subsets=2)
    scans = discover_scans(data_root)

    cache_dir = args.workdir / "cache"
    shutil.rmtree(cache_dir, ignore_errors=True)
    prep = prepare_cache(scans, VolumeCache(cache_dir), workers=1)
    shutil.rmtree(cache_dir, ignore_errors=True)
    prep_parallel = prepare_cache(scans, VolumeCache(cache_dir), workers=args.workers)

    cache = VolumeCache(cache_dir)
    rng = np.random.default_rng(0)
    centres = _random_centres(cache, args.crops, rng)
    ours = bench_ours(cache, centres)
    reread = bench_reread(scans, centres[:40])
    gz = bench_diskcache(cache, centres[:4000], args.workdir / "diskcache")

    total_mb = sum(cache.volume(u).hu.nbytes for u in cache.series_uids()) / 1e6
    print(f"\n{len(scans)} scans, {total_mb:.0f} MB of HU, crop {CLASSIFIER_CROP_IRC}, one process")
    print(f"{'method':<34}{'crops/s':>12}{'ours is':>12}")
    for name, rate in [
        ("lungcad memory-mapped cache", ours),
        ("gzip diskcache store (book)", gz),
        ("re-read .mhd per crop", reread),
    ]:
        print(f"{name:<34}{rate:>12,.0f}{ours / rate:>11.1f}x")
    print()
    for workers, summary in [(1, prep), (args.workers, prep_parallel)]:
        rate = summary.mb_per_s_per_worker
        seconds = summary.seconds
        print(f"prepare, {workers} worker(s): {rate:6.0f} MB/s per worker ({seconds:.1f} s)")


if __name__ == "__main__":
    main()
