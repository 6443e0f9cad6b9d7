"""Fixtures for the server: tiny models, fake runners, a synthetic CT, and a live server
on a free loopback port (uvicorn in a background thread, driven over real HTTP)."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import SimpleITK as sitk
import torch
import uvicorn
from fastapi import FastAPI

from lungcad.analysis.pipeline import ModelBundle
from lungcad.data.crops import CLASSIFIER_CROP_IRC
from lungcad.data.geometry import Geometry
from lungcad.models import build_model, default_config, save_checkpoint
from lungcad.serving.app import create_app
from lungcad.serving.models import ServingModels
from lungcad.serving.settings import ServeSettings

HU_SCALE = 300.0  # running std of the input norms: activations stay at trained-model scale
SPHERE_CENTRES_IRC = ((10, 20, 20), (20, 40, 44))
CT_SHAPE_IRC = (32, 64, 64)


def write_checkpoint(path: Path, kind: str, confident: bool = False) -> Path:
    """A random-weight checkpoint; ``confident`` classifiers answer p_nodule ~ 1 for all."""
    torch.manual_seed(len(kind))
    model = build_model(kind)
    input_norm = model.input_batchnorm if kind == "segmentation" else model.tail_batchnorm
    input_norm.running_var.fill_(HU_SCALE**2)  # type: ignore[operator, union-attr]
    if kind != "segmentation" and confident:
        torch.nn.init.zeros_(model.head_linear.weight)  # type: ignore[arg-type]
        model.head_linear.bias.data = torch.tensor([-8.0, 8.0])  # type: ignore[union-attr]
    arguments: dict[str, Any] = {"epoch": 1, "samples_seen": 1, "metrics": {}}
    return save_checkpoint(
        path,
        model=model,
        config=default_config(kind),
        command_line=[],
        data_fingerprint="",
        **arguments,
    )


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """classifier.pt, malignancy.pt and segmentation.pt with random weights."""
    folder = tmp_path_factory.mktemp("models")
    for kind in ("classifier", "malignancy", "segmentation"):
        write_checkpoint(folder / f"{kind}.pt", kind)
    return folder


def random_crops(count: int, seed: int = 0) -> np.ndarray:
    """(count, 32, 48, 48) float32 HU, some beyond the clipped range."""
    return (
        np.random.default_rng(seed)
        .uniform(-1500, 1500, (count, *CLASSIFIER_CROP_IRC))
        .astype(np.float32)
    )


class FakeRunner:
    """Answers p = item mean / 1000 clipped to [0, 1], after ``delay_s``; raises on a batch
    holding ``poison`` (a HU value); records the first voxel of each item it saw."""

    def __init__(self, delay_s: float = 0.0, poison: float | None = None) -> None:
        self.delay_s = delay_s
        self.poison = poison
        self.seen: list[float] = []

    def predict(self, batch: np.ndarray) -> np.ndarray:
        self.seen += [float(v) for v in batch.reshape(len(batch), -1)[:, 0]]
        time.sleep(self.delay_s)
        if self.poison is not None and bool((batch == self.poison).any()):
            raise RuntimeError(f"poisoned input {self.poison}")
        p = np.clip(batch.reshape(len(batch), -1).mean(axis=1) / 1000, 0, 1)
        return np.stack([1 - p, p], axis=1)


def fake_models(runner: FakeRunner) -> ServingModels:
    return ServingModels(classifier=runner, malignancy=None, analysis=None, info=())


def threshold_segmenter(delay_s: float = 0.0) -> Callable[[torch.Tensor], torch.Tensor]:
    """Marks the middle slice's voxels above 0 HU: (N, 7, R, C) -> (N, 1, R, C); the first
    call takes ``delay_s`` longer (a slow analysis)."""
    delays = [delay_s]

    def segment(batch: torch.Tensor) -> torch.Tensor:
        time.sleep(delays.pop() if delays else 0.0)
        middle = batch.shape[1] // 2
        return (batch[:, middle : middle + 1] > 0).float()

    return segment


def analysis_models(folder: Path, delay_s: float = 0.0) -> ServingModels:
    """Real pipeline, HU-threshold segmenter, confident classifier: each sphere a nodule."""
    bundle = ModelBundle.load(
        write_checkpoint(folder / "segmentation.pt", "segmentation"),
        write_checkpoint(folder / "classifier.pt", "classifier", confident=True),
        device="cpu",
    )
    bundle = replace(bundle, segmenter=threshold_segmenter(delay_s))
    return ServingModels(classifier=FakeRunner(), malignancy=None, analysis=bundle, info=())


def synthetic_ct_image() -> sitk.Image:
    """Air with two 6-voxel-radius spheres of 100 HU, 1.5 mm voxels, LPS identity."""
    index, row, col = np.indices(CT_SHAPE_IRC)
    hu = np.full(CT_SHAPE_IRC, -1000, dtype=np.int16)
    for i, r, c in SPHERE_CENTRES_IRC:
        hu[(index - i) ** 2 + (row - r) ** 2 + (col - c) ** 2 <= 36] = 100
    image = sitk.GetImageFromArray(hu)
    geometry = Geometry((-50.0, -40.0, -30.0), (1.5, 1.5, 1.5), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    image.SetOrigin(geometry.origin_xyz)
    image.SetSpacing(geometry.spacing_xyz)
    return image


def settings_for(folder: Path, **overrides: Any) -> ServeSettings:
    return ServeSettings.build(models_dir=folder, **overrides)


@contextlib.contextmanager
def live_server(app: FastAPI, graceful_timeout_s: int = 5) -> Iterator[str]:
    """Run ``app`` on 127.0.0.1 at a free port in a thread; yields its base URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        app, log_level="warning", timeout_graceful_shutdown=graceful_timeout_s, access_log=False
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("test server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


@pytest.fixture
def serve() -> Iterator[Callable[..., str]]:
    """``serve(app)`` starts a live server for this test and returns its base URL."""
    with contextlib.ExitStack() as stack:
        yield lambda app, **kwargs: stack.enter_context(live_server(app, **kwargs))


@pytest.fixture
def make_app(tmp_path: Path) -> Callable[..., FastAPI]:
    """``make_app(models=None, **settings)``: an app over ``tmp_path`` or given models."""

    def make(
        models: ServingModels | None = None, folder: Path | None = None, **overrides: Any
    ) -> FastAPI:
        return create_app(settings_for(folder or tmp_path, **overrides), models)

    return make
