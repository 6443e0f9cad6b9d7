"""Eager, TorchScript and ONNX runners give the same answers, in process and over HTTP."""

from __future__ import annotations

import io
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch

from lungcad.errors import LungcadError
from lungcad.models import load_model_with_info
from lungcad.models.export import export_model, random_input
from lungcad.serving.backends import BACKENDS, exported_runner, load_exported
from tests.conftest import shared_file
from tests.serving.conftest import random_crops, write_checkpoint

BOOK_CLASSIFIER = "models/dlwpt/cls_2020-02-06_14.16.55_final-nodule-nonnodule.best.state"
VAL_EXAMPLE = "models/dlwpt/cls_val_example.pt"


@pytest.mark.slow
@pytest.mark.parametrize("role", ["classifier", "segmentation"])  # malignancy: same network
def test_every_backend_predicts_like_eager(models_dir: Path, tmp_path: Path, role: str) -> None:
    loaded = load_model_with_info(models_dir / f"{role}.pt", kind=role)
    batch = random_input(loaded.config, batch=2, size_hw=32, seed=3)
    outputs = {}
    for backend in BACKENDS:
        runner, info = exported_runner(role, loaded, models_dir / f"{role}.pt", backend, tmp_path)
        outputs[backend] = runner.predict(batch)
        assert (info.role, info.kind, info.backend) == (role, role, backend)
    for backend in ("torchscript", "onnx"):
        np.testing.assert_allclose(outputs[backend], outputs["eager"], atol=1e-5, rtol=0)


@pytest.mark.slow
def test_pre_exported_file_beside_the_checkpoint_is_used(models_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "models"
    shutil.copytree(models_dir, folder)
    loaded = load_model_with_info(folder / "classifier.pt")
    export_model(loaded, folder / "classifier.onnx", "onnx", source_sha256="")
    _, info = exported_runner("classifier", loaded, folder / "classifier.pt", "onnx", tmp_path)
    assert info.file == "classifier.onnx"
    assert not list(tmp_path.glob("*.onnx"))  # nothing exported at startup


@pytest.mark.slow
def test_export_from_another_checkpoint_is_refused(models_dir: Path, tmp_path: Path) -> None:
    other = load_model_with_info(write_checkpoint(tmp_path / "other.pt", "classifier"))
    export_model(other, tmp_path / "classifier.ts", "torchscript", source_sha256="0" * 64)
    shutil.copy(models_dir / "classifier.pt", tmp_path / "classifier.pt")
    loaded = load_model_with_info(tmp_path / "classifier.pt")
    with pytest.raises(LungcadError, match="exported from another checkpoint"):
        exported_runner("classifier", loaded, tmp_path / "classifier.pt", "torchscript", tmp_path)


@pytest.mark.slow
def test_exported_segmenter_cannot_serve_as_classifier(models_dir: Path, tmp_path: Path) -> None:
    loaded = load_model_with_info(models_dir / "segmentation.pt")
    export_model(loaded, tmp_path / "seg.onnx", "onnx")
    with pytest.raises(LungcadError, match="segmentation model, which cannot serve as classifier"):
        load_exported("classifier", tmp_path / "seg.onnx")


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit itself, in 2.13
def test_torchscript_without_lungcad_metadata_is_refused(tmp_path: Path) -> None:
    torch.jit.save(torch.jit.script(torch.nn.Identity()), str(tmp_path / "plain.ts"))
    with pytest.raises(LungcadError, match="no lungcad metadata"):
        load_exported("classifier", tmp_path / "plain.ts")


def classify(base: str, crop: np.ndarray) -> dict[str, Any]:
    buffer = io.BytesIO()
    np.save(buffer, crop.astype(np.float32))
    answer = httpx.post(
        f"{base}/v1/classify",
        content=buffer.getvalue(),
        headers={"content-type": "application/x-npy"},
        timeout=30,
    )
    assert answer.status_code == 200, answer.text
    return dict(answer.json())


@pytest.mark.slow
def test_served_onnx_and_torchscript_answer_like_eager(
    models_dir: Path, make_app: Callable[..., Any], serve: Callable[..., str]
) -> None:
    crops = random_crops(3, seed=5)
    answers = {}
    for backend in BACKENDS:
        base = serve(make_app(folder=models_dir, backend=backend))
        health = httpx.get(f"{base}/health").json()
        assert health["backend"] == backend
        assert {m["backend"] for m in health["models"]} == {backend}
        answers[backend] = [classify(base, crop) for crop in crops]
    for backend in ("torchscript", "onnx"):
        for ours, eager in zip(answers[backend], answers["eager"], strict=True):
            assert ours["p_nodule"] == pytest.approx(eager["p_nodule"], abs=1e-5)
            assert ours["p_malignant"] == pytest.approx(eager["p_malignant"], abs=1e-5)


def test_book_classifier_served_as_onnx_gives_the_reference_answer(
    tmp_path: Path, make_app: Callable[..., Any], serve: Callable[..., str]
) -> None:
    folder = tmp_path / "models"
    folder.mkdir()
    shutil.copy(shared_file(BOOK_CLASSIFIER), folder / "classifier.pt")
    crop = torch.load(shared_file(VAL_EXAMPLE), map_location="cpu", weights_only=True)[0][0]
    answer = classify(serve(make_app(folder=folder, backend="onnx")), crop.numpy())
    assert answer["p_nodule"] == pytest.approx(5.0552309005524876e-09, rel=1e-3)  # MEASUREMENTS.md
    assert answer["p_malignant"] is None
