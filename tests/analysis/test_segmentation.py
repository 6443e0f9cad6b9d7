"""``segment_volume`` is the model applied to each slice stack, batched or not, any backend."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lungcad.analysis.segmentation import OnnxSliceModel, segment_volume, stack_indices
from lungcad.data.crops import clip_hu, slice_stack
from lungcad.models import LoadedModel, SegmentationModel
from tests.analysis.conftest import TINY_CONFIG

ONNX_LEGACY_EXPORTER = pytest.mark.filterwarnings(
    "ignore:You are using the legacy TorchScript-based ONNX export",
    "ignore:The feature will be removed:DeprecationWarning",
)


def random_hu(shape: tuple[int, int, int] = (9, 16, 16)) -> np.ndarray:
    return np.random.default_rng(0).integers(-1200, 1500, shape).astype(np.int16)


def per_slice(model: SegmentationModel, hu: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return np.stack(
            [
                model(torch.from_numpy(clip_hu(slice_stack(hu, i)))[None])[0, 0].numpy()
                for i in range(hu.shape[0])
            ]
        )


def test_stacks_repeat_the_edge_slices() -> None:
    assert stack_indices(0, 2, slices=5, context=2).tolist() == [[0, 0, 0, 1, 2], [0, 0, 1, 2, 3]]
    assert stack_indices(4, 5, slices=5, context=1).tolist() == [[3, 4, 4]]


@pytest.mark.parametrize("batch_size", [1, 4, 9, 32])
def test_equals_the_model_applied_slice_by_slice(
    random_unet: SegmentationModel, batch_size: int
) -> None:
    hu = random_hu()
    expected = per_slice(random_unet, hu)
    got = segment_volume(random_unet, hu, batch_size=batch_size)
    assert got.dtype == np.float32 and got.shape == hu.shape
    # Only float summation order differs (batched, channels_last), on saturated logits.
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)


def test_reports_progress_after_each_batch(random_unet: SegmentationModel) -> None:
    calls: list[tuple[int, int]] = []
    segment_volume(random_unet, random_hu(), batch_size=4, progress=lambda *a: calls.append(a))
    assert calls == [(4, 9), (8, 9), (9, 9)]


def test_rejects_a_non_volume(random_unet: SegmentationModel) -> None:
    with pytest.raises(ValueError, match="expected an"):
        segment_volume(random_unet, np.zeros((16, 16), np.int16))


@ONNX_LEGACY_EXPORTER
def test_onnx_backend_matches_eager(random_unet: SegmentationModel) -> None:
    onnx_model = OnnxSliceModel.export(LoadedModel(random_unet, "segmentation", TINY_CONFIG))
    hu = random_hu()
    np.testing.assert_allclose(
        segment_volume(onnx_model, hu, batch_size=4),
        segment_volume(random_unet, hu, batch_size=4),
        atol=1e-4,
        rtol=0,
    )
