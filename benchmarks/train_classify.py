"""Classifier training samples/s on CPU: our engine's step against the book's way.

Measured in one run, same candidates in the same order, same model, same batch size:
  ours      cache crop (memory map) -> batch -> augment the batch on the device -> step;
  book      per sample in the Dataset: ``read_ct`` of the .mhd (one CT cached per worker,
            like the book's ``getCt`` lru_cache(1)), crop, clip, augment with
            affine_grid + grid_sample, noise -> batch -> step, model in the book's
            (contiguous) memory layout;
  book+cl   the book's data path with our channels-last model, to show what each part buys.
Ours runs as ``lungcad train classify`` does by default: channels-last, Adam, bfloat16
autocast where the CPU has it in hardware (AVX512-BF16 / AMX). Then the two halves of our
step apart: the data pipeline alone (DataLoader + on-device augmentation, no model)
against the model alone (forward + backward + optimizer step on random crops, same
precision), so we know which one bounds training.

    python benchmarks/train_classify.py [--data-root ROOT] [--steps 20] [--batch-size 32]

Without --data-root it writes 6 synthetic 512 x 512 scans (LUNA16's in-plane size) under
--workdir once and reuses them.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from lungcad.data.cache import VolumeCache, default_cache_dir, prepare_cache
from lungcad.data.crops import CLASSIFIER_CROP_IRC, clip_hu, crop_irc
from lungcad.data.ct import CtVolume, read_ct
from lungcad.data.geometry import xyz_to_irc
from lungcad.data.luna import CandidateInfo, discover_scans
from lungcad.models import LunaModel
from lungcad.precision import Precision, has_native_bf16, mixed_precision
from lungcad.training.augment import AugmentSettings, CropAugmentation
from lungcad.training.classify import (
    ClassificationTask,
    ClassifySettings,
    to_model_input,
)

CPU = torch.device("cpu")


class BookStyleCrops(Dataset[tuple[torch.Tensor, int]]):
    """The book's data path: everything per sample, in the Dataset, on the CPU."""

    def __init__(
        self,
        scans: dict[str, Path],
        candidates: tuple[CandidateInfo, ...],
        order: np.ndarray,
        augment: AugmentSettings,
    ) -> None:
        self.scans, self.candidates, self.order = scans, candidates, order
        self.augmentation = CropAugmentation(augment)

    def __len__(self) -> int:
        return len(self.order)

    @staticmethod
    @functools.lru_cache(maxsize=1)
    def ct(path: Path) -> CtVolume:
        """One CT per worker process, re-read whenever the series changes (book's getCt)."""
        return read_ct(path)

    def __getitem__(self, item: int) -> tuple[torch.Tensor, int]:
        candidate = self.candidates[int(self.order[item])]
        volume = self.ct(self.scans[candidate.series_uid])
        center_irc = xyz_to_irc(candidate.center_xyz, volume.geometry)
        crop = torch.from_numpy(clip_hu(crop_irc(volume.hu, center_irc, CLASSIFIER_CROP_IRC)))
        generator = torch.Generator().manual_seed(item)
        augmented = self.augmentation(crop[None, None], generator)[0]  # (1, 32, 48, 48)
        return augmented, int(candidate.is_nodule)


def _rate(
    batches: Iterator[Any], step: Callable[[Any], None], steps: int, warmup: int, size: int
) -> float:
    """Samples per second over ``steps`` calls of ``step`` after ``warmup`` untimed ones."""
    for _ in range(warmup):
        step(next(batches))
    start = time.perf_counter()
    for _ in range(steps):
        step(next(batches))
    return steps * size / (time.perf_counter() - start)


def _model_step(
    model: nn.Module, optimizer: torch.optim.Optimizer, precision: Precision
) -> Callable[[torch.Tensor, torch.Tensor], None]:
    def step(crops: torch.Tensor, labels: torch.Tensor) -> None:
        with mixed_precision(precision, CPU):
            logits, _ = model(crops)
            loss = F.cross_entropy(logits.float(), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def _book_sgd(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.99)


def measure(task: ClassificationTask, scans: dict[str, Path], args: argparse.Namespace) -> dict:
    size, workers = args.batch_size, args.num_workers
    samples = task.train_samples(1)

    def loader(dataset: Dataset[Any]) -> Iterator[Any]:
        return iter(DataLoader(dataset, batch_size=size, num_workers=workers))

    torch.manual_seed(0)
    model = task.build_model()
    optimizer = task.make_optimizer(model.parameters())

    def ours_step(batch: Any) -> None:
        with mixed_precision("auto", CPU):
            out = task.train_step(model, batch, torch.Generator().manual_seed(0), CPU)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        optimizer.step()

    rates = {"ours": _rate(loader(samples), ours_step, args.steps, 3, size)}

    def data_step(batch: Any) -> None:
        crops, _, _ = batch
        task.augmentation(to_model_input(crops, CPU), torch.Generator().manual_seed(0))

    rates["data"] = _rate(loader(samples), data_step, 2 * args.steps, 3, size)

    random_crops = torch.randn(size, 1, *CLASSIFIER_CROP_IRC) * 400
    random_crops = random_crops.contiguous(memory_format=torch.channels_last_3d)
    random_labels = torch.arange(size) % 2
    alone = task.build_model()
    model_step = _model_step(alone, task.make_optimizer(alone.parameters()), "auto")
    rates["model"] = _rate(
        itertools.repeat(None),
        lambda _: model_step(random_crops, random_labels),
        args.steps,
        3,
        size,
    )

    book = BookStyleCrops(scans, task.candidates.train, samples.order, task.settings.augment)
    book_model = LunaModel()  # contiguous, fp32, SGD: as the book trains it
    book_model_step = _model_step(book_model, _book_sgd(book_model), "fp32")
    rates["book"] = _rate(loader(book), lambda b: book_model_step(*b), args.baseline_steps, 1, size)
    cl_model = task.build_model()
    cl_model_step = _model_step(cl_model, _book_sgd(cl_model), "fp32")

    def book_cl_step(batch: Any) -> None:
        crops, labels = batch
        cl_model_step(crops.contiguous(memory_format=torch.channels_last_3d), labels)

    rates["book+cl"] = _rate(loader(book), book_cl_step, args.baseline_steps * 2, 1, size)
    return rates


def report(rates: dict[str, float], args: argparse.Namespace, n_scans: int) -> None:
    print(
        f"\nclassifier training on CPU ({torch.get_num_threads()} threads), batch "
        f"{args.batch_size}, {args.num_workers} DataLoader workers, {n_scans} scans, "
        f"bfloat16 autocast {'on' if has_native_bf16(CPU) else 'off (no hardware bf16)'}"
    )
    rows = [
        ("ours: engine train step", rates["ours"]),
        ("book: per-sample read_ct + grid_sample", rates["book"]),
        ("book data + our channels-last fp32 model", rates["book+cl"]),
    ]
    print(f"{'pipeline':<42}{'samples/s':>11}{'ours is':>10}")
    for name, rate in rows:
        print(f"{name:<42}{rate:>11.1f}{rates['ours'] / rate:>9.1f}x")
    print()
    print(f"{'half of our step':<42}{'samples/s':>11}{'vs model':>10}")
    print(f"{'data pipeline alone (load + augment)':<42}{rates['data']:>11.1f}", end="")
    print(f"{rates['data'] / rates['model']:>9.1f}x")
    print(f"{'model alone (forward + backward + step)':<42}{rates['model']:>11.1f}{'1.0x':>10}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data-root", type=Path, default=None)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/lungcad-bench-classify"))
    parser.add_argument("--scans", type=int, default=6)
    # LUNA16 scans are 512 x 512 in plane: what the book's per-worker CT reload really costs.
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--num-workers", type=int, default=0)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--baseline-steps", type=int, default=3)
    args = parser.parse_args()

    data_root = args.data_root
    if data_root is None:
        from lungcad.data.synth import write_dataset

        data_root = args.workdir / f"synth-{args.scans}x{args.size}"
        if not (data_root / "candidates.csv").exists():
            shutil.rmtree(data_root, ignore_errors=True)
            write_dataset(data_root, scans=args.scans, seed=99, size=args.size)
    scans = discover_scans(data_root)
    cache_dir = default_cache_dir(data_root)
    prepare_cache(scans, VolumeCache(cache_dir))
    settings = ClassifySettings(
        data_root=data_root,
        cache_dir=cache_dir,
        epoch_samples=args.batch_size * (2 * args.steps + 8),  # enough for every measurement
        val_stride=len(scans),
    )
    task = ClassificationTask(settings)
    report(measure(task, scans, args), args, len(scans))


if __name__ == "__main__":
    main()
