"""The ``serve`` command: the HTTP inference server (FastAPI on uvicorn)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer
import uvicorn

from lungcad.analysis.pipeline import find_model_files
from lungcad.errors import LungcadError
from lungcad.serving.settings import MIB, Backend, ServeSettings


def serve(
    models: Annotated[
        Path,
        typer.Option(
            help="Folder with classifier.pt [malignancy.pt] [segmentation.pt]; for the "
            "torchscript/onnx backends also <name>.ts / <name>.onnx, else exported at start."
        ),
    ],
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    backend: Annotated[Backend, typer.Option(help="How the models run.")] = "eager",
    max_batch_size: Annotated[int, typer.Option(help="Most crops per model call.")] = 64,
    max_wait_ms: Annotated[
        float, typer.Option(help="Longest a crop waits for others before its batch runs.")
    ] = 5.0,
    max_queue: Annotated[
        int, typer.Option(help="Crops allowed to wait; more are answered 503 + Retry-After.")
    ] = 1024,
    workers: Annotated[int, typer.Option(help="Server processes, each with its own models.")] = 1,
    max_upload_mb: Annotated[
        int, typer.Option(help="Largest CT upload to /v1/analyze, MiB (413 above).")
    ] = 1024,
    graceful_timeout: Annotated[
        float, typer.Option(help="Seconds to finish in-flight requests on shutdown.")
    ] = 30.0,
) -> None:
    """Serve /v1/classify (batched), /v1/analyze, /health, /metrics and an upload page at /."""
    settings = ServeSettings.build(
        models_dir=models,
        host=host,
        port=port,
        backend=backend,
        max_batch_size=max_batch_size,
        max_wait_ms=max_wait_ms,
        max_queue=max_queue,
        workers=workers,
        analyze_max_bytes=max_upload_mb * MIB,
        graceful_timeout_s=graceful_timeout,
    )
    if "classifier" not in find_model_files(models):
        raise LungcadError(f"{models}: no classifier.pt in the models folder")
    # Worker processes rebuild the settings from the environment they inherit.
    os.environ.update(settings.to_environment())
    uvicorn.run(
        "lungcad.serving.app:app_from_environment",
        factory=True,
        host=settings.host,
        port=settings.port,
        workers=settings.workers,
        timeout_graceful_shutdown=int(settings.graceful_timeout_s),
        access_log=False,
    )


def register(app: typer.Typer) -> None:
    app.command()(serve)
