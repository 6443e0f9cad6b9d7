"""The C++ LibTorch program in ``cpp/``: built with CMake against the torch wheel's
LibTorch, it classifies exported crops exactly as Python does."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from lungcad.models import load_model_with_info
from lungcad.models.export import export_model, load_torchscript, torch_outputs
from tests.conftest import REPO_ROOT, shared_file
from tests.serving.conftest import random_crops, write_checkpoint

BOOK_CLASSIFIER = "models/dlwpt/cls_2020-02-06_14.16.55_final-nodule-nonnodule.best.state"
VAL_EXAMPLE = "models/dlwpt/cls_val_example.pt"


@pytest.fixture(scope="module")
def classify_binary(tmp_path_factory: pytest.TempPathFactory) -> Path:
    missing = [tool for tool in ("cmake", "make", "c++") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"cannot build the C++ program: {', '.join(missing)} not found")
    build = tmp_path_factory.mktemp("cpp-build")
    configure = [
        "cmake",
        "-S",
        str(REPO_ROOT / "cpp"),
        "-B",
        str(build),
        "-DCMAKE_BUILD_TYPE=Release",
        f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
        f"-DTORCH_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
    ]
    for command in (configure, ["cmake", "--build", str(build), "-j", "2"]):
        done = subprocess.run(command, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout + done.stderr
    return build / "lungcad-classify"


def run_binary(binary: Path, model: Path, crop: np.ndarray, folder: Path) -> list[float]:
    crop_file = folder / "crop.raw"
    crop.astype("<f4").tofile(crop_file)
    done = subprocess.run(
        [str(binary), str(model), str(crop_file)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    return [float(v) for v in done.stdout.split()]


@pytest.mark.slow
def test_cpp_probabilities_match_python(classify_binary: Path, tmp_path: Path) -> None:
    loaded = load_model_with_info(write_checkpoint(tmp_path / "classifier.pt", "classifier"))
    model_path = tmp_path / "classifier.ts"
    export_model(loaded, model_path, "torchscript")
    scripted = load_torchscript(model_path)[0]
    crops = random_crops(3, seed=9)  # beyond +-1000 HU: the program must clip as Python does
    for crop in crops:
        expected = torch_outputs(scripted, np.clip(crop, -1000, 1000)[None, None])[1][0]
        ours = run_binary(classify_binary, model_path, crop, tmp_path)
        np.testing.assert_allclose(ours, expected, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_cpp_book_classifier_on_the_real_validation_crop(
    classify_binary: Path, tmp_path: Path
) -> None:
    loaded = load_model_with_info(shared_file(BOOK_CLASSIFIER))
    crop = torch.load(shared_file(VAL_EXAMPLE), map_location="cpu", weights_only=True)[0][0]
    model_path = tmp_path / "book.ts"
    export_model(loaded, model_path, "torchscript")
    ours = run_binary(classify_binary, model_path, crop.numpy(), tmp_path)
    np.testing.assert_allclose(ours, [1.0, 5.0552309005524876e-09], atol=1e-5, rtol=0)
    assert ours[1] == pytest.approx(5.0552309005524876e-09, rel=1e-3)


@pytest.mark.slow
def test_cpp_refuses_a_file_that_is_not_one_crop(classify_binary: Path, tmp_path: Path) -> None:
    (tmp_path / "short.raw").write_bytes(b"\0" * 100)
    done = subprocess.run(
        [str(classify_binary), str(tmp_path / "none.ts"), str(tmp_path / "short.raw")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "100 bytes, expected 294912" in done.stderr
