"""What a model brings to the shared training engine.

The engine owns the loop (devices, seeds, progress, validation, checkpoints, resume,
Ctrl-C, torchrun); a task owns what differs between models: its samples, how a batch is
augmented and scored, and which metrics it reports.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from lungcad.models.checkpoint import ModelConfig, build_model

# Per-sample values of one batch (or of a whole epoch once concatenated), e.g.
# {"loss": (N,), "label": (N,), "prob": (N,)}. Every tensor has the batch as its first axis.
Records = dict[str, torch.Tensor]


@dataclass
class StepOutput:
    """A training step's mean loss (for backward) and its per-sample records (detached)."""

    loss: torch.Tensor
    records: Records


class TrainingTask(ABC):
    """One model's training recipe. Subclasses are complete after construction."""

    #: metric that selects ``best.pt`` and whether larger is better
    best_metric: str = "val/loss"
    best_mode: str = "min"

    @property
    @abstractmethod
    def model_config(self) -> ModelConfig:
        """Saved in every checkpoint so the file alone rebuilds the model."""

    def build_model(self) -> nn.Module:
        """A fresh model; tasks that fine-tune override this to load weights."""
        return build_model(self.model_config.kind, self.model_config)

    def trainable_parameters(self, model: nn.Module) -> Iterable[nn.Parameter]:
        return model.parameters()

    @abstractmethod
    def make_optimizer(self, parameters: Iterable[nn.Parameter]) -> torch.optim.Optimizer: ...

    @abstractmethod
    def train_samples(self, epoch: int) -> Dataset[Any]:
        """The samples of training epoch ``epoch`` (1-based), in order.

        Must be a pure function of (seed, epoch, ``state_dict()``): resume and multi-process
        sharding rely on every rank and every restart seeing the same list.
        """

    def after_train_epoch(self, records: Records) -> None:
        """Learn from a finished epoch's training records (every rank's, on every rank), e.g.
        which samples are hard; whatever changes must live in ``state_dict``."""
        return None

    def state_dict(self) -> dict[str, torch.Tensor]:
        """What the task has learnt during training; saved in checkpoints for exact resume."""
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore ``state_dict()`` from a checkpoint (an empty dict: keep the fresh state)."""
        return None

    @abstractmethod
    def validation_samples(self) -> Dataset[Any]: ...

    @abstractmethod
    def train_step(
        self, model: nn.Module, batch: Any, generator: torch.Generator, device: torch.device
    ) -> StepOutput:
        """Augment on ``device`` (drawing randomness only from ``generator``), forward, loss."""

    @abstractmethod
    def eval_step(self, model: nn.Module, batch: Any, device: torch.device) -> Records:
        """Forward without augmentation; per-sample records for the metrics."""

    @abstractmethod
    def metrics(self, records: Records) -> dict[str, float]:
        """Epoch metrics from the concatenated records of all ranks (keys without prefix)."""

    @abstractmethod
    def data_fingerprint(self) -> str:
        """Identifies the data a checkpoint was trained on (tables, split, cache format)."""

    def after_validation(
        self, model: nn.Module, records: Records, epoch: int, run_dir: Path, writer: Any | None
    ) -> None:
        """Optional extras on rank 0 after validation (images, PR curves, histograms)."""
        return None
