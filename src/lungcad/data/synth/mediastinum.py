"""Heart, great vessels, trachea and main bronchi: what sits between the lungs.

Drawn as ellipsoids and tubes over the background; whatever they cover stops being lung.
Returns the hila, where the vessel and airway trees of each lung start.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from lungcad.data.ct import HU_AIR
from lungcad.data.synth.anatomy import HU_FAT, HU_SOFT, Torso, axis_position
from lungcad.data.synth.primitives import (
    Grid,
    occupancy,
    paint_max,
    paint_over,
    star_shape,
    tapered_capsule,
)

NO_BUMPS = np.zeros((0, 3))


@dataclass(frozen=True)
class Hilum:
    """Where one lung's trees leave the mediastinum: canonical (z, y, x) mm and radii."""

    artery: np.ndarray
    vein: np.ndarray
    bronchus: np.ndarray
    artery_radius: float
    vein_radius: float
    bronchus_radius: float


class Painter:
    """Draws tubes and blobs given in anatomical mm, keeping the lung mask up to date."""

    def __init__(self, torso: Torso, grid: Grid, hu: np.ndarray, lung: np.ndarray) -> None:
        self.grid = grid
        self.hu = hu
        self.lung = lung
        self.axis_y, self.axis_x = axis_position(torso, grid)

    def point(self, z: float, y: float, x: float) -> np.ndarray:
        return np.array([z, y + self.axis_y, x + self.axis_x])

    def tube(self, points: list[np.ndarray], radius: float, value: float) -> None:
        """A chain of solid tubes through ``points``."""
        for start, end in itertools.pairwise(points):
            found = tapered_capsule(self.grid, start, end, radius, radius, self.grid.edge_mm)
            if found is not None:
                box, distance = found
                fraction = occupancy(distance, self.grid.edge_mm)
                paint_max(self.hu, box, fraction, value)
                self.lung[box] &= fraction < 0.5

    def lumen(self, start: np.ndarray, end: np.ndarray, radius: float) -> None:
        """An air channel, drawn after the walls so that joined airways stay open."""
        found = tapered_capsule(self.grid, start, end, radius, radius, self.grid.edge_mm)
        if found is not None:
            box, distance = found
            paint_over(self.hu, box, occupancy(distance, self.grid.edge_mm), HU_AIR)

    def blob(
        self,
        centre: np.ndarray,
        axes: np.ndarray,
        rotation: np.ndarray,
        bumps: np.ndarray,
        value: float,
        rim: float,
    ) -> None:
        """An ellipsoid with smooth bumps (see ``star_shape``) inside ``rim`` mm of fat."""
        edge = self.grid.edge_mm
        found = star_shape(self.grid, centre, 1.0, axes, rotation, bumps, 3.0, rim + edge)
        if found is None:
            return
        box, distance = found
        paint_over(self.hu, box, occupancy(distance - np.float32(rim), edge), HU_FAT)
        paint_max(self.hu, box, occupancy(distance, edge), value)
        self.lung[box] &= distance > rim


def _rotation_z(angle: float, tilt: float) -> np.ndarray:
    """Columns are the principal axes in (z, y, x): turned by ``angle`` in the axial plane,
    then tipped by ``tilt`` so the first axis points downwards (the heart's apex)."""
    c, s = np.cos(angle), np.sin(angle)
    first = np.array([-np.sin(tilt), s * np.cos(tilt), c * np.cos(tilt)])
    second = np.array([0.0, c, -s])
    third = np.cross(first, second)
    return np.stack([first, second, third], axis=1)


def render_mediastinum(
    torso: Torso, grid: Grid, hu: np.ndarray, lung: np.ndarray, rng: np.random.Generator
) -> tuple[Hilum, Hilum]:
    """Draw the heart and mediastinal structures; return the (right, left) hila."""
    k = torso.scale
    paint = Painter(torso, grid, hu, lung)
    p = paint.point
    xm = torso.midline_x
    top = torso.height + 10 * k
    carina = torso.carina_z
    rx, ry = torso.vertebra_radius_xy
    spine_front = torso.vertebra_y - ry
    blood = HU_SOFT + rng.uniform(-8, 8)

    # Heart: an ellipsoid resting on the diaphragm, long axis to the left, front and down,
    # wrapped in a rim of epicardial fat.
    heart_axes = np.array([rng.uniform(60, 70), rng.uniform(42, 50), rng.uniform(45, 55)]) * k
    rotation = _rotation_z(-rng.uniform(0.35, 0.7), rng.uniform(0.15, 0.4))
    half_extent = np.sqrt(((rotation * heart_axes[None, :]) ** 2).sum(axis=1))  # along z, y, x
    front = float(torso.cavity_radius(np.array(-np.pi / 2)))
    heart_centre = p(
        torso.diaphragm_centre_z + 0.6 * half_extent[0],
        # against the front of the chest, clear of the spine and the descending aorta
        min(-front + 0.8 * half_extent[1], spine_front - 10 * k - half_extent[1]),
        xm + rng.uniform(24, 34) * k,
    )
    directions = rng.normal(size=(4, 3))
    bumps = (
        directions
        / np.linalg.norm(directions, axis=1, keepdims=True)
        * rng.uniform(0.05, 0.12, size=(4, 1))
    )
    paint.blob(heart_centre, heart_axes, rotation, bumps, blood, rim=rng.uniform(1, 2.5) * k)
    heart_top = heart_centre[0] + 0.55 * heart_axes[2]

    arch_z = carina + rng.uniform(12, 22) * k
    aorta_r = rng.uniform(11, 15) * k
    descending = (spine_front + 0.6 * ry, xm + rx + 0.4 * aorta_r)
    ascending = (-rng.uniform(12, 22) * k, xm + rng.uniform(-2, 6) * k)
    paint.tube(
        [
            p(heart_top - 15 * k, ascending[0] + 8 * k, ascending[1] + 4 * k),
            p(arch_z - 10 * k, *ascending),
            p(
                arch_z + 6 * k,
                0.5 * (ascending[0] + descending[0]),
                0.5 * (ascending[1] + descending[1]) + 6 * k,
            ),
            p(arch_z - 8 * k, *descending),
            p(-10 * k, *descending),
        ],
        aorta_r,
        blood,
    )
    for offset_x, offset_y in ((-10, -6), (4, -2), (14, 6)):
        start = p(arch_z, ascending[0] + offset_y * k, xm + offset_x * k)
        paint.tube(
            [start, p(top, ascending[0] + offset_y * k, xm + 1.3 * offset_x * k)], 5.5 * k, blood
        )
    paint.tube(
        [p(top, -14 * k, xm - 24 * k), p(heart_top - 10 * k, -14 * k, xm - 22 * k)], 9 * k, blood
    )

    trachea_y = spine_front - 17 * k
    oesophagus = (spine_front - 5 * k, xm + 6 * k)
    paint.tube(
        [p(top, *oesophagus), p(torso.diaphragm_centre_z - 20 * k, *oesophagus)], 6.5 * k, HU_SOFT
    )

    hila = []
    for side in (-1, 1):  # right, left
        lateral = xm + side * (torso.mediastinum_low + rng.uniform(14, 22) * k)
        hila.append(
            Hilum(
                artery=p(carina - (18 if side < 0 else 8) * k, trachea_y + 8 * k, lateral),
                vein=p(carina - rng.uniform(40, 55) * k, trachea_y + 4 * k, lateral - side * 4 * k),
                bronchus=p(
                    carina - (28 if side < 0 else 38) * k,
                    trachea_y + 14 * k,
                    lateral + side * 6 * k,
                ),
                artery_radius=rng.uniform(8, 11) * k,
                vein_radius=rng.uniform(6, 8) * k,
                bronchus_radius=rng.uniform(5.5, 7) * k,
            )
        )

    trunk_split = p(carina - 12 * k, trachea_y - 2 * k, xm + 12 * k)
    paint.tube(
        [p(heart_top, heart_centre[1] - paint.axis_y - 25 * k, xm + 10 * k), trunk_split],
        13 * k,
        blood,
    )
    atrium = p(heart_top - 25 * k, spine_front - 14 * k, xm + 4 * k)
    for hilum in hila:
        paint.tube([trunk_split, hilum.artery], hilum.artery_radius, blood)
        paint.tube([atrium, hilum.vein], hilum.vein_radius, blood)

    # Trachea and main bronchi: air inside a soft-tissue wall.
    carina_point = p(carina, trachea_y, xm - 2 * k)
    trachea_r = rng.uniform(8, 10.5) * k
    trachea_top = p(top, trachea_y - 4 * k, xm - 3 * k)
    paint.tube([trachea_top, carina_point], trachea_r, HU_SOFT)
    for hilum in hila:
        paint.tube([carina_point, hilum.bronchus], hilum.bronchus_radius, HU_SOFT)
    paint.lumen(trachea_top, carina_point, trachea_r - 1.6 * k)
    for hilum in hila:
        paint.lumen(carina_point, hilum.bronchus, 0.78 * hilum.bronchus_radius)
    return hila[0], hila[1]
