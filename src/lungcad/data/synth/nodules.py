"""Lung nodules: what kind, where, how they look, and how malignant readers would call them.

Kinds follow the clinical split by density: solid (soft tissue, 10-60 HU), part-solid (a
ground-glass halo around a solid core) and ground-glass (-560 to -380 HU, dense enough
that growing a -700 HU mask from the centre still finds them). Shapes are smooth,
lobulated (bumps on the surface) or spiculated (thin strands radiating out). A nodule
touches the chest wall (juxtapleural), a vessel (juxtavascular) or nothing (isolated).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lungcad.data.synth.primitives import Grid, occupancy, paint_max, star_shape, tapered_capsule
from lungcad.data.synth.trees import Tree

KINDS = ("solid", "part-solid", "ground-glass")
SHAPES = ("smooth", "lobulated", "spiculated")
LOCATIONS = ("isolated", "juxtapleural", "juxtavascular")
NODULE_COUNT_WEIGHTS = (0.2, 0.3, 0.2, 0.12, 0.08, 0.06, 0.04)  # P(0..6 nodules in a scan)
MIN_DIAMETER_MM = 3.0
MAX_DIAMETER_MM = 30.0
# Diameters fitted to the 1,186 nodules of LUNA16's annotations.csv: 3.2 mm plus a
# log-normal part puts the 5th / 25th / 50th / 75th percentile at 4.1 / 5.2 / 6.7 / 9.3 mm
# (the table: 4.1 / 5.1 / 6.4 / 9.7 mm) and 4% of nodules under 4 mm (the table: 4%).
DIAMETER_FLOOR_MM = 3.2
DIAMETER_LOG_MEAN = 1.25
DIAMETER_LOG_STD = 0.85
SUBSOLID_MIN_DIAMETER_MM = 6.0
PLACEMENT_TRIES = 40


@dataclass(frozen=True)
class NoduleDesign:
    """Everything needed to draw one nodule; positions in canonical (z, y, x) mm."""

    centre: np.ndarray
    radius: float
    kind: str
    shape: str
    location: str
    axes: np.ndarray
    rotation: np.ndarray
    bumps: np.ndarray
    spicules: tuple[tuple[np.ndarray, np.ndarray, float], ...]  # start, end, start radius
    solid_hu: float
    ground_glass_hu: float
    core_fraction: float  # part-solid: radius of the solid core / radius

    @property
    def reach_mm(self) -> float:
        """Distance from the centre beyond which nothing of the nodule is drawn."""
        body = (
            self.radius
            * float(np.max(self.axes))
            * (1 + float(np.linalg.norm(self.bumps, axis=1).sum()))
        )
        tips = [float(np.linalg.norm(end - self.centre)) for _, end, _ in self.spicules]
        return max([body, *tips])


def _unit_vectors(rng: np.random.Generator, count: int) -> np.ndarray:
    vectors = rng.normal(size=(count, 3))
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    return q * np.sign(np.diag(r))


def draw_kind(rng: np.random.Generator, diameter_mm: float) -> tuple[str, str, str]:
    """(kind, shape, location); sub-solid and spiculated nodules are never tiny."""
    big = diameter_mm >= SUBSOLID_MIN_DIAMETER_MM
    kind = str(rng.choice(KINDS, p=(0.6, 0.2, 0.2))) if big else "solid"
    spiculated = 0.1 + 0.3 * min(diameter_mm / 20.0, 1.0) if big else 0.0
    lobulated = 0.35 if big else 0.4
    shape = str(rng.choice(SHAPES, p=(1 - lobulated - spiculated, lobulated, spiculated)))
    if kind == "ground-glass" and shape == "spiculated":
        shape = "lobulated"
    location = str(rng.choice(LOCATIONS, p=(0.5, 0.3, 0.2)))
    return kind, shape, location


def draw_diameter(rng: np.random.Generator) -> float:
    """A diameter as LUNA16's annotations have them (see ``DIAMETER_FLOOR_MM``).

    Redrawn above ``MAX_DIAMETER_MM`` rather than clipped: a clip piles its whole tail on
    one value (clipping at 3 mm once put 6% of all nodules at exactly 3 mm, and 15% under
    4 mm where LUNA16 has 4%).
    """
    while True:
        diameter = DIAMETER_FLOOR_MM + rng.lognormal(DIAMETER_LOG_MEAN, DIAMETER_LOG_STD)
        if diameter <= MAX_DIAMETER_MM:
            return float(diameter)


def design_nodule(
    rng: np.random.Generator,
    centre: np.ndarray,
    radius: float,
    kind: str,
    shape: str,
    location: str,
) -> NoduleDesign:
    """Random shape and densities for a nodule of nominal ``radius`` mm at ``centre``.

    Juxtapleural nodules stay rounder, so that they sit against the wall rather than in it.
    """
    axes = 1 + rng.uniform(-0.15, 0.15, size=3) * (0.4 if location == "juxtapleural" else 1.0)
    rotation = _random_rotation(rng)
    if shape == "smooth":
        bumps = _unit_vectors(rng, 2) * rng.uniform(0.0, 0.08, size=(2, 1))
    else:
        count = int(rng.integers(3, 7))
        bumps = _unit_vectors(rng, count) * rng.uniform(0.12, 0.3, size=(count, 1))
    spicules = []
    if shape == "spiculated":
        for direction in _unit_vectors(rng, int(rng.integers(6, 15))):
            length = radius * rng.uniform(0.4, 1.3) + rng.uniform(1.0, 4.0)
            start = centre + direction * 0.7 * radius
            spicules.append(
                (start, centre + direction * (radius + length), float(rng.uniform(0.45, 0.9)))
            )
    return NoduleDesign(
        centre=np.asarray(centre, dtype=np.float64),
        radius=radius,
        kind=kind,
        shape=shape,
        location=location,
        axes=axes,
        rotation=rotation,
        bumps=bumps,
        spicules=tuple(spicules),
        solid_hu=float(rng.uniform(10, 60)),
        ground_glass_hu=float(rng.uniform(-560, -380)),
        core_fraction=float(rng.uniform(0.35, 0.6)),
    )


def render_nodule(
    design: NoduleDesign, grid: Grid, hu: np.ndarray, labels: np.ndarray | None, label: int
) -> int:
    """Draw the nodule (densest wins) and mark voxels at least half inside with ``label``.

    Returns the number of voxels at least half inside (without ``labels``, of its body).
    """
    edge = grid.edge_mm
    outer = design.ground_glass_hu if design.kind != "solid" else design.solid_hu
    found = star_shape(
        grid, design.centre, design.radius, design.axes, design.rotation, design.bumps, 6.0, edge
    )
    if found is None:
        return 0
    box, distance = found
    fraction = occupancy(distance, edge)
    paint_max(hu, box, fraction, outer)
    if labels is None:
        return int(np.count_nonzero(fraction >= 0.5))
    labels[box][fraction >= 0.5] = label
    if design.kind == "part-solid":
        core = star_shape(
            grid,
            design.centre,
            design.radius * design.core_fraction,
            design.axes,
            design.rotation,
            design.bumps * 0.5,
            6.0,
            edge,
        )
        if core is not None:
            paint_max(hu, core[0], occupancy(core[1], edge), design.solid_hu)
    for start, end, radius in design.spicules:
        strand = tapered_capsule(grid, start, end, radius, 0.15, edge)
        if strand is not None:
            fraction = occupancy(strand[1], edge)
            paint_max(hu, strand[0], fraction, design.solid_hu)
            labels[strand[0]][fraction >= 0.5] = label
    return int(np.count_nonzero(labels[box] == label))


def _sphere_lung_fraction(lung: np.ndarray, grid: Grid, centre: np.ndarray, radius: float) -> float:
    box = grid.box(centre - radius, centre + radius)
    if box is None:
        return 0.0
    z, y, x = grid.box_coords(box)
    inside = (z - centre[0]) ** 2 + (y - centre[1]) ** 2 + (x - centre[2]) ** 2 <= radius**2
    count = int(np.count_nonzero(inside))
    if count == 0:
        return 0.0
    # Voxels of the sphere outside the volume count as not lung.
    full = 4 / 3 * np.pi * radius**3 / float(np.prod(grid.spacing))
    return float(np.count_nonzero(lung[box] & inside)) / max(count, full)


def march_to_boundary(
    lung: np.ndarray, grid: Grid, start: np.ndarray, direction: np.ndarray
) -> np.ndarray | None:
    """First point along the ray from ``start`` that leaves the lung (None if it never does)."""
    step = 0.5 * float(grid.spacing.min())
    distances = np.arange(step, float(np.linalg.norm(grid.extent_mm)), step)
    points = start[None, :] + distances[:, None] * direction[None, :]
    index = np.rint(points / grid.spacing).astype(int)
    valid = np.all((index >= 0) & (index < np.asarray(grid.shape)), axis=1)
    outside = ~valid
    outside[valid] = ~lung[index[valid, 0], index[valid, 1], index[valid, 2]]
    if not outside.any():
        return None
    return points[int(np.argmax(outside))]


def place_nodule(
    rng: np.random.Generator,
    location: str,
    radius: float,
    lung: np.ndarray,
    grid: Grid,
    lung_points: np.ndarray,
    vessels: Tree,
    taken: list[tuple[np.ndarray, float]],
) -> np.ndarray | None:
    """A centre for a nodule of ``radius`` mm at ``location`` that is in the lung, or None."""
    thick = np.flatnonzero((vessels.radii > 0.7) & (vessels.radii < 3.5))
    for _ in range(PLACEMENT_TRIES):
        anchor = lung_points[rng.integers(len(lung_points))]
        if location == "juxtapleural":
            direction = _unit_vectors(rng, 1)[0]
            wall = march_to_boundary(lung, grid, anchor, direction)
            if wall is None:
                continue
            centre = wall - direction * rng.uniform(0.55, 0.8) * radius
            wanted = (0.55, 0.92)
        elif location == "juxtavascular" and len(thick):
            segment = thick[rng.integers(len(thick))]
            on_axis = vessels.starts[segment] + rng.uniform(0.2, 0.8) * (
                vessels.ends[segment] - vessels.starts[segment]
            )
            away = np.cross(vessels.ends[segment] - vessels.starts[segment], rng.normal(size=3))
            away /= max(float(np.linalg.norm(away)), 1e-9)
            centre = on_axis + away * (vessels.radii[segment] + 0.8 * radius)
            wanted = (0.9, 1.01)
        else:
            centre = anchor
            wanted = (0.97, 1.01)
        index = tuple(grid.to_index(centre))
        if not lung[index]:
            continue
        if any(
            np.linalg.norm(centre - other) < radius + other_radius + 3.0
            for other, other_radius in taken
        ):
            continue
        if wanted[0] <= _sphere_lung_fraction(lung, grid, centre, radius + 0.5) <= wanted[1]:
            return centre
    return None


def malignancy_logit(diameter_mm: float, kind: str, shape: str) -> float:
    """Log-odds of malignancy: grows with size, spiculation and a solid core in a sub-solid."""
    shape_term = {"smooth": 0.0, "lobulated": 0.8, "spiculated": 1.8}[shape]
    kind_term = {"solid": 0.0, "part-solid": 1.0, "ground-glass": -0.6}[kind]
    return -1.1 + 2.0 * float(np.log(diameter_mm / 10.0)) + shape_term + kind_term


def reader_ratings(
    rng: np.random.Generator, malignant: bool, probability: float
) -> tuple[int, ...]:
    """LIDC-style ratings 1-5 from 1-4 readers, consistent with "malignant = at least two >= 4"."""
    readers = int(rng.choice([1, 2, 3, 4], p=(0.1, 0.15, 0.25, 0.5)))
    if malignant:
        readers = max(readers, 2)
    ratings = np.clip(np.rint(1 + 4 * probability + rng.normal(0, 0.8, size=readers)), 1, 5).astype(
        int
    )
    order = np.argsort(-ratings, kind="stable")
    if malignant:
        ratings[order[:2]] = np.maximum(ratings[order[:2]], 4)
    else:
        ratings[order[1:]] = np.minimum(ratings[order[1:]], 3)
    return tuple(int(r) for r in ratings)
