"""Data commands: ``info``, ``synth``, ``prepare``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import typer

from lungcad.data.cache import VolumeCache, default_cache_dir, prepare_cache
from lungcad.data.ct import read_ct
from lungcad.data.luna import discover_scans


def info(
    path: Path = typer.Argument(..., help="A .mhd/.nrrd/.nii(.gz) file or a DICOM series folder."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """Describe a CT scan: identity, size, geometry and HU range."""
    volume = read_ct(path)
    summary = {
        "series_uid": volume.series_uid,
        "shape_irc": list(volume.shape_irc),
        "spacing_xyz": list(volume.geometry.spacing_xyz),
        "origin_xyz": list(volume.geometry.origin_xyz),
        "direction": list(volume.geometry.direction),
        "hu_min": int(volume.hu.min()),
        "hu_max": int(volume.hu.max()),
    }
    if as_json:
        typer.echo(json.dumps(summary))
        return
    i, r, c = volume.shape_irc
    sx, sy, sz = volume.geometry.spacing_xyz
    typer.echo(f"series_uid  {volume.series_uid}")
    typer.echo(f"source      {volume.source}")
    typer.echo(f"voxels      {c} x {r} x {i} (cols x rows x slices)")
    typer.echo(f"spacing     {sx:.3f} x {sy:.3f} x {sz:.3f} mm")
    typer.echo(f"extent      {c * sx:.1f} x {r * sy:.1f} x {i * sz:.1f} mm")
    typer.echo(
        "origin      " + ", ".join(f"{v:.2f}" for v in volume.geometry.origin_xyz) + " mm (LPS)"
    )
    typer.echo("direction   " + " ".join(f"{v:g}" for v in volume.geometry.direction))
    typer.echo(f"HU          {summary['hu_min']} .. {summary['hu_max']}")
    lung_fraction = float(np.mean((volume.hu > -950) & (volume.hu < -700)))
    typer.echo(f"lung-range  {100 * lung_fraction:.1f}% of voxels in [-950, -700] HU")


def synth(
    out_dir: Path = typer.Argument(..., help="Where to write the LUNA16-layout dataset."),
    scans: int = typer.Option(20, "--scans", min=1, help="Number of scans."),
    seed: int = typer.Option(0, "--seed", help="Same seed, identical bytes."),
    size: int = typer.Option(512, "--size", min=64, help="In-plane size in voxels."),
    subsets: int = typer.Option(1, "--subsets", min=1, help="Spread scans over subset0..K-1."),
) -> None:
    """Write synthetic chest-CT phantoms with nodules in the exact LUNA16 layout."""
    from lungcad.data.synth import write_dataset

    summary = write_dataset(out_dir, scans=scans, seed=seed, size=size, subsets=subsets)
    typer.echo(
        f"wrote {summary.scans} scans, {summary.nodules} nodules, {summary.candidates} candidates "
        f"to {out_dir} in {summary.seconds:.1f} s"
    )


def prepare(
    data_root: Path = typer.Argument(..., help="LUNA16-layout root with subset*/<uid>.mhd."),
    cache: Path | None = typer.Option(
        None, "--cache", help="Cache folder (default: DATA_ROOT/.lungcad-cache or $LUNGCAD_CACHE)."
    ),
    workers: int = typer.Option(2, "--workers", min=1, help="Parallel conversion processes."),
) -> None:
    """Convert every scan once into the memory-mappable volume cache (resumable)."""
    scans = discover_scans(data_root)
    store = VolumeCache(cache or default_cache_dir(data_root))
    summary = prepare_cache(scans, store, workers=workers)
    typer.echo(
        f"prepared {summary.converted} scans ({summary.skipped} already fresh), "
        f"{summary.megabytes:.0f} MB HU in {summary.seconds:.1f} s "
        f"= {summary.mb_per_s_per_worker:.0f} MB/s per worker -> {store.entries_dir}"
    )


def register(app: typer.Typer) -> None:
    app.command()(info)
    app.command()(synth)
    app.command()(prepare)
