"""The three networks (nodule classifier, malignancy classifier, segmentation U-Net), their
configs, and the checkpoint format; ``load_model`` is the one way to get a model from disk."""

from lungcad.models.checkpoint import (
    MODEL_KINDS,
    LoadedModel,
    ModelConfig,
    ModelKind,
    build_model,
    default_config,
    file_sha256,
    load_checkpoint,
    load_model,
    load_model_with_info,
    model_from_checkpoint,
    save_checkpoint,
)
from lungcad.models.classifier import ClassifierConfig, LunaModel
from lungcad.models.unet import SegmentationConfig, SegmentationModel, UNet, fuse_for_inference

__all__ = [
    "MODEL_KINDS",
    "ClassifierConfig",
    "LoadedModel",
    "LunaModel",
    "ModelConfig",
    "ModelKind",
    "SegmentationConfig",
    "SegmentationModel",
    "UNet",
    "build_model",
    "default_config",
    "file_sha256",
    "fuse_for_inference",
    "load_checkpoint",
    "load_model",
    "load_model_with_info",
    "model_from_checkpoint",
    "save_checkpoint",
]
