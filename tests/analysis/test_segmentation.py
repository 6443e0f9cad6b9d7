"""``segment_volume`` is the model applied to each slice stack, batched or not, any backend."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lungcad.analysis.segmentation import (
    OnnxSliceModel,
    body_window,
    segment_volume,
    stack_indices,
)
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


def chest_like_hu(shape: tuple[int, int, int] = (6, 96, 128)) -> np.ndarray:
    """Air around a soft-tissue torso (rows 30-69, columns 20-99) holding a lung, and a
    separate dense table below it (rows 86-89)."""
    hu = np.full(shape, -1000, dtype=np.int16)
    hu[:, 30:70, 20:100] = 40
    hu[:, 38:62, 30:90] = -850
    hu[:, 86:90, 4:124] = 200
    return hu


def test_body_window_is_the_torso_grown_by_the_reach_on_the_pooling_grid() -> None:
    rows, cols = body_window(chest_like_hu(), reach=10, multiple=4)
    assert rows.start % 4 == 0 and cols.start % 4 == 0
    # The torso spans rows 30..69 and columns 20..99 (found on a 4x coarser grid).
    assert rows.start <= 30 - 10 and rows.stop >= 70 + 10
    assert cols.start <= 20 - 10 and cols.stop >= 100 + 10
    assert rows.stop <= 86, "the table is a separate region and stays out"
    assert rows.stop - rows.start < 96


def test_without_a_body_sized_region_slices_are_whole() -> None:
    hu = np.full((6, 32, 32), -800, dtype=np.int16)
    hu[2:4, 10:13, 10:13] = 50  # one small nodule in lung-like air
    assert body_window(hu, reach=10) == (slice(0, 32), slice(0, 32))
    assert body_window(np.full((4, 16, 16), -1000, np.int16), reach=2) == (
        slice(0, 16),
        slice(0, 16),
    )


def test_a_window_gives_whole_slice_outputs_inside_and_zero_outside(
    random_unet: SegmentationModel,
) -> None:
    hu = chest_like_hu()
    hu[:, 45:50, 50:55] = 30  # a nodule in the lung
    reach = TINY_CONFIG.reach
    window = body_window(hu, reach, TINY_CONFIG.size_multiple)
    whole = segment_volume(random_unet, hu, batch_size=3)
    windowed = segment_volume(
        random_unet, hu, batch_size=3, window=window, size_multiple=TINY_CONFIG.size_multiple
    )
    rows, cols = window
    body = (slice(30, 70), slice(20, 100))
    np.testing.assert_allclose(windowed[:, body[0], body[1]], whole[:, body[0], body[1]], atol=1e-5)
    outside = np.ones(hu.shape, dtype=bool)
    outside[:, rows, cols] = False
    assert outside.any() and not windowed[outside].any()


def test_sizes_the_model_cannot_take_are_padded_with_air(random_unet: SegmentationModel) -> None:
    hu = random_hu((3, 18, 21))  # TINY_CONFIG needs multiples of 2
    with pytest.raises(ValueError, match="multiples"):
        segment_volume(random_unet, hu)
    padded = np.pad(hu, ((0, 0), (0, 0), (0, 1)), constant_values=-1000)
    got = segment_volume(random_unet, hu, size_multiple=TINY_CONFIG.size_multiple)
    assert got.shape == hu.shape
    np.testing.assert_allclose(got, segment_volume(random_unet, padded)[:, :, :21], atol=1e-5)
