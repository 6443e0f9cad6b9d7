"""Checkpoint format, the one loader (ours and the book's files), safety, and export."""

from __future__ import annotations

import hashlib
import os
import pickle
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime
import pytest
import torch

import lungcad
from lungcad.errors import LungcadError
from lungcad.models import (
    ClassifierConfig,
    LunaModel,
    SegmentationConfig,
    SegmentationModel,
    build_model,
    default_config,
    file_sha256,
    load_checkpoint,
    load_model,
    load_model_with_info,
    model_from_checkpoint,
    save_checkpoint,
)
from tests.conftest import shared_file

BOOK_CLASSIFIER = "models/dlwpt/cls_2020-02-06_14.16.55_final-nodule-nonnodule.best.state"
BOOK_SEGMENTER = (
    "models/dlwpt/seg_2020-01-26_19.45.12_w4d3c1-bal_1_nodupe-label_pos-d1_fn8-adam.best.state"
)
# An input batch per kind: (N, 1, I, R, C) HU crops or (N, 7, H, W) HU slice stacks.
INPUT_SHAPES = {
    "classifier": (2, 1, 32, 48, 48),
    "malignancy": (2, 1, 32, 48, 48),
    "segmentation": (2, 7, 32, 32),
}
KINDS = list(INPUT_SHAPES)
# torch 2.13 deprecates TorchScript and the TorchScript-based ONNX exporter; the new exporter
# needs onnxscript, which we do not install. Both still work and we keep the models compatible.
SCRIPT_DEPRECATION = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")
ONNX_LEGACY_EXPORTER = pytest.mark.filterwarnings(
    "ignore:You are using the legacy TorchScript-based ONNX export",
    "ignore:The feature will be removed:DeprecationWarning",
)


def probabilities(model: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """The probability output of any of our models (classifiers return logits first)."""
    with torch.no_grad():
        out = model(batch)
    return out[1] if isinstance(out, tuple) else out


def save(path: Path, model: torch.nn.Module, config: Any, **overrides: Any) -> Path:
    arguments: dict[str, Any] = {
        "model": model,
        "config": config,
        "epoch": 3,
        "samples_seen": 3000,
        "metrics": {"val/loss": 0.25},
        "command_line": ["lungcad", "train"],
        "data_fingerprint": "abc123",
    }
    return save_checkpoint(path, **{**arguments, **overrides})


class Payload:
    """Any class instance: not plain data, so a safe loader must refuse to rebuild it."""


class RunsShellOnLoad:
    """Unpickling this runs a shell command, as a hostile checkpoint would."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("kind", KINDS)
def test_round_trip_restores_weights_outputs_config_and_metadata(tmp_path: Path, kind: str) -> None:
    torch.manual_seed(0)
    config = default_config(kind)
    model = build_model(kind, config)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    batch = torch.randn(INPUT_SHAPES[kind])
    with torch.no_grad():  # every weight and BN statistic differs from a fresh model's
        for tensor in model.state_dict().values():
            if tensor.is_floating_point():
                tensor.add_(torch.rand_like(tensor))
    for parameter in model.parameters():
        parameter.grad = torch.randn_like(parameter)
    optimizer.step()  # Adam now holds per-parameter moments
    path = save(
        tmp_path / "model.pt",
        model,
        config,
        optimizer=optimizer,
        metrics={"recall": np.float64(0.5), "count": np.int64(4), "per_class": [0.1, 0.9]},
        extra={"seed": 7},
    )

    loaded = load_model_with_info(path)
    assert (loaded.kind, loaded.config) == (kind, config)
    assert not loaded.model.training
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[name], tensor), name
    torch.testing.assert_close(
        probabilities(loaded.model, batch), probabilities(model.eval(), batch), atol=1e-5, rtol=0
    )
    meta = loaded.checkpoint_meta
    assert meta["source_format"] == "lungcad"
    assert meta["lungcad_version"] == lungcad.__version__
    assert (meta["epoch"], meta["samples_seen"], meta["data_fingerprint"]) == (3, 3000, "abc123")
    assert meta["metrics"] == {"recall": 0.5, "count": 4, "per_class": [0.1, 0.9]}
    assert type(meta["metrics"]["count"]) is int
    assert meta["command_line"] == ["lungcad", "train"]
    assert meta["extra"] == {"seed": 7}
    assert meta["optimizer_name"] == "Adam"
    assert datetime.fromisoformat(meta["created"]).tzinfo is not None
    assert "model_state" not in meta and "optimizer_state" not in meta

    raw = torch.load(path, map_location="cpu", weights_only=True)  # plain data only
    assert raw["model_config"] == loaded.checkpoint_meta["model_config"]
    torch.optim.Adam(loaded.model.parameters()).load_state_dict(raw["optimizer_state"])


def test_non_default_segmentation_structure_is_rebuilt_from_the_file(tmp_path: Path) -> None:
    config = SegmentationConfig(in_channels=3, depth=2, wf=2, up_mode="upsample")
    path = save(tmp_path / "seg.pt", SegmentationModel(config), config)
    loaded = load_model_with_info(path)
    assert loaded.config == config
    assert loaded.model(torch.randn(1, 3, 8, 8)).shape == (1, 1, 8, 8)


def test_model_from_checkpoint_reuses_one_read_for_resume(tmp_path: Path) -> None:
    config = ClassifierConfig(kind="malignancy")
    path = save(tmp_path / "mal.pt", LunaModel(), config)
    checkpoint = load_checkpoint(path)
    loaded = model_from_checkpoint(checkpoint, path)
    assert loaded.kind == "malignancy"
    assert checkpoint["optimizer_state"] is None


def test_save_replaces_atomically_and_leaves_no_temp_files(tmp_path: Path) -> None:
    path = tmp_path / "nested" / "model.pt"
    save(path, LunaModel(), ClassifierConfig(), epoch=1)
    save(path, LunaModel(), ClassifierConfig(), epoch=2)
    assert load_model_with_info(path).checkpoint_meta["epoch"] == 2
    assert [p.name for p in path.parent.iterdir()] == ["model.pt"]


def test_save_refuses_objects_that_would_need_unpickling(tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    save(path, LunaModel(), ClassifierConfig(), epoch=1)
    with pytest.raises(TypeError, match=r"metrics\['bad'\]: Payload"):
        save(path, LunaModel(), ClassifierConfig(), epoch=2, metrics={"bad": Payload()})
    assert load_model_with_info(path).checkpoint_meta["epoch"] == 1  # old file intact


def test_malicious_pickle_is_refused_without_running_it(tmp_path: Path) -> None:
    marker = tmp_path / "code-ran"
    path = tmp_path / "evil.pt"
    state = LunaModel().state_dict()
    torch.save({"model_state": state, "note": RunsShellOnLoad(marker)}, path)
    with pytest.raises(LungcadError, match=r"evil.pt.*refusing to unpickle"):
        load_model(path)
    assert not marker.exists()


def test_pickled_class_instance_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "object.pt"
    torch.save({"model_state": {}, "payload": Payload()}, path)
    with pytest.raises(LungcadError, match=r"object.pt.*refusing to unpickle"):
        load_checkpoint(path)


@pytest.mark.parametrize(
    ("name", "content", "problem"),
    [
        ("notes.pt", b"these are not weights\n", "not a PyTorch checkpoint|unreadable"),
        ("empty.pt", b"", "unreadable or truncated"),
    ],
)
def test_garbage_files_give_one_line_errors(
    tmp_path: Path, name: str, content: bytes, problem: str
) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(LungcadError, match=rf"{name}: ({problem})") as error:
        load_model(path)
    assert "\n" not in str(error.value)


def test_truncated_checkpoint_is_refused(tmp_path: Path) -> None:
    path = save(tmp_path / "model.pt", LunaModel(), ClassifierConfig())
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(LungcadError, match=r"model.pt: unreadable or truncated"):
        load_model(path)


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (torch.zeros(3), "no 'model_state'"),
        ({"weights": {}}, "no 'model_state'"),
        ({"model_state": {"x.weight": torch.zeros(1)}}, "cannot tell which model"),
    ],
)
def test_files_that_are_not_model_checkpoints_are_refused(
    tmp_path: Path, content: object, problem: str
) -> None:
    path = tmp_path / "other.pt"
    torch.save(content, path)
    with pytest.raises(LungcadError, match=rf"other.pt: .*{problem}"):
        load_model(path)


def test_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(LungcadError, match=r"absent.pt: no such checkpoint file"):
        load_model(tmp_path / "absent.pt")


def test_unknown_kinds_list_the_valid_ones(tmp_path: Path) -> None:
    with pytest.raises(LungcadError, match=r"'detector'.*classifier, malignancy, segmentation"):
        build_model("detector")
    path = save(tmp_path / "model.pt", LunaModel(), ClassifierConfig())
    with pytest.raises(LungcadError, match=r"'detector'"):
        load_model(path, kind="detector")
    checkpoint = load_checkpoint(path)
    checkpoint["model_kind"] = "detector"
    torch.save(checkpoint, path)
    with pytest.raises(LungcadError, match=r"model.pt: unknown model kind 'detector'"):
        load_model(path)


def test_kind_requested_must_match_the_file(tmp_path: Path) -> None:
    path = save(tmp_path / "seg.pt", SegmentationModel(), SegmentationConfig())
    with pytest.raises(LungcadError, match=r"seg.pt: holds a segmentation model, not classifier"):
        load_model(path, kind="classifier")


def test_newer_format_and_mismatched_weights_are_refused(tmp_path: Path) -> None:
    path = save(tmp_path / "model.pt", LunaModel(), ClassifierConfig())
    checkpoint = load_checkpoint(path)
    torch.save({**checkpoint, "format_version": 99}, path)
    with pytest.raises(LungcadError, match=r"format 99 .* newer"):
        load_model(path)
    torch.save({**checkpoint, "model_config": {}, "model_kind": "segmentation"}, path)
    with pytest.raises(
        LungcadError,
        match=r"model.pt: weights do not fit a segmentation model .*"
        r"\(81 missing, e.g. input_batchnorm.weight; 23 unexpected, e.g. tail_batchnorm.weight\)",
    ):
        load_model(path)
    state = dict(checkpoint["model_state"], **{"head_linear.bias": torch.zeros(3)})
    torch.save({**checkpoint, "model_state": state}, path)
    with pytest.raises(
        LungcadError, match=r"1 misshapen, e.g. head_linear.bias is \(3,\) not \(2,\)"
    ):
        load_model(path)


def test_file_sha256_matches_hashlib(tmp_path: Path) -> None:
    path = tmp_path / "blob"
    content = os.urandom((1 << 20) + 17)  # more than one read chunk
    path.write_bytes(content)
    assert file_sha256(path) == hashlib.sha256(content).hexdigest()


@pytest.mark.parametrize(
    ("relative", "kind", "model_type"),
    [
        (BOOK_CLASSIFIER, "classifier", LunaModel),
        (BOOK_SEGMENTER, "segmentation", SegmentationModel),
    ],
)
def test_book_files_load_with_kind_detected(relative: str, kind: str, model_type: type) -> None:
    loaded = load_model_with_info(shared_file(relative))
    assert loaded.kind == kind
    assert isinstance(loaded.model, model_type)
    assert not loaded.model.training
    assert loaded.config == default_config(kind)
    assert loaded.checkpoint_meta["source_format"] == "dlwpt-book"
    assert loaded.checkpoint_meta["epoch"] in (90, 5)


def test_book_segmenter_loads_channels_last_and_refuses_other_kinds() -> None:
    path = shared_file(BOOK_SEGMENTER)
    conv = load_model(path).state_dict()["unet.down_path.0.block.0.weight"]
    assert conv.is_contiguous(memory_format=torch.channels_last)
    with pytest.raises(LungcadError, match=r"holds a book UNetWrapper, not a malignancy model"):
        load_model(path, kind="malignancy")


@pytest.mark.parametrize("relative", [BOOK_CLASSIFIER, BOOK_SEGMENTER])
def test_book_kind_is_detected_from_keys_without_model_name(tmp_path: Path, relative: str) -> None:
    book = torch.load(shared_file(relative), map_location="cpu", weights_only=True)
    path = tmp_path / "renamed.state"
    torch.save({"model_state": book["model_state"]}, path)
    expected = "classifier" if relative == BOOK_CLASSIFIER else "segmentation"
    assert load_model_with_info(path).kind == expected


@SCRIPT_DEPRECATION
@pytest.mark.parametrize("kind", KINDS)
def test_torchscript_matches_eager(kind: str) -> None:
    torch.manual_seed(0)
    model = build_model(kind).eval()
    scripted = torch.jit.script(model)
    batch = torch.randn(INPUT_SHAPES[kind])
    torch.testing.assert_close(probabilities(scripted, batch), probabilities(model, batch))


@SCRIPT_DEPRECATION
def test_scripted_segmenter_still_checks_slice_size() -> None:
    scripted = torch.jit.script(SegmentationModel().eval())
    with pytest.raises(torch.jit.Error, match=r"multiples of 4"):
        scripted(torch.randn(1, 7, 30, 32))


@ONNX_LEGACY_EXPORTER
@pytest.mark.parametrize("kind", KINDS)
def test_onnx_export_runs_in_onnxruntime_with_dynamic_batch_and_size(
    tmp_path: Path, kind: str
) -> None:
    torch.manual_seed(0)
    model = build_model(kind).eval()
    is_segmenter = kind == "segmentation"
    # (N, C, H, W) in and out for the U-Net; (N, 1, 32, 48, 48) -> (N, 2) for classifiers.
    dynamic_axes = {0: "batch", 2: "height", 3: "width"} if is_segmenter else {0: "batch"}
    outputs = ["probabilities"] if is_segmenter else ["logits", "probabilities"]
    exported = tmp_path / f"{kind}.onnx"
    torch.onnx.export(
        model,
        (torch.randn(INPUT_SHAPES[kind]),),
        exported,
        input_names=["input"],
        output_names=outputs,
        dynamic_axes={"input": dynamic_axes, **{name: dynamic_axes for name in outputs}},
        dynamo=False,
    )
    session = onnxruntime.InferenceSession(exported, providers=["CPUExecutionProvider"])
    other_shape = (3, 7, 16, 40) if is_segmenter else (3, 1, 32, 48, 48)
    batch = torch.randn(other_shape)
    onnx_probabilities = session.run(["probabilities"], {"input": batch.numpy()})[0]
    np.testing.assert_allclose(onnx_probabilities, probabilities(model, batch).numpy(), atol=1e-5)


def test_plain_pickle_file_with_an_object_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "legacy.pt"
    with path.open("wb") as handle:
        pickle.dump({"model_state": {}, "payload": Payload()}, handle, protocol=2)
    with pytest.raises(LungcadError, match=r"legacy.pt"):
        load_checkpoint(path)
