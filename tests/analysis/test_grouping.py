"""Grouping on hand-made masks: erosion, components, HU-weighted centres, mm, diameters."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lungcad.analysis.grouping import equivalent_diameter_mm, group_candidates, group_mask
from lungcad.data.geometry import IDENTITY_DIRECTION, Geometry, irc_to_xyz

UNIT = Geometry(
    origin_xyz=(0.0, 0.0, 0.0), spacing_xyz=(1.0, 1.0, 1.0), direction=IDENTITY_DIRECTION
)


def cube(mask: np.ndarray, corner: tuple[int, int, int], size: int) -> None:
    i, r, c = corner
    mask[i : i + size, r : r + size, c : c + size] = True


def test_erosion_drops_specks_and_counts_each_stage() -> None:
    mask = np.zeros((20, 20, 20), dtype=bool)
    cube(mask, (1, 1, 1), 5)  # erodes to its 3x3x3 core
    cube(mask, (10, 10, 10), 5)
    mask[17, 2, 17] = True  # a lone voxel: gone after one erosion
    cube(mask, (15, 15, 2), 2)  # 2x2x2: no voxel has all six neighbours, gone too
    grouping = group_mask(mask, np.zeros(mask.shape, np.int16), UNIT)
    assert grouping.voxels_above_threshold == 2 * 125 + 1 + 8
    assert grouping.voxels_after_erosion == 2 * 27
    assert [c.voxels for c in grouping.components] == [27, 27]
    assert [c.center_irc for c in grouping.components] == [(3.0, 3.0, 3.0), (12.0, 12.0, 12.0)]


def test_threshold_is_strict_and_applies_to_probabilities() -> None:
    probabilities = np.zeros((9, 9, 9), dtype=np.float32)
    probabilities[2:7, 2:7, 2:7] = 0.5  # exactly at the threshold: not above it
    assert group_candidates(probabilities, np.zeros((9, 9, 9), np.int16), UNIT).components == ()
    probabilities[2:7, 2:7, 2:7] = 0.51
    grouping = group_candidates(probabilities, np.zeros((9, 9, 9), np.int16), UNIT)
    assert len(grouping.components) == 1


def test_centre_is_weighted_by_clipped_hu_plus_1001() -> None:
    mask = np.zeros((7, 7, 7), dtype=bool)
    cube(mask, (1, 1, 1), 5)  # core: indices 2..4 on every axis
    hu = np.full(mask.shape, -1000, dtype=np.int16)  # weight 1 everywhere...
    hu[:, :, 4] = 3000  # ...except column 4, clipped to 1000 -> weight 2001
    (component,) = group_mask(mask, hu, UNIT).components
    expected_col = (2 * 1 + 3 * 1 + 4 * 2001) / (1 + 1 + 2001)
    assert component.center_irc == pytest.approx((3.0, 3.0, expected_col))


def test_patient_mm_follows_a_flipped_direction() -> None:
    geometry = Geometry(
        origin_xyz=(100.0, -50.0, 20.0),
        spacing_xyz=(0.5, 0.7, 2.5),
        direction=(-1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, -1.0),
    )
    mask = np.zeros((10, 12, 14), dtype=bool)
    cube(mask, (2, 3, 4), 5)  # core centre (4, 5, 6)
    (component,) = group_mask(mask, np.zeros(mask.shape, np.int16), geometry).components
    # x = 100 - 0.5 * col, y = -50 + 0.7 * row, z = 20 - 2.5 * index
    assert component.center_xyz == pytest.approx((97.0, -46.5, 10.0))
    assert component.center_xyz == pytest.approx(irc_to_xyz(component.center_irc, geometry))


def test_diameter_is_that_of_a_sphere_of_the_component_volume() -> None:
    spacing = (0.5, 0.7, 2.5)
    voxel_mm3 = 0.5 * 0.7 * 2.5
    assert equivalent_diameter_mm(np.array([27]), spacing)[0] == pytest.approx(
        (6 * 27 * voxel_mm3 / math.pi) ** (1 / 3)
    )
    mask = np.zeros((7, 7, 7), dtype=bool)
    cube(mask, (1, 1, 1), 5)
    geometry = Geometry((0.0, 0.0, 0.0), spacing, IDENTITY_DIRECTION)
    (component,) = group_mask(mask, np.zeros(mask.shape, np.int16), geometry).components
    assert component.diameter_mm == pytest.approx((6 * 27 * voxel_mm3 / math.pi) ** (1 / 3))


def test_empty_mask_gives_no_candidates() -> None:
    grouping = group_mask(np.zeros((4, 4, 4), bool), np.zeros((4, 4, 4), np.int16), UNIT)
    assert (grouping.components, grouping.voxels_above_threshold) == ((), 0)


def ball(mask: np.ndarray, centre: tuple[int, int, int], radius: float) -> None:
    i, r, c = np.ogrid[: mask.shape[0], : mask.shape[1], : mask.shape[2]]
    mask |= (i - centre[0]) ** 2 + (r - centre[1]) ** 2 + (c - centre[2]) ** 2 <= radius**2


def nodule_on_a_vessel() -> np.ndarray:
    """A 6-voxel-radius ball on a long 5x5 rod: one component, its centre on the rod."""
    mask = np.zeros((24, 24, 80), dtype=bool)
    ball(mask, (12, 12, 10), 6)
    mask[10:15, 10:15, 10:78] = True
    return mask


def test_a_nodule_merged_with_a_vessel_is_a_blob_of_its_component() -> None:
    grouping = group_mask(nodule_on_a_vessel(), np.zeros((24, 24, 80), np.int16), UNIT)
    (component,) = grouping.components
    assert component.center_irc[2] > 25, "the rod pulls the centre far from the ball"
    near_ball = [b for b in grouping.blobs if abs(b.center_irc[2] - 10) < 3]
    (blob,) = near_ball
    assert blob.center_irc == pytest.approx((12, 12, 10), abs=0.5)
    assert blob.diameter_mm == pytest.approx(2 * 5, abs=1.0)  # eroded ball: radius ~5
    assert blob.voxels == component.voxels
    assert grouping.candidates == (component, *grouping.blobs)
    # Blobs on the rod are thinner, and none sits inside another's sphere.
    assert all(b.diameter_mm < blob.diameter_mm for b in grouping.blobs if b is not blob)


def test_blobs_can_be_switched_off_and_small_components_have_none() -> None:
    mask = nodule_on_a_vessel()
    hu = np.zeros(mask.shape, np.int16)
    assert group_mask(mask, hu, UNIT, blob_search_min_mm3=None).blobs == ()
    assert group_mask(mask, hu, UNIT, blob_search_min_mm3=float(mask.sum())).blobs == ()


def test_a_lone_ball_or_a_thin_rod_gives_no_extra_blob() -> None:
    mask = np.zeros((24, 24, 80), dtype=bool)
    ball(mask, (12, 12, 12), 7)  # its centre is its component's centre
    mask[2:4, 2:4, 2:78] = True  # thinner than BLOB_MIN_RADIUS_MM once eroded
    mask[6:9, 20:23, 30:78] = True  # 3x3 rod: erodes to a 1-voxel line, distance 1
    grouping = group_mask(mask, np.zeros(mask.shape, np.int16), UNIT, blob_search_min_mm3=1.0)
    assert len(grouping.components) == 2
    rod_blobs = [b for b in grouping.blobs if b.center_irc[1] > 15]
    ball_blobs = [b for b in grouping.blobs if b.center_irc[1] <= 15]
    assert ball_blobs == []
    assert all(b.diameter_mm == pytest.approx(2.0) for b in rod_blobs)
