"""The ``export`` command: a checkpoint to TorchScript or ONNX, parity-checked against eager."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from lungcad.data.ct import read_ct
from lungcad.models import file_sha256, load_model_with_info
from lungcad.models.export import PARITY_TOLERANCE, ExportFormat, export_model, input_from_ct


def export(
    checkpoint: Annotated[
        Path, typer.Argument(help="A lungcad checkpoint or one of the book's .state files.")
    ],
    format: Annotated[ExportFormat, typer.Option("--format", help="Output format.")],
    out: Annotated[Path, typer.Option(help="File to write (.onnx for ONNX; .ts by convention).")],
    kind: Annotated[
        str | None,
        typer.Option(help="Model kind, only needed for a book classifier file used as malignancy."),
    ] = None,
    check_ct: Annotated[
        Path | None,
        typer.Option(help="A real CT (any readable format) to cut a parity-check input from."),
    ] = None,
    tolerance: Annotated[
        float, typer.Option(min=0.0, help="Largest allowed |exported - eager| of any output.")
    ] = PARITY_TOLERANCE,
) -> None:
    """Export a model with a dynamic batch size (and slice size for the U-Net); checks parity."""
    loaded = load_model_with_info(checkpoint, kind=kind)
    check_inputs = {}
    if check_ct is not None:
        check_inputs[f"real CT {check_ct.name}"] = input_from_ct(
            loaded.config, read_ct(check_ct).hu
        )
    report = export_model(
        loaded,
        out,
        format,
        check_inputs=check_inputs,
        tolerance=tolerance,
        source_sha256=file_sha256(checkpoint),
    )
    width = max(len(check.name) for check in report.checks)
    for check in report.checks:
        shape = "x".join(str(n) for n in check.shape)
        typer.echo(f"parity {check.name:<{width}}  {shape:<14} max |diff| {check.max_abs_diff:.3g}")
    typer.echo(
        f"exported {loaded.kind} model to {out} ({format}); "
        f"max abs difference {report.max_abs_diff:.3g} <= {tolerance:g}"
    )


def register(app: typer.Typer) -> None:
    app.command()(export)
