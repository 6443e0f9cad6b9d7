"""``lungcad train segment``: train the 2D nodule segmentation U-Net."""

from __future__ import annotations

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
    NoTensorboard,
    NumWorkers,
    PrecisionChoice,
    Resume,
    RunDir,
    Seed,
    ValStride,
    engine_options,
    report,
    resolve_cache,
)
from lungcad.training.segment import BestBy, ValSlices

FnWeight = Annotated[
    float,
    typer.Option("--fn-weight", min=0.0, help="Weight of the Dice term over nodule pixels only."),
]
Background = Annotated[
    float,
    typer.Option(
        "--background",
        min=0.0,
        max=0.95,
        help="Share of training crops taken anywhere in a slice, not around a nodule "
        "(0: the book's nodule-only crops).",
    ),
]
BestByOption = Annotated[
    BestBy,
    typer.Option(
        "--best-by",
        help="Validation pixel metric that picks best.pt: recall (the book's; favours a "
        "model that flags too much) or f1.",
    ),
]
ValSlicesOption = Annotated[
    ValSlices,
    typer.Option(
        "--val-slices",
        help="Validate on all slices (counts false positives) or only slices with nodules.",
    ),
]
NoAugment = Annotated[
    bool,
    typer.Option("--no-augment", help="Train without flips, shifts, scaling, rotation and noise."),
]
ImageSeries = Annotated[
    int,
    typer.Option(
        "--image-series", min=0, help="Validation series drawn as overlay images each epoch."
    ),
]


def segment(
    data_root: DataRoot,
    out: RunDir,
    cache: CacheDir = None,
    epochs: Epochs = 6,
    epoch_samples: EpochSamples = None,
    batch_size: BatchSize = 16,
    num_workers: NumWorkers = 0,
    lr: LearningRate = 1e-3,
    lr_schedule: LrSchedule = "constant",
    fn_weight: FnWeight = 8.0,
    background: Background = 0.25,
    val_stride: ValStride = 10,
    val_slices: ValSlicesOption = "all",
    image_series: ImageSeries = 4,
    best_by: BestByOption = "recall",
    no_augment: NoAugment = False,
    seed: Seed = 0,
    device: Device = "auto",
    resume: Resume = False,
    precision: PrecisionChoice = "auto",
    no_tensorboard: NoTensorboard = False,
) -> None:
    """Train the segmentation U-Net on nodule masks grown from the annotations.

    best.pt is chosen by validation pixel recall (or --best-by f1); RUN_DIR/images/ holds
    overlays of validation slices (green true positive, red false positive, orange false
    negative); RUN_DIR/nodule_recall.json says which validation nodules best.pt finds.
    """
    from lungcad.training.augment import SegmentationAugmentSettings
    from lungcad.training.distributed import is_main_process, select_device
    from lungcad.training.engine import BEST_CHECKPOINT, train
    from lungcad.training.segment import (
        SegmentationSettings,
        SegmentationTask,
        validation_nodule_report,
    )

    settings = SegmentationSettings(
        data_root=data_root,
        cache_dir=resolve_cache(data_root, cache),
        epoch_samples=epoch_samples,
        lr=lr,
        fn_weight=fn_weight,
        background=background,
        val_stride=val_stride,
        val_slices=val_slices,
        image_series=image_series,
        best_by=best_by,
        seed=seed,
        augment=SegmentationAugmentSettings.none() if no_augment else SegmentationAugmentSettings(),
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
    task = SegmentationTask(settings)
    result = train(task, options)
    if not result.interrupted and is_main_process() and (out / BEST_CHECKPOINT).exists():
        found = validation_nodule_report(task, out / BEST_CHECKPOINT, select_device(device))
        typer.echo(
            f"validation nodules >= 4 mm overlapping a predicted component: {found.found}/"
            f"{found.total} ({found.rate:.1%}); pixel recall {found.pixel_recall:.4f}; "
            f"{found.predicted_voxels:,} voxels flagged -> {out / 'nodule_recall.json'}"
        )
    report(result, out)
