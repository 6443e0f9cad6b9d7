"""The models one server process holds, loaded once at startup from a models folder.

The folder holds checkpoints named as ``lungcad analyze`` expects: ``classifier.pt``
(required), ``malignancy.pt`` (optional; ``p_malignant`` is null without it) and
``segmentation.pt`` (optional; ``/v1/analyze`` answers 503 without it). Book ``.state``
files renamed to these names work too. Everything runs on the CPU.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from lungcad.analysis.pipeline import MODEL_FILE_NAMES, ModelBundle, find_model_files
from lungcad.analysis.segmentation import SliceModel
from lungcad.errors import LungcadError
from lungcad.models import LoadedModel, load_model_with_info
from lungcad.serving.backends import ModelInfo, Runner, exported_runner
from lungcad.serving.settings import ServeSettings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServingModels:
    """Runners for ``/v1/classify`` and, with a segmentation model, the analysis bundle."""

    classifier: Runner
    malignancy: Runner | None
    analysis: ModelBundle | None
    info: tuple[ModelInfo, ...]

    def classify(self, crops: np.ndarray) -> np.ndarray:
        """(N, 32, 48, 48) float32 clipped HU -> (N, 2): p_nodule, p_malignant (NaN if none)."""
        batch = crops[:, None]  # (N, 1, 32, 48, 48)
        p_nodule = self.classifier.predict(batch)[:, 1]
        if self.malignancy is None:
            p_malignant = np.full_like(p_nodule, np.nan)
        else:
            p_malignant = self.malignancy.predict(batch)[:, 1]
        return np.stack([p_nodule, p_malignant], axis=1)


def load_serving_models(settings: ServeSettings, workdir: Path) -> ServingModels:
    """Load every model in ``settings.models_dir`` for ``settings.backend``.

    TorchScript and ONNX backends use pre-exported ``<role>.ts`` / ``<role>.onnx`` files
    beside the checkpoints when present, else export into ``workdir``. ``/v1/analyze``
    runs the exported U-Net for segmentation and the eager classifiers for its crops.
    """
    paths = find_model_files(settings.models_dir)
    if "classifier" not in paths:
        raise LungcadError(
            f"{settings.models_dir}: no {MODEL_FILE_NAMES['classifier']} in the models folder"
        )
    bundle: ModelBundle | None = None
    loaded: dict[str, LoadedModel] = {}
    if "segmentation" in paths:
        bundle = ModelBundle.load(
            paths["segmentation"], paths["classifier"], paths.get("malignancy"), device="cpu"
        )
        loaded = {"classifier": bundle.classifier, "segmentation": bundle.segmentation}
        if bundle.malignancy is not None:
            loaded["malignancy"] = bundle.malignancy
    else:
        for role in ("classifier", "malignancy"):
            if role in paths:
                loaded[role] = load_model_with_info(paths[role], "cpu", role)
    runners: dict[str, Runner] = {}
    info: list[ModelInfo] = []
    for role, model in loaded.items():
        runner, model_info = exported_runner(role, model, paths[role], settings.backend, workdir)
        runners[role] = runner
        info.append(model_info)
    if bundle is not None and settings.backend != "eager":
        bundle = replace(bundle, segmenter=_slice_model(runners["segmentation"]))
    return ServingModels(
        classifier=runners["classifier"],
        malignancy=runners.get("malignancy"),
        analysis=bundle,
        info=tuple(info),
    )


def _slice_model(runner: Runner) -> SliceModel:
    """The analysis pipeline's segmenter contract (tensor in, tensor out) over a runner."""

    def segment(batch: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(runner.predict(batch.cpu().numpy()))

    return segment
