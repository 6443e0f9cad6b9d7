"""One ``predict(batch) -> probabilities`` interface over eager, TorchScript and ONNX models.

A runner takes a float32 batch of clipped HU (classifiers: (N, 1, 32, 48, 48); the U-Net:
(N, C, H, W)) and returns the model's probability output ((N, 2) or (N, 1, H, W)).

Where the TorchScript or ONNX files come from: a models folder may hold pre-exported
``<role>.ts`` / ``<role>.onnx`` files (from ``lungcad export``), which are used as they
are; otherwise ``<role>.pt`` is exported at startup into a temporary folder, with the
same parity check against eager as ``lungcad export``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, get_args

import numpy as np
import onnxruntime
import torch
from torch import nn

from lungcad.errors import LungcadError
from lungcad.models import LoadedModel, file_sha256
from lungcad.models.export import (
    ExportMetadata,
    export_model,
    load_torchscript,
    onnx_outputs,
    onnx_session,
    read_export_metadata,
    torch_outputs,
)
from lungcad.serving.settings import Backend

log = logging.getLogger(__name__)

BACKENDS: tuple[Backend, ...] = get_args(Backend)
EXPORTED_SUFFIX = {"torchscript": ".ts", "onnx": ".onnx"}
# Which model kinds may fill each role: the malignancy model is a LunaModel too.
ROLE_KINDS = {
    "classifier": ("classifier", "malignancy"),
    "malignancy": ("classifier", "malignancy"),
    "segmentation": ("segmentation",),
}


class Runner(Protocol):
    """A loaded model behind one call: float32 batch in, probabilities out."""

    def predict(self, batch: np.ndarray) -> np.ndarray: ...


@dataclass(frozen=True)
class ModelInfo:
    """What the server loaded for one role, as ``/health`` reports it."""

    role: str
    kind: str
    backend: Backend
    file: str
    sha256: str


class TorchRunner:
    """An eager ``nn.Module`` or a TorchScript module; thread-safe for inference."""

    def __init__(self, module: nn.Module | torch.jit.ScriptModule) -> None:
        self.module = module

    def predict(self, batch: np.ndarray) -> np.ndarray:
        return torch_outputs(self.module, batch)[-1]


class OnnxRunner:
    """An onnxruntime CPU session of a file written by ``lungcad export``."""

    def __init__(self, session: onnxruntime.InferenceSession) -> None:
        self.session = session

    def predict(self, batch: np.ndarray) -> np.ndarray:
        return onnx_outputs(self.session, batch)[-1]


def exported_runner(
    role: str, loaded: LoadedModel, checkpoint: Path, backend: Backend, workdir: Path
) -> tuple[Runner, ModelInfo]:
    """A runner of ``backend`` for ``role``: the eager model itself, a pre-exported file
    beside ``checkpoint``, or a fresh parity-checked export into ``workdir``."""
    if backend == "eager":
        info = ModelInfo(role, loaded.kind, backend, checkpoint.name, file_sha256(checkpoint))
        return TorchRunner(loaded.model), info
    checkpoint_sha256 = file_sha256(checkpoint)
    path = checkpoint.with_suffix(EXPORTED_SUFFIX[backend])
    if not path.is_file():
        path = workdir / f"{role}{EXPORTED_SUFFIX[backend]}"
        export_model(loaded, path, backend, source_sha256=checkpoint_sha256)
    runner, info, metadata = load_exported(role, path)
    if metadata.source_sha256 not in ("", checkpoint_sha256):
        # Otherwise /v1/classify and /v1/analyze (eager) would answer with different weights.
        raise LungcadError(f"{path}: was exported from another checkpoint than {checkpoint.name}")
    return runner, info


def load_exported(role: str, path: Path) -> tuple[Runner, ModelInfo, ExportMetadata]:
    """A runner for a file written by ``lungcad export``, checked to hold a ``role`` model."""
    if path.suffix == ".onnx":
        metadata = read_export_metadata(path)
        runner: Runner = OnnxRunner(onnx_session(path))
    else:
        module, text = load_torchscript(path)
        if not text:
            raise LungcadError(f"{path}: has no lungcad metadata (not written by lungcad export)")
        metadata = ExportMetadata.from_json(text, str(path))
        runner = TorchRunner(module)
    if metadata.kind not in ROLE_KINDS[role]:
        raise LungcadError(f"{path}: holds a {metadata.kind} model, which cannot serve as {role}")
    backend: Backend = "onnx" if metadata.format == "onnx" else "torchscript"
    log.info("%s: %s model from %s (%s)", role, metadata.kind, path.name, backend)
    return runner, ModelInfo(role, metadata.kind, backend, path.name, file_sha256(path)), metadata
