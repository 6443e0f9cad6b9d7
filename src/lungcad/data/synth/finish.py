"""What the scanner adds: sampling (spacing, slice thickness, orientation), blur and noise.

Noise is white Gaussian added before a small blur, so it comes out spatially correlated
like reconstructed CT noise; its strength before the blur is chosen so that the final
standard deviation is the drawn one.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lungcad.data.geometry import Geometry, Xyz

SLICE_MM = (0.625, 1.0, 1.25, 1.5, 2.0, 2.5)
SLICE_WEIGHTS = (0.1, 0.15, 0.25, 0.1, 0.15, 0.25)
# Flips along (x, y, z) seen in real archives: reversed slice order, mirrored columns,
# and both in-plane axes reversed.
FLIPS_XYZ = ((False, False, True), (True, False, False), (True, True, False))
NO_FLIP = (False, False, False)
FLIP_PROBABILITY = 0.2
PADDING_PROBABILITY = 0.25  # scanners that mark pixels outside the reconstruction circle
PADDING_HU = (-2000.0, -3024.0)
HU_RANGE = (-1024.0, 3071.0)
SLAB = 16
FULL_DETAIL_SIZE = 256


@dataclass(frozen=True)
class Acquisition:
    """How one phantom is sampled and stored."""

    spacing_xy: float  # mm
    slice_mm: float
    origin_xyz: tuple[float, float, float]  # world position of canonical voxel (0, 0, 0)
    flips_xyz: tuple[bool, bool, bool]
    noise_hu: float  # standard deviation of the final noise
    blur_xy: float  # Gaussian sigma, voxels
    blur_z: float
    padding_hu: float | None

    def to_world(self, point_zyx: np.ndarray) -> Xyz:
        """Canonical (z, y, x) mm -> world LPS mm; flipping the stored array keeps it valid."""
        x, y, z = np.asarray(self.origin_xyz) + np.asarray(point_zyx, dtype=np.float64)[::-1]
        return Xyz(float(x), float(y), float(z))

    def store(self, canonical: np.ndarray) -> np.ndarray:
        """The array as saved: canonical (I, R, C) reversed along the flipped axes."""
        axes = tuple(axis for axis, flip in zip((2, 1, 0), self.flips_xyz, strict=True) if flip)
        return np.ascontiguousarray(np.flip(canonical, axes)) if axes else canonical

    def stored_geometry(self, shape: tuple[int, int, int]) -> Geometry:
        """Geometry of the stored array: a flipped axis starts at its far end and runs back."""
        spacing_xyz = np.array([self.spacing_xy, self.spacing_xy, self.slice_mm])
        last_xyz = (np.asarray(shape)[::-1] - 1) * spacing_xyz
        flips = np.asarray(self.flips_xyz)
        origin = np.asarray(self.origin_xyz) + np.where(flips, last_xyz, 0.0)
        return Geometry(
            origin_xyz=(float(origin[0]), float(origin[1]), float(origin[2])),
            spacing_xyz=(self.spacing_xy, self.spacing_xy, self.slice_mm),
            direction=tuple(float(v) for v in np.diag(np.where(flips, -1.0, 1.0)).ravel()),
        )


def plan_acquisition(rng: np.random.Generator, size: int) -> Acquisition:
    """Draw spacing, slice thickness, origin, orientation, noise and blur for one scan."""
    spacing = round(float(rng.uniform(0.5, 0.98)), 6)
    # Small phantoms are small people: thick slices would leave their lungs a few slices
    # tall, so below FULL_DETAIL_SIZE pixels the thickest choices drop out.
    thickest = max(SLICE_MM[0], SLICE_MM[-1] * min(1.0, size / FULL_DETAIL_SIZE))
    weights = np.where(np.asarray(SLICE_MM) <= thickest, SLICE_WEIGHTS, 0.0)
    slice_mm = float(rng.choice(SLICE_MM, p=weights / weights.sum()))
    half = (size - 1) * spacing / 2
    origin = (
        round(-half + rng.uniform(-25, 25), 4),
        round(-half + rng.uniform(-40, 15), 4),
        round(float(rng.uniform(-380, -40)), 4),
    )
    flips = (
        FLIPS_XYZ[int(rng.integers(len(FLIPS_XYZ)))]
        if rng.uniform() < FLIP_PROBABILITY
        else NO_FLIP
    )
    padding = float(rng.choice(PADDING_HU)) if rng.uniform() < PADDING_PROBABILITY else None
    return Acquisition(
        spacing_xy=spacing,
        slice_mm=slice_mm,
        origin_xyz=origin,
        flips_xyz=flips,
        noise_hu=float(rng.uniform(15, 30)),
        blur_xy=float(rng.uniform(0.5, 0.8)),
        blur_z=float(rng.uniform(0.3, 0.6)),
        padding_hu=padding,
    )


def _three_tap(sigma: float) -> tuple[float, float]:
    """(centre, side) weights of the 3-tap kernel with variance sigma^2 (sigma <= 0.8)."""
    side = sigma**2 / 2
    return 1 - 2 * side, side


def _blur_axis(values: np.ndarray, sigma: float, axis: int) -> np.ndarray:
    """3-tap blur along one axis, edges repeated. Cheaper than scipy for sigma < 1 voxel."""
    centre, side = _three_tap(sigma)
    moved = np.moveaxis(values, axis, 0)
    out = moved * np.float32(centre)
    out[1:] += np.float32(side) * moved[:-1]
    out[:-1] += np.float32(side) * moved[1:]
    out[0] += np.float32(side) * moved[0]
    out[-1] += np.float32(side) * moved[-1]
    return np.moveaxis(out, 0, axis)


def _noise_gain(acquisition: Acquisition) -> float:
    """How much the blur shrinks the standard deviation of white noise."""
    gain = 1.0
    for sigma in (acquisition.blur_z, acquisition.blur_xy, acquisition.blur_xy):
        centre, side = _three_tap(sigma)
        gain *= float(np.sqrt(centre**2 + 2 * side**2))
    return gain


def finish_volume(rng: np.random.Generator, hu: np.ndarray, acquisition: Acquisition) -> np.ndarray:
    """Noise, blur, clipping to the scanner's range and int16; consumes ``hu`` (float32)."""
    white = np.float32(acquisition.noise_hu / _noise_gain(acquisition))
    for first in range(0, hu.shape[0], SLAB):
        slab = hu[first : first + SLAB]
        slab += white * rng.standard_normal(slab.shape, dtype=np.float32)
        slab[...] = _blur_axis(_blur_axis(slab, acquisition.blur_xy, 1), acquisition.blur_xy, 2)
    volume = np.empty(hu.shape, dtype=np.int16)
    centre, side = _three_tap(acquisition.blur_z)
    previous = hu[0].copy()
    for index in range(hu.shape[0]):
        current = hu[index].copy()
        following = hu[min(index + 1, hu.shape[0] - 1)]
        blurred = np.float32(centre) * current + np.float32(side) * (previous + following)
        volume[index] = np.rint(np.clip(blurred, *HU_RANGE))
        previous = current
    if acquisition.padding_hu is not None:
        rows, cols = hu.shape[1:]
        y = np.arange(rows)[:, None] - (rows - 1) / 2
        x = np.arange(cols)[None, :] - (cols - 1) / 2
        volume[:, np.hypot(x, y) > min(rows, cols) / 2] = acquisition.padding_hu
    return volume
