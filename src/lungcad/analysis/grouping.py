"""From per-voxel nodule probabilities to candidate positions, as the book groups them.

Threshold, erode once (drops one-voxel specks and thin bridges), label 6-connected
components, and place each candidate at its HU-weighted centre of mass (denser tissue
pulls harder; weights are HU clipped to [-1000, 1000] plus 1001, so air still counts a
little). Only the labelled voxels are touched after labelling, never a float copy of the
whole volume.

Beyond the book: a nodule touching a flagged vessel becomes part of one large component
whose centre can lie centimetres away, where the classifier never looks (measured: half
of the nodules our synthetic validation missed). So components larger than
``BLOB_SEARCH_MIN_MM3`` also give a candidate at each blob inside them: each local
maximum of the distance to the component's surface, i.e. each place where a sphere of at
least ``BLOB_MIN_RADIUS_MM`` fits and no larger one nearby, unless the component's centre
or a larger blob's already lies in that sphere.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from lungcad.data.crops import HU_CLIP
from lungcad.data.geometry import Geometry, Irc, Xyz, irc_to_xyz_array

CENTRE_WEIGHT_OFFSET = 1001.0  # the book's: clipped HU + 1001 keeps every weight positive
BLOB_SEARCH_MIN_MM3 = 4.0 / 3.0 * math.pi * 4.0**3  # larger than an 8 mm nodule
BLOB_MIN_RADIUS_MM = 1.0  # after erosion: a 3 mm nodule keeps about this much
BLOB_SEPARATION_MM = 2.5  # a blob is the largest sphere within this distance


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
    """Candidates plus the voxel counts of the funnel that produced them.

    ``blobs`` are the extra candidates inside large components: their ``voxels`` is that
    of the component they lie in, their ``diameter_mm`` that of the largest sphere that
    fits there (after erosion) and their centre is the sphere's.
    """

    components: tuple[Component, ...]
    voxels_above_threshold: int
    voxels_after_erosion: int
    blobs: tuple[Component, ...] = ()

    @property
    def candidates(self) -> tuple[Component, ...]:
        return self.components + self.blobs


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


def group_mask(
    mask: np.ndarray,
    hu: np.ndarray,
    geometry: Geometry,
    blob_search_min_mm3: float | None = BLOB_SEARCH_MIN_MM3,
) -> Grouping:
    """Like :func:`group_candidates` for an already thresholded (I, R, C) boolean mask.

    Lets a caller drop the float probabilities before the labelling allocates its own
    full-size array. ``blob_search_min_mm3`` None: no blobs, the book's candidates only.
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
    length = count + 1
    weights = np.clip(hu[coords], *HU_CLIP).astype(np.float64) + CENTRE_WEIGHT_OFFSET
    total_weight = np.bincount(ids, weights, minlength=length)[1:]
    centers_irc = (
        np.stack(
            [np.bincount(ids, weights * axis, minlength=length)[1:] for axis in coords], axis=1
        )
        / total_weight[:, None]
    )
    voxels = np.bincount(ids, minlength=length)[1:]
    del coords, ids, weights
    blobs: tuple[Component, ...] = ()
    if blob_search_min_mm3 is not None:
        large = np.flatnonzero(voxels * math.prod(geometry.spacing_xyz) >= blob_search_min_mm3)
        blobs = _blobs(labels, large + 1, centers_irc, voxels, geometry)
    diameters = equivalent_diameter_mm(voxels, geometry.spacing_xyz)
    return Grouping(_components(centers_irc, voxels, diameters, geometry), above, eroded, blobs)


def _components(
    centers_irc: np.ndarray, voxels: np.ndarray, diameters: np.ndarray, geometry: Geometry
) -> tuple[Component, ...]:
    centers_xyz = irc_to_xyz_array(centers_irc, geometry)
    return tuple(
        Component(
            center_irc=Irc(*(float(v) for v in irc)),
            center_xyz=Xyz(*(float(v) for v in xyz)),
            voxels=int(n),
            diameter_mm=float(d),
        )
        for irc, xyz, n, d in zip(
            centers_irc.reshape(-1, 3), centers_xyz.reshape(-1, 3), voxels, diameters, strict=True
        )
    )


def _blobs(
    labels: np.ndarray,
    large: np.ndarray,
    centers_irc: np.ndarray,
    voxels: np.ndarray,
    geometry: Geometry,
) -> tuple[Component, ...]:
    """The blobs of components ``large`` (labels), largest first in each component.

    A blob is a local maximum of the distance to the component's surface (a plateau of
    equal distances gives one blob at its centre) and stands for the sphere of that
    radius. It is kept only if it adds a place to look: the component's centre is not
    inside its sphere, and it is neither inside a larger kept blob's sphere nor holds
    that blob's centre. Works in each component's bounding box, so the cost follows the
    large components, not the volume.
    """
    spacing_irc = np.array(geometry.spacing_xyz[::-1])
    window = 2 * np.ceil(BLOB_SEPARATION_MM / spacing_irc).astype(int) + 1
    boxes = ndimage.find_objects(labels)
    centers, sizes, radii = [], [], []
    for label in large:
        box = boxes[label - 1]
        assert box is not None  # every label in ``large`` has voxels
        distance = ndimage.distance_transform_edt(labels[box] == label, sampling=spacing_irc)
        peaks = (distance == ndimage.maximum_filter(distance, size=window)) & (
            distance >= BLOB_MIN_RADIUS_MM
        )
        peak_labels, count = ndimage.label(peaks, structure=np.ones((3, 3, 3)))
        if count == 0:
            continue
        index = np.arange(1, count + 1)
        offset = np.array([s.start for s in box], dtype=np.float64)
        peak_irc = np.array(ndimage.center_of_mass(peaks, peak_labels, index)) + offset
        peak_radius = np.array(ndimage.maximum(distance, peak_labels, index))
        taken, taken_radius = [centers_irc[label - 1]], [0.0]
        for k in np.argsort(-peak_radius, kind="stable"):
            gaps_mm = np.linalg.norm((np.array(taken) - peak_irc[k]) * spacing_irc, axis=1)
            if np.all(gaps_mm > np.maximum(taken_radius, peak_radius[k])):
                taken.append(peak_irc[k])
                taken_radius.append(peak_radius[k])
                centers.append(peak_irc[k])
                radii.append(peak_radius[k])
                sizes.append(voxels[label - 1])
    if not centers:
        return ()
    return _components(np.array(centers), np.array(sizes), 2.0 * np.array(radii), geometry)
