"""The ``evaluate`` command: LUNA16 FROC/CPM of a results file."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from lungcad.data.luna import read_annotations, read_detections, read_series_uids
from lungcad.evaluation.froc import bootstrap_froc, evaluate_detections
from lungcad.evaluation.report import operating_point_key, write_report


def evaluate(
    annotations: Annotated[Path, typer.Option(help="LUNA16 annotations.csv (the nodules).")],
    excluded: Annotated[
        Path, typer.Option(help="annotations_excluded.csv (findings whose marks are ignored).")
    ],
    seriesuids: Annotated[Path, typer.Option(help="seriesuids.csv: the scans that count.")],
    results: Annotated[
        Path, typer.Option(help="CSV seriesuid,coordX,coordY,coordZ,probability (mm, LPS).")
    ],
    out: Annotated[Path, typer.Option(help="Folder for summary.json, froc.csv, froc.png.")],
    bootstrap: Annotated[
        int, typer.Option(min=0, help="Bootstrap replicates over scans for 95% CIs (0: none).")
    ] = 0,
    seed: Annotated[int, typer.Option(help="Seed of the bootstrap draws.")] = 0,
) -> None:
    """Score CAD marks with the LUNA16 FROC analysis: sensitivity at 1/8..8 FP/scan and CPM."""
    result = evaluate_detections(
        read_detections(results),
        read_annotations(annotations),
        read_annotations(excluded),
        read_series_uids(seriesuids),
    )
    intervals = bootstrap_froc(result.entries, bootstrap, seed) if bootstrap else None
    write_report(out, result, intervals)

    typer.echo("FP/scan  sensitivity" + ("  95% CI" if intervals else ""))
    for point, sensitivity in result.sensitivity_at_fp.items():
        line = f"{operating_point_key(point):>7}  {sensitivity:11.4f}"
        if intervals:
            ci = intervals.sensitivity_at_fp[point]
            line += f"  [{ci.low:.4f}, {ci.high:.4f}]"
        typer.echo(line)
    ignored = (
        f"ignored: {result.ignored_on_excluded} marks on excluded findings, "
        f"{result.double_detections} double detections, "
        f"{result.ignored_other_series} marks on unlisted series"
    )
    typer.echo(ignored)
    cpm_ci = f" [{intervals.cpm.low:.4f}, {intervals.cpm.high:.4f}]" if intervals else ""
    typer.echo(
        f"CPM {result.cpm:.4f}{cpm_ci}: {result.detected}/{result.nodules} nodules detected, "
        f"{result.false_positives} false positives over {result.scans} scans -> {out}"
    )


def register(app: typer.Typer) -> None:
    app.command()(evaluate)
