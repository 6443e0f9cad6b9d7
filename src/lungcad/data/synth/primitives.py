"""Shapes drawn into a volume inside their own bounding boxes.

Everything here works in the phantom's canonical frame: millimetres from the centre of
voxel (0, 0, 0), in (z, y, x) order to match the array's (I, R, C) axes. Drawing a shape
costs in proportion to its box, not to the volume, which keeps a 512-size scan fast.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import numpy as np

Box = tuple[slice, slice, slice]


@dataclass(frozen=True)
class Grid:
    """The voxel lattice of one phantom: shape (I, R, C) and spacing in mm along each."""

    shape: tuple[int, int, int]
    spacing_zyx: tuple[float, float, float]

    @property
    def spacing(self) -> np.ndarray:
        return np.asarray(self.spacing_zyx, dtype=np.float64)

    @property
    def extent_mm(self) -> np.ndarray:
        """Millimetres from the first to the last voxel centre along (z, y, x)."""
        return (np.asarray(self.shape) - 1) * self.spacing

    @property
    def edge_mm(self) -> float:
        """Width over which a surface blends into its neighbours (partial-volume effect)."""
        return float(self.spacing_zyx[1])

    @cached_property
    def _axes_mm(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return tuple(  # type: ignore[return-value]
            np.arange(n, dtype=np.float32) * np.float32(step)
            for n, step in zip(self.shape, self.spacing_zyx, strict=True)
        )

    def axis_mm(self, axis: int, index: slice | None = None) -> np.ndarray:
        """Millimetre positions of the voxel centres along one axis (float32, read-only)."""
        positions = self._axes_mm[axis]
        return positions if index is None else positions[index]

    def box(self, low_zyx: np.ndarray, high_zyx: np.ndarray) -> Box | None:
        """Voxel slices covering the mm box [low, high], clipped; None if it misses the volume."""
        bounds = []
        for low, high, step, size in zip(
            low_zyx, high_zyx, self.spacing_zyx, self.shape, strict=True
        ):
            first = max(math.floor(low / step), 0)
            stop = min(math.ceil(high / step) + 1, size)
            if stop <= first:
                return None
            bounds.append(slice(first, stop))
        return bounds[0], bounds[1], bounds[2]

    def box_coords(self, box: Box) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Broadcastable mm coordinates of a box: z (n, 1, 1), y (1, m, 1), x (1, 1, k)."""
        z, y, x = self._axes_mm
        return z[box[0], None, None], y[None, box[1], None], x[None, None, box[2]]

    def to_index(self, points_zyx: np.ndarray) -> np.ndarray:
        """Nearest voxel (I, R, C) of mm points, clipped into the volume."""
        index = np.rint(np.asarray(points_zyx) / self.spacing).astype(int)
        return np.clip(index, 0, np.asarray(self.shape) - 1)


def occupancy(signed_distance: np.ndarray, edge_mm: float) -> np.ndarray:
    """Fraction of a voxel inside a surface: 1 deep inside, 0 outside, linear over one edge."""
    return np.clip(0.5 - signed_distance / np.float32(edge_mm), 0.0, 1.0)


def tapered_capsule(
    grid: Grid, start: np.ndarray, end: np.ndarray, r_start: float, r_end: float, margin: float
) -> tuple[Box, np.ndarray] | None:
    """Signed distance (mm, negative inside) to a cone-like tube from ``start`` to ``end``.

    The radius changes linearly along the axis; vessels, airways and ribs are chains of these.
    """
    reach = max(r_start, r_end) + margin
    low = [min(a, b) - reach for a, b in zip(start, end, strict=True)]
    high = [max(a, b) + reach for a, b in zip(start, end, strict=True)]
    box = grid.box(low, high)  # type: ignore[arg-type]
    if box is None:
        return None
    z, y, x = grid.box_coords(box)
    axis = [np.float32(b - a) for a, b in zip(start, end, strict=True)]
    length2 = max(float(axis[0] ** 2 + axis[1] ** 2 + axis[2] ** 2), 1e-6)
    pz, py, px = z - np.float32(start[0]), y - np.float32(start[1]), x - np.float32(start[2])
    along = (pz * axis[0] + py * axis[1]) + px * axis[2]
    t = np.clip(along / np.float32(length2), 0.0, 1.0)
    squared = (pz * pz + py * py) + px * px - t * (2 * along - t * np.float32(length2))
    radius = np.float32(r_start) + t * np.float32(r_end - r_start)
    return box, np.sqrt(np.maximum(squared, 0.0)) - radius


def star_shape(
    grid: Grid,
    center: np.ndarray,
    radius: float,
    axes: np.ndarray,
    rotation: np.ndarray,
    bumps: np.ndarray,
    bump_sharpness: float,
    margin: float,
) -> tuple[Box, np.ndarray] | None:
    """Signed distance along rays from ``center`` to an ellipsoid with smooth bumps.

    ``axes`` scales the three principal directions (columns of ``rotation``); each row of
    ``bumps`` is a direction times an amplitude that pushes the surface out around it
    (lobulation). Being measured along rays, the centre is always inside.
    """
    center = np.asarray(center, dtype=np.float64)
    amplitude = float(np.linalg.norm(bumps, axis=1).sum()) if len(bumps) else 0.0
    # Half-extent of the rotated ellipsoid along each volume axis, grown by the bumps.
    extent = np.sqrt(((rotation * np.asarray(axes)[None, :]) ** 2).sum(axis=1))
    reach = radius * extent * (1 + amplitude) + margin
    box = grid.box(center - reach, center + reach)
    if box is None:
        return None
    z, y, x = grid.box_coords(box)
    offsets = (z - np.float32(center[0]), y - np.float32(center[1]), x - np.float32(center[2]))
    rot = rotation.astype(np.float32)
    local = [
        (offsets[0] * rot[0, k] + offsets[1] * rot[1, k] + offsets[2] * rot[2, k])
        / np.float32(axes[k])
        for k in range(3)
    ]
    distance = np.sqrt(local[0] ** 2 + local[1] ** 2 + local[2] ** 2) + np.float32(1e-6)
    surface = np.ones_like(distance)
    for bump in bumps.astype(np.float32):
        strength = float(np.linalg.norm(bump))
        direction = bump / strength
        cosine = (
            local[0] * direction[0] + local[1] * direction[1] + local[2] * direction[2]
        ) / distance
        surface += np.float32(strength) * np.exp(np.float32(bump_sharpness) * (cosine - 1))
    # Ray distance scaled back to mm by the mean axis keeps the edge about one voxel wide.
    return box, (distance - np.float32(radius) * surface) * np.float32(np.mean(axes))


def paint_max(volume: np.ndarray, box: Box, fraction: np.ndarray, value: float) -> None:
    """Blend ``value`` in by ``fraction`` where that makes voxels denser (tissue over lung)."""
    region = volume[box]
    np.maximum(region, region + fraction * (np.float32(value) - region), out=region)


def paint_over(volume: np.ndarray, box: Box, fraction: np.ndarray, value: float) -> None:
    """Blend ``value`` in by ``fraction`` whatever was there (air lumen, fat rims)."""
    region = volume[box]
    region += fraction * (np.float32(value) - region)
