"""Whole-scan segmentation on CPU: batched ``segment_volume`` vs the book's one slice at a time.

The same published U-Net weights on the real 512x512x141 chest CT, in one run:
  (a) the book's way: a Dataset returning one float32 7-slice stack per item, a DataLoader
      with batch_size 1, the model in PyTorch's default (contiguous) layout;
  (b) the same loop with the model in channels_last layout, as ``load_model`` returns it
      (separates the layout's share of the gain from batching's);
  (c) ``lungcad.analysis.segmentation.segment_volume``: batches of int16 stacks converted
      on the device, channels_last (``lungcad analyze``, default --precision fp32);
  (d) the same under bfloat16 autocast (``lungcad analyze --precision bf16``), with how
      many voxels it flags differently from (c).
(a) and (b) time a subset of slices (``--book-slices``, evenly spaced) to keep the run
short; (c) segments the whole scan and also reports what it flags (voxels above 0.5 and
6-connected components).

    python benchmarks/segment_inference.py [--book-slices 24] [--batch-size 8]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage
from torch.utils.data import DataLoader, Dataset

from lungcad.analysis.run import configure_process
from lungcad.analysis.segmentation import segment_volume
from lungcad.data.crops import clip_hu, slice_stack
from lungcad.data.ct import read_ct
from lungcad.models import load_model
from lungcad.precision import mixed_precision
from lungcad.training.distributed import DistributedContext

SHARED = Path(
    os.environ.get("LUNGCAD_SHARED", Path(__file__).resolve().parents[1].parent / "shared")
)
SCAN = SHARED / "data/ct/chest-ct-141-dicom"
WEIGHTS = (
    SHARED
    / "models/dlwpt/seg_2020-01-26_19.45.12_w4d3c1-bal_1_nodupe-label_pos-d1_fn8-adam.best.state"
)


class BookSlices(Dataset[torch.Tensor]):
    """One (7, R, C) float32 stack of clipped HU per item, as the book's full-slice dataset."""

    def __init__(self, hu: np.ndarray, indices: list[int]) -> None:
        self.hu, self.indices = hu, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, item: int) -> torch.Tensor:
        return torch.from_numpy(clip_hu(slice_stack(self.hu, self.indices[item])))


def book_style(
    model: torch.nn.Module, hu: np.ndarray, indices: list[int]
) -> tuple[float, np.ndarray]:
    """Seconds per slice and the (len(indices), R, C) probabilities, one slice per batch."""
    outputs = []
    start = time.perf_counter()
    with torch.no_grad():
        for batch in DataLoader(BookSlices(hu, indices), batch_size=1, num_workers=0):
            outputs.append(model(batch)[:, 0].numpy())
    return (time.perf_counter() - start) / len(indices), np.concatenate(outputs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--book-slices", type=int, default=24)
    parser.add_argument("--batch-size", type=int, default=2, help="as lungcad analyze on CPU")
    args = parser.parse_args()
    for path in (SCAN, WEIGHTS):
        if not path.exists():
            raise SystemExit(f"{path} is absent (set LUNGCAD_SHARED)")

    # As ``lungcad analyze`` does: keep freed activation blocks in the heap. Process-wide,
    # so the book's loop gets it too (its batch-1 blocks are small enough not to need it).
    configure_process(DistributedContext())
    hu = read_ct(SCAN).hu
    ours = load_model(WEIGHTS)  # channels_last, eval
    book = load_model(WEIGHTS).to(memory_format=torch.contiguous_format)  # type: ignore[call-overload]
    subset = np.linspace(0, hu.shape[0] - 1, args.book_slices).round().astype(int).tolist()
    book_style(book, hu, subset[:2])  # warm-up: first-call allocations

    # Machines here are shared: the book's slices are timed half before and half after the
    # whole-scan run, so a change in load hits both sides alike.
    first, second = subset[::2], subset[1::2]
    book_first, probs_first = book_style(book, hu, first)
    book_cl_first, _ = book_style(ours, hu, first)
    start = time.perf_counter()
    probs = segment_volume(ours, hu, batch_size=args.batch_size, device="cpu")
    batched_s = (time.perf_counter() - start) / hu.shape[0]
    start = time.perf_counter()
    with mixed_precision("bf16", torch.device("cpu")):
        probs_bf16 = segment_volume(ours, hu, batch_size=args.batch_size, device="cpu")
    bf16_s = (time.perf_counter() - start) / hu.shape[0]
    book_second, probs_second = book_style(book, hu, second)
    book_cl_second, _ = book_style(ours, hu, second)
    book_s, book_cl_s = (book_first + book_second) / 2, (book_cl_first + book_cl_second) / 2

    flagged = probs > 0.5
    _, components = ndimage.label(flagged)
    difference = float(
        np.abs(probs[[*first, *second]] - np.concatenate([probs_first, probs_second])).max()
    )
    print(
        f"scan {SCAN.name}: {hu.shape[0]} slices of {hu.shape[1]}x{hu.shape[2]}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    print(f"{'how':52} {'slices':>6} {'s/slice':>8} {'slices/s':>9} {'vs book':>8}")
    rows = [
        ("book: DataLoader batch 1, contiguous", len(subset), book_s),
        ("book loop, channels_last model", len(subset), book_cl_s),
        (f"segment_volume batch {args.batch_size}, channels_last", hu.shape[0], batched_s),
        (f"segment_volume batch {args.batch_size}, channels_last, bf16", hu.shape[0], bf16_s),
    ]
    for name, count, seconds in rows:
        ratio = rows[0][2] / seconds
        print(f"{name:52} {count:>6} {seconds:>8.3f} {1 / seconds:>9.2f} {ratio:>7.2f}x")
    print(f"max |difference| on the common slices: {difference:.2e}")
    print(
        f"flagged: {int(flagged.sum()):,} voxels above 0.5 in {components} components (6-connected)"
    )
    flipped = int(((probs_bf16 > 0.5) != flagged).sum())
    print(f"bf16 flags {flipped:,} voxels differently ({flipped / max(int(flagged.sum()), 1):.2%})")


if __name__ == "__main__":
    main()
