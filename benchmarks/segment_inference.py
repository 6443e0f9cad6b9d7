"""Whole-scan segmentation on CPU: batched ``segment_volume`` vs the book's one slice at a time.

The same published U-Net weights on the real 512x512x141 chest CT, in one run:
  (a) the book's way: a Dataset returning one float32 7-slice stack per item, a DataLoader
      with batch_size 1, the model in PyTorch's default (contiguous) layout;
  (b) the same loop with the model in channels_last layout, as ``load_model`` returns it
      (separates the layout's share of the gain from the rest);
  (c) ``segment_volume`` on whole slices with the fused model ``lungcad analyze`` runs
      (conv -> ReLU -> batch norm as one conv and one clamp), batches of int16 stacks
      converted on the device, channels_last (``lungcad analyze --whole-slices``);
  (d) the same on the body window only (``lungcad analyze``, the default): the patient
      plus the U-Net's reach, so outputs inside the body are those of (c);
  (e) (d) under bfloat16 autocast (``lungcad analyze --precision bf16``).
(a) and (b) time a subset of slices (``--book-slices``, evenly spaced) to keep the run
short. Also printed: what each flags (voxels above 0.5, 6-connected components) and how
many flagged voxels differ from the book's arithmetic on the common slices.

    python benchmarks/segment_inference.py [--book-slices 24] [--batch-size 2]
"""

from __future__ import annotations

import argparse
import copy
import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage
from torch.utils.data import DataLoader, Dataset

from lungcad.analysis.run import configure_process
from lungcad.analysis.segmentation import body_window, segment_volume
from lungcad.data.crops import clip_hu, slice_stack
from lungcad.data.ct import read_ct
from lungcad.models import (
    SegmentationConfig,
    SegmentationModel,
    fuse_for_inference,
    load_model_with_info,
)
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


def timed(run: Callable[[], np.ndarray], slices: int) -> tuple[float, np.ndarray]:
    start = time.perf_counter()
    probabilities = run()
    return (time.perf_counter() - start) / slices, probabilities


def flagged_summary(probabilities: np.ndarray) -> str:
    flagged = probabilities > 0.5
    _, components = ndimage.label(flagged)
    return f"{int(flagged.sum()):,} voxels in {components} components"


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
    slices = hu.shape[0]
    loaded = load_model_with_info(WEIGHTS)
    config, channels_last = loaded.config, loaded.model  # channels_last, eval
    assert isinstance(config, SegmentationConfig) and isinstance(channels_last, SegmentationModel)
    book = copy.deepcopy(channels_last).to(memory_format=torch.contiguous_format)
    fused = fuse_for_inference(channels_last)
    window = body_window(hu, config.reach, config.size_multiple)
    subset = np.linspace(0, slices - 1, args.book_slices).round().astype(int).tolist()
    book_style(book, hu, subset[:2])  # warm-up: first-call allocations

    def ours(use_window: bool) -> np.ndarray:
        return segment_volume(
            fused,
            hu,
            batch_size=args.batch_size,
            window=window if use_window else None,
            size_multiple=config.size_multiple,
        )

    def ours_bf16() -> np.ndarray:
        with mixed_precision("bf16", torch.device("cpu")):
            return ours(True)

    # Machines here are shared: the book's slices are timed half before and half after the
    # whole-scan runs, so a change in load hits both sides alike.
    first, second = subset[::2], subset[1::2]
    book_first, probs_first = book_style(book, hu, first)
    book_cl_first, _ = book_style(channels_last, hu, first)
    whole_s, whole = timed(lambda: ours(False), slices)
    window_s, windowed = timed(lambda: ours(True), slices)
    bf16_s, bf16 = timed(ours_bf16, slices)
    book_second, probs_second = book_style(book, hu, second)
    book_cl_second, _ = book_style(channels_last, hu, second)
    book_s, book_cl_s = (book_first + book_second) / 2, (book_cl_first + book_cl_second) / 2

    print(
        f"scan {SCAN.name}: {slices} slices of {hu.shape[1]}x{hu.shape[2]}, torch "
        f"{torch.__version__}, {torch.get_num_threads()} threads; body window rows "
        f"{window[0].start}:{window[0].stop}, columns {window[1].start}:{window[1].stop}"
    )
    print(f"{'how':54} {'slices':>6} {'s/slice':>8} {'slices/s':>9} {'vs book':>8}")
    rows = [
        ("(a) book: DataLoader batch 1, contiguous", len(subset), book_s),
        ("(b) book loop, channels_last model", len(subset), book_cl_s),
        (f"(c) segment_volume batch {args.batch_size}, fused, whole slices", slices, whole_s),
        (f"(d) segment_volume batch {args.batch_size}, fused, body window", slices, window_s),
        ("(e) (d) under bf16 autocast", slices, bf16_s),
    ]
    for name, count, seconds in rows:
        ratio = rows[0][2] / seconds
        print(f"{name:54} {count:>6} {seconds:>8.3f} {1 / seconds:>9.2f} {ratio:>7.2f}x")

    common = [*first, *second]
    book_flags = np.concatenate([probs_first, probs_second]) > 0.5
    inside = np.zeros(hu.shape[1:], dtype=bool)
    inside[window] = True
    for name, probabilities in (("(c)", whole), ("(d)", windowed), ("(e)", bf16)):
        differ = int(((probabilities[common] > 0.5) != book_flags).sum())
        print(
            f"{name} flags {flagged_summary(probabilities)}; on the book's slices "
            f"{differ:,} voxels flagged differently from (a)"
        )
    outside = int((whole[:, ~inside] > 0.5).sum())
    inside_difference = float(np.abs(whole[:, inside] - windowed[:, inside]).max())
    print(
        f"(c) vs (d): max |difference| inside the window {inside_difference:.1e}; "
        f"(c) flags {outside:,} voxels outside it (air)"
    )


if __name__ == "__main__":
    main()
