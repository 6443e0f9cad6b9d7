"""Training the nodule classifier: candidate crops, balanced epochs, and the engine's task.

Samples are (1, 32, 48, 48) crops of HU (I, R, C) around each candidate of
``candidates.csv``, read from the volume cache. Series are split once, over every series
the tables name, so a partial download or a half-filled cache never moves a series from
validation to training. Training epochs are balanced (a positive, then ``balance_ratio``
negatives); validation sees every validation candidate unbalanced, so its precision is
the one a user would get.

Hard-negative mining: the negatives are a few hundred per nodule and almost all of them
are easy, so uniform draws show the rare hard ones (a vessel seen end-on, a calcified
granuloma) a handful of times in a whole run; the model then keeps calling them nodules.
Part of the negative draws therefore follow the p_nodule the model gave each negative
the last time it trained on it.

Excluded findings (``annotations_excluded.csv``: nodules under 3 mm, calcified granulomas,
findings too few readers marked) are what LUNA16's evaluation ignores: a mark on one is
neither a hit nor a false positive. Candidates on them are left out of training by default
(as negatives, they teach the model to dismiss the smallest nodules, which look the same)
and out of the validation metrics, which report separately how many the model flags.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from lungcad.data.cache import CACHE_FORMAT_VERSION, VolumeCache
from lungcad.data.crops import CLASSIFIER_CROP_IRC, HU_CLIP
from lungcad.data.luna import (
    ANNOTATIONS_CSV,
    CANDIDATES_CSVS,
    EXCLUDED_CSV,
    MALIGNANCY_CSV,
    SERIESUIDS_CSV,
    CandidateInfo,
    SeriesSplit,
    find_table,
    merge_candidates,
    read_annotations,
    read_candidates,
    read_malignancy_annotations,
    read_series_uids,
    report_missing_series,
    require_table,
    split_series,
)
from lungcad.errors import LungcadError
from lungcad.models.classifier import ClassifierConfig
from lungcad.training.augment import AugmentSettings, ClassifierAugmentSettings, CropAugmentation
from lungcad.training.metrics import THRESHOLD, binary_metrics
from lungcad.training.optimizer import OptimizerSettings
from lungcad.training.task import Records, StepOutput, TrainingTask

log = logging.getLogger(__name__)

# Each training positive is shown this many times per default epoch, each time augmented
# differently. Positives are the scarce class, so they set the pace: on a 40-scan phantom
# set (about 60 training nodules) a default epoch is ~3,000 samples, a couple of CPU
# minutes, so validation (and best.pt) follows training closely; on LUNA16 (about 1,200
# training nodules) ~60,000, a few GPU minutes. Negatives are drawn without repeats across
# epochs (see ``balanced_order``), so short epochs still walk through all of them.
POSITIVE_VIEWS_PER_EPOCH = 25


@dataclass(frozen=True)
class CandidateSplit:
    """The candidates of the cached series, split by series, and the tables they came from."""

    train: tuple[CandidateInfo, ...]
    validation: tuple[CandidateInfo, ...]
    split: SeriesSplit
    tables: tuple[Path, ...]


def load_candidates(data_root: Path, cache: VolumeCache, val_stride: int = 10) -> CandidateSplit:
    """Candidates (merged with annotations) of the series in ``cache``, split by series."""
    candidates_path = require_table(data_root, *CANDIDATES_CSVS)
    optional = {
        name: find_table(data_root, name)
        for name in (ANNOTATIONS_CSV, MALIGNANCY_CSV, EXCLUDED_CSV)
    }
    annotations = read_annotations(p) if (p := optional[ANNOTATIONS_CSV]) else []
    malignancy = read_malignancy_annotations(p) if (p := optional[MALIGNANCY_CSV]) else []
    excluded = read_annotations(p) if (p := optional[EXCLUDED_CSV]) else []
    candidates = merge_candidates(
        read_candidates(candidates_path), annotations, malignancy, excluded
    )

    series_path = find_table(data_root, SERIESUIDS_CSV)
    every_series = {c.series_uid for c in candidates} | {a.series_uid for a in annotations}
    if series_path is not None:
        every_series |= set(read_series_uids(series_path))
    split = split_series(every_series, val_stride)

    cached = set(cache.series_uids())
    if not cached:
        raise LungcadError(
            f"{cache.entries_dir}: the volume cache is empty; run `lungcad prepare {data_root}`"
        )
    report_missing_series(
        {c.series_uid for c in candidates}, dict.fromkeys(cached, cache.entries_dir), data_root
    )
    validation_series = set(split.validation)
    usable = [c for c in candidates if c.series_uid in cached]
    train = tuple(c for c in usable if c.series_uid not in validation_series)
    validation = tuple(c for c in usable if c.series_uid in validation_series)
    if not any(c.is_nodule for c in train):
        raise LungcadError(
            f"{candidates_path}: no nodule (class 1) among the {len(train)} candidates of the "
            "cached training series; nothing to learn from"
        )
    if not validation:
        raise LungcadError(
            f"{candidates_path}: no candidates in the cached validation series "
            f"(every {val_stride}th series by UID); prepare more scans or change --val-stride"
        )
    tables = (candidates_path, *(p for p in (*optional.values(), series_path) if p))
    return CandidateSplit(train, validation, split, tables)


class CandidateCrops(Dataset[tuple[torch.Tensor, int, int]]):
    """Item ``k``: (int16 HU crop (1, 32, 48, 48), label 0/1, index of its candidate).

    ``order`` lists which candidate each item is (repeats allowed); by default each once.
    Cheap by design: one memory-mapped crop, no clipping, no augmentation (both happen
    batched on the training device).
    """

    def __init__(
        self,
        cache: VolumeCache,
        candidates: Sequence[CandidateInfo],
        order: np.ndarray | None = None,
        labels: np.ndarray | None = None,
    ) -> None:
        self.cache = cache
        self.series_uids = [c.series_uid for c in candidates]
        self.centers_xyz = np.array([c.center_xyz for c in candidates], dtype=np.float64)
        # Nodule flags by default; the malignancy model passes its own labels.
        self.labels = (
            np.array([c.is_nodule for c in candidates], dtype=bool)
            if labels is None
            else np.asarray(labels, dtype=bool)
        )
        self.order = np.arange(len(candidates)) if order is None else np.asarray(order)

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, item: int) -> tuple[torch.Tensor, int, int]:
        index = int(self.order[item])
        crop, _ = self.cache.crop(
            self.series_uids[index], self.centers_xyz[index], CLASSIFIER_CROP_IRC
        )
        return torch.from_numpy(crop[None]), int(self.labels[index]), index


def _shuffle_stream(size: int, start: int, count: int, seed: int, stream: int) -> np.ndarray:
    """Items ``start .. start + count`` of an endless run of shuffles of ``range(size)``.

    Shuffle ``r`` is seeded by (seed, stream, r) alone, so any slice is a pure function of
    its arguments, and consecutive slices use every item once before repeating any.
    """
    if count == 0:
        return np.zeros(0, dtype=np.int64)
    first, last = start // size, (start + count - 1) // size
    shuffles = [
        np.random.default_rng([seed, stream, r]).permutation(size) for r in range(first, last + 1)
    ]
    offset = start - first * size
    return np.concatenate(shuffles)[offset : offset + count]


def _negative_draws(
    negatives: np.ndarray,
    count: int,
    seed: int,
    epoch: int,
    hard_fraction: float,
    weights: np.ndarray | None,
) -> np.ndarray:
    """``count`` of ``negatives`` for one epoch: ``hard_fraction`` of the slots (evenly
    spread) drawn with repeats in proportion to ``weights`` (one per negative), the rest
    read from the negatives' endless stream of shuffles."""
    slot = np.arange(count)
    hard_slot = np.floor((slot + 1) * hard_fraction) > np.floor(slot * hard_fraction)
    n_hard = int(hard_slot.sum())
    n_stream = count - n_hard
    order = np.empty(count, dtype=np.int64)
    order[~hard_slot] = negatives[
        _shuffle_stream(len(negatives), (epoch - 1) * n_stream, n_stream, seed, 0)
    ]
    if n_hard:
        if weights is None:
            raise ValueError("a hard fraction > 0 needs the last scores")
        p = np.asarray(weights, dtype=np.float64) + 1e-9
        rng = np.random.default_rng([seed, 3, epoch])
        order[hard_slot] = rng.choice(negatives, n_hard, p=p / p.sum())
    return order


def balanced_order(
    labels: np.ndarray,
    count: int,
    ratio: int,
    seed: int,
    epoch: int,
    hard_negative_fraction: float = 0.0,
    last_scores: np.ndarray | None = None,
) -> np.ndarray:
    """Candidate indices of training epoch ``epoch`` (1-based): a pure function of its args.

    ``ratio`` >= 1: one positive, then ``ratio`` negatives, repeating, so every batch holds
    the same class mix. Each class is read from its own stream of shuffles, epoch after
    epoch, so every negative is shown once before any is shown again.
    ``hard_negative_fraction`` of the negative slots are instead drawn, with repeats, in
    proportion to ``last_scores`` (the p_nodule the model last gave each candidate): the
    hard negatives, shown about as often as a positive while the stream still walks
    through the easy rest. ``ratio`` 0: no balancing, all candidates in shuffled order
    (the natural, very unbalanced mix).
    """
    labels = np.asarray(labels, dtype=bool)
    if ratio == 0:
        return _shuffle_stream(len(labels), (epoch - 1) * count, count, seed, stream=2)
    positives, negatives = np.flatnonzero(labels), np.flatnonzero(~labels)
    if len(positives) == 0 or len(negatives) == 0:
        raise LungcadError("balanced sampling needs both nodule and non-nodule candidates")
    positive_slot = np.arange(count) % (ratio + 1) == 0
    n_pos = int(positive_slot.sum())
    order = np.empty(count, dtype=np.int64)
    order[positive_slot] = positives[
        _shuffle_stream(len(positives), (epoch - 1) * n_pos, n_pos, seed, 1)
    ]
    order[~positive_slot] = _negative_draws(
        negatives,
        count - n_pos,
        seed,
        epoch,
        hard_negative_fraction,
        None if last_scores is None else np.asarray(last_scores)[negatives],
    )
    return order


def default_epoch_samples(positives: int, ratio: int) -> int:
    """Samples per epoch: every training positive ``POSITIVE_VIEWS_PER_EPOCH`` times, with
    its ``ratio`` negatives each time (see the constant for why positives set the pace)."""
    return POSITIVE_VIEWS_PER_EPOCH * positives * (1 + max(ratio, 1))


@dataclass(frozen=True)
class ClassifySettings:
    """What to train on and how; the defaults are those of ``lungcad train classify``."""

    data_root: Path
    cache_dir: Path
    epoch_samples: int | None = None
    balance_ratio: int = 1
    optimizer: OptimizerSettings = field(default_factory=OptimizerSettings)
    val_stride: int = 10
    seed: int = 0
    augment: AugmentSettings = field(default_factory=ClassifierAugmentSettings)
    hard_negatives: float = 0.5
    train_on_excluded: bool = False

    def __post_init__(self) -> None:
        if self.balance_ratio < 0:
            raise LungcadError(f"--balance-ratio {self.balance_ratio}: must be 0 or more")
        if not 0 <= self.hard_negatives <= 1:
            raise LungcadError(f"--hard-negatives {self.hard_negatives}: must be in [0, 1]")


def to_model_input(crops: torch.Tensor, device: torch.device) -> torch.Tensor:
    """int16 HU crops (N, 1, 32, 48, 48) -> float32 HU clipped to [-1000, 1000] on ``device``."""
    return crops.to(device, non_blocking=True).float().clamp(*HU_CLIP)


def score(
    model: nn.Module, crops: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, Records]:
    """Per-sample cross-entropy (N,) with gradient, and the detached records for metrics."""
    # Channels-last is the layout the model's weights use (see ``build_model``).
    logits, probs = model(crops.contiguous(memory_format=torch.channels_last_3d))  # (N, 2) each
    loss = F.cross_entropy(logits, labels, reduction="none")  # (N,)
    return loss, {"loss": loss.detach(), "label": labels, "prob": probs[:, 1].detach()}


def training_fingerprint(tables: Sequence[Path], split: SeriesSplit) -> str:
    """What the trained weights depend on: the tables' bytes, the split, the cache format."""
    digest = hashlib.sha256()
    for table in tables:
        digest.update(table.name.encode() + b"\0" + table.read_bytes())
    for side in (split.train, split.validation):
        digest.update("\n".join(sorted(side)).encode() + b"\0")
    digest.update(f"cache-format-{CACHE_FORMAT_VERSION}".encode())
    return digest.hexdigest()


class ClassificationTask(TrainingTask):
    """LunaModel on nodule vs non-nodule candidates; best checkpoint by validation F1."""

    best_metric = "val/f1"
    best_mode = "max"

    def __init__(self, settings: ClassifySettings) -> None:
        self.settings = settings
        self.cache = VolumeCache(settings.cache_dir)
        self.candidates = load_candidates(settings.data_root, self.cache, settings.val_stride)
        self.train_candidates = tuple(
            c
            for c in self.candidates.train
            if settings.train_on_excluded or not c.on_excluded_finding
        )
        self.train_labels = np.array([c.is_nodule for c in self.train_candidates], dtype=bool)
        self.validation_excluded = torch.tensor(
            [c.on_excluded_finding for c in self.candidates.validation], dtype=torch.bool
        )
        self.epoch_samples = settings.epoch_samples or default_epoch_samples(
            int(self.train_labels.sum()), settings.balance_ratio
        )
        self.augmentation = CropAugmentation(settings.augment)
        # p_nodule of each training candidate when last trained on; 1 until then, so a
        # negative not yet seen counts as hard.
        self.last_scores = torch.ones(len(self.train_candidates), dtype=torch.float32)
        log.info(
            "classifier: %d training candidates (%d nodules) in %d series, %d validation "
            "candidates (%d nodules) in %d series; %d samples per epoch; %d training and %d "
            "validation candidates on excluded findings%s",
            len(self.train_candidates),
            int(self.train_labels.sum()),
            len({c.series_uid for c in self.train_candidates}),
            len(self.candidates.validation),
            sum(c.is_nodule for c in self.candidates.validation),
            len({c.series_uid for c in self.candidates.validation}),
            self.epoch_samples,
            sum(c.on_excluded_finding for c in self.candidates.train),
            int(self.validation_excluded.sum()),
            " (trained on as negatives)" if settings.train_on_excluded else " (left out)",
        )

    @property
    def model_config(self) -> ClassifierConfig:
        return ClassifierConfig(kind="classifier")

    def make_optimizer(self, parameters: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
        return self.settings.optimizer.build(parameters)

    def train_samples(self, epoch: int) -> CandidateCrops:
        order = balanced_order(
            self.train_labels,
            self.epoch_samples,
            self.settings.balance_ratio,
            self.settings.seed,
            epoch,
            self.settings.hard_negatives,
            self.last_scores.numpy(),
        )
        return CandidateCrops(self.cache, self.train_candidates, order)

    def after_train_epoch(self, records: Records) -> None:
        """Remember each trained-on candidate's p_nodule (the highest, if shown twice)."""
        index, prob = records["index"].numpy(), records["prob"].numpy().astype(np.float32)
        highest = np.full(len(self.last_scores), -np.inf, dtype=np.float32)
        np.maximum.at(highest, index, prob)
        seen = np.isfinite(highest)
        self.last_scores[torch.from_numpy(seen)] = torch.from_numpy(highest[seen])
        positive = torch.from_numpy(self.train_labels)
        log.info(
            "mining: %d training negatives last scored p >= 0.5, %d nodules p < 0.5",
            int((self.last_scores[~positive] >= THRESHOLD).sum()),
            int((self.last_scores[positive] < THRESHOLD).sum()),
        )

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"last_scores": self.last_scores.clone()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if "last_scores" in state:
            self.last_scores = state["last_scores"].clone()

    def validation_samples(self) -> CandidateCrops:
        return CandidateCrops(self.cache, self.candidates.validation)

    def train_step(
        self, model: nn.Module, batch: Any, generator: torch.Generator, device: torch.device
    ) -> StepOutput:
        crops, labels, index = batch
        crops = to_model_input(crops, device)  # (N, 1, 32, 48, 48) HU in [-1000, 1000]
        crops = self.augmentation(crops, generator)  # same shape: moved, mirrored, noisy
        loss, records = score(model, crops, labels.to(device))
        return StepOutput(loss.mean(), {**records, "index": index})

    def eval_step(self, model: nn.Module, batch: Any, device: torch.device) -> Records:
        crops, labels, index = batch
        _, records = score(model, to_model_input(crops, device), labels.to(device))
        return {**records, "excluded": self.validation_excluded[index]}

    def metrics(self, records: Records) -> dict[str, float]:
        """Binary metrics; on validation records, as LUNA16 counts: candidates on excluded
        findings out, and how many of those the model calls a nodule beside."""
        if "excluded" not in records:
            return binary_metrics(records)
        excluded = records["excluded"].bool()
        flagged = records["prob"][excluded] >= THRESHOLD
        return {
            **binary_metrics({k: v[~excluded] for k, v in records.items()}),
            "excluded/flagged": float(int(flagged.sum())),
            "count/excluded": float(int(excluded.sum())),
        }

    def data_fingerprint(self) -> str:
        return training_fingerprint(self.candidates.tables, self.candidates.split)

    def after_validation(
        self, model: nn.Module, records: Records, epoch: int, run_dir: Path, writer: Any | None
    ) -> None:
        """PR curve and p_nodule histograms per true class, at step ``epoch``."""
        if writer is None:
            return
        label, prob = records["label"].bool(), records["prob"]
        writer.add_pr_curve("val/pr_curve", label, prob, global_step=epoch)
        for name, mask in (("neg", ~label), ("pos", label)):
            if mask.any():
                writer.add_histogram(f"val/prob_{name}", prob[mask], global_step=epoch)
