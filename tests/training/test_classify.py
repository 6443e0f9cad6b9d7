"""The classifier's data (split, balancing, crops), its task and its command, on tiny scans."""

from __future__ import annotations

import inspect
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
import typer
from typer.testing import CliRunner

from lungcad.cli.train_classify import classify
from lungcad.data.cache import VolumeCache, prepare_cache
from lungcad.data.ct import write_metaimage
from lungcad.data.geometry import Geometry, irc_to_xyz
from lungcad.data.luna import discover_scans, split_series
from lungcad.errors import LungcadError
from lungcad.models import load_checkpoint
from lungcad.training.augment import AugmentSettings, ClassifierAugmentSettings
from lungcad.training.classify import (
    POSITIVE_VIEWS_PER_EPOCH,
    CandidateCrops,
    ClassificationTask,
    ClassifySettings,
    balanced_order,
    default_epoch_samples,
    load_candidates,
)
from lungcad.training.engine import EngineOptions, train

GEOMETRY = Geometry((-40.0, 10.0, -200.0), (0.9, 0.9, 1.5), (1, 0, 0, 0, 1, 0, 0, 0, 1))
SHAPE = (24, 40, 40)
HEADER = "seriesuid,coordX,coordY,coordZ"


def write_tiny_luna(root: Path, series: int = 9, scanned: int | None = None) -> list[str]:
    """``series`` scans (the first ``scanned`` written as .mhd) with 2 nodules (bright
    spheres) and 6 negatives each, plus candidates.csv and annotations.csv."""
    rng = np.random.default_rng(0)
    uids = [f"1.2.840.99.{k}" for k in range(series)]
    candidates, annotations = [f"{HEADER},class"], [f"{HEADER},diameter_mm"]
    (root / "subset0").mkdir(parents=True)
    for k, uid in enumerate(uids):
        hu = rng.normal(-800, 20, SHAPE).astype(np.int16)
        grid = np.stack(np.meshgrid(*[np.arange(n) for n in SHAPE], indexing="ij"), axis=-1)
        for label, count in ((1, 2), (0, 6)):
            for _ in range(count):
                irc = tuple(int(rng.integers(4, n - 4)) for n in SHAPE)
                if label:
                    hu[np.linalg.norm(grid - irc, axis=-1) <= 3] = 40
                x, y, z = irc_to_xyz(irc, GEOMETRY)
                candidates.append(f"{uid},{x},{y},{z},{label}")
                if label:
                    annotations.append(f"{uid},{x},{y},{z},6.0")
        if scanned is None or k < scanned:
            write_metaimage(root / "subset0" / f"{uid}.mhd", hu, GEOMETRY)
    (root / "candidates.csv").write_text("\n".join(candidates) + "\n")
    (root / "annotations.csv").write_text("\n".join(annotations) + "\n")
    return uids


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tiny-luna")
    write_tiny_luna(root)
    prepare_cache(discover_scans(root), VolumeCache(root / ".lungcad-cache"))
    return root


def settings_for(root: Path, **overrides: object) -> ClassifySettings:
    fields: dict = {"data_root": root, "cache_dir": root / ".lungcad-cache", "val_stride": 3}
    return ClassifySettings(**{**fields, **overrides})


def test_split_keeps_series_apart_and_ignores_what_the_cache_lacks(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    uids = write_tiny_luna(tmp_path, series=9, scanned=7)
    prepare_cache(discover_scans(tmp_path), VolumeCache(tmp_path / "cache"))
    with caplog.at_level(logging.WARNING):
        loaded = load_candidates(tmp_path, VolumeCache(tmp_path / "cache"), val_stride=3)
    # The split is over every series the tables name, not only the cached ones.
    assert loaded.split == split_series(uids, 3)
    train_series = {c.series_uid for c in loaded.train}
    validation_series = {c.series_uid for c in loaded.validation}
    assert not train_series & validation_series
    assert validation_series <= set(loaded.split.validation)
    assert train_series | validation_series == set(uids[:7])
    assert sum("2 annotated series have no scan" in r.message for r in caplog.records) == 1


def test_crops_are_int16_boxes_around_each_candidate(tiny: Path) -> None:
    cache = VolumeCache(tiny / ".lungcad-cache")
    loaded = load_candidates(tiny, cache, val_stride=3)
    dataset = CandidateCrops(cache, loaded.train, np.array([3, 0]))
    crop, label, index = dataset[0]
    assert crop.dtype == torch.int16 and crop.shape == (1, 32, 48, 48)
    assert index == 3 and label == int(loaded.train[3].is_nodule)
    expected, _ = cache.crop(loaded.train[3].series_uid, loaded.train[3].center_xyz)
    assert np.array_equal(crop[0].numpy(), expected)
    nodule_crop, label, _ = dataset[1]  # candidates are ordered nodules first
    assert label == 1 and int(nodule_crop[0, 16, 24, 24]) == 40


def test_balanced_order_is_pure_balanced_and_walks_through_the_negatives() -> None:
    labels = np.array([True] * 3 + [False] * 20)
    first = balanced_order(labels, 12, ratio=2, seed=5, epoch=1)
    assert np.array_equal(first, balanced_order(labels, 12, ratio=2, seed=5, epoch=1))
    assert not np.array_equal(first, balanced_order(labels, 12, ratio=2, seed=5, epoch=2))
    assert not np.array_equal(first, balanced_order(labels, 12, ratio=2, seed=6, epoch=1))
    assert labels[first].tolist() == [True, False, False] * 4
    # Epochs 1 and 2 take 8 + 8 = 16 of the 20 negatives: no repeats before all are used.
    negatives = np.concatenate(
        [balanced_order(labels, 12, 2, 5, epoch)[~labels[first]] for epoch in (1, 2)]
    )
    assert len(set(negatives.tolist())) == 16
    # Positives cycle: each of the 3 shown once before any is shown again.
    assert sorted(first[labels[first]][:3].tolist()) == [0, 1, 2]
    unbalanced = balanced_order(labels, 23, ratio=0, seed=5, epoch=1)
    assert sorted(unbalanced.tolist()) == list(range(23))


def test_hard_negative_slots_follow_the_last_scores_and_the_stream_still_walks() -> None:
    labels = np.array([True] * 3 + [False] * 20)
    scores = np.zeros(23)
    scores[7] = 0.9  # the one negative the model still calls a nodule
    order = balanced_order(labels, 24, 2, 5, 1, hard_negative_fraction=0.5, last_scores=scores)
    assert np.array_equal(
        order, balanced_order(labels, 24, 2, 5, 1, hard_negative_fraction=0.5, last_scores=scores)
    )
    assert labels[order].tolist() == [True, False, False] * 8
    negatives = order[~labels[order]]
    assert negatives[1::2].tolist() == [7] * 8  # every other negative slot is a hard draw
    # The other slots read the same stream as without mining, at half the pace.
    plain = balanced_order(labels, 24, 2, 5, 1)
    assert negatives[0::2].tolist() == plain[~labels[plain]][:8].tolist()
    with pytest.raises(ValueError, match="last scores"):
        balanced_order(labels, 24, 2, 5, 1, hard_negative_fraction=0.5)


def test_mining_state_moves_the_next_epoch_and_survives_a_checkpoint(tiny: Path) -> None:
    task = ClassificationTask(settings_for(tiny, epoch_samples=64, hard_negatives=1.0))
    labels = task.train_labels
    negatives = np.flatnonzero(~labels)
    hard = int(negatives[3])
    # The model scored every negative ~0 except one: the hard draws now all take that one.
    task.after_train_epoch(
        {
            "index": torch.from_numpy(negatives),
            "prob": torch.where(torch.from_numpy(negatives) == hard, 0.8, 1e-6),
            "label": torch.zeros(len(negatives), dtype=torch.long),
        }
    )
    order = task.train_samples(2).order
    assert set(order[~labels[order]].tolist()) == {hard}
    restored = ClassificationTask(settings_for(tiny, epoch_samples=64, hard_negatives=1.0))
    assert not np.array_equal(restored.train_samples(2).order, order)
    restored.load_state_dict(task.state_dict())
    assert np.array_equal(restored.train_samples(2).order, order)


def test_default_epoch_is_derived_from_the_positives() -> None:
    assert default_epoch_samples(70, 1) == 70 * 2 * POSITIVE_VIEWS_PER_EPOCH
    assert default_epoch_samples(70, 3) == 70 * 4 * POSITIVE_VIEWS_PER_EPOCH


def test_task_steps_records_and_fingerprint(tiny: Path) -> None:
    task = ClassificationTask(settings_for(tiny, epoch_samples=8))
    model = task.build_model()
    samples = task.train_samples(1)
    assert len(samples) == 8 and task.train_samples(1).order.tolist() == samples.order.tolist()
    batch = torch.utils.data.default_collate([samples[i] for i in range(4)])
    out = task.train_step(model, batch, torch.Generator().manual_seed(0), torch.device("cpu"))
    assert out.loss.shape == () and out.loss.requires_grad
    assert out.records["label"].tolist() == [1, 0, 1, 0]
    assert {k: v.shape for k, v in out.records.items()} == {k: (4,) for k in out.records}
    assert torch.allclose(out.loss, out.records["loss"].mean())
    records = task.eval_step(model.eval(), batch, torch.device("cpu"))
    assert ((records["prob"] >= 0) & (records["prob"] <= 1)).all()
    metrics = task.metrics(records)
    assert {"loss/all", "correct/pos", "precision", "recall", "f1", "auc"} <= set(metrics)
    fingerprint = task.data_fingerprint()
    assert fingerprint == ClassificationTask(settings_for(tiny)).data_fingerprint()
    other_split = ClassificationTask(settings_for(tiny, val_stride=4))
    assert other_split.data_fingerprint() != fingerprint


def test_validation_is_every_validation_candidate_unbalanced(tiny: Path) -> None:
    task = ClassificationTask(settings_for(tiny))
    validation = task.validation_samples()
    assert len(validation) == len(task.candidates.validation) == 3 * 8
    assert sum(validation[i][1] for i in range(len(validation))) == 3 * 2


def test_excluded_findings_stay_out_of_training_and_of_the_validation_metrics(
    tmp_path: Path,
) -> None:
    write_tiny_luna(tmp_path)
    prepare_cache(discover_scans(tmp_path), VolumeCache(tmp_path / ".lungcad-cache"))
    # One excluded finding of unknown size (reach 5 mm) on the first negative of each series.
    negatives = [
        line.split(",") for line in (tmp_path / "candidates.csv").read_text().splitlines()[1:]
    ]
    first = {row[0]: row[1:4] for row in reversed(negatives) if row[4] == "0"}
    rows = [f"{uid},{x},{y},{z},-1" for uid, (x, y, z) in first.items()]
    (tmp_path / "annotations_excluded.csv").write_text(
        "\n".join([f"{HEADER},diameter_mm", *rows]) + "\n"
    )
    task = ClassificationTask(settings_for(tmp_path))
    assert not any(c.on_excluded_finding for c in task.train_candidates)
    flagged_train = [c for c in task.candidates.train if c.on_excluded_finding]
    assert len(task.train_candidates) == len(task.candidates.train) - len(flagged_train) > 0
    assert len(flagged_train) >= 6  # at least one in each of the 6 training series
    book_like = ClassificationTask(settings_for(tmp_path, train_on_excluded=True))
    assert book_like.train_candidates == task.candidates.train

    validation = task.validation_samples()
    batch = torch.utils.data.default_collate([validation[i] for i in range(len(validation))])
    records = task.eval_step(task.build_model().eval(), batch, torch.device("cpu"))
    excluded = records["excluded"]
    assert int(excluded.sum()) == sum(c.on_excluded_finding for c in task.candidates.validation)
    # Every excluded candidate called a nodule: the metrics neither count nor reward them.
    records["prob"] = torch.where(excluded, 0.9, records["label"].float())
    metrics = task.metrics(records)
    assert metrics["precision"] == metrics["recall"] == metrics["f1"] == 1.0
    assert metrics["excluded/flagged"] == metrics["count/excluded"] == int(excluded.sum()) >= 3
    assert metrics["count/neg"] == len(validation) - 6 - int(excluded.sum())


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("no-candidates", "no candidates_V2.csv or candidates.csv"),
        ("empty-cache", "cache is empty"),
        ("no-positives", r"no nodule \(class 1\)"),
    ],
)
def test_bad_input_is_a_one_line_user_error(tmp_path: Path, damage: str, message: str) -> None:
    write_tiny_luna(tmp_path, series=4)
    if damage != "empty-cache":
        prepare_cache(discover_scans(tmp_path), VolumeCache(tmp_path / ".lungcad-cache"))
    table = tmp_path / "candidates.csv"
    if damage == "no-candidates":
        table.unlink()
    elif damage == "no-positives":
        lines = table.read_text().splitlines()
        table.write_text("\n".join(line.replace(",1", ",0") for line in lines) + "\n")
    with pytest.raises(LungcadError, match=message) as error:
        ClassificationTask(settings_for(tmp_path))
    assert "\n" not in str(error.value)


@pytest.mark.slow
def test_a_short_run_writes_checkpoints_and_metrics(tiny: Path, tmp_path: Path) -> None:
    task = ClassificationTask(settings_for(tiny, epoch_samples=16, augment=AugmentSettings()))
    result = train(task, EngineOptions(out_dir=tmp_path, epochs=2, batch_size=8, tensorboard=True))
    assert result.epochs_done == 2 and result.samples_seen == 32
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [line["epoch"] for line in lines] == [1, 2]
    assert {"train/loss/all", "val/f1", "val/recall", "val/auc"} <= set(lines[-1])
    checkpoint = load_checkpoint(tmp_path / "best.pt")
    assert checkpoint["model_kind"] == "classifier"
    assert checkpoint["data_fingerprint"] == task.data_fingerprint()
    assert any((tmp_path / "tensorboard").iterdir())


def test_command_reports_bad_data_as_a_lungcad_error(tmp_path: Path) -> None:
    app = typer.Typer()
    app.command()(classify)
    (tmp_path / "subset0").mkdir()
    result = CliRunner().invoke(app, [str(tmp_path), "--out", str(tmp_path / "run")])
    assert isinstance(result.exception, LungcadError)
    assert "no candidates_V2.csv or candidates.csv" in str(result.exception)


def test_command_defaults_are_the_settings_defaults() -> None:
    """The command's literal defaults (kept literal so --help needs no torch import)."""
    defaults = {name: p.default for name, p in inspect.signature(classify).parameters.items()}
    settings = ClassifySettings(data_root=Path("d"), cache_dir=Path("c"))
    assert isinstance(settings.augment, ClassifierAugmentSettings)
    assert defaults["offset"] == settings.augment.offset == 0.05 < AugmentSettings().offset
    for name in ("hard_negatives", "train_on_excluded", "balance_ratio"):
        assert defaults[name] == getattr(settings, name)
