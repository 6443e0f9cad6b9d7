"""``analyze_ct`` on a tiny CT with hand-wired models: what it finds, counts and records."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from lungcad.analysis.classification import classify_crops, shift_inside
from lungcad.analysis.pipeline import AnalysisOptions, ModelBundle, analyze_ct
from lungcad.data.ct import CtVolume
from lungcad.data.geometry import irc_to_xyz
from lungcad.errors import LungcadError
from lungcad.models import LunaModel, file_sha256
from tests.analysis.conftest import SPHERE_CENTERS_IRC

NODULE_KEYS = {"center_xyz", "center_irc", "diameter_mm", "voxels", "p_nodule", "p_malignant"}
FUNNEL_KEYS = {
    "voxels_above_threshold",
    "voxels_after_erosion",
    "components",
    "blobs_in_large_components",
    "candidates_classified",
    "nodules",
    "malignant",
}
TIMING_KEYS = {"load", "segment", "group", "classify", "malignancy", "total"}


@pytest.fixture(scope="module")
def bundle(model_dir: Path) -> ModelBundle:
    return ModelBundle.from_dir(model_dir, device="cpu")


def test_finds_the_two_dense_spheres(bundle: ModelBundle, tiny_volume: CtVolume) -> None:
    result = analyze_ct(tiny_volume, bundle, AnalysisOptions(), load_seconds=0.25)
    nodules = result.nodules
    assert sorted(d.center_irc for d in nodules) == sorted(SPHERE_CENTERS_IRC)
    for detection in nodules:
        assert detection.center_xyz == pytest.approx(
            irc_to_xyz(detection.center_irc, tiny_volume.geometry), abs=1e-6
        )
        assert detection.p_nodule == pytest.approx(1 / (1 + np.exp(-5.0)))
        assert detection.p_malignant == pytest.approx(1 / (1 + np.exp(5.0)))
    above = int(np.count_nonzero(tiny_volume.hu > -250))
    assert result.funnel == {
        "voxels_above_threshold": above,
        "voxels_after_erosion": sum(d.voxels for d in nodules),
        "components": 2,
        "blobs_in_large_components": 0,  # both smaller than BLOB_SEARCH_MIN_MM3
        "candidates_classified": 2,
        "nodules": 2,
        "malignant": 0,
    }
    assert result.timings_s["load"] == 0.25
    assert result.timings_s["total"] == pytest.approx(
        sum(v for k, v in result.timings_s.items() if k != "total")
    )


def test_json_has_the_documented_keys_and_model_hashes(
    bundle: ModelBundle, tiny_volume: CtVolume, model_dir: Path
) -> None:
    record = json.loads(json.dumps(analyze_ct(tiny_volume, bundle).to_json()))
    assert {"series_uid", "nodules", "funnel", "timings_s", "models"} <= set(record)
    assert record["series_uid"] == "1.2.3.4"
    assert all(set(n) == NODULE_KEYS for n in record["nodules"])
    assert set(record["funnel"]) == FUNNEL_KEYS
    assert set(record["timings_s"]) == TIMING_KEYS
    assert record["models"]["classifier"] == {
        "file": "classifier.pt",
        "sha256": file_sha256(model_dir / "classifier.pt"),
        "format": "lungcad",
    }
    assert set(record["models"]) == {"segmentation", "classifier", "malignancy"}


def test_nodule_threshold_filters_and_malignancy_is_null_without_its_model(
    model_dir: Path, tiny_volume: CtVolume
) -> None:
    bundle = ModelBundle.load(model_dir / "segmentation.pt", model_dir / "classifier.pt")
    strict = analyze_ct(tiny_volume, bundle, AnalysisOptions(nodule_threshold=0.999))
    assert strict.nodules == [] and len(strict.candidates) == 2
    assert strict.funnel["nodules"] == 0 and strict.funnel["malignant"] is None
    assert all(d.p_malignant is None for d in analyze_ct(tiny_volume, bundle).nodules)


def test_loading_checks_the_model_kinds(model_dir: Path) -> None:
    with pytest.raises(LungcadError, match="not segmentation"):
        ModelBundle.load(model_dir / "classifier.pt", model_dir / "classifier.pt")
    with pytest.raises(LungcadError, match="no such checkpoint"):
        ModelBundle.load(model_dir / "segmentation.pt", model_dir / "missing.pt")


def test_options_reject_bad_thresholds() -> None:
    with pytest.raises(LungcadError, match="nodule_threshold"):
        AnalysisOptions(nodule_threshold=1.5)
    with pytest.raises(LungcadError, match="--precision fp8"):
        AnalysisOptions(segmentation_precision="fp8")  # type: ignore[arg-type]


def test_bf16_segmentation_finds_the_same_spheres(
    bundle: ModelBundle, tiny_volume: CtVolume
) -> None:
    exact = analyze_ct(tiny_volume, bundle, AnalysisOptions(), load_seconds=0.0)
    fast = analyze_ct(
        tiny_volume, bundle, AnalysisOptions(segmentation_precision="bf16"), load_seconds=0.0
    )
    assert [d.center_irc for d in fast.nodules] == [d.center_irc for d in exact.nodules]
    assert fast.funnel == exact.funnel


def test_classify_crops_equals_one_crop_at_a_time() -> None:
    torch.manual_seed(0)
    model = LunaModel().eval()
    hu = np.random.default_rng(0).integers(-1000, 400, (40, 60, 60)).astype(np.int16)
    centers = np.array([[20, 30, 30], [2, 3, 58], [39, 59, 0]])  # the last two reach past edges
    got = classify_crops(model, hu, centers, batch_size=2)
    for center, probability in zip(centers, got, strict=True):
        start = center - np.array([16, 24, 24])
        crop = np.full((32, 48, 48), -1000.0, dtype=np.float32)  # air beyond the edge
        src = tuple(
            slice(max(s, 0), min(s + w, n))
            for s, w, n in zip(start, (32, 48, 48), hu.shape, strict=True)
        )
        dst = tuple(slice(sl.start - s, sl.stop - s) for sl, s in zip(src, start, strict=True))
        crop[dst] = np.clip(hu[src], -1000, 1000)
        with torch.no_grad():
            expected = model(torch.from_numpy(crop)[None, None])[1][0, 1].item()
        assert probability == pytest.approx(expected, abs=1e-5)


def test_book_crops_slide_back_inside_the_volume() -> None:
    centers = np.array([[3, 42, 347], [82, 220, 499], [70, 256, 256]])
    assert shift_inside(centers, (141, 512, 512)).tolist() == [
        [16, 42, 347],
        [82, 220, 488],
        [70, 256, 256],
    ]
    # A volume thinner than the crop cannot hold it: those axes keep the centre (air pads).
    assert shift_inside(np.array([[3, 10, 10]]), (20, 512, 512)).tolist() == [[3, 24, 24]]


def test_options_must_agree_with_where_the_models_are(
    bundle: ModelBundle, tiny_volume: CtVolume
) -> None:
    assert analyze_ct(tiny_volume, bundle, AnalysisOptions(device="cpu")).nodules
    if not torch.cuda.is_available():
        with pytest.raises(LungcadError, match="CUDA is not available"):
            analyze_ct(tiny_volume, bundle, AnalysisOptions(device="cuda"))
