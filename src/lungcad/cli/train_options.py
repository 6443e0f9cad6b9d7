"""Options every ``lungcad train ...`` command shares, defined once.

Each trainer declares e.g. ``epochs: Epochs = 10`` so defaults stay per model while names,
help texts and checks stay identical.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from lungcad.data.cache import default_cache_dir
from lungcad.precision import Precision
from lungcad.training.engine import EngineOptions, TrainingResult
from lungcad.training.optimizer import OptimizerName, ScheduleName

DataRoot = Annotated[
    Path, typer.Argument(help="LUNA16-layout root: subset*/<uid>.mhd + CSV tables.")
]
RunDir = Annotated[Path, typer.Option("--out", help="Run folder: best.pt, last.pt, metrics.jsonl.")]
CacheDir = Annotated[
    Path | None,
    typer.Option(
        "--cache", help="Volume cache (default: DATA_ROOT/.lungcad-cache or $LUNGCAD_CACHE)."
    ),
]
Epochs = Annotated[int, typer.Option("--epochs", min=1, help="Training epochs.")]
EpochSamples = Annotated[
    int | None,
    typer.Option(
        "--epoch-samples", min=1, help="Samples per training epoch (default: from the data)."
    ),
]
BatchSize = Annotated[
    int, typer.Option("--batch-size", min=1, help="Samples per step (per process).")
]
NumWorkers = Annotated[
    int, typer.Option("--num-workers", min=0, help="DataLoader worker processes.")
]
LearningRate = Annotated[float, typer.Option("--lr", min=0.0, help="Learning rate.")]
OptimizerChoice = Annotated[OptimizerName, typer.Option("--optimizer", help="sgd or adam.")]
Momentum = Annotated[
    float, typer.Option("--momentum", min=0.0, max=1.0, help="SGD momentum (ignored by adam).")
]
LrSchedule = Annotated[
    ScheduleName,
    typer.Option("--lr-schedule", help="constant, or cosine decay to 0 over all epochs."),
]
PrecisionChoice = Annotated[
    Precision,
    typer.Option(
        "--precision",
        help="auto: bfloat16 autocast where the CPU/GPU has it in hardware, else fp32.",
    ),
]
Seed = Annotated[int, typer.Option("--seed", help="Same seed, same weights.")]
Device = Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N.")]
Resume = Annotated[bool, typer.Option("--resume", help="Continue from RUN_DIR/last.pt.")]
ValStride = Annotated[
    int, typer.Option("--val-stride", min=2, help="Every Nth series (sorted by UID) validates.")
]
NoTensorboard = Annotated[bool, typer.Option("--no-tensorboard", help="Write metrics.jsonl only.")]


def resolve_cache(data_root: Path, cache: Path | None) -> Path:
    return cache if cache is not None else default_cache_dir(data_root)


def engine_options(
    *,
    out: Path,
    epochs: int,
    batch_size: int,
    num_workers: int,
    seed: int,
    device: str,
    resume: bool,
    no_tensorboard: bool,
    lr_schedule: ScheduleName = "constant",
    precision: Precision = "auto",
) -> EngineOptions:
    return EngineOptions(
        out_dir=out,
        epochs=epochs,
        batch_size=batch_size,
        num_workers=num_workers,
        seed=seed,
        device=device,
        resume=resume,
        tensorboard=not no_tensorboard,
        command_line=tuple(sys.argv),
        lr_schedule=lr_schedule,
        precision=precision,
    )


def report(result: TrainingResult, out: Path) -> None:
    """The closing summary line of every trainer."""
    status = "interrupted" if result.interrupted else "done"
    typer.echo(
        f"{status}: {result.epochs_done} epochs, {result.samples_seen:,} samples in "
        f"{result.seconds:.0f} s; best {result.best_metric}={result.best_value:.4f}; "
        f"checkpoints in {out}"
    )
    if result.interrupted:
        raise typer.Exit(130)
