"""Branching vessel and airway trees that fill each lung from its hilum.

A tree is grown by splitting the lung territory it supplies: random points stand for
the lung tissue; a branch runs part of the way towards the centre of its points, then
the points are cut in two across their longest direction and each half gets a child.
Radii follow Murray's law (radius^3 proportional to the tissue supplied), so vessels
taper from about 6 mm at the hilum to about 0.5 mm at the periphery. The first branch is
short: lobar vessels split close to the hilum.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from lungcad.data.ct import HU_AIR
from lungcad.data.synth.primitives import (
    Box,
    Grid,
    occupancy,
    paint_max,
    paint_over,
    tapered_capsule,
)

MURRAY_EXPONENT = 3.0
TAPER = 0.85  # end radius / start radius of one segment
ROOT_REACH = (0.15, 0.3)  # how far towards the centre of its territory a branch runs
BRANCH_REACH = (0.35, 0.55)


@dataclass(frozen=True)
class Tree:
    """Segments in canonical (z, y, x) mm; ``forks`` marks segments whose end branches."""

    starts: np.ndarray  # (N, 3)
    ends: np.ndarray  # (N, 3)
    radii: np.ndarray  # (N,) radius at the start, mm
    forks: np.ndarray  # (N,) bool

    @staticmethod
    def join(trees: list[Tree]) -> Tree:
        return Tree(
            starts=np.concatenate([t.starts for t in trees]),
            ends=np.concatenate([t.ends for t in trees]),
            radii=np.concatenate([t.radii for t in trees]),
            forks=np.concatenate([t.forks for t in trees]),
        )


def sample_lung_points(
    rng: np.random.Generator,
    lung: np.ndarray,
    grid: Grid,
    count: int,
    side_x_mm: tuple[float, float],
) -> np.ndarray:
    """Up to ``count`` random mm points inside the lung mask with x in ``side_x_mm``."""
    found: list[np.ndarray] = []
    total = 0
    for _ in range(20):
        index = rng.integers(0, grid.shape, size=(max(8 * count, 256), 3))
        points = (index + rng.uniform(-0.5, 0.5, size=index.shape)) * grid.spacing
        keep = lung[index[:, 0], index[:, 1], index[:, 2]]
        keep &= (points[:, 2] > side_x_mm[0]) & (points[:, 2] < side_x_mm[1])
        found.append(points[keep])
        total += int(keep.sum())
        if total >= count:
            break
    return np.concatenate(found)[:count]


def _perpendicular(direction: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random unit vector at right angles to ``direction``."""
    other = rng.normal(size=3)
    other -= direction * (other @ direction) / max(float(direction @ direction), 1e-12)
    return other / max(float(np.sqrt(other @ other)), 1e-12)


def grow_tree(
    rng: np.random.Generator,
    root: np.ndarray,
    points: np.ndarray,
    leaf_size: int,
    leaf_radius: float,
    min_radius: float = 0.0,
) -> Tree:
    """Grow a tree from ``root`` through the territory ``points`` (see module docstring).

    Branches thinner than ``min_radius`` are not drawn (airways stop where their lumen
    would vanish).
    """
    starts: list[np.ndarray] = []
    ends: list[np.ndarray] = []
    radii: list[float] = []
    forks: list[bool] = []

    def add(start: np.ndarray, end: np.ndarray, radius: float, fork: bool) -> None:
        length = float(np.linalg.norm(end - start))
        if length > 4 * radius:  # a bend halfway makes long branches less straight
            middle = (
                0.5 * (start + end)
                + _perpendicular(end - start, rng) * rng.uniform(-0.12, 0.12) * length
            )
            starts.extend([start, middle])
            ends.extend([middle, end])
            radii.extend([radius, radius * TAPER**0.5])
            forks.extend([False, fork])
        else:
            starts.append(start)
            ends.append(end)
            radii.append(radius)
            forks.append(fork)

    stack = [(np.asarray(root, dtype=np.float64), np.arange(len(points)), 0)]
    while stack:
        start, members, depth = stack.pop()
        group = points[members]
        centre = group.mean(axis=0)
        radius = leaf_radius * max(len(members) / leaf_size, 1.0) ** (1 / MURRAY_EXPONENT)
        if radius < min_radius:
            continue
        if len(members) <= leaf_size:
            add(start, centre, radius, fork=False)
            continue
        end = start + rng.uniform(*(BRANCH_REACH if depth else ROOT_REACH)) * (centre - start)
        add(start, end, radius, fork=True)
        spread = group - centre
        longest = np.linalg.eigh(spread.T @ spread)[1][:, -1]
        longest *= np.sign(longest[np.argmax(np.abs(longest))])  # LAPACK may return either sign
        order = np.argsort(spread @ longest, kind="stable")
        cut = int(np.clip(round(len(members) * rng.uniform(0.35, 0.65)), 1, len(members) - 1))
        stack.append((end, members[order[cut:]], depth + 1))
        stack.append((end, members[order[:cut]], depth + 1))
    if not starts:
        empty = np.zeros((0, 3))
        return Tree(empty, empty, np.zeros(0), np.zeros(0, dtype=bool))
    return Tree(np.array(starts), np.array(ends), np.array(radii), np.array(forks, dtype=bool))


def _segments(
    tree: Tree, grid: Grid, scale: float = 1.0, shrink: float = 0.0
) -> Iterator[tuple[Box, np.ndarray, float]]:
    """(box, signed distance, radius) of each segment drawn ``scale`` times thinner less ``shrink``."""
    for start, end, radius in zip(tree.starts, tree.ends, tree.radii, strict=True):
        r = radius * scale - shrink
        if r <= 0:
            continue
        found = tapered_capsule(grid, start, end, r, r * TAPER, grid.edge_mm)
        if found is not None:
            yield found[0], found[1], r


def render_vessels(tree: Tree, grid: Grid, hu: np.ndarray, value: float) -> None:
    """Solid tubes of blood/soft tissue density (non-contrast CT).

    A vessel thinner than a voxel fills only part of the voxels it crosses, so its
    contrast fades with its width instead of drawing a full-density line.
    """
    for box, distance, radius in _segments(tree, grid):
        fill = min(1.0, 2 * radius / grid.edge_mm)
        paint_max(hu, box, occupancy(distance, grid.edge_mm) * np.float32(fill), value)


def render_airways(tree: Tree, grid: Grid, hu: np.ndarray, wall_value: float) -> None:
    """Air lumen inside a wall about a fifth of the radius thick; walls first, then lumens."""
    for box, distance, _ in _segments(tree, grid):
        paint_max(hu, box, occupancy(distance, grid.edge_mm), wall_value)
    for box, distance, _ in _segments(tree, grid, scale=0.8, shrink=0.15):
        paint_over(hu, box, occupancy(distance, grid.edge_mm), HU_AIR)
