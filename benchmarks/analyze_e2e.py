"""End-to-end nodule analysis of the real 141-slice chest CT: lungcad vs the book's flow.

Same weights (the book's published checkpoints), same CT, same run. Each variant runs in
a fresh subprocess limited to ``--threads`` torch threads, reporting its stage times and
its own peak RSS (``ru_maxrss``):

  ours       ``lungcad analyze``'s code path: one CT load, the fused channels_last U-Net
             on the body window in batches, one candidate per component plus the blobs
             of large components, in-memory crops classified in batches, JSON + HTML +
             CSV written.
  ours-no-blobs  the same with one candidate per component, as the book (``--no-blobs``):
             its detections are compared with the book's.
  ours-onnx  ``ours`` with the U-Net run by onnxruntime (``--backend onnx``).
  baseline   the book's ``nodule_analysis.py`` flow: the CT reloaded for each stage, a
             per-slice DataLoader (batch 4, num_workers 0) into a contiguous-layout
             U-Net, grouping on a float copy of the volume, and every candidate crop
             cut from a fresh CT load (batch 4 DataLoader). The per-candidate stage is
             timed on ``--subset`` candidates and extrapolated to all of them.

The DICOM series is converted once to ``.mhd`` (untimed), the format the book reads.
"Inside the body" uses a body mask: HU > -500, largest component, holes filled per slice.

    python benchmarks/analyze_e2e.py [--threads 2] [--subset 24] [--repeats 1] [--variants ours,baseline]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
SERIES = SHARED / "data/ct/chest-ct-141-dicom"
MODELS = SHARED / "models/dlwpt"
SEGMENTER = MODELS / "seg_2020-01-26_19.45.12_w4d3c1-bal_1_nodupe-label_pos-d1_fn8-adam.best.state"
CLASSIFIER = MODELS / "cls_2020-02-06_14.16.55_final-nodule-nonnodule.best.state"
# ../shared/MEASUREMENTS.md: the book's own run, detections above 0.5 (p, x, y, z mm).
BOOK_DETECTIONS = [
    (1.000, -41.99, 135.80, -88.5),
    (0.9992, 104.49, 79.16, 29.5),
    (0.9934, 98.63, 61.59, -20.5),
    (0.5971, 112.30, 93.81, -112.5),
    (0.5204, 233.40, 61.59, -30.5),
]
MATCH_MM = 3.0
VARIANTS = ("ours", "ours-no-blobs", "ours-onnx", "baseline")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def cpu_seconds() -> float:
    """User + system CPU time of this process: robust to other jobs sharing the cores."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def run_ours(ct_path: Path, backend: str, blobs: bool, workdir: Path) -> dict[str, Any]:
    from lungcad.analysis.pipeline import AnalysisOptions, ModelBundle
    from lungcad.analysis.run import AnalysisInputs, configure_process, run_analysis
    from lungcad.training.distributed import DistributedContext

    configure_process(DistributedContext())  # as ``lungcad analyze`` does
    start = time.perf_counter()
    models = ModelBundle.load(SEGMENTER, CLASSIFIER, device="cpu", backend=backend)
    model_seconds = time.perf_counter() - start
    out = workdir / f"out-{backend}-{blobs}"
    options = AnalysisOptions(blob_candidates=blobs)
    run_analysis(AnalysisInputs((ct_path,)), models, options, out, DistributedContext())
    total = time.perf_counter() - start
    (record_path,) = [p for p in out.glob("*.json")]
    timings = json.loads(record_path.read_text())["timings_s"]
    stages = {"models": model_seconds, **{k: v for k, v in timings.items() if k != "total"}}
    stages["reports"] = total - sum(stages.values())
    rows = (out / "detections.csv").read_text().splitlines()[1:]
    candidates = [[float(v) for v in row.split(",")[1:]] for row in rows]  # x, y, z, p
    return {"stages": stages, "total": total, "candidates": candidates}


def run_baseline(ct_path: Path, subset: int) -> dict[str, Any]:
    import torch
    from scipy import ndimage
    from torch.utils.data import DataLoader, Dataset

    from lungcad.analysis.classification import shift_inside
    from lungcad.data.crops import CLASSIFIER_CROP_IRC, crop_irc
    from lungcad.data.ct import read_ct
    from lungcad.data.geometry import irc_to_xyz_array, xyz_to_irc
    from lungcad.models import load_model

    def book_ct() -> tuple[np.ndarray, Any]:
        """The book's ``Ct``: the whole volume as float32 HU clipped to [-1000, 1000]."""
        volume = read_ct(ct_path)
        return np.clip(volume.hu.astype(np.float32), -1000, 1000), volume.geometry

    class Slices(Dataset):
        def __init__(self) -> None:
            self.hu, _ = book_ct()

        def __len__(self) -> int:
            return self.hu.shape[0]

        def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
            indices = np.clip(np.arange(index - 3, index + 4), 0, len(self) - 1)
            return torch.from_numpy(self.hu[indices]), index

    class Crops(Dataset):
        def __init__(self, centers_xyz: np.ndarray) -> None:
            self.centers_xyz = centers_xyz

        def __len__(self) -> int:
            return len(self.centers_xyz)

        def __getitem__(self, index: int) -> torch.Tensor:
            hu, geometry = book_ct()  # a fresh CT load for every candidate
            center = np.array([xyz_to_irc(self.centers_xyz[index], geometry)])
            crop = crop_irc(hu, shift_inside(center, hu.shape)[0], CLASSIFIER_CROP_IRC)
            return torch.from_numpy(crop)[None]

    stages: dict[str, float] = {}
    clock = time.perf_counter()
    segmenter = load_model(SEGMENTER).to(memory_format=torch.contiguous_format)
    classifier = load_model(CLASSIFIER)
    stages["models"] = time.perf_counter() - clock

    clock = time.perf_counter()
    hu, geometry = book_ct()  # the main loop's CT
    stages["load"] = time.perf_counter() - clock

    clock = time.perf_counter()
    probabilities = np.zeros(hu.shape, dtype=np.float32)
    with torch.no_grad():
        for batch, indices in DataLoader(Slices(), batch_size=4, num_workers=0):
            probabilities[indices.numpy()] = segmenter(batch)[:, 0].numpy()
    stages["segment"] = time.perf_counter() - clock

    clock = time.perf_counter()
    hu, geometry = book_ct()
    mask = ndimage.binary_erosion(probabilities > 0.5, iterations=1)
    labels, count = ndimage.label(mask)
    centers_irc = ndimage.center_of_mass(hu + 1001, labels=labels, index=np.arange(1, count + 1))
    centers_xyz = irc_to_xyz_array(np.array(centers_irc).reshape(-1, 3), geometry)
    stages["group"] = time.perf_counter() - clock
    del probabilities, mask, labels, hu

    chosen = subset_indices(centers_xyz, subset)
    clock = time.perf_counter()
    scores = []
    with torch.no_grad():
        for batch in DataLoader(Crops(centers_xyz[chosen]), batch_size=4, num_workers=0):
            scores.append(classifier(batch)[1][:, 1].numpy())
    per_candidate = (time.perf_counter() - clock) / len(chosen)
    stages["classify"] = per_candidate * len(centers_xyz)  # extrapolated from the subset
    return {
        "stages": stages,
        "total": sum(stages.values()),
        "candidates": [
            [*centers_xyz[i], float(p)] for i, p in zip(chosen, np.concatenate(scores), strict=True)
        ],
        "all_candidates": len(centers_xyz),
        "classified": len(chosen),
    }


def subset_indices(centers_xyz: np.ndarray, size: int) -> list[int]:
    """The candidates nearest the book's detections, then evenly spaced others."""
    book = np.array([d[1:] for d in BOOK_DETECTIONS])
    nearest = np.linalg.norm(centers_xyz[None] - book[:, None], axis=-1).argmin(axis=1)
    spaced = np.linspace(0, len(centers_xyz) - 1, max(size - len(nearest), 0)).astype(int)
    return list(dict.fromkeys([*nearest.tolist(), *spaced.tolist()]))


def body_mask(ct_path: Path) -> tuple[np.ndarray, Any]:
    from scipy import ndimage

    from lungcad.data.ct import read_ct

    volume = read_ct(ct_path)
    labels, _ = ndimage.label(volume.hu > -500)
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    body = labels == sizes.argmax()
    for index in range(body.shape[0]):
        body[index] = ndimage.binary_fill_holes(body[index])
    return body, volume.geometry


def detections_inside(candidates: list[list[float]], ct_path: Path) -> list[list[float]]:
    from lungcad.data.geometry import xyz_to_irc

    body, geometry = body_mask(ct_path)
    found = []
    for x, y, z, p in candidates:
        if p >= 0.5 and body[tuple(int(v) for v in xyz_to_irc((x, y, z), geometry))]:
            found.append([x, y, z, p])
    return sorted(found, key=lambda d: -d[3])


def child(variant: str, ct_path: Path, threads: int, subset: int, workdir: Path) -> None:
    import torch

    torch.set_num_threads(threads)
    if variant == "baseline":
        record = run_baseline(ct_path, subset)
    else:
        backend = "onnx" if variant == "ours-onnx" else "torch"
        record = run_ours(ct_path, backend, variant != "ours-no-blobs", workdir)
    record["peak_rss_mb"] = peak_rss_mb()
    record["cpu_s"] = cpu_seconds()
    record["inside_body"] = detections_inside(record["candidates"], ct_path)
    (workdir / f"{variant}.json").write_text(json.dumps(record))


def matches_book(found: list[list[float]], ct_path: Path) -> bool:
    book = [[x, y, z, p] for p, x, y, z in BOOK_DETECTIONS]
    expected = detections_inside(book, ct_path)
    if len(found) != len(expected):
        return False
    return all(
        min(np.linalg.norm(np.array(e[:3]) - np.array(f[:3])) for f in found) < MATCH_MM
        for e in expected
    )


def print_table(records: dict[str, dict[str, Any]], ct_path: Path) -> None:
    names = list(records)
    stages = list(dict.fromkeys(s for r in records.values() for s in r["stages"]))
    base = records.get("baseline")
    print(
        f"{'stage (s)':<22}"
        + "".join(f"{n:>14}" for n in names)
        + ("   baseline/ours" if base else "")
    )
    for stage in [*stages, "total"]:
        values = [
            r["total"] if stage == "total" else r["stages"].get(stage, 0.0)
            for r in records.values()
        ]
        line = f"{stage:<22}" + "".join(f"{v:14.2f}" for v in values)
        ours = records.get("ours")
        if base and ours:
            mine = ours["total"] if stage == "total" else ours["stages"].get(stage, 0.0)
            theirs = base["total"] if stage == "total" else base["stages"].get(stage, 0.0)
            line += f"   {theirs / mine:8.1f}x" if mine > 0.005 else ""
        print(line)
    print(f"{'CPU s (user+sys)':<22}" + "".join(f"{r['cpu_s']:14.1f}" for r in records.values()))
    print(f"{'peak RSS (MB)':<22}" + "".join(f"{r['peak_rss_mb']:14.0f}" for r in records.values()))
    print(
        f"{'candidates':<22}"
        + "".join(f"{r.get('all_candidates', len(r['candidates'])):14d}" for r in records.values())
    )
    if base:
        print(
            f"baseline classify: {base['classified']} candidates timed, extrapolated to {base['all_candidates']}"
        )
    for name, record in records.items():
        inside = record["inside_body"]
        shown = ", ".join(f"{p:.4f}@({x:.1f},{y:.1f},{z:.1f})" for x, y, z, p in inside)
        same = (
            "same as the book's" if matches_book(inside, ct_path) else "DIFFERENT from the book's"
        )
        print(f"{name}: {len(inside)} detections >= 0.5 inside the body, {same}: {shown}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--subset", type=int, default=24, help="Baseline candidates timed.")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--repeats", type=int, default=1, help="Runs per variant; fastest kept.")
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--ct", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.ct, args.threads, args.subset, args.workdir)
        return
    if not SERIES.is_dir() or not SEGMENTER.is_file():
        sys.exit(f"needs {SERIES} and the book's checkpoints in {MODELS}")

    from lungcad.data.ct import read_ct, write_metaimage

    with tempfile.TemporaryDirectory(prefix="lungcad-e2e-") as folder:
        workdir = Path(folder)
        volume = read_ct(SERIES)
        ct_path = workdir / f"{volume.series_uid}.mhd"
        write_metaimage(ct_path, volume.hu, volume.geometry)
        del volume
        records: dict[str, dict[str, Any]] = {}
        # Round-robin repeats, fastest total kept: other jobs on shared cores come and go.
        for repeat in range(args.repeats):
            for variant in args.variants.split(","):
                print(
                    f"running {variant} ({repeat + 1}/{args.repeats}) ...",
                    file=sys.stderr,
                    flush=True,
                )
                subprocess.run(
                    [sys.executable, __file__, "--child", variant, "--ct", str(ct_path),
                     "--workdir", str(workdir), "--threads", str(args.threads), "--subset", str(args.subset)],
                    check=True,
                )  # fmt: skip
                record = json.loads((workdir / f"{variant}.json").read_text())
                if variant not in records or record["total"] < records[variant]["total"]:
                    records[variant] = record
        print(
            f"{SERIES.name}, book checkpoints, {args.threads} torch threads, "
            f"fastest of {args.repeats} run(s) per variant"
        )
        print_table(records, ct_path)


if __name__ == "__main__":
    main()
