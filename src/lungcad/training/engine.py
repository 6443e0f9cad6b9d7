"""The one training loop behind ``lungcad train classify|segment|malignancy``.

Determinism: every random draw of an epoch is a pure function of (seed, epoch, step, rank):
the task's sample list is seeded by (seed, epoch) and augmentation draws from a generator
seeded per step. So a run resumed from any checkpoint, even one written mid-epoch by
Ctrl-C, ends with the same weights as an uninterrupted run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from lungcad.atomic import atomic_write_text
from lungcad.errors import LungcadError
from lungcad.models.checkpoint import load_checkpoint, save_checkpoint
from lungcad.precision import Precision, mixed_precision
from lungcad.progress import make_progress
from lungcad.training.distributed import (
    DistributedContext,
    init_distributed,
    select_device,
    shutdown_distributed,
)
from lungcad.training.optimizer import ScheduleName, schedule_factor
from lungcad.training.task import Records, TrainingTask

log = logging.getLogger(__name__)

LAST_CHECKPOINT = "last.pt"
BEST_CHECKPOINT = "best.pt"
METRICS_FILE = "metrics.jsonl"


@dataclass(frozen=True)
class EngineOptions:
    """How to run, as opposed to what to train (that is the task)."""

    out_dir: Path
    epochs: int
    batch_size: int
    num_workers: int = 0
    seed: int = 0
    device: str = "auto"
    resume: bool = False
    tensorboard: bool = True
    command_line: tuple[str, ...] = field(default_factory=lambda: tuple(sys.argv))
    lr_schedule: ScheduleName = "constant"
    precision: Precision = "fp32"


@dataclass(frozen=True)
class TrainingResult:
    epochs_done: int
    samples_seen: int
    best_metric: str
    best_value: float
    last_metrics: dict[str, float]
    seconds: float
    interrupted: bool


class _StopFlag:
    """First Ctrl-C asks the loop to stop after the current step; a second one aborts."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None

    def __enter__(self) -> _StopFlag:
        self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        signal.signal(signal.SIGINT, self._previous)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        log.warning("interrupt: finishing this step and writing a checkpoint (Ctrl-C again aborts)")


def step_seed(seed: int, epoch: int, step: int, rank: int) -> int:
    """A well-mixed 63-bit seed for one step's augmentation."""
    digest = hashlib.blake2b(f"{seed}/{epoch}/{step}/{rank}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def _detached(records: Records) -> Records:
    """On the CPU, and bfloat16 (from autocast) widened so metrics see float32 as usual."""
    return {
        k: (v.float() if v.dtype == torch.bfloat16 else v).detach().cpu()
        for k, v in records.items()
    }


def _concat(records: list[Records]) -> Records:
    if not records:
        return {}
    return {key: torch.cat([r[key] for r in records]) for key in records[0]}


def _gather(ctx: DistributedContext, records: list[Records]) -> Records:
    return _concat([r for part in ctx.all_gather(records) for r in part])


def _batches_per_rank(dataset_len: int, batch_size: int, ctx: DistributedContext) -> int:
    return math.ceil(len(range(ctx.rank, dataset_len, ctx.world_size)) / batch_size)


def _loader(dataset: Dataset[Any], options: EngineOptions, device: torch.device) -> DataLoader[Any]:
    return DataLoader(
        dataset,
        batch_size=options.batch_size,
        shuffle=False,
        num_workers=options.num_workers,
        pin_memory=device.type == "cuda",
        persistent_workers=False,
    )


def _open_tensorboard(options: EngineOptions, ctx: DistributedContext) -> Any | None:
    if not (options.tensorboard and ctx.is_main):
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        log.info("tensorboard is not installed; metrics go to %s only", METRICS_FILE)
        return None
    return SummaryWriter(log_dir=str(options.out_dir / "tensorboard"))


def _is_better(value: float, best: float | None, mode: str) -> bool:
    if math.isnan(value):
        return False
    if best is None:
        return True
    return value > best if mode == "max" else value < best


def evaluate(
    task: TrainingTask,
    model: nn.Module,
    dataset: Dataset[Any],
    options: EngineOptions,
    device: torch.device,
    ctx: DistributedContext,
) -> Records:
    """Per-sample validation records of all ranks, model in eval mode, no gradients."""
    indices = ctx.shard(list(range(len(dataset))))  # type: ignore[arg-type]
    model.eval()
    records = []
    with torch.inference_mode():
        for batch in _loader(Subset(dataset, indices), options, device):
            with mixed_precision(options.precision, device):
                batch_records = task.eval_step(model, batch, device)
            records.append(_detached(batch_records))
    return _gather(ctx, records)


def train(task: TrainingTask, options: EngineOptions) -> TrainingResult:
    """Train ``task`` for ``options.epochs`` epochs; resumable, interruptible, multi-process."""
    device = select_device(options.device)
    ctx = init_distributed(device.type)
    if ctx.enabled and options.device == "auto":
        device = select_device("auto", ctx.local_rank)
    try:
        return _train(task, options, device, ctx)
    finally:
        shutdown_distributed()


def _train(
    task: TrainingTask, options: EngineOptions, device: torch.device, ctx: DistributedContext
) -> TrainingResult:
    torch.manual_seed(options.seed)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
    options.out_dir.mkdir(parents=True, exist_ok=True)
    model = task.build_model().to(device)
    optimizer = task.make_optimizer(task.trainable_parameters(model))
    base_lrs = [group["lr"] for group in optimizer.param_groups]
    fingerprint = task.data_fingerprint()

    start_epoch, start_step, samples_seen = 1, 0, 0
    best_value: float | None = None
    partial_records: list[Records] = []
    last_path = options.out_dir / LAST_CHECKPOINT
    if options.resume:
        if not last_path.exists():
            raise LungcadError(f"{last_path}: nothing to resume (no checkpoint in the run folder)")
        state = load_checkpoint(last_path)
        if state["data_fingerprint"] != fingerprint:
            raise LungcadError(
                f"{last_path}: trained on other data (fingerprint "
                f"{state['data_fingerprint'][:12]}, now {fingerprint[:12]}); use a new run folder"
            )
        model.load_state_dict(state["model_state"])
        optimizer.load_state_dict(state["optimizer_state"])
        extra = state["extra"]
        # ``epoch`` counts completed epochs; ``step_in_epoch`` the steps done of the next one.
        start_epoch, start_step = int(state["epoch"]) + 1, int(extra["step_in_epoch"])
        samples_seen = int(state["samples_seen"])
        best_value = extra.get("best_value")
        task.load_state_dict(extra.get("task_state", {}))
        # The saved records are every rank's; rank 0 alone carries them into the epoch's metrics.
        partial = extra.get("partial_records")
        partial_records = [partial] if partial and ctx.is_main else []
        log.info("resuming %s at epoch %d step %d", last_path, start_epoch, start_step)

    train_model: nn.Module = model
    if ctx.enabled:
        train_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    writer = _open_tensorboard(options, ctx)
    validation = task.validation_samples()
    started = time.perf_counter()
    metrics: dict[str, float] = {}
    interrupted = False
    epochs_done = start_epoch - 1

    def checkpoint(path: Path, epoch_done: int, step_in_epoch: int, records: list[Records]) -> None:
        extra = {
            "step_in_epoch": step_in_epoch,
            "best_value": best_value,
            "best_metric": task.best_metric,
            "seed": options.seed,
            "partial_records": _concat(records) if step_in_epoch else {},
            "task_state": task.state_dict(),
        }
        save_checkpoint(
            path,
            model=model,
            config=task.model_config,
            optimizer=optimizer,
            epoch=epoch_done,
            samples_seen=samples_seen,
            metrics=metrics,
            command_line=list(options.command_line),
            data_fingerprint=fingerprint,
            extra=extra,
        )

    with _StopFlag() as stop, make_progress() as progress:
        for epoch in range(start_epoch, options.epochs + 1):
            samples = task.train_samples(epoch)
            # Every step is a collective, so all ranks must take as many: drop the remainder.
            usable = len(samples) - len(samples) % ctx.world_size  # type: ignore[arg-type]
            indices = ctx.shard(list(range(usable)))
            skip = start_step if epoch == start_epoch else 0
            steps = _batches_per_rank(usable, options.batch_size, ctx)
            todo = Subset(samples, indices[skip * options.batch_size :])
            bar = progress.add_task(f"epoch {epoch}/{options.epochs}", total=steps, completed=skip)
            records = partial_records if skip else []
            train_model.train()
            step = skip
            for step, batch in enumerate(_loader(todo, options, device), start=skip + 1):
                generator = torch.Generator(device=device)
                generator.manual_seed(step_seed(options.seed, epoch, step, ctx.rank))
                done = ((epoch - 1) * steps + step - 1) / (options.epochs * steps)
                for group, base_lr in zip(optimizer.param_groups, base_lrs, strict=True):
                    group["lr"] = base_lr * schedule_factor(options.lr_schedule, done)
                with mixed_precision(options.precision, device):
                    out = task.train_step(train_model, batch, generator, device)
                optimizer.zero_grad(set_to_none=True)
                out.loss.backward()
                optimizer.step()
                records.append(_detached(out.records))
                samples_seen += len(next(iter(out.records.values()))) * ctx.world_size
                progress.advance(bar)
                if ctx.any(stop.requested) and step < steps:
                    interrupted = True
                    break
            if interrupted:
                gathered = _gather(ctx, records)  # a collective: every rank takes part
                if ctx.is_main:
                    checkpoint(last_path, epoch - 1, step, [gathered] if gathered else [])
                log.warning(
                    "stopped at epoch %d step %d/%d; resume with --resume", epoch, step, steps
                )
                break

            train_records = _gather(ctx, records)
            task.after_train_epoch(train_records)
            train_metrics = task.metrics(train_records)
            val_records = evaluate(task, model, validation, options, device, ctx)
            val_metrics = task.metrics(val_records)
            metrics = {f"train/{k}": v for k, v in train_metrics.items()}
            metrics.update({f"val/{k}": v for k, v in val_metrics.items()})
            epochs_done = epoch
            progress.remove_task(bar)
            if ctx.is_main:
                elapsed = time.perf_counter() - started
                line = {"epoch": epoch, "samples_seen": samples_seen, "seconds": round(elapsed, 2)}
                _append_metrics(options.out_dir / METRICS_FILE, {**line, **metrics})
                if writer is not None:
                    for key, value in metrics.items():
                        writer.add_scalar(key, value, samples_seen)
                task.after_validation(model, val_records, epoch, options.out_dir, writer)
                value = metrics.get(task.best_metric, float("nan"))
                improved = _is_better(value, best_value, task.best_mode)
                if improved:
                    best_value = value
                checkpoint(last_path, epoch, 0, [])
                if improved:
                    shutil.copyfile(last_path, options.out_dir / BEST_CHECKPOINT)
                log.info("epoch %d: %s", epoch, _format_metrics(metrics, task.best_metric))
            ctx.barrier()
            if ctx.any(stop.requested):
                interrupted = epoch < options.epochs
                break
    if writer is not None:
        writer.close()
    return TrainingResult(
        epochs_done=epochs_done,
        samples_seen=samples_seen,
        best_metric=task.best_metric,
        best_value=float("nan") if best_value is None else float(best_value),
        last_metrics=metrics,
        seconds=time.perf_counter() - started,
        interrupted=interrupted,
    )


def _append_metrics(path: Path, line: dict[str, Any]) -> None:
    existing = path.read_text() if path.exists() else ""
    atomic_write_text(path, existing + json.dumps(line) + "\n")


def _format_metrics(metrics: dict[str, float], highlight: str) -> str:
    keys = [k for k in metrics if k.startswith("val/")][:8]
    if highlight in metrics and highlight not in keys:
        keys.append(highlight)
    return " ".join(f"{k}={metrics[k]:.4f}" for k in keys)
