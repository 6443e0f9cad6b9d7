"""An evaluation's files: ``summary.json``, ``froc.csv``, ``froc.png``, each written atomically."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import IO, Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from lungcad.atomic import atomic_write
from lungcad.errors import LungcadError
from lungcad.evaluation.froc import OPERATING_POINTS_FP_PER_SCAN, BootstrapResult, FrocResult

SUMMARY_JSON = "summary.json"
FROC_CSV = "froc.csv"
FROC_PNG = "froc.png"


def operating_point_key(fps_per_scan: float) -> str:
    """``0.125`` -> ``"0.125"``, ``1.0`` -> ``"1"``: the keys of ``sensitivity_at_fp``."""
    return f"{fps_per_scan:g}"


def summary(result: FrocResult, bootstrap: BootstrapResult | None = None) -> dict[str, Any]:
    """The content of ``summary.json``; ``bootstrap`` adds mean and CI of every number."""
    data: dict[str, Any] = {
        "cpm": result.cpm,
        "sensitivity_at_fp": {
            operating_point_key(p): s for p, s in result.sensitivity_at_fp.items()
        },
        "nodules": result.nodules,
        "detected": result.detected,
        "false_positives": result.false_positives,
        "scans": result.scans,
    }
    if bootstrap is not None:
        data["bootstrap"] = {
            "replicates": bootstrap.replicates,
            "seed": bootstrap.seed,
            "confidence": bootstrap.confidence,
            "cpm": asdict(bootstrap.cpm),
            "sensitivity_at_fp": {
                operating_point_key(p): asdict(interval)
                for p, interval in bootstrap.sensitivity_at_fp.items()
            },
        }
    return data


def _write_csv(handle: IO[bytes], result: FrocResult) -> None:
    lines = ["fps_per_scan,sensitivity"]
    lines += [
        f"{float(f)!r},{float(s)!r}"
        for f, s in zip(result.curve.fps_per_scan, result.curve.sensitivity, strict=True)
    ]
    handle.write(("\n".join(lines) + "\n").encode())


def _write_png(handle: IO[bytes], result: FrocResult, bootstrap: BootstrapResult | None) -> None:
    """Log-2 x axis from 1/16 to 16 FP/scan; the 7 operating points marked (with CIs if any)."""
    figure = Figure(figsize=(6.4, 4.8))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    grid = np.geomspace(1 / 16, 16, 400)
    measured = grid <= result.curve.fps_per_scan[-1]
    sensitivity = result.curve.sensitivity_at(grid)
    axes.plot(grid[measured], sensitivity[measured], color="tab:blue", lw=2, label="FROC")
    # Past the last mark the evaluation holds the final sensitivity: drawn dashed.
    axes.plot(grid[~measured], sensitivity[~measured], color="tab:blue", lw=1, ls="--")
    points = np.array(OPERATING_POINTS_FP_PER_SCAN)
    values = np.array([result.sensitivity_at_fp[p] for p in OPERATING_POINTS_FP_PER_SCAN])
    if bootstrap is None:
        axes.plot(points, values, "o", color="tab:red", label="operating points")
    else:
        intervals = [bootstrap.sensitivity_at_fp[p] for p in OPERATING_POINTS_FP_PER_SCAN]
        errors = np.array(
            [
                [v - i.low for v, i in zip(values, intervals, strict=True)],
                [i.high - v for v, i in zip(values, intervals, strict=True)],
            ]
        )
        axes.errorbar(
            points,
            values,
            yerr=np.clip(errors, 0, None),
            fmt="o",
            color="tab:red",
            capsize=3,
            label=f"operating points, {bootstrap.confidence:.0%} CI",
        )
    axes.set_xscale("log", base=2)
    axes.set_xticks(points, [operating_point_key(p) for p in points])
    axes.set_xlim(1 / 16, 16)
    axes.set_ylim(0, 1.02)
    axes.set_xlabel("average false positives per scan")
    axes.set_ylabel("sensitivity")
    axes.set_title(
        f"FROC: CPM {result.cpm:.3f} ({result.detected}/{result.nodules} nodules, "
        f"{result.scans} scans)"
    )
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(loc="lower right")
    figure.tight_layout()
    figure.savefig(handle, format="png", dpi=120)


def write_report(
    out_dir: Path, result: FrocResult, bootstrap: BootstrapResult | None = None
) -> list[Path]:
    """Write the three files into ``out_dir`` (created if needed); return their paths."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise LungcadError(f"{out_dir}: cannot create output directory ({exc.strerror})") from None
    text = json.dumps(summary(result, bootstrap), indent=2) + "\n"
    writers = {
        SUMMARY_JSON: lambda handle: handle.write(text.encode()),
        FROC_CSV: lambda handle: _write_csv(handle, result),
        FROC_PNG: lambda handle: _write_png(handle, result, bootstrap),
    }
    paths = []
    for name, writer in writers.items():
        path = out_dir / name
        try:
            atomic_write(path, writer)
        except OSError as exc:
            raise LungcadError(f"{path}: cannot write ({exc.strerror})") from None
        paths.append(path)
    return paths
