"""The ``analyze`` command: find nodules in CT scans and write the reports."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from lungcad.analysis.pipeline import (
    MODEL_FILE_NAMES,
    AnalysisOptions,
    ModelBundle,
    find_model_files,
)
from lungcad.analysis.run import configure_process, resolve_inputs, run_analysis
from lungcad.errors import LungcadError
from lungcad.precision import Precision
from lungcad.progress import make_progress
from lungcad.training.distributed import init_distributed, select_device, shutdown_distributed

Probability = Annotated[float, typer.Option(min=0.0, max=1.0)]


def _model_paths(
    models: Path | None, seg: Path | None, cls: Path | None, mal: Path | None
) -> tuple[Path, Path, Path | None]:
    """Explicit --seg/--cls/--mal win over the files of --models."""
    found = find_model_files(models) if models is not None else {}
    seg = seg or found.get("segmentation")
    cls = cls or found.get("classifier")
    mal = mal or found.get("malignancy")
    if seg is None or cls is None:
        kind, option = ("segmentation", "--seg") if seg is None else ("classifier", "--cls")
        where = f"{models} has no {MODEL_FILE_NAMES[kind]}; " if models else ""
        raise LungcadError(f"{where}give --models DIR or {option} PATH for the {kind} model")
    return seg, cls, mal


def analyze(
    inputs: Annotated[
        list[Path],
        typer.Argument(help=".mhd/.nrrd/.nii(.gz) files, DICOM series folders or LUNA16 roots."),
    ],
    out: Annotated[Path, typer.Option("--out", help="Folder for the reports.")],
    models: Annotated[
        Path | None,
        typer.Option(help="Folder with segmentation.pt, classifier.pt [, malignancy.pt]."),
    ] = None,
    seg: Annotated[Path | None, typer.Option(help="Segmentation checkpoint.")] = None,
    cls: Annotated[Path | None, typer.Option(help="Nodule classifier checkpoint.")] = None,
    mal: Annotated[Path | None, typer.Option(help="Malignancy classifier checkpoint.")] = None,
    series: Annotated[
        str | None, typer.Option(help="UID[,UID]: scans of a LUNA16 root to analyse.")
    ] = None,
    split: Annotated[
        str | None, typer.Option(help="val, train or all scans of a LUNA16 root.")
    ] = None,
    val_stride: Annotated[
        int, typer.Option(min=2, help="Every Nth series (sorted by UID) validates.")
    ] = 10,
    seg_threshold: Probability = 0.5,
    nodule_threshold: Probability = 0.5,
    malignancy_threshold: Probability = 0.5,
    batch_size: Annotated[
        int | None, typer.Option(min=1, help="Slices per U-Net batch (default: 2 CPU, 16 GPU).")
    ] = None,
    cls_batch_size: Annotated[int, typer.Option(min=1, help="Crops per classifier batch.")] = 32,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    backend: Annotated[
        str, typer.Option(help="U-Net runtime: torch, or onnx (onnxruntime, CPU only).")
    ] = "torch",
    precision: Annotated[
        Precision,
        typer.Option(
            help="U-Net arithmetic (torch backend): fp32 (exact), bf16 (~2x faster on AMX "
            "CPUs, flips ~0.6% of flagged voxels), or auto (bf16 where native)."
        ),
    ] = "fp32",
    whole_slices: Annotated[
        bool,
        typer.Option(
            "--whole-slices",
            help="Segment the air around the patient too, as the book does (slower; by "
            "default only the body plus the U-Net's reach, same results inside it).",
        ),
    ] = False,
    no_blobs: Annotated[
        bool,
        typer.Option(
            "--no-blobs",
            help="One candidate per segmented component, as the book does; by default large "
            "components also give one at each blob inside them (nodules touching vessels).",
        ),
    ] = False,
) -> None:
    """Find nodules: segment, group, classify, estimate malignancy; write JSON, HTML, CSV."""
    options = AnalysisOptions(
        segmentation_threshold=seg_threshold,
        nodule_threshold=nodule_threshold,
        malignancy_threshold=malignancy_threshold,
        segmentation_batch_size=batch_size,
        classifier_batch_size=cls_batch_size,
        device=device,
        segmentation_precision=precision,
        crop_to_body=not whole_slices,
        blob_candidates=not no_blobs,
    )
    wanted = [uid.strip() for uid in (series or "").split(",") if uid.strip()]
    analysis_inputs = resolve_inputs(inputs, series=wanted, split=split, val_stride=val_stride)
    seg_path, cls_path, mal_path = _model_paths(models, seg, cls, mal)
    target = select_device(device)
    ctx = init_distributed(target.type)
    try:
        if ctx.enabled and device == "auto":
            target = select_device("auto", ctx.local_rank)
        configure_process(ctx)
        bundle = ModelBundle.load(seg_path, cls_path, mal_path, device=target, backend=backend)
        mine = len(ctx.shard(list(analysis_inputs.scans)))
        with make_progress(transient=True) as bar:
            scans_task = bar.add_task("scans", total=mine, visible=ctx.is_main)
            stage_task = bar.add_task("", total=1, visible=ctx.is_main)
            summary = run_analysis(
                analysis_inputs,
                bundle,
                options,
                out,
                ctx,
                on_scan=lambda uid: bar.advance(scans_task),
                progress=lambda stage, done, total: bar.update(
                    stage_task, description=stage, completed=done, total=total
                ),
            )
    finally:
        shutdown_distributed()
    if not ctx.is_main:
        return
    if summary.confusion_text:
        typer.echo(summary.confusion_text)
    malignant = "" if summary.malignant is None else f", {summary.malignant} malignant"
    typer.echo(
        f"analysed {summary.scans} scans in {summary.seconds:.1f} s: {summary.candidates} "
        f"candidates, {summary.nodules} nodules{malignant} -> {out / 'index.html'}"
    )
    if summary.failures:
        raise LungcadError(f"{len(summary.failures)} scan(s) failed, first: {summary.failures[0]}")


def register(app: typer.Typer) -> None:
    app.command()(analyze)
