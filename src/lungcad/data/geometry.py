"""Patient millimetres (LPS, x/y/z) versus voxel indices (index/row/col = z/y/x).

A CT's geometry maps voxel (c, r, i) to patient space by
``xyz = origin + direction @ (spacing * [c, r, i])``. The book's inverse forgot to
invert the direction matrix; here both directions are exact for any orthonormal (or
merely invertible) direction.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import NamedTuple

import numpy as np


class Xyz(NamedTuple):
    """A point in patient space, millimetres, LPS (as LUNA16 and DICOM use)."""

    x: float
    y: float
    z: float


class Irc(NamedTuple):
    """A voxel position: (index, row, col) = (z, y, x) array order."""

    index: float  # type: ignore[assignment]  # shadows tuple.index, which nothing here calls
    row: float
    col: float


@dataclass(frozen=True)
class Geometry:
    """Where a volume sits in patient space. Spacing in mm along x, y, z (col, row, index)."""

    origin_xyz: tuple[float, float, float]
    spacing_xyz: tuple[float, float, float]
    direction: tuple[float, ...]  # 9 numbers, row-major, as SimpleITK gives

    def __post_init__(self) -> None:
        if len(self.origin_xyz) != 3 or len(self.spacing_xyz) != 3 or len(self.direction) != 9:
            raise ValueError(
                f"geometry needs 3 origin, 3 spacing and 9 direction numbers, got "
                f"{len(self.origin_xyz)}, {len(self.spacing_xyz)}, {len(self.direction)}"
            )
        if min(self.spacing_xyz) <= 0:
            raise ValueError(f"spacing must be positive, got {self.spacing_xyz}")

    @property
    def direction_matrix(self) -> np.ndarray:
        return np.asarray(self.direction, dtype=np.float64).reshape(3, 3)

    @cached_property
    def xyz_to_cri_matrix(self) -> np.ndarray:
        """inverse(direction @ diag(spacing)): patient-mm offset -> (col, row, index)."""
        return np.linalg.inv(self.direction_matrix * np.asarray(self.spacing_xyz))

    def to_json(self) -> dict[str, list[float]]:
        return {
            "origin_xyz": [float(v) for v in self.origin_xyz],
            "spacing_xyz": [float(v) for v in self.spacing_xyz],
            "direction": [float(v) for v in self.direction],
        }

    @classmethod
    def from_json(cls, data: dict[str, list[float]]) -> Geometry:
        return cls(
            origin_xyz=tuple(float(v) for v in data["origin_xyz"]),  # type: ignore[arg-type]
            spacing_xyz=tuple(float(v) for v in data["spacing_xyz"]),  # type: ignore[arg-type]
            direction=tuple(float(v) for v in data["direction"]),
        )


IDENTITY_DIRECTION: tuple[float, ...] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)


def irc_to_xyz_array(irc: np.ndarray, geometry: Geometry) -> np.ndarray:
    """Vectorised: (N, 3) voxel (I, R, C) -> (N, 3) patient mm (x, y, z)."""
    cri = np.asarray(irc, dtype=np.float64)[..., ::-1]
    scaled = cri * np.asarray(geometry.spacing_xyz)
    return scaled @ geometry.direction_matrix.T + np.asarray(geometry.origin_xyz)


def xyz_to_irc_array(xyz: np.ndarray, geometry: Geometry) -> np.ndarray:
    """Vectorised exact inverse of :func:`irc_to_xyz_array` (continuous voxel units)."""
    offset = np.asarray(xyz, dtype=np.float64) - np.asarray(geometry.origin_xyz)
    # A true matrix inverse, not the direction matrix reused as if it were its own inverse.
    cri = offset @ geometry.xyz_to_cri_matrix.T
    return cri[..., ::-1]


def irc_to_xyz(irc: Irc | tuple[float, float, float], geometry: Geometry) -> Xyz:
    """Voxel (I, R, C), possibly fractional -> patient mm (LPS)."""
    return Xyz(*(float(v) for v in irc_to_xyz_array(np.asarray(irc), geometry)))


def xyz_to_irc_continuous(xyz: Xyz | tuple[float, float, float], geometry: Geometry) -> Irc:
    """Patient mm (LPS) -> fractional voxel (I, R, C); exact inverse of :func:`irc_to_xyz`."""
    return Irc(*(float(v) for v in xyz_to_irc_array(np.asarray(xyz), geometry)))


def xyz_to_irc(xyz: Xyz | tuple[float, float, float], geometry: Geometry) -> Irc:
    """Patient mm (LPS) -> nearest voxel (I, R, C), as integers (round half to even)."""
    continuous = xyz_to_irc_array(np.asarray(xyz), geometry)
    return Irc(*(int(v) for v in np.rint(continuous)))
