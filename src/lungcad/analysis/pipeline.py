"""One CT in, nodules out: segment, group, classify, estimate malignancy.

The CT is read once by the caller and every stage works on that in-memory int16 volume
(the book reloads it for each stage). Models load once into a :class:`ModelBundle` and
serve any number of scans; the CLI and the HTTP server both call :func:`analyze_ct`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

import lungcad
from lungcad.analysis.classification import classify_crops
from lungcad.analysis.grouping import BLOB_SEARCH_MIN_MM3, Grouping, group_mask
from lungcad.analysis.segmentation import (
    SEGMENTATION_BACKENDS,
    OnnxSliceModel,
    SliceModel,
    body_window,
    segment_volume,
)
from lungcad.data.ct import CtVolume
from lungcad.data.geometry import Geometry, Xyz
from lungcad.errors import LungcadError
from lungcad.models import (
    LoadedModel,
    SegmentationConfig,
    SegmentationModel,
    file_sha256,
    fuse_for_inference,
    load_model_with_info,
)
from lungcad.precision import Precision, check_precision, mixed_precision
from lungcad.training.distributed import select_device

log = logging.getLogger(__name__)

MODEL_FILE_NAMES = {
    "segmentation": "segmentation.pt",
    "classifier": "classifier.pt",
    "malignancy": "malignancy.pt",
}
STAGES = ("segment", "group", "classify", "malignancy")
StageProgress = Callable[[str, int, int], None]
"""``progress(stage, done, total)``: stage is one of ``STAGES``."""


@dataclass(frozen=True)
class ModelFile:
    """Which weights produced a result: file name and SHA-256 of its bytes."""

    path: Path
    sha256: str
    source_format: str

    def to_json(self) -> dict[str, str]:
        return {"file": self.path.name, "sha256": self.sha256, "format": self.source_format}


@dataclass(frozen=True)
class ModelBundle:
    """The models of one analysis run, loaded once, on ``device``, in eval mode."""

    segmentation: LoadedModel
    classifier: LoadedModel
    malignancy: LoadedModel | None
    files: dict[str, ModelFile]
    device: torch.device
    segmenter: SliceModel

    @classmethod
    def load(
        cls,
        segmentation: Path,
        classifier: Path,
        malignancy: Path | None = None,
        *,
        device: str | torch.device = "auto",
        backend: str = "torch",
    ) -> ModelBundle:
        """Load lungcad checkpoints or the book's ``.state`` files (kinds are checked).

        ``backend="onnx"`` runs the U-Net with onnxruntime (CPU only; see
        :class:`OnnxSliceModel` for its speed); the classifiers always run in PyTorch.
        """
        if backend not in SEGMENTATION_BACKENDS:
            raise LungcadError(
                f"unknown backend {backend!r}; expected one of {', '.join(SEGMENTATION_BACKENDS)}"
            )
        target = select_device(device) if isinstance(device, str) else device
        if backend == "onnx" and target.type != "cpu":
            raise LungcadError(f"backend onnx runs on the CPU only, not on {target}")
        paths = {"segmentation": segmentation, "classifier": classifier}
        if malignancy is not None:
            paths["malignancy"] = malignancy
        loaded = {kind: load_model_with_info(path, target, kind) for kind, path in paths.items()}
        files = {
            kind: ModelFile(
                Path(path), file_sha256(path), str(loaded[kind].checkpoint_meta["source_format"])
            )
            for kind, path in paths.items()
        }
        segmenter: SliceModel = (
            OnnxSliceModel.export(loaded["segmentation"])
            if backend == "onnx"
            else _fused(loaded["segmentation"].model)
        )
        return cls(
            segmentation=loaded["segmentation"],
            classifier=loaded["classifier"],
            malignancy=loaded.get("malignancy"),
            files=files,
            device=target,
            segmenter=segmenter,
        )

    @classmethod
    def from_dir(
        cls, directory: Path, *, device: str | torch.device = "auto", backend: str = "torch"
    ) -> ModelBundle:
        """Load ``segmentation.pt``, ``classifier.pt`` and, if present, ``malignancy.pt``."""
        paths = find_model_files(directory)
        for kind in ("segmentation", "classifier"):
            if kind not in paths:
                raise LungcadError(f"{directory}: no {MODEL_FILE_NAMES[kind]} in the models folder")
        return cls.load(
            paths["segmentation"],
            paths["classifier"],
            paths.get("malignancy"),
            device=device,
            backend=backend,
        )

    @property
    def segmentation_context(self) -> int:
        """Neighbour slices on each side of the segmented one (3 for the book's 7 channels)."""
        return self.segmentation_config.in_channels // 2

    @property
    def segmentation_config(self) -> SegmentationConfig:
        config = self.segmentation.config
        if not isinstance(config, SegmentationConfig):
            raise TypeError(f"the segmentation model has a {type(config).__name__}")
        return config


def _fused(model: torch.nn.Module) -> SliceModel:
    """The U-Net with its conv -> ReLU -> batch norm triples fused (see ``ConvReluNorm``)."""
    return fuse_for_inference(model) if isinstance(model, SegmentationModel) else model


def find_model_files(directory: Path) -> dict[str, Path]:
    """The standard model files present in ``directory``, by kind."""
    if not directory.is_dir():
        raise LungcadError(f"{directory}: models folder not found")
    return {
        kind: directory / name
        for kind, name in MODEL_FILE_NAMES.items()
        if (directory / name).is_file()
    }


@dataclass(frozen=True)
class AnalysisOptions:
    """Thresholds (probabilities in [0, 1]), batch sizes and the device to load models on."""

    segmentation_threshold: float = 0.5
    nodule_threshold: float = 0.5
    malignancy_threshold: float = 0.5
    segmentation_batch_size: int | None = None  # None: 2 slices on CPU, 16 on a GPU
    classifier_batch_size: int = 32
    device: str = "auto"
    # The U-Net in bfloat16 where asked: ~2x faster on AMX CPUs, but it flips ~0.6% of the
    # flagged voxels of a real CT, so exact float32 stays the default.
    segmentation_precision: Precision = "fp32"
    # Segment only the patient (plus the U-Net's reach), not the air around it.
    crop_to_body: bool = True
    # Also a candidate at each blob inside a large component (see ``analysis.grouping``).
    blob_candidates: bool = True

    def __post_init__(self) -> None:
        check_precision(self.segmentation_precision)
        for name in ("segmentation_threshold", "nodule_threshold", "malignancy_threshold"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise LungcadError(f"{name} must be in [0, 1], got {value}")
        for name in ("segmentation_batch_size", "classifier_batch_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise LungcadError(f"{name} must be >= 1, got {value}")

    def slices_per_batch(self, device: torch.device) -> int:
        """On CPU a 512x512 slice costs ~150 MB of U-Net activations and batching gains
        nothing measurable; a GPU wants enough slices to fill it."""
        if self.segmentation_batch_size is not None:
            return self.segmentation_batch_size
        return 2 if device.type == "cpu" else 16

    def thresholds_json(self) -> dict[str, float]:
        return {
            "segmentation": self.segmentation_threshold,
            "nodule": self.nodule_threshold,
            "malignancy": self.malignancy_threshold,
        }


@dataclass(frozen=True)
class Detection:
    """One classified candidate. ``center_irc`` is the voxel its crop was centred on."""

    center_xyz: Xyz
    center_irc: tuple[int, int, int]
    diameter_mm: float
    voxels: int
    p_nodule: float
    p_malignant: float | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "center_xyz": [round(v, 3) for v in self.center_xyz],
            "center_irc": list(self.center_irc),
            "diameter_mm": round(self.diameter_mm, 2),
            "voxels": self.voxels,
            "p_nodule": self.p_nodule,
            "p_malignant": self.p_malignant,
        }


@dataclass(frozen=True)
class ScanResult:
    """Everything one analysis found and how: candidates, funnel, timings, model hashes."""

    series_uid: str
    source: str
    shape_irc: tuple[int, int, int]
    geometry: Geometry
    candidates: tuple[Detection, ...]
    funnel: dict[str, int | None]
    timings_s: dict[str, float]
    models: dict[str, ModelFile]
    options: AnalysisOptions = field(default_factory=AnalysisOptions)

    @property
    def nodules(self) -> list[Detection]:
        """Candidates at or above the nodule threshold, most probable first."""
        chosen = [d for d in self.candidates if d.p_nodule >= self.options.nodule_threshold]
        return sorted(chosen, key=lambda d: -d.p_nodule)

    def is_malignant(self, detection: Detection) -> bool:
        return (
            detection.p_malignant is not None
            and detection.p_malignant >= self.options.malignancy_threshold
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "series_uid": self.series_uid,
            "source": self.source,
            "shape_irc": list(self.shape_irc),
            "geometry": self.geometry.to_json(),
            "thresholds": self.options.thresholds_json(),
            "nodules": [d.to_json() for d in self.nodules],
            "funnel": dict(self.funnel),
            "timings_s": {k: round(v, 3) for k, v in self.timings_s.items()},
            "models": {kind: f.to_json() for kind, f in self.models.items()},
            "lungcad_version": lungcad.__version__,
        }


def _trained_on_slid_crops(loaded: LoadedModel) -> bool:
    return loaded.checkpoint_meta.get("source_format") == "dlwpt-book"


def analyze_ct(
    volume: CtVolume,
    models: ModelBundle,
    options: AnalysisOptions | None = None,
    progress: StageProgress | None = None,
    *,
    load_seconds: float = 0.0,
) -> ScanResult:
    """Find and score nodules in one CT; ``load_seconds`` is the caller's read time."""
    options = options or AnalysisOptions()
    _check_device(options.device, models.device)
    report = progress or (lambda stage, done, total: None)
    timings = {"load": load_seconds}
    clock = time.perf_counter()

    def lap(stage: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        timings[stage] = now - clock
        clock = now

    config = models.segmentation_config
    window = (
        body_window(volume.hu, config.reach, config.size_multiple) if options.crop_to_body else None
    )
    with mixed_precision(options.segmentation_precision, models.device):
        probabilities = segment_volume(
            models.segmenter,
            volume.hu,
            batch_size=options.slices_per_batch(models.device),
            device=models.device,
            context=models.segmentation_context,
            window=window,
            size_multiple=config.size_multiple,
            progress=lambda done, total: report("segment", done, total),
        )
    lap("segment")
    report("group", 0, 1)
    mask = probabilities > options.segmentation_threshold
    del probabilities  # 4 bytes a voxel, no longer needed: keep the peak memory down
    grouping = group_mask(
        mask,
        volume.hu,
        volume.geometry,
        blob_search_min_mm3=BLOB_SEARCH_MIN_MM3 if options.blob_candidates else None,
    )
    del mask
    report("group", 1, 1)
    lap("group")

    irc = np.array([c.center_irc for c in grouping.candidates], dtype=np.float64).reshape(-1, 3)
    centers = np.rint(irc).astype(np.int64)
    p_nodule = classify_crops(
        models.classifier.model,
        volume.hu,
        centers,
        batch_size=options.classifier_batch_size,
        device=models.device,
        slide_from_edges=_trained_on_slid_crops(models.classifier),
        progress=lambda done, total: report("classify", done, total),
    )
    lap("classify")
    p_malignant = _malignancy(models, volume.hu, centers, p_nodule, options, report)
    lap("malignancy")
    timings["total"] = sum(timings.values())

    return _scan_result(volume, models, options, grouping, centers, p_nodule, p_malignant, timings)


def _check_device(requested: str, actual: torch.device) -> None:
    """The options name where models should run; they must be where the bundle put them."""
    if requested == "auto":
        return
    wanted = select_device(requested)
    if wanted.type != actual.type or (
        None not in (wanted.index, actual.index) and wanted != actual
    ):
        raise ValueError(f"models are on {actual}, options ask for {requested}")


def _malignancy(
    models: ModelBundle,
    hu: np.ndarray,
    centers: np.ndarray,
    p_nodule: np.ndarray,
    options: AnalysisOptions,
    report: StageProgress,
) -> list[float | None]:
    """Malignancy probability of the candidates taken as nodules; None for the others."""
    p_malignant: list[float | None] = [None] * len(centers)
    if models.malignancy is None:
        return p_malignant
    chosen = np.flatnonzero(p_nodule >= options.nodule_threshold)
    scores = classify_crops(
        models.malignancy.model,
        hu,
        centers[chosen],
        batch_size=options.classifier_batch_size,
        device=models.device,
        slide_from_edges=_trained_on_slid_crops(models.malignancy),
        progress=lambda done, total: report("malignancy", done, total),
    )
    for index, score in zip(chosen, scores, strict=True):
        p_malignant[index] = float(score)
    return p_malignant


def _scan_result(
    volume: CtVolume,
    models: ModelBundle,
    options: AnalysisOptions,
    grouping: Grouping,
    centers: np.ndarray,
    p_nodule: np.ndarray,
    p_malignant: list[float | None],
    timings: dict[str, float],
) -> ScanResult:
    candidates = tuple(
        Detection(
            center_xyz=component.center_xyz,
            center_irc=(int(center[0]), int(center[1]), int(center[2])),
            diameter_mm=component.diameter_mm,
            voxels=component.voxels,
            p_nodule=float(p),
            p_malignant=mal,
        )
        for component, center, p, mal in zip(
            grouping.candidates, centers, p_nodule, p_malignant, strict=True
        )
    )
    malignant = sum(1 for m in p_malignant if m is not None and m >= options.malignancy_threshold)
    funnel: dict[str, int | None] = {
        "voxels_above_threshold": grouping.voxels_above_threshold,
        "voxels_after_erosion": grouping.voxels_after_erosion,
        "components": len(grouping.components),
        "blobs_in_large_components": len(grouping.blobs),
        "candidates_classified": len(candidates),
        "nodules": int(np.count_nonzero(p_nodule >= options.nodule_threshold)),
        "malignant": malignant if models.malignancy is not None else None,
    }
    log.debug("%s: funnel %s", volume.series_uid, funnel)
    return ScanResult(
        series_uid=volume.series_uid,
        source=str(volume.source),
        shape_irc=volume.shape_irc,
        geometry=volume.geometry,
        candidates=candidates,
        funnel=funnel,
        timings_s=timings,
        models=dict(models.files),
        options=options,
    )
