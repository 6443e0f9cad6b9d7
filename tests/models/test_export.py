"""TorchScript and ONNX export: parity with eager (random and real inputs), dynamic axes,
metadata, refusal above the tolerance, and the ``lungcad export`` command."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import typer
from typer.testing import CliRunner

from lungcad.cli import app as lungcad_app
from lungcad.data.crops import clip_hu
from lungcad.data.ct import read_ct
from lungcad.errors import LungcadError
from lungcad.models import (
    LoadedModel,
    build_model,
    default_config,
    load_model_with_info,
    save_checkpoint,
)
from lungcad.models.export import (
    PARITY_TOLERANCE,
    ExportReport,
    export_model,
    input_from_ct,
    load_torchscript,
    onnx_outputs,
    onnx_session,
    random_input,
    read_export_metadata,
    torch_outputs,
)
from tests.conftest import shared_file

BOOK_CLASSIFIER = "models/dlwpt/cls_2020-02-06_14.16.55_final-nodule-nonnodule.best.state"
BOOK_SEGMENTER = (
    "models/dlwpt/seg_2020-01-26_19.45.12_w4d3c1-bal_1_nodupe-label_pos-d1_fn8-adam.best.state"
)
VAL_EXAMPLE = "models/dlwpt/cls_val_example.pt"
KINDS = ("classifier", "malignancy", "segmentation")
FORMATS = ("torchscript", "onnx")
SUFFIX = {"torchscript": ".ts", "onnx": ".onnx"}


def random_loaded(kind: str, input_std_hu: float = 300.0) -> LoadedModel:
    """Random weights; the input norm scaled to HU as trained models are (book init alone
    leaves running_var 1, so raw HU would blow activations up to 1e4)."""
    torch.manual_seed(0)
    model = build_model(kind).eval()
    norm = model.input_batchnorm if kind == "segmentation" else model.tail_batchnorm
    norm.running_var.fill_(input_std_hu**2)  # type: ignore[operator, union-attr]
    return LoadedModel(model=model, kind=kind, config=default_config(kind))  # type: ignore[arg-type]


def exported_outputs(path: Path, batch: np.ndarray) -> list[np.ndarray]:
    if path.suffix == ".onnx":
        return onnx_outputs(onnx_session(path), batch)
    return torch_outputs(load_torchscript(path)[0], batch)


def assert_parity(
    loaded: LoadedModel, path: Path, fmt: str, check_inputs: dict[str, np.ndarray] | None = None
) -> ExportReport:
    """Export, then rerun the written file on every check input and compare with eager."""
    report = export_model(loaded, path, fmt, check_inputs=check_inputs)  # type: ignore[arg-type]
    assert report.max_abs_diff <= PARITY_TOLERANCE
    assert {c.name for c in report.checks} >= {"random", *(check_inputs or {})}
    for name, batch in {
        "random": random_input(loaded.config, 3, 48),
        **(check_inputs or {}),
    }.items():
        for ours, eager in zip(
            exported_outputs(path, batch), torch_outputs(loaded.model, batch), strict=True
        ):
            np.testing.assert_allclose(ours, eager, atol=PARITY_TOLERANCE, rtol=0, err_msg=name)
    return report


@pytest.mark.slow
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("kind", KINDS)
def test_export_matches_eager_with_dynamic_batch(tmp_path: Path, kind: str, fmt: str) -> None:
    loaded = random_loaded(kind)
    path = tmp_path / f"model{SUFFIX[fmt]}"
    # Batch sizes 1 and 3 (and, for the U-Net, slice sizes) other than the traced example's.
    checks = {}
    if kind == "segmentation":
        slices = np.random.default_rng(1).uniform(-1000, 1000, (2, 7, 40, 72))
        checks["40x72 slices"] = slices.astype(np.float32)
    report = assert_parity(loaded, path, fmt, checks)
    assert {check.shape[0] for check in report.checks} >= {1, 3}
    metadata = read_export_metadata(path)
    assert (metadata.kind, metadata.format) == (kind, fmt)
    assert metadata.config == asdict(default_config(kind))
    assert metadata.output_names[-1] == "probabilities"


@pytest.mark.slow
def test_parity_failure_raises_and_writes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "classifier.onnx"
    with pytest.raises(LungcadError, match=r"classifier.onnx: onnx export .* differs from eager"):
        export_model(random_loaded("classifier"), path, "onnx", tolerance=0.0)
    assert not path.exists()
    assert not list(tmp_path.iterdir())  # no temporary file left either


def test_unknown_format_is_refused(tmp_path: Path) -> None:
    with pytest.raises(LungcadError, match="unknown export format 'pdf'"):
        export_model(random_loaded("classifier"), tmp_path / "x", "pdf")  # type: ignore[arg-type]


def test_metadata_is_required_and_files_are_checked(tmp_path: Path) -> None:
    with pytest.raises(LungcadError, match="no such exported model file"):
        read_export_metadata(tmp_path / "missing.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"junk")
    with pytest.raises(LungcadError, match="not an ONNX model"):
        read_export_metadata(tmp_path / "junk.onnx")
    (tmp_path / "junk.ts").write_bytes(b"junk")
    with pytest.raises(LungcadError, match="not a TorchScript model"):
        read_export_metadata(tmp_path / "junk.ts")


def test_input_from_ct_cuts_a_crop_and_a_trimmed_slice_stack() -> None:
    hu = np.arange(40 * 66 * 70, dtype=np.int16).reshape(40, 66, 70) - 2000
    stack = input_from_ct(default_config("segmentation"), hu)
    crop = input_from_ct(default_config("classifier"), hu)
    assert stack.shape == (1, 7, 64, 68) and crop.shape == (1, 1, 32, 48, 48)
    np.testing.assert_array_equal(stack[0, 3], clip_hu(hu[20, :64, :68]))
    assert stack.dtype == crop.dtype == np.float32 and crop.min() >= -1000


@pytest.mark.slow
@pytest.mark.parametrize("fmt", FORMATS)
def test_book_classifier_parity_on_the_real_validation_crop(tmp_path: Path, fmt: str) -> None:
    loaded = load_model_with_info(shared_file(BOOK_CLASSIFIER))
    crop = torch.load(shared_file(VAL_EXAMPLE), map_location="cpu", weights_only=True)[0]
    path = tmp_path / f"classifier{SUFFIX[fmt]}"
    assert_parity(loaded, path, fmt, {"validation crop": crop[None].numpy()})
    probabilities = exported_outputs(path, crop[None].numpy())[1]
    assert probabilities[0, 1] == pytest.approx(5.0552309005524876e-09, rel=1e-3)


@pytest.mark.slow
@pytest.mark.parametrize("fmt", FORMATS)
def test_book_unet_parity_on_a_real_ct_slice_stack(tmp_path: Path, fmt: str) -> None:
    loaded = load_model_with_info(shared_file(BOOK_SEGMENTER))
    hu = read_ct(shared_file("data/ct/chest-ct-141-dicom")).hu
    stack = clip_hu(hu[68:75])[None]  # (1, 7, 512, 512), MEASUREMENTS.md's reference stack
    path = tmp_path / f"unet{SUFFIX[fmt]}"
    assert_parity(loaded, path, fmt, {"real stack": stack})
    assert exported_outputs(path, stack)[0].sum() == pytest.approx(2361.3233, rel=1e-4)


def cli() -> typer.Typer:
    """The real ``lungcad`` command, as a user calls it."""
    return lungcad_app


def save_random(path: Path, kind: str) -> Path:
    loaded = random_loaded(kind)
    arguments: dict[str, Any] = {"epoch": 0, "samples_seen": 0, "metrics": {}, "command_line": []}
    return save_checkpoint(
        path, model=loaded.model, config=loaded.config, data_fingerprint="", **arguments
    )


def test_cli_prints_each_parity_check_and_the_maximum(tmp_path: Path) -> None:
    checkpoint = save_random(tmp_path / "classifier.pt", "classifier")
    out = tmp_path / "classifier.ts"
    result = CliRunner().invoke(
        cli(), ["export", str(checkpoint), "--format", "torchscript", "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    assert "parity random " in result.output and "max |diff|" in result.output
    assert f"exported classifier model to {out} (torchscript)" in result.output
    assert "max abs difference" in result.output
    assert read_export_metadata(out).source_sha256 != ""


@pytest.mark.slow
def test_cli_parity_failure_is_a_user_error(tmp_path: Path) -> None:
    checkpoint = save_random(tmp_path / "classifier.pt", "classifier")
    result = CliRunner().invoke(
        cli(),
        [
            "export",
            str(checkpoint),
            "--format",
            "onnx",
            "--out",
            str(tmp_path / "c.onnx"),
            "--tolerance",
            "0",
        ],
    )
    assert isinstance(result.exception, LungcadError)
    assert "differs from eager" in str(result.exception)
    assert not (tmp_path / "c.onnx").exists()
