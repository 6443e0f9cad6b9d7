"""Synthetic phantoms: LUNA16 layout, determinism, ground truth that matches the image."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from lungcad.cli import app
from lungcad.data import luna
from lungcad.data.ct import read_ct
from lungcad.data.geometry import IDENTITY_DIRECTION, xyz_to_irc
from lungcad.data.synth import PhantomScan, generate_scan, series_uid, write_dataset
from lungcad.data.synth.nodules import draw_diameter, draw_kind, malignancy_logit, reader_ratings
from lungcad.errors import LungcadError
from tests.conftest import shared_file

TABLES = (
    "annotations.csv",
    "annotations_excluded.csv",
    "annotations_with_malignancy.csv",
    "candidates.csv",
    "seriesuids.csv",
)


def _hashes(root: Path) -> dict[str, str]:
    return {
        str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


def _scans_with_nodules(size: int, count: int) -> list[PhantomScan]:
    found = []
    for index in range(40):
        scan = generate_scan(11, index, size)
        if scan.nodules:
            found.append(scan)
        if len(found) == count:
            return found
    raise AssertionError("too few phantoms with nodules")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "luna"
    write_dataset(out, scans=3, seed=5, size=64, subsets=2)
    return out


def test_same_seed_writes_identical_bytes_and_another_seed_does_not(
    dataset: Path, tmp_path: Path
) -> None:
    again = tmp_path / "again"
    other = tmp_path / "other"
    write_dataset(again, scans=3, seed=5, size=64, subsets=2)
    write_dataset(other, scans=3, seed=6, size=64, subsets=2)
    assert _hashes(again) == _hashes(dataset)
    assert set(_hashes(other).values()).isdisjoint(_hashes(dataset).values())


def test_layout_headers_and_readers(dataset: Path) -> None:
    for name in TABLES:
        assert (dataset / name).is_file(), name
    header = "seriesuid,coordX,coordY,coordZ,diameter_mm"
    assert (dataset / "annotations.csv").read_text().splitlines()[0] == header
    assert (dataset / "annotations_excluded.csv").read_text().splitlines()[0] == header
    assert (dataset / "candidates.csv").read_text().splitlines()[
        0
    ] == "seriesuid,coordX,coordY,coordZ,class"
    malignancy_header = (dataset / "annotations_with_malignancy.csv").read_text().splitlines()[0]
    assert malignancy_header.startswith(header + ",mal_bool,mal_details,bboxLowX")
    assert malignancy_header.endswith(",len_mal_details")

    uids = luna.read_series_uids(dataset / "seriesuids.csv")
    assert len(uids) == 3 and not (dataset / "seriesuids.csv").read_text().startswith("seriesuid")
    scans = luna.discover_scans(dataset)
    assert sorted(scans) == sorted(uids)
    assert {path.parent.name for path in scans.values()} == {"subset0", "subset1"}
    for uid, path in scans.items():
        volume = read_ct(path)
        assert volume.series_uid == uid and volume.hu.dtype == np.int16
        assert volume.hu.shape[1:] == (64, 64)
    annotations = luna.read_annotations(dataset / "annotations.csv")
    candidates = luna.read_candidates(dataset / "candidates.csv")
    luna.read_annotations(dataset / "annotations_excluded.csv")
    malignancy = luna.read_malignancy_annotations(dataset / "annotations_with_malignancy.csv")
    assert len(malignancy) == len(annotations)
    assert sum(c.is_nodule for c in candidates) == len(annotations)
    merged = luna.merge_candidates(candidates, annotations, malignancy)
    assert all(c.has_annotation for c in merged if c.is_nodule)


def test_uids_are_dicom_style_and_depend_on_seed_index_and_size() -> None:
    uids = {
        series_uid(seed, index, size) for seed in (0, 1) for index in (0, 1) for size in (64, 512)
    }
    assert len(uids) == 8
    for uid in uids:
        assert len(uid) <= 64
        assert all(
            part.isdigit() and (part == "0" or not part.startswith("0")) for part in uid.split(".")
        )


def test_lungs_are_near_minus_850_hu() -> None:
    scan = generate_scan(2, 0, 96)
    assert -900 <= float(np.median(scan.hu[scan.lung_mask])) <= -800
    assert np.median(scan.hu[0, :4, :4]) < -900  # air (or padding) in the corner


def test_annotated_centres_land_in_their_nodules() -> None:
    for scan in _scans_with_nodules(96, 3):
        for nodule in scan.nodules:
            voxel = xyz_to_irc(nodule.center_xyz, scan.geometry)
            assert scan.hu[voxel] > -700, (nodule, scan.hu[voxel])
            assert scan.nodule_labels[voxel] == nodule.label
            assert 3.0 * 0.8 <= nodule.diameter_mm <= 30.0 * 1.2


def test_candidates_hold_every_nodule_and_100_to_400_negatives_each() -> None:
    for scan in _scans_with_nodules(64, 3):
        positives = [c for c in scan.candidates if c.is_nodule]
        negatives = len(scan.candidates) - len(positives)
        assert len(positives) == len(scan.nodules)
        assert 100 <= (negatives - len(scan.findings)) / len(positives) <= 400
        for nodule in scan.nodules:
            offsets = [
                np.linalg.norm(np.subtract(c.center_xyz, nodule.center_xyz)) for c in positives
            ]
            assert min(offsets) < nodule.diameter_mm / 8


def test_flipped_direction_keeps_annotations_in_place() -> None:
    flipped = None
    for index in range(60):
        scan = generate_scan(3, index, 64)
        if scan.geometry.direction != IDENTITY_DIRECTION and scan.nodules:
            flipped = scan
            break
    assert flipped is not None, "no flipped phantom with nodules among the first 60"
    geometry = flipped.geometry
    assert set(np.diag(geometry.direction_matrix)) == {-1.0, 1.0}
    for nodule in flipped.nodules:
        voxel = xyz_to_irc(nodule.center_xyz, geometry)
        assert flipped.nodule_labels[voxel] == nodule.label
        low, high = np.array(nodule.bbox_low_xyz), np.array(nodule.bbox_high_xyz)
        assert np.all(low <= np.array(nodule.center_xyz) + 1e-6)
        assert np.all(np.array(nodule.center_xyz) <= high + 1e-6)


def test_refuses_non_empty_output_but_accepts_an_empty_folder(tmp_path: Path) -> None:
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    with pytest.raises(LungcadError, match="not empty"):
        write_dataset(tmp_path / "full", scans=1, seed=0, size=64)
    (tmp_path / "empty").mkdir()
    assert write_dataset(tmp_path / "empty", scans=1, seed=0, size=64).scans == 1


def test_interrupted_run_leaves_nothing_that_looks_complete(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import lungcad.data.synth.dataset as dataset_module

    calls = []

    def failing(seed: int, index: int, size: int) -> PhantomScan:
        calls.append(index)
        if index == 1:
            raise KeyboardInterrupt
        return generate_scan(seed, index, size)

    monkeypatch.setattr(dataset_module, "generate_scan", failing)
    with pytest.raises(KeyboardInterrupt):
        write_dataset(tmp_path / "out", scans=3, seed=0, size=64)
    assert calls == [0, 1]
    assert list(tmp_path.iterdir()) == []


def test_malignancy_rate_overlap_and_reader_consistency() -> None:
    rng = np.random.default_rng(0)
    labels, diameters = [], []
    for _ in range(3000):
        diameter = draw_diameter(rng)
        kind, shape, _ = draw_kind(rng, diameter)
        probability = 1 / (
            1 + np.exp(-(malignancy_logit(diameter, kind, shape) + rng.normal(0, 0.8)))
        )
        malignant = bool(rng.uniform() < probability)
        ratings = reader_ratings(rng, malignant, float(probability))
        assert malignant == (sum(r >= 4 for r in ratings) >= 2)
        assert all(1 <= r <= 5 for r in ratings) and 1 <= len(ratings) <= 4
        labels.append(malignant)
        diameters.append(diameter)
    labels_array, diameters_array = np.array(labels), np.array(diameters)
    assert 0.25 <= labels_array.mean() <= 0.4
    # Size matters but does not decide: both classes at both ends.
    assert (
        0 < labels_array[diameters_array < 6].mean() < labels_array[diameters_array > 12].mean() < 1
    )


def test_diameters_follow_the_luna16_annotations() -> None:
    table = shared_file("data/luna16/annotations.csv")
    real = np.array([a.diameter_mm for a in luna.read_annotations(table)])
    rng = np.random.default_rng(1)
    drawn = np.array([draw_diameter(rng) for _ in range(5000)])
    assert drawn.min() > 3.0 and drawn.max() <= 30.0
    # No value repeats: a clip would pile a tail on one diameter.
    assert len(np.unique(drawn)) == len(drawn)
    for percent in (5, 25, 50, 75):
        ours, theirs = np.percentile(drawn, percent), np.percentile(real, percent)
        assert abs(ours - theirs) < 0.08 * theirs, (percent, ours, theirs)
    assert abs((drawn < 4).mean() - (real < 4).mean()) < 0.02


def test_small_phantom_is_fast() -> None:
    generate_scan(0, 0, 64)
    started = time.perf_counter()
    generate_scan(0, 1, 64)
    assert time.perf_counter() - started < 1.0


def test_cli_synth_writes_a_dataset(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        app, ["synth", str(tmp_path / "cli"), "--scans", "2", "--size", "64", "--seed", "4"]
    )
    assert result.exit_code == 0, result.output
    assert "wrote 2 scans" in result.output
    assert len(luna.read_series_uids(tmp_path / "cli" / "seriesuids.csv")) == 2
