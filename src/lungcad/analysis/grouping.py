"""From per-voxel nodule probabilities to candidate positions, as the book groups them.

Threshold, erode once (drops one-voxel specks and thin bridges), label 6-connected
components, and place each candidate at its HU-weighted centre of mass (denser tissue
pulls harder; weights are HU clipped to [-1000, 1000] plus 1001, so air still counts a
little). Only the labelled voxels are touched after labelling, never a float copy of the
whole volume.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from lungcad.data.crops import HU_CLIP
from lungcad.data.geometry import Geometry, Irc, Xyz, irc_to_xyz_array

CENTRE_WEIGHT_OFFSET = 1001.0  # the book's: clipped HU + 1001 keeps every weight positive


@dataclass(frozen=True)
class Component:
    """One connected blob of the eroded mask.

    ``center_irc`` is the fractional HU-weighted centre (I, R, C); ``center_xyz`` the same
    point in patient mm (LPS). ``voxels`` counts the blob after erosion and
    ``diameter_mm`` is the diameter of a sphere of that many voxels' volume.
    """

    center_irc: Irc
    center_xyz: Xyz
    voxels: int
    diameter_mm: float


@dataclass(frozen=True)
class Grouping:
    """Candidates plus the voxel counts of the funnel that produced them."""

    components: tuple[Component, ...]
    voxels_above_threshold: int
    voxels_after_erosion: int


def equivalent_diameter_mm(
    voxels: np.ndarray, spacing_xyz: tuple[float, float, float]
) -> np.ndarray:
    """Diameter (mm) of spheres with the volume of ``voxels`` voxels of ``spacing_xyz`` mm."""
    voxel_mm3 = math.prod(spacing_xyz)
    return np.cbrt(6.0 * np.asarray(voxels, dtype=np.float64) * voxel_mm3 / math.pi)


def group_candidates(
    probabilities: np.ndarray, hu: np.ndarray, geometry: Geometry, threshold: float = 0.5
) -> Grouping:
    """Candidates in raster order of their first voxel from (I, R, C) probabilities and HU."""
    return group_mask(probabilities > threshold, hu, geometry)


def group_mask(mask: np.ndarray, hu: np.ndarray, geometry: Geometry) -> Grouping:
    """Like :func:`group_candidates` for an already thresholded (I, R, C) boolean mask.

    Lets a caller drop the float probabilities before the labelling allocates its own
    full-size array.
    """
    above = int(np.count_nonzero(mask))
    mask = ndimage.binary_erosion(mask, iterations=1)
    eroded = int(np.count_nonzero(mask))
    labels, count = ndimage.label(mask)
    del mask
    if count == 0:
        return Grouping((), above, eroded)

    coords = np.nonzero(labels)  # 3 arrays of voxel indices, only the labelled voxels
    ids = labels[coords]
    del labels
    weights = np.clip(hu[coords], *HU_CLIP).astype(np.float64) + CENTRE_WEIGHT_OFFSET
    length = count + 1
    total_weight = np.bincount(ids, weights, minlength=length)[1:]
    centers_irc = (
        np.stack(
            [np.bincount(ids, weights * axis, minlength=length)[1:] for axis in coords], axis=1
        )
        / total_weight[:, None]
    )
    voxels = np.bincount(ids, minlength=length)[1:]
    centers_xyz = irc_to_xyz_array(centers_irc, geometry)
    diameters = equivalent_diameter_mm(voxels, geometry.spacing_xyz)
    components = tuple(
        Component(
            center_irc=Irc(*(float(v) for v in irc)),
            center_xyz=Xyz(*(float(v) for v in xyz)),
            voxels=int(n),
            diameter_mm=float(d),
        )
        for irc, xyz, n, d in zip(centers_irc, centers_xyz, voxels, diameters, strict=True)
    )
    return Grouping(components, above, eroded)
