"""``lungcad train classify``: train the nodule / non-nodule candidate classifier."""

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

BalanceRatio = Annotated[
    int,
    typer.Option(
        "--balance-ratio",
        min=0,
        help="Negatives per positive in training epochs (0: no balancing, the natural mix).",
    ),
]
HardNegatives = Annotated[
    float,
    typer.Option(
        "--hard-negatives",
        min=0.0,
        max=1.0,
        help="Share of negative draws weighted by the p_nodule the model last gave each "
        "negative (the rest walk through all negatives in turn); 0: uniform, as the book.",
    ),
]
TrainOnExcluded = Annotated[
    bool,
    typer.Option(
        "--train-on-excluded",
        help="Train on candidates at excluded findings as negatives, as the book does "
        "(default: leave them out; the LUNA16 evaluation ignores marks there).",
    ),
]
NoAugment = Annotated[bool, typer.Option("--no-augment", help="Switch every augmentation off.")]
NoFlip = Annotated[bool, typer.Option("--no-flip", help="No random mirroring.")]
NoOffset = Annotated[bool, typer.Option("--no-offset", help="No random shift.")]
NoScale = Annotated[bool, typer.Option("--no-scale", help="No random scaling.")]
NoRotate = Annotated[bool, typer.Option("--no-rotate", help="No rotation about head-foot axis.")]
NoNoise = Annotated[bool, typer.Option("--no-noise", help="No added Gaussian noise.")]
Offset = Annotated[
    float, typer.Option("--offset", min=0.0, max=1.0, help="Largest shift, fraction of size.")
]
Scale = Annotated[
    float, typer.Option("--scale", min=0.0, max=0.9, help="Scale factor range 1 +- this.")
]
NoiseHu = Annotated[float, typer.Option("--noise-hu", min=0.0, help="Noise std in HU.")]


def classify(
    data_root: DataRoot,
    out: RunDir,
    cache: CacheDir = None,
    epochs: Epochs = 24,
    epoch_samples: EpochSamples = None,
    batch_size: BatchSize = 32,
    num_workers: NumWorkers = 0,
    optimizer: OptimizerChoice = "adam",
    lr: LearningRate = 1e-3,
    momentum: Momentum = 0.99,
    lr_schedule: LrSchedule = "cosine",
    balance_ratio: BalanceRatio = 1,
    hard_negatives: HardNegatives = 0.5,
    train_on_excluded: TrainOnExcluded = False,
    val_stride: ValStride = 10,
    no_augment: NoAugment = False,
    no_flip: NoFlip = False,
    no_offset: NoOffset = False,
    no_scale: NoScale = False,
    no_rotate: NoRotate = False,
    no_noise: NoNoise = False,
    offset: Offset = 0.05,
    scale: Scale = 0.2,
    noise_hu: NoiseHu = 25.0,
    seed: Seed = 0,
    device: Device = "auto",
    resume: Resume = False,
    precision: PrecisionChoice = "auto",
    no_tensorboard: NoTensorboard = False,
) -> None:
    """Train the nodule classifier (the book's LunaModel) on candidate crops.

    Writes RUN_DIR/best.pt (by validation F1), last.pt and metrics.jsonl (+ TensorBoard).
    Crops come from the volume cache (`lungcad prepare DATA_ROOT` first); augmentation runs
    batched on the training device.
    """
    from lungcad.training.augment import ClassifierAugmentSettings
    from lungcad.training.classify import ClassificationTask, ClassifySettings
    from lungcad.training.engine import train
    from lungcad.training.optimizer import OptimizerSettings

    augment = ClassifierAugmentSettings(
        flip=not (no_augment or no_flip),
        offset=0.0 if no_augment or no_offset else offset,
        scale=0.0 if no_augment or no_scale else scale,
        rotate=not (no_augment or no_rotate),
        noise_hu=0.0 if no_augment or no_noise else noise_hu,
    )
    settings = ClassifySettings(
        data_root=data_root,
        cache_dir=resolve_cache(data_root, cache),
        epoch_samples=epoch_samples,
        balance_ratio=balance_ratio,
        hard_negatives=hard_negatives,
        train_on_excluded=train_on_excluded,
        optimizer=OptimizerSettings(optimizer, lr, momentum),
        val_stride=val_stride,
        seed=seed,
        augment=augment,
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
    report(train(ClassificationTask(settings), options), out)
