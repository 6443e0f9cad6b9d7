"""A toy task for the engine tests, and the script ``torchrun`` runs for the multi-process test.

    torchrun --nproc-per-node 2 tests/training/engine_worker.py OUT_DIR [SAMPLES]

Each rank trains the toy task and writes ``OUT_DIR/rank<r>.sha256``, the hash of its final
weights: data parallel training must leave every rank with the same weights. An odd
SAMPLES checks that ranks still take the same number of steps (else they deadlock).
"""

from __future__ import annotations

import hashlib
import os
import signal
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from lungcad.models import ClassifierConfig
from lungcad.training.engine import EngineOptions, train
from lungcad.training.task import Records, StepOutput, TrainingTask

SAMPLES = 48
FEATURES = 4
# Per-epoch value of the toy "score" metric: epoch 2 is the best.
SCORES = {1: 0.2, 2: 0.9, 3: 0.5, 4: 0.4}


class ToyTask(TrainingTask):
    """A 2-layer MLP on points labelled by a hyperplane, with generator-drawn input noise.

    ``interrupt_after`` sends this process a SIGINT (a Ctrl-C) after that many train steps.
    """

    best_metric = "val/score"
    best_mode = "max"

    def __init__(
        self, seed: int = 0, interrupt_after: int | None = None, samples: int = SAMPLES
    ) -> None:
        data = torch.Generator().manual_seed(1234)
        self.points = torch.randn(samples, FEATURES, generator=data)
        self.labels = (self.points @ torch.tensor([1.0, -2.0, 0.5, 1.0]) > 0).long()
        self.seed = seed
        self.interrupt_after = interrupt_after
        self.steps_run = 0
        self.epoch = 0
        # Learnt state, as hard-negative mining keeps: the next epoch's order depends on it,
        # so resume is exact only if the engine saves and restores it.
        self.loss_total = torch.zeros((), dtype=torch.float64)

    @property
    def model_config(self) -> ClassifierConfig:
        return ClassifierConfig()

    def build_model(self) -> nn.Module:
        self.model = nn.Sequential(nn.Linear(FEATURES, 8), nn.ReLU(), nn.Linear(8, 2))
        return self.model  # kept so a test can read the final weights of every rank

    def make_optimizer(self, parameters: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
        return torch.optim.SGD(parameters, lr=0.1, momentum=0.9)

    def train_samples(self, epoch: int) -> Dataset[Any]:
        self.epoch = epoch
        shuffle_seed = self.seed + epoch + int(self.loss_total * 1000)
        order = torch.randperm(
            len(self.points), generator=torch.Generator().manual_seed(shuffle_seed)
        )
        return TensorDataset(self.points[order], self.labels[order])

    def after_train_epoch(self, records: Records) -> None:
        self.loss_total = self.loss_total + records["loss"].double().sum()

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"loss_total": self.loss_total.clone()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.loss_total = state["loss_total"].clone()

    def validation_samples(self) -> Dataset[Any]:
        return TensorDataset(self.points, self.labels)

    def train_step(
        self, model: nn.Module, batch: Any, generator: torch.Generator, device: torch.device
    ) -> StepOutput:
        points, labels = batch
        noise = torch.randn(points.shape, generator=generator, device=device)
        loss = F.cross_entropy(model(points + 0.1 * noise), labels, reduction="none")
        self.steps_run += 1
        if self.steps_run == self.interrupt_after:
            os.kill(os.getpid(), signal.SIGINT)
        return StepOutput(loss.mean(), {"loss": loss.detach()})

    def eval_step(self, model: nn.Module, batch: Any, device: torch.device) -> Records:
        points, labels = batch
        return {"loss": F.cross_entropy(model(points), labels, reduction="none")}

    def metrics(self, records: Records) -> dict[str, float]:
        return {"loss": float(records["loss"].mean()), "score": SCORES[self.epoch]}

    def data_fingerprint(self) -> str:
        return hashlib.sha256(self.points.numpy().tobytes()).hexdigest()


def weights_hash(state: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(state):
        digest.update(name.encode() + state[name].detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def main(out_dir: Path, samples: int) -> None:
    task = ToyTask(samples=samples)
    options = EngineOptions(out_dir=out_dir / "run", epochs=2, batch_size=4, tensorboard=False)
    train(task, options)
    rank = os.environ.get("RANK", "0")
    (out_dir / f"rank{rank}.sha256").write_text(weights_hash(task.model.state_dict()))


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else SAMPLES)
