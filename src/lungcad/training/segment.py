"""Training the segmentation U-Net: slice samples, Dice loss, metrics and overlay images.

Samples are 7-channel slices (the slice plus 3 neighbours above and below, edge slices
repeated) in HU clipped to [-1000, 1000], with the ground-truth nodule mask of the middle
slice. Training sees random 64x64 crops out of a 96x96 window centred on a nodule, on
slices that hold its voxels, plus a share of crops from anywhere; validation sees whole
slices of the held-out series, by default all of them, so false positives on nodule-free
slices count. ``nodule_recall`` checks a trained model on whole volumes: which annotated
nodules it finds.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from lungcad.analysis.segmentation import segment_volume
from lungcad.atomic import atomic_write, atomic_write_text
from lungcad.data.cache import VolumeCache, prepare_cache
from lungcad.data.crops import clip_hu, crop_irc
from lungcad.data.luna import (
    ANNOTATIONS_CSV,
    SeriesSplit,
    dataset_split,
    discover_scans,
    read_annotations,
    report_missing_series,
    require_table,
)
from lungcad.data.masks import MASK_FORMAT_VERSION, MASK_THRESHOLD_HU, NoduleMasks
from lungcad.errors import LungcadError
from lungcad.models.unet import SegmentationConfig
from lungcad.training.augment import (
    AugmentSettings,
    SegmentationAugmentation,
    SegmentationAugmentSettings,
)
from lungcad.training.metrics import ratio
from lungcad.training.task import Records, StepOutput, TrainingTask

CONTEXT_SLICES = 3
TRAIN_WINDOW = 96
TRAIN_CROP = 64
THRESHOLD = 0.5
OVERLAY_SLICES = 6
ValSlices = Literal["all", "positive"]
VAL_SLICES: tuple[ValSlices, ...] = ("all", "positive")
BestBy = Literal["recall", "f1"]
BEST_BY: tuple[BestBy, ...] = ("recall", "f1")
# Overlay colours (RGB in [0, 1]) blended over the grey CT slice.
TP_COLOR, FP_COLOR, FN_COLOR = (0.0, 1.0, 0.0), (1.0, 0.0, 0.0), (1.0, 0.55, 0.0)


@dataclass(frozen=True)
class SliceSample:
    """A (height x width) window of slice ``index`` whose top-left voxel is (top, left)."""

    series_uid: str
    index: int
    top: int
    left: int


def stack_window(
    hu: np.ndarray, index: int, top: int, left: int, size: tuple[int, int], context: int
) -> np.ndarray:
    """int16 (2*context+1, h, w) window of the slices around ``index`` (I, R, C volume).

    Slices past the first or last repeat the edge slice; rows and columns outside the
    volume read as air.
    """
    indices = np.clip(np.arange(index - context, index + context + 1), 0, hu.shape[0] - 1)
    first, last = int(indices[0]), int(indices[-1])
    # crop_irc on the view of just these slices: the whole index range, rows/cols windowed.
    block = crop_irc(
        hu[first : last + 1],
        ((last - first + 1) // 2, top + size[0] // 2, left + size[1] // 2),
        (last - first + 1, *size),
    )
    return block[indices - first]


class SegmentationSamples(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """(image float32 (7, h, w) clipped HU, mask bool (1, h, w)) per ``SliceSample``."""

    def __init__(
        self,
        cache: VolumeCache,
        masks: NoduleMasks,
        samples: Sequence[SliceSample],
        size: tuple[int, int],
        context: int = CONTEXT_SLICES,
    ) -> None:
        self.cache, self.masks, self.samples = cache, masks, list(samples)
        self.size, self.context = size, context

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, item: int) -> tuple[torch.Tensor, torch.Tensor]:
        sample = self.samples[item]
        hu = self.cache.volume(sample.series_uid).hu
        stack = stack_window(hu, sample.index, sample.top, sample.left, self.size, self.context)
        mask_slice = self.masks.slice(sample.series_uid, sample.index)[None]
        centre = (0, sample.top + self.size[0] // 2, sample.left + self.size[1] // 2)
        mask = crop_irc(mask_slice, centre, (1, *self.size), fill=0)
        return torch.from_numpy(clip_hu(stack)), torch.from_numpy(mask)


def training_crops(
    masks: NoduleMasks,
    series_uids: Iterable[str],
    count: int,
    seed: int,
    epoch: int,
    background: float = 0.0,
    shapes: Mapping[str, tuple[int, int, int]] | None = None,
) -> list[SliceSample]:
    """``count`` random 64x64 training crops; a pure function of (seed, epoch).

    A ``background`` fraction of them are windows anywhere in any slice of the series (of
    volume ``shapes``): without those the model never sees chest wall, heart or bone and
    calls much of it nodule. The rest are nodule crops: nodules take turns in a fresh
    random order each round (a large nodule does not crowd out small ones); each draw
    picks one of the nodule's slices and a crop position inside the 96x96 window centred
    on the nodule.
    """
    series_uids = list(series_uids)
    nodules = [
        (uid, nodule) for uid in series_uids for nodule in masks.nodules(uid) if nodule.slices
    ]
    if not nodules:
        raise LungcadError("no training series has an annotated nodule inside its volume")
    rng = np.random.default_rng([seed, epoch])
    background_count = round(count * background) if shapes else 0
    nodule_count = count - background_count
    order = np.concatenate(
        [rng.permutation(len(nodules)) for _ in range(math.ceil(nodule_count / len(nodules)))]
    )[:nodule_count]
    spare = TRAIN_WINDOW - TRAIN_CROP
    samples = []
    for k in order:
        uid, nodule = nodules[k]
        index = nodule.slices[int(rng.integers(len(nodule.slices)))]
        row_offset, col_offset = (int(v) for v in rng.integers(0, spare + 1, size=2))
        _, row, col = nodule.center_irc
        top = row - TRAIN_WINDOW // 2 + row_offset
        left = col - TRAIN_WINDOW // 2 + col_offset
        samples.append(SliceSample(uid, int(index), top, left))
    for _ in range(background_count):
        uid = series_uids[int(rng.integers(len(series_uids)))]
        slices, rows, cols = shapes[uid]  # type: ignore[index]
        samples.append(
            SliceSample(
                uid,
                int(rng.integers(slices)),
                int(rng.integers(max(rows - TRAIN_CROP, 0) + 1)),
                int(rng.integers(max(cols - TRAIN_CROP, 0) + 1)),
            )
        )
    return [samples[i] for i in rng.permutation(len(samples))]


def validation_slices(
    cache: VolumeCache, masks: NoduleMasks, series_uids: Iterable[str], mode: ValSlices
) -> list[SliceSample]:
    """Whole slices of each series: every slice, or only those holding nodule voxels."""
    samples: list[SliceSample] = []
    for uid in series_uids:
        indices = (
            range(cache.volume(uid).hu.shape[0]) if mode == "all" else masks.positive_slices(uid)
        )
        samples.extend(SliceSample(uid, int(i), 0, 0) for i in indices)
    return samples


def dice_loss(
    prediction: torch.Tensor, label: torch.Tensor, epsilon: float = 1.0, over_batch: bool = False
) -> torch.Tensor:
    """Soft Dice loss of (N, C, H, W): per sample (N,), or one value () over the whole batch.

    Over the batch, a crop without nodule pixels still feels its false positives: per
    sample its loss is 1 - eps / (sum(prediction) + eps), which saturates (gradient ~
    1 / sum^2) once a few pixels fire, so background crops teach nothing.
    """
    dims = tuple(range(0 if over_batch else 1, prediction.dim()))
    overlap = (prediction * label).sum(dim=dims)
    total = prediction.sum(dim=dims) + label.sum(dim=dims)
    return 1 - (2 * overlap + epsilon) / (total + epsilon)


def segmentation_loss(
    prediction: torch.Tensor, label: torch.Tensor, fn_weight: float, over_batch: bool = False
) -> torch.Tensor:
    """The book's loss: Dice plus ``fn_weight`` x Dice over the label pixels only (that term
    sees missed nodule pixels, never false positives, so it buys recall)."""
    return dice_loss(prediction, label, over_batch=over_batch) + fn_weight * dice_loss(
        prediction * label, label, over_batch=over_batch
    )


def pixel_records(prediction: torch.Tensor, label: torch.Tensor, loss: torch.Tensor) -> Records:
    """Per-sample loss and TP / FN / FP / label pixel counts at ``THRESHOLD``."""
    dims = tuple(range(1, prediction.dim()))
    predicted = prediction.detach() > THRESHOLD
    truth = label > 0.5
    return {
        "loss": loss.detach(),
        "tp": (predicted & truth).sum(dim=dims).float(),
        "fn": (~predicted & truth).sum(dim=dims).float(),
        "fp": (predicted & ~truth).sum(dim=dims).float(),
        "label": truth.sum(dim=dims).float(),
    }


def segmentation_metrics(records: Records) -> dict[str, float]:
    """Loss, TP/FN/FP as percentages of label pixels, precision, recall, F1 (pixels)."""
    tp, fn, fp, label = (float(records[k].double().sum()) for k in ("tp", "fn", "fp", "label"))
    precision, recall = ratio(tp, tp + fp), ratio(tp, tp + fn)
    return {
        "loss": float(records["loss"].double().mean()),
        "tp_pct": 100 * ratio(tp, label),
        "fn_pct": 100 * ratio(fn, label),
        "fp_pct": 100 * ratio(fp, label),
        "precision": precision,
        "recall": recall,
        "f1": ratio(2 * precision * recall, precision + recall),
    }


def overlay(hu_slice: np.ndarray, predicted: np.ndarray, label: np.ndarray) -> np.ndarray:
    """RGB float (R, C, 3): grey CT (HU -1000..1000) with TP green, FP red, FN orange."""
    grey = (clip_hu(hu_slice) + 1000.0) / 2000.0
    rgb = np.repeat(grey[..., None], 3, axis=-1)
    for where, color in (
        (predicted & label, TP_COLOR),
        (predicted & ~label, FP_COLOR),
        (~predicted & label, FN_COLOR),
    ):
        rgb[where] = 0.3 * rgb[where] + 0.7 * np.asarray(color, dtype=np.float32)
    return rgb


@dataclass(frozen=True)
class SegmentationSettings:
    """What to train on and how; the defaults are those of ``lungcad train segment``."""

    data_root: Path
    cache_dir: Path
    epoch_samples: int | None = None
    lr: float = 1e-3
    fn_weight: float = 8.0
    background: float = 0.25
    val_stride: int = 10
    val_slices: ValSlices = "all"
    image_series: int = 4
    best_by: BestBy = "recall"
    seed: int = 0
    augment: AugmentSettings = field(default_factory=SegmentationAugmentSettings)

    def __post_init__(self) -> None:
        if self.best_by not in BEST_BY:
            raise LungcadError(f"--best-by {self.best_by!r}: expected one of {', '.join(BEST_BY)}")
        if not 0 <= self.background < 1:
            raise LungcadError(f"--background {self.background}: must be in [0, 1)")
        if self.val_slices not in VAL_SLICES:
            raise LungcadError(
                f"--val-slices {self.val_slices!r}: expected one of {', '.join(VAL_SLICES)}"
            )


class SegmentationTask(TrainingTask):
    """The 2D U-Net on nodule masks; best checkpoint by validation pixel recall (or F1)."""

    best_mode = "max"

    def __init__(self, settings: SegmentationSettings) -> None:
        self.settings = settings
        self.best_metric = f"val/{settings.best_by}"
        self.config = SegmentationConfig(in_channels=2 * CONTEXT_SLICES + 1)
        scans = discover_scans(settings.data_root)
        self.cache = VolumeCache(settings.cache_dir)
        prepare_cache(scans, self.cache)
        annotations = read_annotations(require_table(settings.data_root, ANNOTATIONS_CSV))
        report_missing_series({a.series_uid for a in annotations}, scans, settings.data_root)
        self.annotations = [a for a in annotations if a.series_uid in scans]
        # The data root's one split, narrowed to the scans present on disk.
        split = dataset_split(settings.data_root, settings.val_stride)
        self.split = SeriesSplit(
            train=tuple(u for u in split.train if u in scans),
            validation=tuple(u for u in split.validation if u in scans),
        )
        self.masks = NoduleMasks(self.cache, self.annotations)
        self.masks.ensure(list(scans))
        self.epoch_samples = settings.epoch_samples or self.default_epoch_samples()
        self.train_shapes = {uid: self.cache.volume(uid).hu.shape for uid in self.split.train}
        self.augmentation = SegmentationAugmentation(settings.augment)
        self._validation = validation_slices(
            self.cache, self.masks, self.split.validation, settings.val_slices
        )
        self.canvas = self._validation_canvas()

    @property
    def model_config(self) -> SegmentationConfig:
        return self.config

    def default_epoch_samples(self) -> int:
        """Four crops per training nodule slice (about 2,500 on a 40-scan phantom set)."""
        slices = sum(
            len(nodule.slices) for uid in self.split.train for nodule in self.masks.nodules(uid)
        )
        return max(4 * slices, 1024)

    def _validation_canvas(self) -> tuple[int, int]:
        """Whole slices padded (with air) to one size, a multiple of what the U-Net needs."""
        multiple = self.config.size_multiple
        shapes = [self.cache.volume(uid).hu.shape[1:] for uid in self.split.validation]
        if not shapes:
            raise LungcadError(f"{self.settings.data_root}: no validation series")
        height, width = (
            math.ceil(max(s[axis] for s in shapes) / multiple) * multiple for axis in (0, 1)
        )
        return height, width

    def make_optimizer(self, parameters: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
        return torch.optim.Adam(parameters, lr=self.settings.lr)

    def train_samples(self, epoch: int) -> SegmentationSamples:
        crops = training_crops(
            self.masks,
            self.split.train,
            self.epoch_samples,
            self.settings.seed,
            epoch,
            background=self.settings.background,
            shapes=self.train_shapes,
        )
        return SegmentationSamples(self.cache, self.masks, crops, (TRAIN_CROP, TRAIN_CROP))

    def validation_samples(self) -> SegmentationSamples:
        return SegmentationSamples(self.cache, self.masks, self._validation, self.canvas)

    def train_step(
        self, model: nn.Module, batch: Any, generator: torch.Generator, device: torch.device
    ) -> StepOutput:
        images, masks = batch
        images = images.to(device, non_blocking=True)  # (N, 7, 64, 64) clipped HU
        labels = masks.to(device, non_blocking=True).float()  # (N, 1, 64, 64) 0 or 1
        images, labels = self.augmentation(images, labels, generator)  # same shapes
        prediction = model(images)  # (N, 7, 64, 64) -> (N, 1, 64, 64) probabilities
        loss = segmentation_loss(prediction, labels, self.settings.fn_weight, over_batch=True)
        return StepOutput(loss, pixel_records(prediction, labels, loss.expand(len(images))))

    def eval_step(self, model: nn.Module, batch: Any, device: torch.device) -> Records:
        images, masks = batch
        images = images.to(device, non_blocking=True)  # (N, 7, H, W) whole slices
        labels = masks.to(device, non_blocking=True).float()  # (N, 1, H, W)
        prediction = model(images)  # (N, 1, H, W)
        loss = segmentation_loss(prediction, labels, self.settings.fn_weight, over_batch=True)
        return pixel_records(prediction, labels, loss.expand(len(images)))

    def metrics(self, records: Records) -> dict[str, float]:
        return segmentation_metrics(records)

    def data_fingerprint(self) -> str:
        description = {
            "annotations": sorted(
                [a.series_uid, *a.center_xyz, a.diameter_mm] for a in self.annotations
            ),
            "train": list(self.split.train),
            "validation": list(self.split.validation),
            "mask": [MASK_FORMAT_VERSION, MASK_THRESHOLD_HU],
            "samples": [CONTEXT_SLICES, TRAIN_WINDOW, TRAIN_CROP, self.epoch_samples],
            "background": self.settings.background,
            "val_slices": self.settings.val_slices,
        }
        return hashlib.sha256(json.dumps(description).encode()).hexdigest()

    def after_validation(
        self, model: nn.Module, records: Records, epoch: int, run_dir: Path, writer: Any | None
    ) -> None:
        """Overlays of six evenly spaced slices of the first validation series."""
        folder = run_dir / "images" / f"epoch-{epoch:03d}"
        device = next(model.parameters()).device
        model.eval()
        for number, uid in enumerate(self.split.validation[: self.settings.image_series]):
            hu = self.cache.volume(uid).hu
            indices = [k * (hu.shape[0] - 1) // (OVERLAY_SLICES - 1) for k in range(OVERLAY_SLICES)]
            samples = SegmentationSamples(
                self.cache, self.masks, [SliceSample(uid, i, 0, 0) for i in indices], self.canvas
            )
            images = torch.stack([samples[k][0] for k in range(len(samples))]).to(device)
            with torch.inference_mode():
                predicted = (model(images)[:, 0] > THRESHOLD).cpu().numpy()  # (6, H, W)
            rows, cols = hu.shape[1:]
            for position, (index, slice_predicted) in enumerate(
                zip(indices, predicted, strict=True)
            ):
                label = self.masks.slice(uid, index)
                rgb = overlay(np.asarray(hu[index]), slice_predicted[:rows, :cols], label)
                write_png(folder / f"series{number}-{uid}-slice{index:04d}.png", rgb)
                if writer is not None:
                    tag = f"val_overlay/series{number}/slice{position}"
                    writer.add_image(tag, rgb, epoch, dataformats="HWC")


def write_png(path: Path, rgb: np.ndarray) -> None:
    """An RGB float (H, W, 3) image in [0, 1] as a PNG, written atomically."""
    from matplotlib import image as mpl_image

    atomic_write(path, lambda handle: mpl_image.imsave(handle, rgb, format="png"))


@dataclass(frozen=True)
class NoduleRecall:
    """Whole-volume check of a segmentation model on annotated nodules of some series.

    A nodule counts as found when any voxel of its ground-truth mask is predicted above
    the threshold, i.e. it overlaps a predicted component. ``pixel_recall`` is over all
    mask voxels of the series (nodules of every size).
    """

    found: int
    total: int
    missed: tuple[tuple[str, tuple[int, int, int], float], ...]
    pixel_recall: float
    predicted_voxels: int

    @property
    def rate(self) -> float:
        return ratio(self.found, self.total)


def nodule_recall(
    model: nn.Module,
    cache: VolumeCache,
    masks: NoduleMasks,
    series_uids: Iterable[str],
    *,
    min_diameter_mm: float = 4.0,
    batch_size: int = 8,
    device: torch.device | str = "cpu",
) -> NoduleRecall:
    """Segment whole volumes and count the annotated nodules of >= ``min_diameter_mm`` hit."""
    model.eval()
    found, total, hit_voxels, mask_voxels, predicted_voxels = 0, 0, 0, 0, 0
    missed = []
    for uid in series_uids:
        hu = cache.volume(uid).hu
        predicted = segment_volume(model, hu, batch_size=batch_size, device=device) > THRESHOLD
        truth = masks.volume(uid)
        hit_voxels += int((predicted & truth).sum())
        mask_voxels += int(truth.sum())
        predicted_voxels += int(predicted.sum())
        for nodule in masks.nodules(uid):
            if nodule.diameter_mm < min_diameter_mm or not nodule.slices:
                continue
            box = nodule.box_slices()
            total += 1
            if (predicted[box] & truth[box]).any():
                found += 1
            else:
                missed.append((uid, nodule.center_irc, nodule.diameter_mm))
    return NoduleRecall(
        found, total, tuple(missed), ratio(hit_voxels, mask_voxels), predicted_voxels
    )


def validation_nodule_report(
    task: SegmentationTask, checkpoint: Path, device: torch.device | str = "cpu"
) -> NoduleRecall:
    """The trained model's nodule-level recall on the validation series, written beside it.

    Pixel recall can look fine while small nodules are missed entirely; this counts them.
    """
    from lungcad.models.checkpoint import load_model

    result = nodule_recall(
        load_model(checkpoint).to(device),
        task.cache,
        task.masks,
        task.split.validation,
        device=device,
    )
    summary = {
        "checkpoint": checkpoint.name,
        "nodules_4mm_found": result.found,
        "nodules_4mm_total": result.total,
        "pixel_recall": result.pixel_recall,
        "predicted_voxels": result.predicted_voxels,
        "missed": [
            {"series_uid": uid, "center_irc": list(irc), "diameter_mm": d}
            for uid, irc, d in result.missed
        ],
    }
    atomic_write_text(checkpoint.with_name("nodule_recall.json"), json.dumps(summary, indent=2))
    return result
