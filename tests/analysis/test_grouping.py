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
