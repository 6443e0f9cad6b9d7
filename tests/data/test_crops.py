import numpy as np
import pytest

from lungcad.data.crops import clip_hu, crop_irc, slice_stack


@pytest.fixture
def volume() -> np.ndarray:
    return np.arange(10 * 12 * 14, dtype=np.int16).reshape(10, 12, 14)


def test_inside_crop_is_a_copy_centred_on_the_voxel(volume: np.ndarray) -> None:
    crop = crop_irc(volume, (5, 6, 7), (4, 4, 4))
    np.testing.assert_array_equal(crop, volume[3:7, 4:8, 5:9])
    crop[...] = 0
    assert volume[5, 6, 7] != 0


@pytest.mark.parametrize("center", [(0, 0, 0), (9, 11, 13), (5, -1, 7), (12, 6, 7)])
def test_edge_crop_pads_with_air_and_keeps_alignment(volume: np.ndarray, center: tuple) -> None:
    crop = crop_irc(volume, center, (4, 6, 6))
    assert crop.shape == (4, 6, 6)
    for offset in np.ndindex(crop.shape):
        source = [c - w // 2 + o for c, w, o in zip(center, (4, 6, 6), offset, strict=True)]
        inside = all(0 <= s < n for s, n in zip(source, volume.shape, strict=True))
        assert crop[offset] == (volume[tuple(source)] if inside else -1000)


def test_crop_fully_outside_is_all_air(volume: np.ndarray) -> None:
    assert (crop_irc(volume, (100, 100, 100), (2, 2, 2)) == -1000).all()


def test_slice_stack_replicates_edges(volume: np.ndarray) -> None:
    stack = slice_stack(volume, 1, context=3)
    assert stack.shape == (7, 12, 14)
    np.testing.assert_array_equal(stack[0], volume[0])
    np.testing.assert_array_equal(stack[2], volume[0])
    np.testing.assert_array_equal(stack[3], volume[1])
    np.testing.assert_array_equal(stack[6], volume[4])
    last = slice_stack(volume, 9)
    np.testing.assert_array_equal(last[6], volume[9])
    with pytest.raises(IndexError):
        slice_stack(volume, 10)


def test_clip_hu() -> None:
    clipped = clip_hu(np.array([-3000, -500, 2500], np.int16))
    assert clipped.dtype == np.float32
    assert clipped.tolist() == [-1000.0, -500.0, 1000.0]
