"""Plot a run's ``metrics.jsonl`` (any ``lungcad train`` command) as one PNG of curves.

One panel per metric, training and validation together, against samples seen:

    python scripts/plot_metrics.py RUN_DIR/metrics.jsonl [--out RUN_DIR/metrics.png]
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display needed
from matplotlib import pyplot as plt

from lungcad.atomic import atomic_write

SIDES = ("train", "val")
SKIPPED_PREFIXES = ("count/",)  # class counts are constant, not curves
PANEL_COLUMNS = 4


def read_metrics(path: Path) -> list[dict[str, float]]:
    """One dict per epoch; NaN stays NaN (the engine writes it when a metric is undefined)."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def metric_names(lines: list[dict[str, float]]) -> list[str]:
    """Metric names without the train/ or val/ prefix, in first-seen order."""
    names: dict[str, None] = {}
    for line in lines:
        for key in line:
            side, _, name = key.partition("/")
            if side in SIDES and name and not name.startswith(SKIPPED_PREFIXES):
                names.setdefault(name)
    return list(names)


def plot(lines: list[dict[str, float]], title: str) -> plt.Figure:
    names = metric_names(lines)
    rows = max(1, math.ceil(len(names) / PANEL_COLUMNS))
    figure, axes = plt.subplots(
        rows, PANEL_COLUMNS, figsize=(4 * PANEL_COLUMNS, 3 * rows), squeeze=False
    )
    samples = [line["samples_seen"] for line in lines]
    for axis, name in zip(axes.flat, names, strict=False):
        for side in SIDES:
            values = [line.get(f"{side}/{name}", math.nan) for line in lines]
            if not all(math.isnan(v) for v in values):
                axis.plot(samples, values, marker="o", markersize=3, label=side)
        axis.set_title(name)
        axis.set_xlabel("samples seen")
        axis.grid(alpha=0.3)
        axis.legend(fontsize="small")
    for axis in list(axes.flat)[len(names) :]:
        axis.axis("off")
    figure.suptitle(title)
    figure.tight_layout()
    return figure


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("metrics", type=Path, help="A run's metrics.jsonl.")
    parser.add_argument("--out", type=Path, help="PNG to write [default: metrics.png beside it].")
    args = parser.parse_args()
    out = args.out or args.metrics.with_name("metrics.png")
    lines = read_metrics(args.metrics)
    if not lines:
        raise SystemExit(f"{args.metrics}: no epochs recorded yet")
    figure = plot(lines, f"{args.metrics.parent.name}: {len(lines)} epochs")
    atomic_write(out, lambda handle: figure.savefig(handle, format="png", dpi=100))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
