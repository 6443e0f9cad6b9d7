"""One synthetic chest CT: anatomy, nodules, candidates, scanner noise and geometry.

The phantom is built in a canonical frame (identity direction, voxel (0, 0, 0) at the
origin) and only at the end stored the way the drawn acquisition says: some scans are
flipped along an axis, with the direction matrix and origin changed so that every
world (LPS mm) position, and so every annotation, stays where it was.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace

import numpy as np

from lungcad.data.geometry import Geometry, Xyz
from lungcad.data.luna import Candidate
from lungcad.data.synth.anatomy import (
    HU_SOFT,
    axis_position,
    build_section,
    plan_torso,
    render_background,
)
from lungcad.data.synth.bones import render_bones
from lungcad.data.synth.candidates import list_candidates
from lungcad.data.synth.finish import Acquisition, finish_volume, plan_acquisition
from lungcad.data.synth.mediastinum import Hilum, render_mediastinum
from lungcad.data.synth.nodules import (
    MIN_DIAMETER_MM,
    NODULE_COUNT_WEIGHTS,
    NoduleDesign,
    design_nodule,
    draw_diameter,
    draw_kind,
    malignancy_logit,
    place_nodule,
    reader_ratings,
    render_nodule,
)
from lungcad.data.synth.primitives import Grid
from lungcad.data.synth.trees import (
    Tree,
    grow_tree,
    render_airways,
    render_vessels,
    sample_lung_points,
)
from lungcad.errors import LungcadError

UID_ROOT = "1.2.826.0.1.3680043.8.498."  # a root for UIDs made from hashes
MIN_SIZE = 32
VESSEL_LEAF_RADIUS_MM = 0.55
VESSEL_POINTS = 5000  # territory points per vessel tree at scale 1 (about 1250 leaves)
AIRWAY_POINTS = 400
MALIGNANCY_NOISE = 0.8  # std of the unexplained part of the log-odds
MAX_LUNG_SHARE = 0.02  # largest nodule volume / lung volume


@dataclass(frozen=True)
class PhantomNodule:
    """A drawn nodule as an annotation would list it (world LPS mm) plus what made it."""

    center_xyz: Xyz
    diameter_mm: float  # equivalent diameter of the labelled voxels
    kind: str
    shape: str
    location: str
    malignant: bool
    reader_ratings: tuple[int, ...]
    label: int  # its value in PhantomScan.nodule_labels
    bbox_low_xyz: Xyz
    bbox_high_xyz: Xyz


@dataclass(frozen=True)
class PhantomFinding:
    """An "irrelevant finding" (LUNA16's excluded list): a tiny nodule or a calcification."""

    center_xyz: Xyz
    diameter_mm: float  # -1 when not measured


@dataclass(frozen=True)
class PhantomScan:
    """A phantom in memory: int16 HU (I, R, C), its geometry and the ground truth.

    ``nodule_labels`` is uint8 (I, R, C): 0 outside nodules, ``nodule.label`` inside.
    """

    series_uid: str
    hu: np.ndarray
    geometry: Geometry
    nodules: tuple[PhantomNodule, ...]
    findings: tuple[PhantomFinding, ...]
    candidates: tuple[Candidate, ...]
    nodule_labels: np.ndarray
    lung_mask: np.ndarray


def _digest(seed: int, index: int, size: int) -> bytes:
    return hashlib.sha256(f"lungcad-synth:{seed}:{index}:{size}".encode()).digest()


def series_uid(seed: int, index: int, size: int) -> str:
    """A DICOM-style UID (at most 64 characters), the same for the same (seed, index, size)."""
    return UID_ROOT + str(int.from_bytes(_digest(seed, index, size)[16:28], "big"))


def generate_scan(seed: int, index: int, size: int = 512) -> PhantomScan:
    """Render scan ``index`` of the dataset with ``seed``: ``size`` x ``size`` pixels a slice."""
    if size < MIN_SIZE:
        raise LungcadError(f"phantom size must be at least {MIN_SIZE} pixels, got {size}")
    entropy = int.from_bytes(_digest(seed, index, size)[:16], "big")
    # One stream per stage, so changing how one stage draws leaves the others alone.
    streams = [np.random.default_rng(s) for s in np.random.SeedSequence(entropy).spawn(6)]
    acquisition = plan_acquisition(streams[0], size)
    grid, hu, lung, trees = _render_anatomy(streams[1], acquisition, size)

    rng = streams[2]
    lung_points = sample_lung_points(rng, lung, grid, 4000, (-np.inf, np.inf))
    if len(lung_points) == 0:
        raise RuntimeError(f"phantom {seed}/{index}/{size} has no lung voxels")
    labels = np.zeros(grid.shape, dtype=np.uint8)
    designs = _add_nodules(rng, grid, hu, lung, labels, lung_points, trees[0])
    findings = _add_findings(streams[3], grid, hu, lung, lung_points, trees[0], designs)
    nodules = [
        _describe(rng, design, label, labels, grid, acquisition)
        for label, design in enumerate(designs, 1)
    ]
    candidates = list_candidates(
        streams[4],
        grid,
        lung,
        lung_points,
        trees,
        [(d.centre, n.diameter_mm, d.reach_mm) for d, n in zip(designs, nodules, strict=True)],
        [centre for centre, _ in findings],
    )

    uid = series_uid(seed, index, size)
    volume = finish_volume(streams[5], hu, acquisition)
    return PhantomScan(
        series_uid=uid,
        hu=acquisition.store(volume),
        geometry=acquisition.stored_geometry(grid.shape),
        nodules=tuple(nodules),
        findings=tuple(PhantomFinding(acquisition.to_world(c), d) for c, d in findings),
        candidates=tuple(Candidate(uid, acquisition.to_world(p), n) for p, n in candidates),
        nodule_labels=acquisition.store(labels),
        lung_mask=acquisition.store(lung),
    )


def _render_anatomy(
    rng: np.random.Generator, acquisition: Acquisition, size: int
) -> tuple[Grid, np.ndarray, np.ndarray, tuple[Tree, Tree]]:
    """The healthy chest: float32 HU, lung mask and the (vessel, airway) trees."""
    torso = plan_torso(rng, size * acquisition.spacing_xy)
    slices = max(8, round(torso.height / acquisition.slice_mm) + 1)
    spacing = (acquisition.slice_mm, acquisition.spacing_xy, acquisition.spacing_xy)
    grid = Grid((slices, size, size), spacing)
    hu, lung = render_background(torso, build_section(torso, grid, rng), grid)
    hila = render_mediastinum(torso, grid, hu, lung, rng)
    render_bones(torso, grid, hu, lung, rng)
    midline_x = axis_position(torso, grid)[1] + torso.midline_x
    vessels, airways = _grow_trees(rng, torso.scale, midline_x, grid, lung, hila)
    render_airways(airways, grid, hu, HU_SOFT)
    render_vessels(vessels, grid, hu, HU_SOFT + rng.uniform(-10, 10))
    return grid, hu, lung, (vessels, airways)


def _grow_trees(
    rng: np.random.Generator,
    scale: float,
    midline_x: float,
    grid: Grid,
    lung: np.ndarray,
    hila: tuple[Hilum, Hilum],
) -> tuple[Tree, Tree]:
    """Artery and vein trees and a bronchial tree per lung, each in its own territory."""
    vessel_points = max(40, round(VESSEL_POINTS * scale**3))
    airway_points = max(24, round(AIRWAY_POINTS * scale**3))
    # Small people have fine vessels: a 64-pixel phantom's lungs are a few mm wide.
    leaf_radius = VESSEL_LEAF_RADIUS_MM * min(1.0, scale / 0.6)
    vessels, airways = [], []
    for hilum, side in zip(hila, ((-np.inf, midline_x), (midline_x, np.inf)), strict=True):
        for root in (hilum.artery, hilum.vein):
            points = sample_lung_points(rng, lung, grid, vessel_points, side)
            vessels.append(grow_tree(rng, root, points, 4, leaf_radius))
        points = sample_lung_points(rng, lung, grid, airway_points, side)
        airways.append(grow_tree(rng, hilum.bronchus, points, 12, 1.5 * scale**0.5, min_radius=1.0))
    return Tree.join(vessels), Tree.join(airways)


def _add_nodules(
    rng: np.random.Generator,
    grid: Grid,
    hu: np.ndarray,
    lung: np.ndarray,
    labels: np.ndarray,
    lung_points: np.ndarray,
    vessels: Tree,
) -> list[NoduleDesign]:
    """Place and draw 0-6 nodules; one that fits nowhere shrinks, down to 3 mm, or is dropped."""
    designs: list[NoduleDesign] = []
    # No nodule takes more than a small share of the lungs (matters for tiny phantoms).
    lung_mm3 = float(np.count_nonzero(lung)) * float(np.prod(grid.spacing))
    largest = 2 * (MAX_LUNG_SHARE * lung_mm3 * 3 / (4 * np.pi)) ** (1 / 3)
    for _ in range(int(rng.choice(len(NODULE_COUNT_WEIGHTS), p=NODULE_COUNT_WEIGHTS))):
        diameter = min(draw_diameter(rng), largest)
        kind, shape, location = draw_kind(rng, diameter)
        taken = [(d.centre, d.reach_mm) for d in designs]
        radius = diameter / 2
        centre = None
        while centre is None and radius >= MIN_DIAMETER_MM / 2:
            centre = place_nodule(rng, location, radius, lung, grid, lung_points, vessels, taken)
            radius = radius if centre is not None else radius * 0.8
        if centre is None:
            continue
        if 2 * radius < diameter:  # shrunk: too small now for some kinds and shapes
            kind, shape, _ = draw_kind(rng, 2 * radius)
        design = design_nodule(rng, centre, radius, kind, shape, location)
        if render_nodule(design, grid, hu, labels, len(designs) + 1):
            designs.append(design)
    return designs


def _add_findings(
    rng: np.random.Generator,
    grid: Grid,
    hu: np.ndarray,
    lung: np.ndarray,
    lung_points: np.ndarray,
    vessels: Tree,
    designs: list[NoduleDesign],
) -> list[tuple[np.ndarray, float]]:
    """0-3 tiny nodules (< 3 mm, measured) and calcified granulomas (diameter -1)."""
    findings: list[tuple[np.ndarray, float]] = []
    taken = [(d.centre, d.reach_mm) for d in designs]
    for _ in range(int(rng.integers(0, 4))):
        calcified = bool(rng.uniform() < 0.4)
        diameter = float(rng.uniform(2.0, 5.0) if calcified else rng.uniform(1.5, 2.8))
        centre = place_nodule(
            rng, "isolated", diameter / 2, lung, grid, lung_points, vessels, taken
        )
        if centre is None:
            continue
        design = design_nodule(rng, centre, diameter / 2, "solid", "smooth", "isolated")
        if calcified:
            design = replace(design, solid_hu=float(rng.uniform(250, 600)))
        render_nodule(design, grid, hu, None, 0)
        taken.append((centre, diameter / 2))
        findings.append((centre, -1.0 if calcified else round(diameter, 2)))
    return findings


def _describe(
    rng: np.random.Generator,
    design: NoduleDesign,
    label: int,
    labels: np.ndarray,
    grid: Grid,
    acquisition: Acquisition,
) -> PhantomNodule:
    """Measure a drawn nodule from its labelled voxels and rate its malignancy."""
    reach = design.reach_mm + 1
    box = grid.box(design.centre - reach, design.centre + reach)
    if box is None:
        raise RuntimeError(f"nodule {label} lies outside the volume")
    voxels = np.argwhere(labels[box] == label) + np.array([s.start for s in box])
    diameter = float((6 / np.pi * len(voxels) * np.prod(grid.spacing)) ** (1 / 3))
    logit = malignancy_logit(diameter, design.kind, design.shape) + rng.normal(0, MALIGNANCY_NOISE)
    probability = float(1 / (1 + np.exp(-logit)))
    malignant = bool(rng.uniform() < probability)
    return PhantomNodule(
        center_xyz=acquisition.to_world(design.centre),
        diameter_mm=round(diameter, 3),
        kind=design.kind,
        shape=design.shape,
        location=design.location,
        malignant=malignant,
        reader_ratings=reader_ratings(rng, malignant, probability),
        label=label,
        bbox_low_xyz=acquisition.to_world(voxels.min(axis=0) * grid.spacing),
        bbox_high_xyz=acquisition.to_world(voxels.max(axis=0) * grid.spacing),
    )
