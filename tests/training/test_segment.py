import json
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import ndimage
from typer.testing import CliRunner

from lungcad.cli import app
from lungcad.data.crops import clip_hu, slice_stack
from lungcad.data.ct import read_ct, write_metaimage
from lungcad.data.geometry import Geometry, irc_to_xyz
from lungcad.errors import LungcadError
from lungcad.models import load_model
from lungcad.training.augment import AugmentSettings
from lungcad.training.segment import (
    FN_COLOR,
    FP_COLOR,
    TP_COLOR,
    SegmentationSamples,
    SegmentationSettings,
    SegmentationTask,
    SliceSample,
    dice_loss,
    nodule_recall,
    overlay,
    pixel_records,
    segmentation_loss,
    segmentation_metrics,
    stack_window,
    training_crops,
    validation_slices,
)
from tests.conftest import shared_file

GEOMETRY = Geometry((-20.0, -20.0, -50.0), (1.0, 1.0, 2.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
SHAPE = (12, 32, 32)
CENTERS = [(5, 12, 14), (6, 20, 18), (4, 16, 10), (7, 10, 22), (6, 18, 16)]
BOOK_UNET = (
    "models/dlwpt/seg_2020-01-26_19.45.12_w4d3c1-bal_1_nodupe-label_pos-d1_fn8-adam.best.state"
)


def _write_dataset(root: Path) -> list[str]:
    """Five small scans, one soft-tissue ball (radius 3 voxels) each, LUNA16 layout."""
    (root / "subset0").mkdir(parents=True)
    i, r, c = np.indices(SHAPE)
    rows = ["seriesuid,coordX,coordY,coordZ,diameter_mm"]
    uids = []
    for number, center in enumerate(CENTERS):
        uid = f"1.2.3.{number}"
        hu = np.full(SHAPE, -850, np.int16)
        ball = (i - center[0]) ** 2 + (r - center[1]) ** 2 + (c - center[2]) ** 2 <= 9
        hu[ball] = 40
        write_metaimage(root / "subset0" / f"{uid}.mhd", hu, GEOMETRY)
        x, y, z = irc_to_xyz(center, GEOMETRY)
        rows.append(f"{uid},{x},{y},{z},6.0")
        uids.append(uid)
    (root / "annotations.csv").write_text("\n".join(rows) + "\n")
    return uids


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    _write_dataset(tmp_path / "data")
    return tmp_path / "data"


def _settings(root: Path, **changes: object) -> SegmentationSettings:
    values: dict[str, object] = {"data_root": root, "cache_dir": root / "cache", "val_stride": 5}
    return SegmentationSettings(**{**values, **changes})  # type: ignore[arg-type]


def test_stack_window_repeats_edge_slices_and_pads_air() -> None:
    hu = np.arange(5 * 6 * 6, dtype=np.int16).reshape(5, 6, 6)
    window = stack_window(hu, 0, -1, 2, (4, 4), context=3)
    assert window.shape == (7, 4, 4)
    np.testing.assert_array_equal(window[:4, 1:, :], hu[[0, 0, 0, 0], 0:3, 2:6])
    np.testing.assert_array_equal(window[4:, 1:, :], hu[1:4, 0:3, 2:6])
    assert (window[:, 0] == -1000).all(), "row above the volume reads as air"
    whole = stack_window(hu, 4, 0, 0, (6, 6), context=3)
    np.testing.assert_array_equal(whole, slice_stack(hu, 4, 3))


def test_samples_are_clipped_seven_slice_stacks_with_the_middle_mask(dataset: Path) -> None:
    task = SegmentationTask(_settings(dataset))
    uid = task.split.train[0]
    hu = task.cache.volume(uid).hu
    whole = SegmentationSamples(task.cache, task.masks, [SliceSample(uid, 5, 0, 0)], (32, 32))
    image, mask = whole[0]
    assert image.dtype == torch.float32 and mask.dtype == torch.bool
    np.testing.assert_array_equal(image.numpy(), clip_hu(slice_stack(hu, 5, 3)))
    np.testing.assert_array_equal(mask[0].numpy(), task.masks.slice(uid, 5))
    crop = SegmentationSamples(task.cache, task.masks, [SliceSample(uid, 5, 8, -4)], (16, 16))
    image, mask = crop[0]
    assert image.shape == (7, 16, 16) and mask.shape == (1, 16, 16)
    np.testing.assert_array_equal(mask[0, :, 4:].numpy(), task.masks.slice(uid, 5)[8:24, 0:12])
    assert not mask[0, :, :4].any() and (image[:, :, :4] == -1000).all()


def test_training_crops_are_a_pure_function_of_seed_and_epoch(dataset: Path) -> None:
    task = SegmentationTask(_settings(dataset))
    train = task.split.train
    first = training_crops(task.masks, train, 50, seed=1, epoch=3)
    assert first == training_crops(task.masks, train, 50, seed=1, epoch=3)
    assert first != training_crops(task.masks, train, 50, seed=1, epoch=4)
    assert first != training_crops(task.masks, train, 50, seed=2, epoch=3)
    per_series = {uid: sum(s.series_uid == uid for s in first) for uid in train}
    assert min(per_series.values()) >= 50 // len(train) - 1, "nodules take turns"
    for sample in first:
        (nodule,) = task.masks.nodules(sample.series_uid)
        assert sample.index in nodule.slices
        _, row, col = nodule.center_irc
        assert row - 48 <= sample.top <= row - 16 and col - 48 <= sample.left <= col - 16


def test_background_crops_come_from_anywhere_inside_the_volume(dataset: Path) -> None:
    task = SegmentationTask(_settings(dataset))
    train = task.split.train
    shapes = {uid: task.cache.volume(uid).hu.shape for uid in train}
    crops = training_crops(task.masks, train, 400, seed=1, epoch=1, background=0.5, shapes=shapes)
    assert crops == training_crops(
        task.masks, train, 400, seed=1, epoch=1, background=0.5, shapes=shapes
    )
    off_slices, expected_off = 0, 0.0
    for sample in crops:
        slices = shapes[sample.series_uid][0]
        assert 0 <= sample.index < slices
        (nodule,) = task.masks.nodules(sample.series_uid)
        off_slices += sample.index not in nodule.slices
        expected_off += 0.5 * (1 - len(nodule.slices) / slices)
    # Nodule crops never leave the nodule's slices; background ones do, at the slice ratio.
    assert off_slices > 0
    assert abs(off_slices - expected_off) < 0.25 * expected_off


def test_validation_uses_all_slices_or_only_positive_ones(dataset: Path) -> None:
    task = SegmentationTask(_settings(dataset))
    uid = task.split.validation[0]
    everything = validation_slices(task.cache, task.masks, [uid], "all")
    positive = validation_slices(task.cache, task.masks, [uid], "positive")
    assert [s.index for s in everything] == list(range(SHAPE[0]))
    assert [s.index for s in positive] == task.masks.positive_slices(uid)
    assert 0 < len(positive) < len(everything)
    assert len(task.validation_samples()) == SHAPE[0]
    assert task.canvas == (32, 32)


def test_dice_loss_per_sample() -> None:
    label = torch.zeros(2, 1, 4, 4)
    label[:, :, 1:3, 1:3] = 1
    prediction = torch.stack([label[0], torch.zeros(1, 4, 4)])
    loss = dice_loss(prediction, label)
    assert loss.shape == (2,)
    assert loss[0] == pytest.approx(0.0)
    assert loss[1] == pytest.approx(1 - 1 / 5)  # (0 + 1) / (0 + 4 + 1)


def test_dice_over_the_batch_keeps_penalising_false_positives_on_empty_crops() -> None:
    label = torch.zeros(2, 1, 16, 16)
    label[0, 0, 4:8, 4:8] = 1  # a nodule crop, then a background crop
    prediction = label.clone()
    prediction[1] = 0.9  # the background crop fires everywhere
    prediction.requires_grad_(True)
    per_sample = dice_loss(prediction, label).sum()
    (per_sample_grad,) = torch.autograd.grad(per_sample, prediction)
    over_batch = dice_loss(prediction, label, over_batch=True)
    (over_batch_grad,) = torch.autograd.grad(over_batch, prediction)
    assert over_batch.shape == ()
    assert over_batch.item() == pytest.approx(1 - (2 * 16 + 1) / (16 + 0.9 * 256 + 16 + 1))
    # Per sample, the empty crop's loss is saturated: its gradient is ~1 / 231^2.
    assert per_sample_grad[1].abs().max() < 1e-4
    assert over_batch_grad[1].min() > 10 * per_sample_grad[1].abs().max()


def test_false_negative_term_ignores_false_positives() -> None:
    label = torch.zeros(1, 1, 8, 8)
    label[..., 2:4, 2:4] = 1
    found = label.clone()
    found_with_extra = label.clone()
    found_with_extra[..., 6:, 6:] = 1
    missed = label.clone()
    missed[..., 2, 2] = 0
    plain = segmentation_loss(found, label, fn_weight=0.0)
    assert segmentation_loss(found_with_extra, label, 8.0) - segmentation_loss(
        found_with_extra, label, 0.0
    ) == pytest.approx(segmentation_loss(found, label, 8.0) - plain, abs=1e-6)
    fn_term = (segmentation_loss(missed, label, 1.0) - segmentation_loss(missed, label, 0.0)).item()
    assert fn_term > 0.1


def test_pixel_records_and_metrics() -> None:
    label = torch.zeros(2, 1, 4, 4)
    label[0, 0, 0, :] = 1  # 4 label pixels
    prediction = torch.zeros(2, 1, 4, 4)
    prediction[0, 0, 0, :3] = 0.9  # 3 TP, 1 FN
    prediction[1, 0, 3, :2] = 0.8  # 2 FP on an empty slice
    records = pixel_records(prediction, label, torch.tensor([0.5, 0.25]))
    assert records["tp"].tolist() == [3, 0] and records["fn"].tolist() == [1, 0]
    assert records["fp"].tolist() == [0, 2] and records["label"].tolist() == [4, 0]
    metrics = segmentation_metrics(records)
    assert metrics["loss"] == pytest.approx(0.375)
    assert (metrics["tp_pct"], metrics["fn_pct"], metrics["fp_pct"]) == (75.0, 25.0, 50.0)
    assert metrics["recall"] == 0.75 and metrics["precision"] == 0.6
    assert metrics["f1"] == pytest.approx(2 * 0.6 * 0.75 / 1.35)


def test_overlay_colours() -> None:
    hu = np.full((2, 2), -1000, np.int16)
    predicted = np.array([[True, True], [False, False]])
    label = np.array([[True, False], [True, False]])
    rgb = overlay(hu, predicted, label)
    for (r, c), color in (((0, 0), TP_COLOR), ((0, 1), FP_COLOR), ((1, 0), FN_COLOR)):
        assert np.argmax(rgb[r, c]) == np.argmax(color) and rgb[r, c].max() > 0.5
    np.testing.assert_array_equal(rgb[1, 1], [0, 0, 0])


def test_train_step_gives_a_mean_loss_and_per_sample_records(dataset: Path) -> None:
    task = SegmentationTask(_settings(dataset, augment=AugmentSettings(noise_hu=0.0)))
    model = task.build_model()
    batch = next(iter(torch.utils.data.DataLoader(task.train_samples(1), batch_size=4)))
    generator = torch.Generator().manual_seed(0)
    out = task.train_step(model, batch, generator, torch.device("cpu"))
    out.loss.backward()
    assert out.loss.dim() == 0 and all(v.shape == (4,) for v in out.records.values())
    assert out.records["label"].sum() > 0


class _DenseTissue(torch.nn.Module):
    """Stands in for a trained model: marks the middle slice's soft tissue."""

    def forward(self, stacks: torch.Tensor) -> torch.Tensor:
        return (stacks[:, 3:4] > -500).float()


def test_nodule_recall_counts_nodules_hit(dataset: Path) -> None:
    task = SegmentationTask(_settings(dataset))
    uids = list(task.split.train)
    result = nodule_recall(_DenseTissue(), task.cache, task.masks, uids)
    assert (result.found, result.total, result.rate, result.pixel_recall) == (4, 4, 1.0, 1.0)
    big_only = nodule_recall(_DenseTissue(), task.cache, task.masks, uids, min_diameter_mm=7)
    assert big_only.total == 0


@pytest.mark.slow
def test_cli_trains_and_writes_metrics_checkpoints_and_images(
    dataset: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    result = CliRunner().invoke(
        app,
        ["train", "segment", str(dataset), "--out", str(out), "--epochs", "1",
         "--epoch-samples", "8", "--batch-size", "4", "--no-tensorboard", "--image-series", "1"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    (line,) = (out / "metrics.jsonl").read_text().splitlines()
    metrics = json.loads(line)
    for key in ("loss", "tp_pct", "fn_pct", "fp_pct", "precision", "recall", "f1"):
        assert f"val/{key}" in metrics and f"train/{key}" in metrics
    assert (out / "best.pt").exists() and (out / "last.pt").exists()
    assert len(list((out / "images" / "epoch-001").glob("*.png"))) == 6
    assert load_model(out / "best.pt").training is False


def test_bad_val_slices_is_a_user_error(dataset: Path) -> None:
    result = CliRunner().invoke(
        app, ["train", "segment", str(dataset), "--out", "x", "--val-slices", "some"]
    )
    assert result.exit_code == 2


@pytest.mark.slow
def test_book_unet_flags_a_plausible_mask_on_the_real_ct() -> None:
    """The book's weights on 20 slices of the real 141-slice CT (measured: 60,852 voxels
    above 0.5 in 136 components; the whole scan: 266,465 voxels in 958 components)."""
    from lungcad.analysis.segmentation import segment_volume

    hu = read_ct(shared_file("data/ct/chest-ct-141-dicom")).hu
    model = load_model(shared_file(BOOK_UNET))
    probabilities = segment_volume(model, np.ascontiguousarray(hu[60:80]), batch_size=4)
    flagged = probabilities > 0.5
    _, components = ndimage.label(flagged)
    assert 30_000 < flagged.sum() < 120_000
    assert 60 < components < 300


@pytest.mark.slow
def test_resumed_run_ends_with_the_same_weights(dataset: Path, tmp_path: Path) -> None:
    from lungcad.training.engine import EngineOptions, train

    def run(out: Path, epochs: int, resume: bool = False) -> dict[str, torch.Tensor]:
        options = EngineOptions(
            out_dir=out, epochs=epochs, batch_size=2, tensorboard=False, resume=resume
        )
        train(SegmentationTask(_settings(dataset, epoch_samples=4, image_series=0)), options)
        return torch.load(out / "last.pt", weights_only=True)["model_state"]

    straight = run(tmp_path / "straight", 2)
    run(tmp_path / "resumed", 1)
    resumed = run(tmp_path / "resumed", 2, resume=True)
    for name, tensor in straight.items():
        torch.testing.assert_close(resumed[name], tensor, rtol=0, atol=0, msg=name)


def test_best_checkpoint_metric_is_recall_unless_asked_for_f1(dataset: Path) -> None:
    assert SegmentationTask(_settings(dataset)).best_metric == "val/recall"
    assert SegmentationTask(_settings(dataset, best_by="f1")).best_metric == "val/f1"
    with pytest.raises(LungcadError, match="--best-by"):
        _settings(dataset, best_by="dice")
    with pytest.raises(LungcadError, match="--background"):
        _settings(dataset, background=1.0)
