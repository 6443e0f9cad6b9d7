"""Training the malignancy model: the nodule classifier fine-tuned on benign vs malignant.

Samples are the annotated nodules of ``annotations_with_malignancy.csv`` (label
``mal_bool``), cropped like classifier candidates, in the same series split as every other
model. The network is the classifier's: its weights are loaded, the head is re-initialised
and only the head plus the last ``finetune_depth - 1`` convolution blocks train.

Batch norm: the only normalisation layer is the input ``tail_batchnorm``. When it lies in
the frozen part it is kept in eval mode throughout, so its running mean and variance stay
the ones the classifier learned; the frozen convolutions were trained on inputs normalised
by exactly those statistics, and a nodules-only batch would drag them away. (The book left
the whole model in train mode, so its frozen layers silently drifted.)
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lungcad.data.cache import VolumeCache
from lungcad.data.luna import (
    MALIGNANCY_CSV,
    CandidateInfo,
    dataset_split,
    read_malignancy_annotations,
    require_table,
)
from lungcad.errors import LungcadError
from lungcad.models.checkpoint import build_model, load_model_with_info
from lungcad.models.classifier import ClassifierConfig, init_like_book_
from lungcad.training.augment import AugmentSettings, CropAugmentation
from lungcad.training.classify import (
    CandidateCrops,
    balanced_order,
    score,
    to_model_input,
    training_fingerprint,
)
from lungcad.training.metrics import binary_metrics, roc_auc
from lungcad.training.optimizer import OptimizerSettings
from lungcad.training.task import Records, StepOutput, TrainingTask

log = logging.getLogger(__name__)

# Deepest first: depth 1 trains the head only, depth 2 also block4, and so on.
FINETUNE_ORDER = ("head_linear", "block4", "block3", "block2", "block1", "tail_batchnorm")
VIEWS_PER_NODULE = 20


@dataclass(frozen=True)
class MalignancySettings:
    """Defaults are those of ``lungcad train malignancy``."""

    data_root: Path
    cache_dir: Path
    finetune: Path
    finetune_depth: int = 1
    epoch_samples: int | None = None
    optimizer: OptimizerSettings = field(default_factory=OptimizerSettings)
    val_stride: int = 10
    seed: int = 0
    augment: AugmentSettings = field(default_factory=AugmentSettings)

    def __post_init__(self) -> None:
        if not 1 <= self.finetune_depth <= len(FINETUNE_ORDER):
            raise LungcadError(
                f"--finetune-depth {self.finetune_depth}: must be 1..{len(FINETUNE_ORDER)}"
            )


@dataclass(frozen=True)
class NoduleSplit:
    train: tuple[CandidateInfo, ...]
    validation: tuple[CandidateInfo, ...]
    table: Path


def load_nodules(data_root: Path, cache: VolumeCache, val_stride: int) -> NoduleSplit:
    """Annotated nodules with a malignancy label, of the cached series, split by series."""
    table = require_table(data_root, MALIGNANCY_CSV)
    split = dataset_split(data_root, val_stride)
    cached = set(cache.series_uids())
    nodules = [
        CandidateInfo(a.series_uid, a.center_xyz, True, a.diameter_mm, a.is_malignant, True)
        for a in read_malignancy_annotations(table)
        if a.series_uid in cached
    ]
    validation_series = set(split.validation)
    train = tuple(n for n in nodules if n.series_uid not in validation_series)
    validation = tuple(n for n in nodules if n.series_uid in validation_series)
    for side, items in (("training", train), ("validation", validation)):
        malignant = sum(bool(n.is_malignant) for n in items)
        if malignant == 0 or malignant == len(items):
            raise LungcadError(
                f"{table}: the cached {side} series hold {len(items)} nodules, {malignant} "
                "malignant; both classes are needed"
            )
    return NoduleSplit(train, validation, table)


def finetune_blocks(depth: int) -> tuple[str, ...]:
    return FINETUNE_ORDER[:depth]


class MalignancyTask(TrainingTask):
    """LunaModel fine-tuned to malignant vs benign; best checkpoint by validation ROC AUC."""

    best_metric = "val/auc"
    best_mode = "max"

    def __init__(self, settings: MalignancySettings) -> None:
        self.settings = settings
        self.cache = VolumeCache(settings.cache_dir)
        self.nodules = load_nodules(settings.data_root, self.cache, settings.val_stride)
        self.blocks = finetune_blocks(settings.finetune_depth)
        self.train_labels = np.array([bool(n.is_malignant) for n in self.nodules.train])
        self.epoch_samples = settings.epoch_samples or VIEWS_PER_NODULE * len(self.nodules.train)
        self.validation_diameters = torch.tensor([n.diameter_mm for n in self.nodules.validation])
        self.augmentation = CropAugmentation(settings.augment)
        log.info(
            "malignancy: %d training nodules (%d malignant), %d validation (%d malignant); "
            "fine-tuning %s",
            len(self.nodules.train),
            int(self.train_labels.sum()),
            len(self.nodules.validation),
            sum(bool(n.is_malignant) for n in self.nodules.validation),
            ", ".join(self.blocks),
        )

    @property
    def model_config(self) -> ClassifierConfig:
        return ClassifierConfig(kind="malignancy")

    def build_model(self) -> nn.Module:
        """The classifier's weights, a fresh head, everything outside ``blocks`` frozen."""
        source = load_model_with_info(self.settings.finetune, kind="classifier")
        model = build_model("malignancy")
        model.load_state_dict(source.model.state_dict())
        init_like_book_(model.get_submodule("head_linear"))
        for name, parameter in model.named_parameters():
            parameter.requires_grad_(name.split(".")[0] in self.blocks)
        return model

    def trainable_parameters(self, model: nn.Module) -> Iterable[nn.Parameter]:
        return [p for p in model.parameters() if p.requires_grad]

    def make_optimizer(self, parameters: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
        return self.settings.optimizer.build(parameters)

    def train_samples(self, epoch: int) -> CandidateCrops:
        order = balanced_order(self.train_labels, self.epoch_samples, 1, self.settings.seed, epoch)
        return CandidateCrops(self.cache, self.nodules.train, order, labels=self.train_labels)

    def validation_samples(self) -> CandidateCrops:
        labels = np.array([bool(n.is_malignant) for n in self.nodules.validation])
        return CandidateCrops(self.cache, self.nodules.validation, labels=labels)

    def _freeze_batch_norm(self, model: nn.Module) -> None:
        core = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
        for name, module in core.named_children():
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and name not in self.blocks:
                module.eval()

    def train_step(
        self, model: nn.Module, batch: Any, generator: torch.Generator, device: torch.device
    ) -> StepOutput:
        self._freeze_batch_norm(model)
        crops, labels, _ = batch
        crops = self.augmentation(to_model_input(crops, device), generator)  # (N, 1, 32, 48, 48)
        loss, records = score(model, crops, labels.to(device))
        return StepOutput(loss.mean(), records)

    def eval_step(self, model: nn.Module, batch: Any, device: torch.device) -> Records:
        crops, labels, indices = batch
        _, records = score(model, to_model_input(crops, device), labels.to(device))
        records["diameter"] = self.validation_diameters[indices.cpu()]
        return records

    def metrics(self, records: Records) -> dict[str, float]:
        metrics = binary_metrics(records)
        if "diameter" in records:
            # The baseline a model must beat: "bigger is more malignant", same nodules.
            metrics["diameter_auc"] = roc_auc(records["label"], records["diameter"])
        return metrics

    def data_fingerprint(self) -> str:
        split = dataset_split(self.settings.data_root, self.settings.val_stride)
        return training_fingerprint((self.nodules.table,), split)

    def after_validation(
        self, model: nn.Module, records: Records, epoch: int, run_dir: Path, writer: Any | None
    ) -> None:
        """ROC curves of the model and of the diameter baseline: ``RUN_DIR/roc.png``."""
        from lungcad.training.plots import save_roc_plot

        curves = {"model": records["prob"], "diameter baseline": records["diameter"]}
        save_roc_plot(run_dir / "roc.png", records["label"], curves, title=f"epoch {epoch}")
        if writer is not None:
            writer.add_pr_curve("val/pr_curve", records["label"].bool(), records["prob"], epoch)
