"""Optimizer choice and learning-rate schedule, shared by every trainer.

The schedule is a pure function of how far training has got (a fraction of all planned
steps), not an object with state: resuming from any checkpoint lands on the same learning
rate without saving anything extra.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from lungcad.errors import LungcadError

OptimizerName = Literal["sgd", "adam"]
ScheduleName = Literal["constant", "cosine"]
OPTIMIZERS: tuple[OptimizerName, ...] = ("sgd", "adam")
SCHEDULES: tuple[ScheduleName, ...] = ("constant", "cosine")


@dataclass(frozen=True)
class OptimizerSettings:
    """``momentum`` applies to SGD only; Adam keeps PyTorch's betas."""

    name: OptimizerName = "adam"
    lr: float = 1e-3
    momentum: float = 0.99

    def __post_init__(self) -> None:
        if self.name not in OPTIMIZERS:
            raise LungcadError(f"--optimizer {self.name}: must be one of {', '.join(OPTIMIZERS)}")
        if self.lr <= 0:
            raise LungcadError(f"--lr {self.lr}: must be positive")

    def build(self, parameters: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
        if self.name == "sgd":
            return torch.optim.SGD(parameters, lr=self.lr, momentum=self.momentum)
        return torch.optim.Adam(parameters, lr=self.lr)


def schedule_factor(schedule: ScheduleName, progress: float) -> float:
    """Multiplier of the base learning rate after ``progress`` (0..1) of all training steps.

    Cosine decays from 1 to 0 over the run: the last, small steps settle the weights, which
    is worth more on short CPU budgets than a constant rate that keeps them jittering.
    """
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(max(progress, 0.0), 1.0)))
    raise LungcadError(f"--lr-schedule {schedule}: must be one of {', '.join(SCHEDULES)}")
