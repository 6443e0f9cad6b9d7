"""Ribs, costal cartilage, sternum, scapulae and clavicles (the spine is in ``anatomy``).

Each rib leaves the spine, follows the middle of the rib band around the chest and
descends as it goes forward, so an axial slice cuts several ribs as small bright ovals.
"""

from __future__ import annotations

import numpy as np

from lungcad.data.synth.anatomy import Torso
from lungcad.data.synth.mediastinum import NO_BUMPS, Painter
from lungcad.data.synth.primitives import Grid, occupancy, paint_max, star_shape

RIBS_PER_SIDE = 12
STERNUM_HALF_WIDTH = 11.0  # mm at scale 1


def _rib_path(
    torso: Torso, number: int, side: int, rng: np.random.Generator
) -> list[tuple[float, float, float]]:
    """(z, Y, X) anatomical points along rib ``number`` (0 = first rib) on one side."""
    k = torso.scale
    spacing = torso.apex_z + 6 * k - torso.recess_z
    head_z = torso.apex_z + 6 * k - number * spacing / (RIBS_PER_SIDE - 0.5)
    if number == 0:
        end_angle, drop = -np.pi / 2 + 0.9, rng.uniform(15, 25) * k
    elif number < 7:
        end_angle, drop = -np.pi / 2 + 0.35, rng.uniform(80, 110) * k
    elif number < 10:
        end_angle, drop = -np.pi / 2 + 0.6, rng.uniform(60, 85) * k
    else:
        end_angle, drop = rng.uniform(-0.5, 0.3), rng.uniform(25, 40) * k
    angles = np.linspace(np.pi / 2 - 0.3, end_angle, 9)
    radii = torso.rib_radius(angles)
    along = np.linspace(0, 1, len(angles))
    heights = head_z + 6 * k * np.sin(np.pi * along) - drop * along**1.5
    rx, ry = torso.vertebra_radius_xy
    head = (head_z - 3 * k, torso.vertebra_y + 0.2 * ry, side * (rx + 2 * k))
    body = [
        (float(z), float(r * np.sin(a)), float(side * r * np.cos(a)))
        for z, r, a in zip(heights, radii, angles, strict=True)
    ]
    return [head, *body]


def render_bones(
    torso: Torso, grid: Grid, hu: np.ndarray, lung: np.ndarray, rng: np.random.Generator
) -> None:
    k = torso.scale
    paint = Painter(torso, grid, hu, lung)
    xm = torso.midline_x
    bone = rng.uniform(600, 850)
    cartilage = rng.uniform(90, 180)
    front = -float(torso.rib_radius(np.array(-np.pi / 2)))
    sternum_low = torso.dome_right - rng.uniform(0, 15) * k
    sternum_high = torso.apex_z + rng.uniform(-5, 10) * k

    for side in (-1, 1):
        for number in range(RIBS_PER_SIDE):
            path = _rib_path(torso, number, side, rng)
            radius = min(
                rng.uniform(3.8, 5.0) * k * (1.25 if number == 0 else 1.0), 0.42 * torso.rib_band
            )
            paint.tube([paint.point(*point) for point in path], radius, bone)
            z_end, y_end, x_end = path[-1]
            if 0 < number < 10:
                joint_z = float(np.clip(z_end + 12 * k, sternum_low, sternum_high))
                joint = paint.point(joint_z, front, xm * 0.2 + side * STERNUM_HALF_WIDTH * k)
                paint.tube([paint.point(z_end, y_end, x_end), joint], 0.8 * radius, cartilage)
        clavicle = [
            paint.point(sternum_high + 4 * k, front - 4 * k, side * 14 * k),
            paint.point(sternum_high + 18 * k, front + 15 * k, side * 0.72 * torso.half_width),
        ]
        paint.tube(clavicle, 5.5 * k, bone)
        _scapula(paint, torso, side, bone * 0.8, rng)

    for offset in (-STERNUM_HALF_WIDTH * 0.5, 0.0, STERNUM_HALF_WIDTH * 0.5):
        column = [paint.point(z, front, xm * 0.2 + offset * k) for z in (sternum_low, sternum_high)]
        paint.tube(column, 5.0 * k, bone * 0.6)


def _scapula(
    paint: Painter, torso: Torso, side: int, value: float, rng: np.random.Generator
) -> None:
    """The shoulder blade: a thin plate over the back of the upper ribs, outside the rib cage."""
    k = torso.scale
    angle = np.pi / 2 - rng.uniform(0.85, 1.0)
    radius = float(torso.rib_radius(np.array(angle))) + 0.5 * torso.rib_band + rng.uniform(3, 5) * k
    centre_y, centre_x = radius * np.sin(angle), side * radius * np.cos(angle)
    centre = paint.point(torso.apex_z - rng.uniform(45, 60) * k, centre_y, centre_x)
    outward = np.array([0.0, np.sin(angle), side * np.cos(angle)])
    vertical = np.array([1.0, 0.0, 0.0])
    rotation = np.stack([vertical, np.cross(outward, vertical), outward], axis=1)
    axes = np.array([rng.uniform(55, 70), rng.uniform(24, 30), 2.5]) * k
    found = star_shape(paint.grid, centre, 1.0, axes, rotation, NO_BUMPS, 1.0, paint.grid.edge_mm)
    if found is not None:
        box, distance = found
        fraction = occupancy(distance * np.float32(axes[2] / np.mean(axes)), paint.grid.edge_mm)
        paint_max(paint.hu, box, fraction, value)
        paint.lung[box] &= fraction < 0.5
