"""Candidate points as a nodule detector would list them: every nodule, slightly off
centre, plus many hard negatives on things that look like nodules in one slice."""

from __future__ import annotations

import numpy as np

from lungcad.data.synth.nodules import march_to_boundary
from lungcad.data.synth.primitives import Grid
from lungcad.data.synth.trees import Tree

NEGATIVES_PER_POSITIVE = (100, 400)
# Where the negatives come from: vessel forks, along vessels, airway walls, lung surface,
# anywhere in the lung.
SOURCE_WEIGHTS = (0.25, 0.25, 0.08, 0.25, 0.17)
REFERENCE_VOLUME_MM3 = 358.0 * 358.0 * 300.0  # a typical full-size scan


def list_candidates(
    rng: np.random.Generator,
    grid: Grid,
    lung: np.ndarray,
    lung_points: np.ndarray,
    trees: tuple[Tree, Tree],
    nodules: list[tuple[np.ndarray, float, float]],
    findings: list[np.ndarray],
) -> list[tuple[np.ndarray, bool]]:
    """Every nodule (class 1, jittered) and hard negatives (class 0), in random order.

    ``nodules`` holds (centre, diameter, reach) in canonical mm; ``findings`` are the
    excluded findings' centres, listed as negatives as LUNA16 does.
    """
    positives = [
        (jittered_positive(rng, centre, diameter), True) for centre, diameter, _ in nodules
    ]
    volume_fraction = float(np.prod(grid.extent_mm)) / REFERENCE_VOLUME_MM3
    count = negative_count(rng, len(positives), volume_fraction)
    keep_out = [(centre, reach + 2.0) for centre, _, reach in nodules]
    negatives = hard_negatives(rng, count, grid, lung, lung_points, trees, keep_out)
    listed = positives + [(p, False) for p in negatives] + [(c, False) for c in findings]
    return [listed[i] for i in rng.permutation(len(listed))]


def negative_count(rng: np.random.Generator, positives: int, volume_fraction: float) -> int:
    """100-400 negatives per nodule; a scan without nodules gets as many as one with a
    nodule would, shrunk with the volume (``volume_fraction`` of a 512 x 512 x 300 scan)."""
    ratio = rng.uniform(*NEGATIVES_PER_POSITIVE)
    if positives:
        return round(ratio * positives)
    return max(10, round(ratio * min(volume_fraction, 1.0)))


def jittered_positive(
    rng: np.random.Generator, centre: np.ndarray, diameter_mm: float
) -> np.ndarray:
    """A detector's estimate of a nodule centre: less than diameter / 8 away."""
    return centre + rng.uniform(-1, 1, size=3) * diameter_mm / (8 * np.sqrt(3) * 1.01)


def _along_segments(
    rng: np.random.Generator, tree: Tree, count: int, offset_scale: float
) -> np.ndarray:
    """Points on (or, with ``offset_scale``, on the wall of) thicker segments."""
    weights = np.linalg.norm(tree.ends - tree.starts, axis=1) * np.clip(tree.radii - 0.4, 0, None)
    if count == 0 or weights.sum() <= 0:
        return np.zeros((0, 3))
    chosen = rng.choice(len(weights), size=count, p=weights / weights.sum())
    t = rng.uniform(0, 1, size=(count, 1))
    points = tree.starts[chosen] + t * (tree.ends[chosen] - tree.starts[chosen])
    sideways = np.cross(tree.ends[chosen] - tree.starts[chosen], rng.normal(size=(count, 3)))
    sideways /= np.maximum(np.linalg.norm(sideways, axis=1, keepdims=True), 1e-9)
    return points + sideways * (tree.radii[chosen, None] * offset_scale)


def hard_negatives(
    rng: np.random.Generator,
    count: int,
    grid: Grid,
    lung: np.ndarray,
    lung_points: np.ndarray,
    trees: tuple[Tree, Tree],
    keep_out: list[tuple[np.ndarray, float]],
) -> np.ndarray:
    """(count, 3) canonical mm points that are not nodules: none within a nodule's
    ``keep_out`` radius. ``trees`` are the (vessels, airways)."""
    found = np.zeros((0, 3))
    for _ in range(5):
        points = _draw_negatives(rng, 2 * (count - len(found)) + 8, grid, lung, lung_points, trees)
        keep = np.ones(len(points), dtype=bool)
        for centre, radius in keep_out:
            keep &= np.linalg.norm(points - centre, axis=1) > radius
        found = np.concatenate([found, points[keep]])
        if len(found) >= count:
            break
    return found[rng.permutation(len(found))[:count]]


def _draw_negatives(
    rng: np.random.Generator,
    count: int,
    grid: Grid,
    lung: np.ndarray,
    lung_points: np.ndarray,
    trees: tuple[Tree, Tree],
) -> np.ndarray:
    vessels, airways = trees
    counts = rng.multinomial(count, SOURCE_WEIGHTS)
    forks = vessels.ends[vessels.forks]
    fork_points = (
        forks[rng.integers(len(forks), size=counts[0])] if len(forks) else np.zeros((0, 3))
    )
    surface = []
    for anchor in lung_points[rng.integers(len(lung_points), size=counts[3])]:
        direction = rng.normal(size=3)
        direction /= np.linalg.norm(direction)
        wall = march_to_boundary(lung, grid, anchor, direction)
        if wall is not None:
            surface.append(wall - direction * rng.uniform(0.5, 3.0))
    pools = [
        fork_points,
        _along_segments(rng, vessels, counts[1], rng.uniform(0, 0.5)),
        _along_segments(rng, airways, counts[2], 0.9),
        np.array(surface).reshape(-1, 3),
        lung_points[rng.integers(len(lung_points), size=counts[4])],
    ]
    points = np.concatenate(pools)
    points = points + rng.normal(0, 0.7, size=points.shape)
    return np.clip(points, 0, grid.extent_mm)
