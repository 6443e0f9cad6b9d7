"""``lungcad demo``: the whole story on built-in synthetic data, with short budgets.

It calls the same command functions a user would type, in order, so the demo exercises
exactly the documented path: synth -> prepare -> train segment / classify / malignancy ->
analyze the validation series -> evaluate.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Annotated

import typer

from lungcad.cli.analyze import analyze
from lungcad.cli.data import prepare, synth
from lungcad.cli.evaluate import evaluate
from lungcad.cli.train_classify import classify
from lungcad.cli.train_malignancy import malignancy
from lungcad.cli.train_segment import segment
from lungcad.data.luna import dataset_split

DEMO_VAL_STRIDE = 4  # a small dataset still gets several validation series


def _stage(number: int, title: str) -> None:
    typer.secho(f"\n[{number}/7] {title}", bold=True, err=True)


def demo(
    out: Annotated[Path, typer.Option("--out", help="Folder for data, runs and reports.")] = Path(
        "demo"
    ),
    scans: Annotated[int, typer.Option(min=8, help="Synthetic scans to generate.")] = 24,
    # 256 voxels over ~360 mm: 1.4 mm pixels, so a 4 mm nodule still spans a few voxels.
    size: Annotated[int, typer.Option(min=64, help="In-plane size of each scan.")] = 256,
    seed: Annotated[int, typer.Option(help="Seed for data and training.")] = 0,
) -> None:
    """Synthesise a dataset, train all three models briefly, analyse and evaluate."""
    start = time.perf_counter()
    data, runs, report_dir = out / "data", out / "runs", out / "analysis"
    models = out / "models"

    _stage(1, f"synthesise {scans} phantoms ({size}x{size}) in the LUNA16 layout")
    if not (data / "seriesuids.csv").exists():
        shutil.rmtree(data, ignore_errors=True)
        synth(data, scans=scans, seed=seed, size=size, subsets=2)
    else:
        typer.echo(f"reusing {data}")
    _stage(2, "prepare the volume cache")
    prepare(data, cache=None, workers=2)

    # Short budgets: this shows the flow in minutes; the README gives full-length commands.
    for folder in (runs, models, report_dir):
        shutil.rmtree(folder, ignore_errors=True)
    models.mkdir(parents=True)
    common = {"val_stride": DEMO_VAL_STRIDE, "seed": seed, "no_tensorboard": True}
    _stage(3, "train the segmentation U-Net")
    # fn-weight 2 and best by F1: the book's weight 8 makes the U-Net flag all dense tissue.
    segment(
        data,
        runs / "segment",
        epochs=8,
        epoch_samples=1500,
        fn_weight=2.0,
        best_by="f1",
        **common,  # type: ignore[arg-type]
    )
    _stage(4, "train the nodule classifier")
    classify(
        data,
        runs / "classify",
        epochs=7,
        epoch_samples=4000,
        balance_ratio=3,
        **common,  # type: ignore[arg-type]
    )
    _stage(5, "fine-tune the malignancy model")
    malignancy(
        data,
        runs / "malignancy",
        finetune=runs / "classify" / "best.pt",
        epochs=4,
        epoch_samples=800,
        **common,  # type: ignore[arg-type]
    )
    for name, run in (
        ("segmentation", "segment"),
        ("classifier", "classify"),
        ("malignancy", "malignancy"),
    ):
        shutil.copyfile(runs / run / "best.pt", models / f"{name}.pt")

    _stage(6, "analyse the validation series")
    analyze([data], report_dir, models=models, split="val", val_stride=DEMO_VAL_STRIDE)
    _stage(7, "LUNA16 FROC evaluation of the validation series")
    validation = dataset_split(data, DEMO_VAL_STRIDE).validation
    (report_dir / "seriesuids-val.csv").write_text("\n".join(validation) + "\n")
    evaluate(
        annotations=data / "annotations.csv",
        excluded=data / "annotations_excluded.csv",
        seriesuids=report_dir / "seriesuids-val.csv",
        results=report_dir / "detections.csv",
        out=out / "evaluation",
    )
    minutes = (time.perf_counter() - start) / 60
    typer.echo(
        f"\ndemo done in {minutes:.1f} min: open {report_dir / 'index.html'} and "
        f"{out / 'evaluation' / 'froc.png'}"
    )


def register(app: typer.Typer) -> None:
    app.command()(demo)
