"""What an analysis run leaves on disk: per-scan JSON and HTML, ``detections.csv``, an index.

Every file is written atomically. HTML pages are self-contained (inline CSS, images as
base64 PNG data URIs) so they can be mailed or archived as single files.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Circle

from lungcad.analysis.pipeline import Detection, ScanResult
from lungcad.atomic import atomic_write_text
from lungcad.data.crops import crop_irc

DETECTIONS_CSV = "detections.csv"
INDEX_HTML = "index.html"
LUNG_WINDOW_HU = (-1350.0, 150.0)  # level -600, width 1500
THUMBNAIL_FIELD_MM = 96.0
MAX_THUMBNAILS = 30  # the table lists every nodule; pictures for the most probable ones

DetectionRow = tuple[str, float, float, float, float]
"""``(seriesuid, coordX, coordY, coordZ, probability)``, mm LPS, as LUNA16 submissions."""

_CSS = """
body{font-family:system-ui,sans-serif;margin:2em;color:#222;max-width:70em}
table{border-collapse:collapse;margin:1em 0}
th,td{border:1px solid #ccc;padding:.25em .6em;text-align:right}
th{background:#f0f0f0}td.left,th.left{text-align:left}
figure{display:inline-block;margin:.5em 1em .5em 0}figcaption{font-size:.9em}
code{font-size:.85em}.muted{color:#777}
"""


def output_stem(series_uid: str) -> str:
    """The file-name form of a series UID (anything but letters, digits, ``._-`` becomes _)."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", series_uid)


@dataclass(frozen=True)
class ScanSummary:
    """One scan's line in ``index.html`` (small, so ranks can gather it)."""

    series_uid: str
    candidates: int
    nodules: int
    malignant: int | None
    max_p_nodule: float | None
    seconds: float

    @classmethod
    def from_result(cls, result: ScanResult) -> ScanSummary:
        nodules = result.nodules
        return cls(
            series_uid=result.series_uid,
            candidates=len(result.candidates),
            nodules=len(nodules),
            malignant=result.funnel.get("malignant"),
            max_p_nodule=max((d.p_nodule for d in result.candidates), default=None),
            seconds=result.timings_s.get("total", 0.0),
        )


def detection_rows(result: ScanResult) -> list[DetectionRow]:
    """Every classified candidate of a scan, probability = p_nodule."""
    return [(result.series_uid, *d.center_xyz, d.p_nodule) for d in result.candidates]


def write_detections_csv(path: Path, rows: Iterable[DetectionRow]) -> Path:
    """LUNA16 submission format, by series then most probable first."""
    ordered = sorted(rows, key=lambda row: (row[0], -row[4]))
    lines = ["seriesuid,coordX,coordY,coordZ,probability"]
    lines += [f"{uid},{x:.3f},{y:.3f},{z:.3f},{p!r}" for uid, x, y, z, p in ordered]
    return atomic_write_text(path, "\n".join(lines) + "\n")


def write_scan_json(out_dir: Path, result: ScanResult) -> Path:
    path = out_dir / f"{output_stem(result.series_uid)}.json"
    return atomic_write_text(path, json.dumps(result.to_json(), indent=2) + "\n")


def nodule_thumbnail_png(hu: np.ndarray, result: ScanResult, detection: Detection) -> bytes:
    """Axial, coronal and sagittal views around a nodule, lung window, nodule circled."""
    spacing_c, spacing_r, spacing_i = result.geometry.spacing_xyz
    half = [
        max(1, math.ceil(THUMBNAIL_FIELD_MM / 2 / s)) for s in (spacing_i, spacing_r, spacing_c)
    ]
    centre = detection.center_irc
    # Each view is a one-voxel-thick crop (air beyond the scan edge) through the centre.
    views = (
        ("axial", (1, 2 * half[1], 2 * half[2]), (half[2], spacing_c), (half[1], spacing_r)),
        ("coronal", (2 * half[0], 1, 2 * half[2]), (half[2], spacing_c), (half[0], spacing_i)),
        ("sagittal", (2 * half[0], 2 * half[1], 1), (half[1], spacing_r), (half[0], spacing_i)),
    )
    # Index increasing towards the head (positive z direction) goes up in coronal/sagittal.
    head_up = result.geometry.direction[8] >= 0
    figure = Figure(figsize=(6.3, 2.3), dpi=72)
    FigureCanvasAgg(figure)
    for position, (name, width, (h_half, h_mm), (v_half, v_mm)) in enumerate(views, start=1):
        image = crop_irc(hu, centre, width).squeeze()
        axes = figure.add_subplot(1, 3, position)
        horizontal = ((-h_half - 0.5) * h_mm, (h_half - 0.5) * h_mm)
        vertical = ((-v_half - 0.5) * v_mm, (v_half - 0.5) * v_mm)
        origin: Literal["upper", "lower"] = "upper" if name == "axial" or not head_up else "lower"
        extent = (*horizontal, *(vertical[::-1] if origin == "upper" else vertical))
        axes.imshow(
            image,
            cmap="gray",
            vmin=LUNG_WINDOW_HU[0],
            vmax=LUNG_WINDOW_HU[1],
            extent=extent,
            origin=origin,
            interpolation="nearest",
        )
        radius = max(detection.diameter_mm / 2 + 2.0, 4.0)
        axes.add_patch(Circle((0.0, 0.0), radius, fill=False, edgecolor="#ff3b30", linewidth=1.2))
        axes.set_title(name, fontsize=9)
        axes.set_axis_off()
    figure.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=0.9, wspace=0.05)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def _fmt_p(value: float | None) -> str:
    return "&mdash;" if value is None else f"{value:.4f}"


def _table(headers: Sequence[str], rows: Iterable[Sequence[str]], left: int = 0) -> str:
    """An HTML table; cells are trusted HTML, the first ``left`` columns left-aligned."""

    def cell(tag: str, index: int, text: str) -> str:
        return f'<{tag} class="left">{text}</{tag}>' if index < left else f"<{tag}>{text}</{tag}>"

    head = "".join(cell("th", i, html.escape(h)) for i, h in enumerate(headers))
    body = "".join(
        "<tr>" + "".join(cell("td", i, c) for i, c in enumerate(row)) + "</tr>" for row in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def _page(title: str, body: str) -> str:
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head>"
        f"<body>{body}</body></html>\n"
    )


def scan_html(result: ScanResult, hu: np.ndarray) -> str:
    """The report page of one scan (``hu`` is its int16 (I, R, C) volume, for the pictures)."""
    uid = html.escape(result.series_uid)
    nodules = result.nodules
    spacing = " x ".join(f"{s:.3f}" for s in result.geometry.spacing_xyz)
    facts = [
        ("source", f"<code>{html.escape(result.source)}</code>"),
        ("voxels (I, R, C)", " x ".join(str(n) for n in result.shape_irc)),
        ("spacing x, y, z", f"{spacing} mm"),
        ("thresholds", html.escape(json.dumps(result.options.thresholds_json()))),
    ]
    facts += [
        (f"{kind} model", f"<code>{html.escape(f.path.name)}</code> sha256 {f.sha256[:16]}…")
        for kind, f in result.models.items()
    ]
    funnel = [
        (html.escape(k), "&mdash;" if v is None else str(v)) for k, v in result.funnel.items()
    ]
    timings = [(html.escape(k), f"{v:.2f} s") for k, v in result.timings_s.items()]
    rows = [
        (
            f'<a href="#nodule-{n}">{n}</a>',
            _fmt_p(d.p_nodule),
            _fmt_p(d.p_malignant),
            f"{d.diameter_mm:.1f}",
            str(d.voxels),
            ", ".join(f"{v:.1f}" for v in d.center_xyz),
            ", ".join(str(v) for v in d.center_irc),
        )
        for n, d in enumerate(nodules, start=1)
    ]
    figures = "".join(
        f'<figure id="nodule-{n}"><img alt="nodule {n}" src="data:image/png;base64,'
        f'{base64.b64encode(nodule_thumbnail_png(hu, result, d)).decode("ascii")}">'
        f"<figcaption>nodule {n}: p_nodule {d.p_nodule:.3f}, {d.diameter_mm:.1f} mm</figcaption>"
        "</figure>"
        for n, d in enumerate(nodules[:MAX_THUMBNAILS], start=1)
    )
    omitted = len(nodules) - MAX_THUMBNAILS
    headers = (
        "#",
        "p nodule",
        "p malignant",
        "diameter mm",
        "voxels",
        "x, y, z mm (LPS)",
        "I, R, C",
    )
    body = (
        f"<h1>Nodules in {uid}</h1>"
        + _table(("", ""), facts, left=2)
        + f"<h2>{len(nodules)} nodules (p_nodule &ge; {result.options.nodule_threshold:g})</h2>"
        + (_table(headers, rows) if rows else "<p>None found.</p>")
        + figures
        + (f'<p class="muted">{omitted} more nodules without pictures.</p>' if omitted > 0 else "")
        + f'<p class="muted">All {len(result.candidates)} classified candidates are in '
        f'<a href="{DETECTIONS_CSV}">{DETECTIONS_CSV}</a>. <a href="{INDEX_HTML}">All scans</a>.</p>'
        + "<h2>Funnel</h2>"
        + _table(("stage", "count"), funnel, left=1)
        + "<h2>Timings</h2>"
        + _table(("stage", "seconds"), timings, left=1)
    )
    return _page(f"lungcad: {result.series_uid}", body)


def write_scan_html(out_dir: Path, result: ScanResult, hu: np.ndarray) -> Path:
    path = out_dir / f"{output_stem(result.series_uid)}.html"
    return atomic_write_text(path, scan_html(result, hu))


def write_index_html(
    out_dir: Path, summaries: Sequence[ScanSummary], extra_links: Sequence[str] = ()
) -> Path:
    """``index.html`` linking every scan page; ``extra_links`` are file names in ``out_dir``."""
    rows = [
        (
            f'<a href="{html.escape(output_stem(s.series_uid))}.html">{html.escape(s.series_uid)}</a>',
            str(s.candidates),
            str(s.nodules),
            "&mdash;" if s.malignant is None else str(s.malignant),
            _fmt_p(s.max_p_nodule),
            f"{s.seconds:.1f}",
        )
        for s in sorted(summaries, key=lambda s: s.series_uid)
    ]
    links = " &middot; ".join(
        f'<a href="{html.escape(name)}">{html.escape(name)}</a>'
        for name in (DETECTIONS_CSV, *extra_links)
    )
    body = f"<h1>lungcad analysis: {len(summaries)} scans</h1><p>{links}</p>" + _table(
        ("series", "candidates", "nodules", "malignant", "max p nodule", "seconds"), rows, left=1
    )
    return atomic_write_text(out_dir / INDEX_HTML, _page("lungcad analysis", body))
