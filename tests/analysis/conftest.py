"""Tiny CTs and tiny models whose behaviour is known, so analysis results can be predicted.

``dense_tissue_unet`` is a real checkpointable U-Net wired by hand to output
``sigmoid(relu((hu + 300) / 10) - 5)`` of the middle slice: above 0.5 exactly where the
HU exceeds -250. ``constant_classifier`` ignores its crop and answers ``sigmoid(logit)``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from lungcad.data.ct import CtVolume, write_metaimage
from lungcad.data.geometry import IDENTITY_DIRECTION, Geometry
from lungcad.models import (
    ClassifierConfig,
    LunaModel,
    ModelConfig,
    SegmentationConfig,
    SegmentationModel,
    build_model,
    save_checkpoint,
)

TINY_CONFIG = SegmentationConfig(depth=2, wf=2)
TINY_GEOMETRY = Geometry(
    origin_xyz=(-10.0, -20.0, -30.0), spacing_xyz=(0.8, 0.8, 2.0), direction=IDENTITY_DIRECTION
)
# Two dense spheres (I, R, C) in lung-like air; radius 3 voxels in-plane, 1.5 along I.
SPHERE_CENTERS_IRC = ((5, 10, 10), (6, 22, 20))


def tiny_hu(shape: tuple[int, int, int] = (12, 32, 32)) -> np.ndarray:
    hu = np.full(shape, -800, dtype=np.int16)
    i, r, c = np.mgrid[: shape[0], : shape[1], : shape[2]]
    for ci, cr, cc in SPHERE_CENTERS_IRC:
        hu[(i - ci) ** 2 * 4 + (r - cr) ** 2 + (c - cc) ** 2 <= 9] = 50
    return hu


def dense_tissue_unet() -> SegmentationModel:
    model = SegmentationModel(TINY_CONFIG)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.zero_()
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.reset_running_stats()  # mean 0, variance 1
                module.weight.fill_(1.0)
        first = model.unet.down_path[0]
        up = model.unet.up_path[0]
        first.block[0].weight[0, 3, 1, 1] = 0.1  # middle of 7 slices, HU / 10
        first.block[0].bias[0] = 30.0  # + 300 HU / 10
        first.block[3].weight[0, 0, 1, 1] = 1.0
        up.conv_block.block[0].weight[0, 4, 1, 1] = 1.0  # the skip connection's channel 0
        up.conv_block.block[3].weight[0, 0, 1, 1] = 1.0
        model.unet.last.weight[0, 0, 0, 0] = 1.0
        model.unet.last.bias[0] = -5.0
    return model.eval()


def constant_classifier(logit: float) -> LunaModel:
    model = LunaModel()
    with torch.no_grad():
        model.head_linear.weight.zero_()
        model.head_linear.bias.copy_(torch.tensor([0.0, logit]))
    return model.eval()


def save_model(path: Path, model: torch.nn.Module, config: ModelConfig) -> Path:
    return save_checkpoint(
        path,
        model=model,
        config=config,
        epoch=1,
        samples_seen=1,
        metrics={},
        command_line=["test"],
        data_fingerprint="test",
    )


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny tensors gain nothing from threads, and on a busy machine every parallel region
    can wait a scheduler slice for its second thread (0.3 s per tiny forward, measured)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """segmentation.pt (dense tissue), classifier.pt (p 0.99), malignancy.pt (p 0.0067)."""
    folder = tmp_path_factory.mktemp("models")
    save_model(folder / "segmentation.pt", dense_tissue_unet(), TINY_CONFIG)
    save_model(folder / "classifier.pt", constant_classifier(5.0), ClassifierConfig("classifier"))
    save_model(folder / "malignancy.pt", constant_classifier(-5.0), ClassifierConfig("malignancy"))
    return folder


@pytest.fixture(scope="session")
def random_unet() -> SegmentationModel:
    torch.manual_seed(0)
    return build_model("segmentation", TINY_CONFIG).eval()


@pytest.fixture
def tiny_volume(tmp_path: Path) -> CtVolume:
    return CtVolume("1.2.3.4", tiny_hu(), TINY_GEOMETRY, tmp_path / "tiny.mhd")


@pytest.fixture
def tiny_mhd(tmp_path: Path) -> Path:
    path = tmp_path / "scans" / "1.2.3.4.mhd"
    path.parent.mkdir()
    write_metaimage(path, tiny_hu(), TINY_GEOMETRY)
    return path
