"""The chest wall, lungs, diaphragm and spine of a phantom: shapes that change slowly along z.

Anatomical coordinates are millimetres from the body's axis in the canonical frame:
``X`` grows to the patient's left, ``Y`` to the back (posterior), ``z`` upwards (superior),
as LPS does. An axial cross-section is described in polar form around the body axis
(``theta = atan2(Y, X)``: 0 = left side, pi/2 = back, -pi/2 = front), so each tissue
layer of the wall is a band of depth below the skin. Sizes are multiples of ``scale``
(1.0 = an adult chest about 340 mm wide) so that small ``--size`` phantoms are small people.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from lungcad.data.ct import HU_AIR
from lungcad.data.synth.primitives import Grid

HU_FAT = -100.0
HU_SOFT = 40.0
HU_MEDIASTINAL_FAT = -85.0
HU_NECK = 20.0
HU_DISC = 85.0
SLAB = 24  # slices per block when filling the volume: bounds temporary memory


@dataclass(frozen=True)
class Torso:
    """Random per-scan body shape; every length in mm (already multiplied by ``scale``)."""

    scale: float
    offset_yx: tuple[float, float]  # body axis relative to the field-of-view centre
    half_width: float
    half_depth_front: float
    half_depth_back: float
    exponent_front: float
    exponent_back: float
    wobble: np.ndarray  # (m, amplitude, phase) rows: low-order bumps of the outline
    skin: float
    fat: float
    fat_wobble: np.ndarray
    muscle_front: float
    muscle_side: float
    muscle_back: float
    paraspinal: float
    rib_band: float
    midline_x: float
    mediastinum_low: float  # half-width between the lungs at heart level
    mediastinum_high: float  # ... and above the aortic arch
    mediastinum_bulge: float  # extra half-width mid-way front to back, where the great vessels run
    recess_z: float  # lowest point of the lungs (costophrenic recess)
    dome_right: float
    dome_left: float
    apex_z: float
    apex_taper: float
    height: float  # z extent of the scan
    lung_hu: float
    lung_gradient: float  # denser towards the back (dependent lung), HU
    fat_hu: float
    muscle_hu: float
    vertebra_radius_xy: tuple[float, float]
    vertebra_height: float
    vertebra_phase: float

    @property
    def carina_z(self) -> float:
        return self.apex_z - 0.38 * (self.apex_z - self.dome_right)

    @property
    def diaphragm_centre_z(self) -> float:
        return min(self.dome_right, self.dome_left) - 0.012 * self.height

    def body_radius(self, theta: np.ndarray) -> np.ndarray:
        """Distance from the body axis to the skin at polar angle ``theta`` (superellipse)."""
        back = np.sin(theta) > 0
        depth = np.where(back, self.half_depth_back, self.half_depth_front)
        exponent = np.where(back, self.exponent_back, self.exponent_front)
        radius = (
            np.abs(np.cos(theta) / self.half_width) ** exponent
            + np.abs(np.sin(theta) / depth) ** exponent
        ) ** (-1.0 / exponent)
        return radius * (1 + _fourier(theta, self.wobble))

    def wall_layers(self, theta: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Depths (mm below the skin) where fat ends, muscle ends and the ribs' band ends."""
        fat = self.skin + self.fat * (1 + _fourier(theta, self.fat_wobble))
        back = np.clip(np.sin(theta), 0, 1)
        front = np.clip(-np.sin(theta), 0, 1)
        muscle = self.muscle_side + (self.muscle_back - self.muscle_side) * back**2
        muscle = muscle + (self.muscle_front - self.muscle_side) * front**2
        muscle = muscle + self.paraspinal * np.exp(-(((theta - np.pi / 2) / 0.32) ** 2))
        return fat, fat + muscle, fat + muscle + self.rib_band

    def cavity_radius(self, theta: np.ndarray) -> np.ndarray:
        return self.body_radius(theta) - self.wall_layers(theta)[2]

    def rib_radius(self, theta: np.ndarray) -> np.ndarray:
        """Distance from the axis to the middle of the rib band."""
        return self.cavity_radius(theta) + 0.5 * self.rib_band

    @property
    def vertebra_y(self) -> float:
        """Y of the vertebral body's centre: it bulges into the back of the chest cavity."""
        return float(self.cavity_radius(np.array(np.pi / 2))) - 0.35 * self.vertebra_radius_xy[1]


def _fourier(theta: np.ndarray, rows: np.ndarray) -> np.ndarray:
    total = np.zeros_like(np.asarray(theta, dtype=np.float64))
    for order, amplitude, phase in rows:
        total = total + amplitude * np.cos(order * theta + phase)
    return total


def _wobble(rng: np.random.Generator, orders: range, amplitude: float) -> np.ndarray:
    return np.array(
        [(m, rng.normal(0, amplitude / m**0.5), rng.uniform(0, 2 * np.pi)) for m in orders]
    )


def plan_torso(rng: np.random.Generator, field_of_view_mm: float) -> Torso:
    """Draw one body that fits a square field of view ``field_of_view_mm`` wide."""
    half_width = min(0.5 * field_of_view_mm * rng.uniform(0.76, 0.9), rng.uniform(150.0, 185.0))
    k = half_width / 170.0
    dome_right = rng.uniform(45, 70) * k
    lung_height = rng.uniform(210, 260) * k
    margin_low = rng.uniform(20, 45) * k
    margin_high = rng.uniform(12, 35) * k
    recess = margin_low
    apex = recess + lung_height
    return Torso(
        scale=k,
        offset_yx=(
            rng.uniform(-0.03, 0.03) * field_of_view_mm,
            rng.uniform(-0.03, 0.03) * field_of_view_mm,
        ),
        half_width=half_width,
        half_depth_front=half_width * rng.uniform(0.68, 0.8),
        half_depth_back=half_width * rng.uniform(0.74, 0.86),
        exponent_front=rng.uniform(2.0, 2.5),
        exponent_back=rng.uniform(2.3, 2.9),
        wobble=_wobble(rng, range(2, 6), 0.025),
        skin=max(1.0, 2.0 * k),
        fat=rng.uniform(5, 28) * k,
        fat_wobble=_wobble(rng, range(1, 5), 0.3),
        muscle_front=rng.uniform(9, 17) * k,
        muscle_side=rng.uniform(9, 20) * k,
        muscle_back=rng.uniform(10, 18) * k,
        paraspinal=rng.uniform(18, 28) * k,
        rib_band=rng.uniform(9, 13) * k,
        midline_x=rng.uniform(0, 8) * k,
        mediastinum_low=rng.uniform(5, 9) * k,
        mediastinum_high=rng.uniform(10, 16) * k,
        mediastinum_bulge=rng.uniform(18, 30) * k,
        recess_z=recess,
        dome_right=recess + dome_right,
        dome_left=recess + dome_right - rng.uniform(8, 22) * k,
        apex_z=apex,
        apex_taper=rng.uniform(80, 120) * k,
        height=apex + margin_high,
        lung_hu=rng.uniform(-895, -850),
        lung_gradient=rng.uniform(10, 45),
        fat_hu=HU_FAT + rng.uniform(-15, 15),
        muscle_hu=rng.uniform(35, 55),
        vertebra_radius_xy=(rng.uniform(18, 22) * k, rng.uniform(15, 18) * k),
        vertebra_height=rng.uniform(21, 26) * k,
        vertebra_phase=rng.uniform(0, 1),
    )


@dataclass(frozen=True)
class Section:
    """2-D (R, C) maps of one body, the same on every axial slice."""

    x: np.ndarray  # (1, C) anatomical X of each column, mm
    y: np.ndarray  # (R, 1) anatomical Y of each row, mm
    wall_hu: np.ndarray  # air, table, skin, fat, muscle; the cavity holds mediastinal fat
    cavity: np.ndarray
    abdomen_hu: np.ndarray  # what lies under the diaphragm: liver right, spleen/stomach left
    lung_hu: np.ndarray
    lung_sides: tuple[np.ndarray, np.ndarray]  # right, left: cavity beside the mediastinum
    diaphragm_z: np.ndarray  # below this z the cavity is abdomen
    apex_z: np.ndarray  # above this z the cavity is neck
    vertebral_body: np.ndarray
    vertebra_hu: np.ndarray  # NaN outside the spine's bone and canal


def axis_position(torso: Torso, grid: Grid) -> tuple[float, float]:
    """(y, x) in canonical mm of the body's axis."""
    centre = grid.extent_mm / 2
    return float(centre[1] + torso.offset_yx[0]), float(centre[2] + torso.offset_yx[1])


def build_section(torso: Torso, grid: Grid, rng: np.random.Generator) -> Section:
    """Lay out the wall's layers, the table, the lung sections and their domes, and the spine."""
    axis_y, axis_x = axis_position(torso, grid)
    x = (grid.axis_mm(2) - axis_x)[None, :].astype(np.float64)
    y = (grid.axis_mm(1) - axis_y)[:, None].astype(np.float64)
    radius = np.hypot(x, y)
    theta = np.arctan2(y, x)
    depth = torso.body_radius(theta) - radius
    fat_end, muscle_end, cavity_start = torso.wall_layers(theta)

    wall = np.full(radius.shape, float(HU_AIR))
    wall = _draw_table(wall, torso, x, y)
    wall[depth > 0] = HU_SOFT
    wall[depth > torso.skin] = torso.fat_hu
    wall[depth > fat_end] = torso.muscle_hu
    # A thin fat plane between the outer and inner muscle layers, as between the pectorals.
    plane = np.abs(depth - (fat_end + 0.45 * (muscle_end - fat_end))) < 0.8 * torso.scale + 0.4
    wall[plane & (depth > fat_end) & (np.cos(theta) ** 2 > 0.15)] = torso.fat_hu
    wall[depth > muscle_end] = HU_SOFT
    cavity = depth > cavity_start
    wall[cavity] = HU_MEDIASTINAL_FAT

    spacing = grid.spacing_zyx[1:]
    sides = (
        cavity & (x < torso.midline_x - torso.mediastinum_low),
        cavity & (x > torso.midline_x + torso.mediastinum_low),
    )
    diaphragm = np.full(radius.shape, torso.diaphragm_centre_z)
    apex = np.full(radius.shape, torso.apex_z)
    # The diaphragm is a dome under each lung, deepest at the rim and at the back (recesses);
    # the lungs narrow upwards to a rounded apex.
    smooth_px = 15 * torso.scale / spacing[0]
    back_drop = np.clip(y / float(torso.cavity_radius(np.array(np.pi / 2 - 0.5))), 0, 1)
    for side, dome in zip(sides, (torso.dome_right, torso.dome_left), strict=True):
        # Smoothing the distance map rounds off the ridge along its medial axis.
        inside = ndimage.gaussian_filter(
            ndimage.distance_transform_edt(side, sampling=spacing), smooth_px
        )
        closeness = np.clip(1 - inside / max(float(inside.max()), 1e-6), 0, 1)
        dome_rise = dome - torso.recess_z
        surface = dome - dome_rise * (0.75 * closeness**1.3 + 0.25 * back_drop)
        diaphragm = np.where(side, surface, diaphragm)
        apex = np.where(side, torso.apex_z - torso.apex_taper * closeness**2, apex)

    cavity_back = float(torso.cavity_radius(np.array(np.pi / 2 - 0.5)))
    cavity_front = float(torso.cavity_radius(np.array(-np.pi / 2)))
    dependent = np.clip((y + cavity_front) / (cavity_front + cavity_back), 0, 1) ** 2
    lung_hu = np.broadcast_to(torso.lung_hu + torso.lung_gradient * dependent, radius.shape)
    liver = x < torso.midline_x + 0.25 * torso.half_width * np.clip(
        -y / torso.half_depth_front, 0, 1
    )
    abdomen = np.where(liver, rng.uniform(50, 62), rng.uniform(30, 45))
    body, vertebra_hu = _spine(torso, x, y, rng)
    return Section(
        x=x.astype(np.float32),
        y=y.astype(np.float32),
        wall_hu=wall.astype(np.float32),
        cavity=cavity,
        abdomen_hu=abdomen.astype(np.float32),
        lung_hu=lung_hu.astype(np.float32),
        lung_sides=sides,
        diaphragm_z=diaphragm.astype(np.float32),
        apex_z=apex.astype(np.float32),
        vertebral_body=body,
        vertebra_hu=vertebra_hu.astype(np.float32),
    )


def _draw_table(wall: np.ndarray, torso: Torso, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """The scanner couch under the back: two flat plates and a curved shell."""
    k = torso.scale
    top = torso.half_depth_back * (1 + float(np.sum(np.abs(torso.wobble[:, 1])))) + 4 * k
    span = np.abs(x) < 1.05 * torso.half_width
    wall = np.where(span & (np.abs(y - top) < 1.2 * k + 0.3), 40.0, wall)
    wall = np.where(span & (np.abs(y - top - 14 * k) < 1.0 * k + 0.3), -20.0, wall)
    shell = top + 45 * k + 30 * k * (x / torso.half_width) ** 2
    return np.where(span & (np.abs(y - shell) < 1.5 * k + 0.3), 150.0, wall)


def _segment_distance(
    x: np.ndarray, y: np.ndarray, a: tuple[float, float], b: tuple[float, float]
) -> np.ndarray:
    """2-D distance (mm) from each (x, y) to the segment a-b."""
    ax, ay = a
    dx, dy = b[0] - ax, b[1] - ay
    t = np.clip(((x - ax) * dx + (y - ay) * dy) / (dx * dx + dy * dy), 0, 1)
    return np.hypot(x - ax - t * dx, y - ay - t * dy)


def _spine(
    torso: Torso, x: np.ndarray, y: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Axial cross-section of a thoracic vertebra: body, canal, arch and processes."""
    k = torso.scale
    rx, ry = torso.vertebra_radius_xy
    cy = torso.vertebra_y
    xm = torso.midline_x * 0.3
    ellipse = ((x - xm) / rx) ** 2 + ((y - cy) / ry) ** 2
    body = ellipse <= 1
    cortex = body & (ellipse > (1 - 1.3 / min(rx, ry)) ** 2)
    canal_r = 7.0 * k
    canal_y = cy + ry + canal_r + 0.8 * k
    canal_distance = np.hypot(x - xm, y - canal_y)
    canal = canal_distance < canal_r
    arch = (canal_distance >= canal_r) & (canal_distance < canal_r + 3.5 * k)
    spinous = (
        _segment_distance(x, y, (xm, canal_y + canal_r), (xm, canal_y + canal_r + 24 * k)) < 3.2 * k
    )
    processes = np.zeros_like(body)
    for side in (-1, 1):
        start = (xm + side * (canal_r + 2 * k), canal_y - 2 * k)
        end = (xm + side * (canal_r + 22 * k), canal_y + 6 * k)
        processes |= _segment_distance(x, y, start, end) < 3.6 * k
    bone = rng.uniform(550, 800)
    hu = np.full(body.shape, np.nan)
    hu[arch | spinous | processes] = bone
    hu[body] = rng.uniform(170, 260)
    hu[cortex] = bone
    hu[canal] = rng.uniform(5, 25)
    return body, hu


def mediastinum_half_width(torso: Torso, z: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Half-width (mm) of the space between the lungs at height z and depth y.

    Narrow at heart level (the heart is drawn separately) and widest halfway from front to
    back between the carina and the apex, where the aorta, its branches and the venae cavae
    run; (n, 1, 1) z and (1, R, 1) y give (n, R, 1).
    """
    k = torso.scale
    rise = np.clip((z - (torso.carina_z - 25 * k)) / (35 * k), 0, 1)
    base = torso.mediastinum_low + (torso.mediastinum_high - torso.mediastinum_low) * rise
    vessels = np.clip((z - (torso.carina_z - 50 * k)) / (25 * k), 0, 1)
    vessels = vessels * np.clip((torso.apex_z - 10 * k - z) / (60 * k), 0.3, 1)
    depth = float(torso.cavity_radius(np.array(-np.pi / 2)))
    profile = np.clip(1 - ((y + 0.15 * depth) / (0.75 * depth)) ** 2, 0, None)
    return base + torso.mediastinum_bulge * vessels * profile


def _crop(section: Section) -> tuple[tuple[slice, slice], Section]:
    """The part of the section holding the cavity and spine, where the maps vary with z."""
    rows, cols = ndimage.find_objects(
        (section.cavity | ~np.isnan(section.vertebra_hu)).astype(np.uint8)
    )[0]
    cropped = {
        name: value[rows, cols] if value.shape[0] > 1 and value.shape[1] > 1 else value
        for name, value in vars(section).items()
        if name not in ("x", "y", "lung_sides")
    }
    return (rows, cols), Section(
        x=section.x[:, cols],
        y=section.y[rows, :],
        lung_sides=(section.lung_sides[0][rows, cols], section.lung_sides[1][rows, cols]),
        **cropped,
    )


def render_background(torso: Torso, section: Section, grid: Grid) -> tuple[np.ndarray, np.ndarray]:
    """Wall, lungs, diaphragm, abdomen and spine as float32 HU plus a boolean lung mask."""
    hu = np.empty(grid.shape, dtype=np.float32)
    lung = np.zeros(grid.shape, dtype=bool)
    hu[:] = section.wall_hu
    (rows, cols), inner = _crop(section)
    spine = ~np.isnan(inner.vertebra_hu)
    right, left = inner.lung_sides
    for first in range(0, grid.shape[0], SLAB):
        slices = slice(first, min(first + SLAB, grid.shape[0]))
        z = grid.axis_mm(0, slices)[:, None, None]
        half_width = mediastinum_half_width(torso, z, inner.y).astype(np.float32)
        slab = hu[slices, rows, cols]
        np.copyto(slab, inner.abdomen_hu, where=inner.cavity & (z < inner.diaphragm_z))
        np.copyto(slab, np.float32(HU_NECK), where=inner.cavity & (z > inner.apex_z))
        lungs = (z > inner.diaphragm_z) & (z < inner.apex_z)
        lungs &= (right & (inner.x < torso.midline_x - half_width)) | (
            left & (inner.x > torso.midline_x + half_width)
        )
        np.copyto(slab, inner.lung_hu, where=lungs)
        lungs &= ~spine
        np.copyto(slab, inner.vertebra_hu, where=spine)
        phase = (z[:, 0, 0] / torso.vertebra_height + torso.vertebra_phase) % 1.0
        np.copyto(
            slab, np.float32(HU_DISC), where=(phase < 0.2)[:, None, None] & inner.vertebral_body
        )
        lung[slices, rows, cols] = lungs
    return hu, lung
