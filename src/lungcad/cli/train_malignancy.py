"""``lungcad train malignancy``: fine-tune the nodule classifier to benign vs malignant."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from lungcad.cli.train_options import (
    BatchSize,
    CacheDir,
    DataRoot,
    Device,
    Epochs,
    EpochSamples,
    LearningRate,
    LrSchedule,
    Momentum,
    NoTensorboard,
    NumWorkers,
    OptimizerChoice,
    PrecisionChoice,
    Resume,
    RunDir,
    Seed,
    ValStride,
    engine_options,
    report,
    resolve_cache,
)

Finetune = Annotated[
    Path, typer.Option("--finetune", help="Nodule classifier checkpoint to start from.")
]
FinetuneDepth = Annotated[
    int,
    typer.Option(
        "--finetune-depth",
        min=1,
        max=6,
        help="Trainable from the top: 1 = head only, 2 = head + block4, ...",
    ),
]
NoAugment = Annotated[bool, typer.Option("--no-augment", help="Switch every augmentation off.")]


def malignancy(
    data_root: DataRoot,
    out: RunDir,
    finetune: Finetune,
    finetune_depth: FinetuneDepth = 2,
    cache: CacheDir = None,
    epochs: Epochs = 10,
    epoch_samples: EpochSamples = None,
    batch_size: BatchSize = 32,
    num_workers: NumWorkers = 0,
    optimizer: OptimizerChoice = "adam",
    lr: LearningRate = 1e-3,
    momentum: Momentum = 0.99,
    lr_schedule: LrSchedule = "cosine",
    val_stride: ValStride = 10,
    no_augment: NoAugment = False,
    seed: Seed = 0,
    device: Device = "auto",
    resume: Resume = False,
    precision: PrecisionChoice = "auto",
    no_tensorboard: NoTensorboard = False,
) -> None:
    """Fine-tune the classifier into the malignancy model (labels: mal_bool).

    best.pt is chosen by validation ROC AUC; metrics.jsonl also carries the AUC of the
    "larger diameter is more malignant" baseline on the same nodules; RUN_DIR/roc.png plots
    both.
    """
    from lungcad.training.augment import AugmentSettings
    from lungcad.training.engine import train
    from lungcad.training.malignancy import MalignancySettings, MalignancyTask
    from lungcad.training.optimizer import OptimizerSettings

    settings = MalignancySettings(
        data_root=data_root,
        cache_dir=resolve_cache(data_root, cache),
        finetune=finetune,
        finetune_depth=finetune_depth,
        epoch_samples=epoch_samples,
        optimizer=OptimizerSettings(optimizer, lr, momentum),
        val_stride=val_stride,
        seed=seed,
        augment=AugmentSettings.none() if no_augment else AugmentSettings(),
    )
    options = engine_options(
        out=out,
        epochs=epochs,
        batch_size=batch_size,
        num_workers=num_workers,
        seed=seed,
        device=device,
        resume=resume,
        no_tensorboard=no_tensorboard,
        lr_schedule=lr_schedule,
        precision=precision,
    )
    report(train(MalignancyTask(settings), options), out)
