"""Draw docs/phantom_vs_real.png: a 512-size phantom next to a real chest CT.

Top row: axial, coronal and sagittal slices of a phantom through its largest nodule.
Bottom row: the same views through the middle of the real 141-slice CT in
``../shared/data/ct/chest-ct-141-dicom``. Both in the lung window (W 1500, L -600),
shown in radiological orientation (patient's right on the left, head up) with the
aspect ratio their voxel spacing gives.

Usage: .venv/bin/python scripts/phantom_figure.py [--seed N] [--index N] [--out PATH]
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from lungcad.data.ct import read_ct
from lungcad.data.geometry import Geometry, Irc, xyz_to_irc
from lungcad.data.synth import generate_scan

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("LUNGCAD_SHARED", REPO.parent / "shared"))
REAL_CT = SHARED / "data" / "ct" / "chest-ct-141-dicom"
WINDOW = (-600 - 750, -600 + 750)

log = logging.getLogger("phantom_figure")


def _canonical(hu: np.ndarray, geometry: Geometry) -> np.ndarray:
    """Undo axis flips so rows run front to back, columns right to left, index foot to head."""
    signs = np.diag(geometry.direction_matrix)[::-1]  # (z, y, x) order of the array axes
    flipped = tuple(axis for axis, sign in enumerate(signs) if sign < 0)
    return np.flip(hu, flipped) if flipped else hu


def _views(
    hu: np.ndarray, geometry: Geometry, centre_irc: tuple[int, int, int]
) -> list[tuple[np.ndarray, float]]:
    """(image, aspect) for axial, coronal and sagittal slices through ``centre_irc``."""
    index, row, col = centre_irc
    sx, sy, sz = geometry.spacing_xyz
    return [
        (hu[index], sy / sx),
        (hu[::-1, row, :], sz / sx),
        (hu[::-1, :, col], sz / sy),
    ]


def _canonical_irc(irc: Irc, shape: tuple[int, ...], geometry: Geometry) -> tuple[int, int, int]:
    """Where voxel ``irc`` of the stored array lands after :func:`_canonical`."""
    signs = np.diag(geometry.direction_matrix)[::-1]
    index, row, col = (
        n - 1 - int(v) if s < 0 else int(v) for v, n, s in zip(irc, shape, signs, strict=True)
    )
    return index, row, col


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--index", type=int, default=4)
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "phantom_vs_real.png")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    phantom = generate_scan(args.seed, args.index, 512)
    if phantom.nodules:
        nodule = max(phantom.nodules, key=lambda n: n.diameter_mm)
        stored = xyz_to_irc(nodule.center_xyz, phantom.geometry)
        centre = _canonical_irc(stored, phantom.hu.shape, phantom.geometry)
        title = f"phantom: {nodule.diameter_mm:.0f} mm {nodule.kind} {nodule.shape} nodule"
    else:
        centre = (phantom.hu.shape[0] // 2, phantom.hu.shape[1] // 2, phantom.hu.shape[2] // 2)
        title = "phantom (no nodule)"
    real = read_ct(REAL_CT)
    rows = [
        (title, _views(_canonical(phantom.hu, phantom.geometry), phantom.geometry, centre)),
        (
            "real CT (141 slices)",
            _views(
                _canonical(real.hu, real.geometry),
                real.geometry,
                tuple(n // 2 for n in real.hu.shape),
            ),
        ),
    ]
    figure, axes = plt.subplots(2, 3, figsize=(10.5, 6.3), facecolor="black")
    for row_axes, (label, views) in zip(axes, rows, strict=True):
        for axis, (image, aspect), view in zip(
            row_axes, views, ("axial", "coronal", "sagittal"), strict=True
        ):
            axis.imshow(
                image,
                cmap="gray",
                vmin=WINDOW[0],
                vmax=WINDOW[1],
                aspect=aspect,
                interpolation="antialiased",
            )
            axis.set_title(f"{label} - {view}", color="white", fontsize=9)
            axis.axis("off")
    figure.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    temporary = args.out.with_suffix(".tmp-" + str(os.getpid()) + ".png")
    figure.savefig(temporary, dpi=72, facecolor="black")
    os.replace(temporary, args.out)
    log.info("wrote %s (%.0f KB)", args.out, args.out.stat().st_size / 1024)


if __name__ == "__main__":
    main()
