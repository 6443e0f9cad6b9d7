"""Checkpoints: one file format for every model, and the one way to load a model from disk.

A lungcad checkpoint is a ``torch.save``'d dict of plain data and tensors only (no pickled
classes), so it loads with ``torch.load(weights_only=True)`` and opening an untrusted file
cannot run code. It carries the model's config, so the file alone rebuilds the model.
``load_model`` also reads the book's published ``.state`` files.
"""

from __future__ import annotations

import hashlib
import logging
import pickle
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, get_args

import torch
from torch import nn

import lungcad
from lungcad.atomic import atomic_write
from lungcad.errors import LungcadError
from lungcad.models.classifier import CLASSIFIER_KINDS, ClassifierConfig, LunaModel
from lungcad.models.unet import SegmentationConfig, SegmentationModel

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT_VERSION = 1
ModelKind = Literal["classifier", "malignancy", "segmentation"]
MODEL_KINDS: tuple[ModelKind, ...] = get_args(ModelKind)
ModelConfig = ClassifierConfig | SegmentationConfig
# The book's checkpoints name the model class; its malignancy model is also a LunaModel.
_BOOK_MODEL_KINDS: dict[str, ModelKind] = {"LunaModel": "classifier", "UNetWrapper": "segmentation"}
_BOOK_KEY_PREFIXES: dict[str, ModelKind] = {
    "tail_batchnorm.": "classifier",
    "input_batchnorm.": "segmentation",
}


@dataclass(frozen=True)
class LoadedModel:
    """A model ready for inference (eval mode) plus what its checkpoint says about it.

    ``checkpoint_meta`` holds everything but the tensors: ``source_format`` ("lungcad" or
    "dlwpt-book"), ``epoch``, ``samples_seen``, ``command_line``, and for lungcad files
    also ``metrics``, ``data_fingerprint``, ``created``, ``lungcad_version``.
    """

    model: nn.Module
    kind: ModelKind
    config: ModelConfig
    checkpoint_meta: dict[str, Any] = field(default_factory=dict)


def build_model(kind: str, config: ModelConfig | None = None) -> nn.Module:
    """A freshly initialised model of ``kind``; ``config`` defaults to the book's structure.

    Weights are laid out channels-last (2D for the U-Net, 3D for the classifiers): the same
    math, but CPU convolutions run 1.5x (U-Net) to 3x (classifier) faster, forward and
    backward. Inputs may come in either layout.
    """
    config = config if config is not None else default_config(kind)
    model: nn.Module
    if kind == "segmentation":
        if not isinstance(config, SegmentationConfig):
            raise TypeError(f"segmentation needs a SegmentationConfig, got {config!r}")
        model = SegmentationModel(config)
        return model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    if not isinstance(config, ClassifierConfig) or config.kind != kind:
        raise TypeError(f"{kind} needs ClassifierConfig(kind={kind!r}), got {config!r}")
    model = LunaModel()
    return model.to(memory_format=torch.channels_last_3d)  # type: ignore[call-overload]


def default_config(kind: str) -> ModelConfig:
    """The book's structure for ``kind``; an unknown kind is a ``LungcadError`` listing them."""
    if kind == "segmentation":
        return SegmentationConfig()
    if kind in CLASSIFIER_KINDS:
        return ClassifierConfig(kind=kind)
    raise LungcadError(f"unknown model kind {kind!r}; expected one of {', '.join(MODEL_KINDS)}")


def save_checkpoint(
    path: str | Path,
    *,
    model: nn.Module,
    config: ModelConfig,
    optimizer: torch.optim.Optimizer | None = None,
    epoch: int,
    samples_seen: int,
    metrics: dict[str, Any],
    command_line: list[str],
    data_fingerprint: str,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write a checkpoint atomically: readers see the old file or the new one, never half.

    Metrics and ``extra`` must be plain data (numbers, strings, lists, dicts, tensors);
    numpy scalars are turned into Python numbers, anything else is a ``TypeError``.
    """
    path = Path(path)
    checkpoint: dict[str, Any] = {
        "format_version": CHECKPOINT_FORMAT_VERSION,
        "lungcad_version": lungcad.__version__,
        "model_kind": config.kind,
        "model_config": asdict(config),
        "model_state": model.state_dict(),
        "optimizer_state": optimizer.state_dict() if optimizer is not None else None,
        "optimizer_name": type(optimizer).__name__ if optimizer is not None else None,
        "epoch": int(epoch),
        "samples_seen": int(samples_seen),
        "metrics": _plain(metrics, "metrics"),
        "command_line": [str(arg) for arg in command_line],
        "data_fingerprint": str(data_fingerprint),
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "extra": _plain(extra or {}, "extra"),
    }
    atomic_write(path, lambda handle: torch.save(checkpoint, handle))
    log.info("saved %s checkpoint %s (epoch %d)", config.kind, path, epoch)
    return path


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """The raw dict of a lungcad or book checkpoint, read without unpickling any objects."""
    path = Path(path)
    if not path.is_file():
        raise LungcadError(f"{path}: no such checkpoint file")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "weights only" in str(exc).lower():
            raise LungcadError(
                f"{path}: holds pickled Python objects besides tensors and plain data; "
                "refusing to unpickle it (it could run code)"
            ) from None
        raise LungcadError(f"{path}: not a PyTorch checkpoint ({_first_line(exc)})") from None
    except Exception as exc:  # garbage bytes fail in many ways inside the safe unpickler
        raise LungcadError(
            f"{path}: unreadable or truncated checkpoint ({_first_line(exc)})"
        ) from None
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("model_state"), dict):
        raise LungcadError(f"{path}: not a model checkpoint (no 'model_state' dict inside)")
    return checkpoint


def load_model(
    path: str | Path, device: str | torch.device = "cpu", kind: str | None = None
) -> nn.Module:
    """The model in ``path`` (lungcad or book checkpoint), on ``device``, in eval mode."""
    return load_model_with_info(path, device, kind).model


def load_model_with_info(
    path: str | Path, device: str | torch.device = "cpu", kind: str | None = None
) -> LoadedModel:
    """Like ``load_model`` but also returns the kind, config and checkpoint metadata.

    ``kind`` is only needed for a book classifier file holding the malignancy model (the
    book's files do not say which task a ``LunaModel`` was trained for); given for a
    lungcad file, it must agree with the file.
    """
    return model_from_checkpoint(load_checkpoint(path), path, device, kind)


def model_from_checkpoint(
    checkpoint: dict[str, Any],
    path: str | Path,
    device: str | torch.device = "cpu",
    kind: str | None = None,
) -> LoadedModel:
    """Build the model a loaded checkpoint dict describes (training resume reads the dict once
    for both this and ``checkpoint["optimizer_state"]``). ``path`` is for error messages."""
    path = Path(path)
    if kind is not None and kind not in MODEL_KINDS:
        raise LungcadError(f"unknown model kind {kind!r}; expected one of {', '.join(MODEL_KINDS)}")
    if "format_version" in checkpoint:
        config, meta = _read_lungcad_header(checkpoint, path, kind)
    else:
        config, meta = _read_book_header(checkpoint, path, kind)
    model = build_model(config.kind, config)
    mismatch = _state_mismatch(model.state_dict(), checkpoint["model_state"])
    if mismatch:
        raise LungcadError(
            f"{path}: weights do not fit a {config.kind} model {config} ({mismatch})"
        )
    model.load_state_dict(checkpoint["model_state"])
    model.to(device)
    model.eval()
    return LoadedModel(model=model, kind=config.kind, config=config, checkpoint_meta=meta)


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks (reports name the exact weights used)."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _read_lungcad_header(
    checkpoint: dict[str, Any], path: Path, kind: str | None
) -> tuple[ModelConfig, dict[str, Any]]:
    version = checkpoint["format_version"]
    if not isinstance(version, int) or version > CHECKPOINT_FORMAT_VERSION:
        raise LungcadError(
            f"{path}: checkpoint format {version!r} (lungcad {checkpoint.get('lungcad_version')}) "
            f"is newer than this lungcad reads ({CHECKPOINT_FORMAT_VERSION}); upgrade lungcad"
        )
    file_kind = checkpoint.get("model_kind")
    if file_kind not in MODEL_KINDS:
        raise LungcadError(
            f"{path}: unknown model kind {file_kind!r}; expected one of {', '.join(MODEL_KINDS)}"
        )
    if kind is not None and kind != file_kind:
        raise LungcadError(f"{path}: holds a {file_kind} model, not {kind}")
    config_fields = dict(checkpoint.get("model_config") or {})
    try:
        if file_kind == "segmentation":
            config: ModelConfig = SegmentationConfig(**config_fields)
        else:
            config = ClassifierConfig(**{**config_fields, "kind": file_kind})
    except (TypeError, ValueError) as exc:
        raise LungcadError(f"{path}: bad model_config {config_fields} ({exc})") from None
    meta = {k: v for k, v in checkpoint.items() if k not in ("model_state", "optimizer_state")}
    return config, {"source_format": "lungcad", **meta}


def _read_book_header(
    checkpoint: dict[str, Any], path: Path, kind: str | None
) -> tuple[ModelConfig, dict[str, Any]]:
    model_name = checkpoint.get("model_name")
    book_kind = _BOOK_MODEL_KINDS.get(str(model_name))
    if book_kind is None:
        keys = list(checkpoint["model_state"])
        book_kind = next(
            (
                k
                for prefix, k in _BOOK_KEY_PREFIXES.items()
                if any(key.startswith(prefix) for key in keys)
            ),
            None,
        )
    if book_kind is None:
        raise LungcadError(
            f"{path}: cannot tell which model this is (model_name {model_name!r}, "
            "no format_version, state keys match neither the classifier nor the U-Net)"
        )
    if (
        kind is not None
        and kind != book_kind
        and not (book_kind == "classifier" and kind == "malignancy")
    ):
        raise LungcadError(f"{path}: holds a book {model_name or book_kind}, not a {kind} model")
    meta = {
        "source_format": "dlwpt-book",
        "model_name": model_name,
        "epoch": checkpoint.get("epoch"),
        "samples_seen": checkpoint.get("totalTrainingSamples_count"),
        "optimizer_name": checkpoint.get("optimizer_name"),
        "command_line": checkpoint.get("sys_argv"),
        "created": checkpoint.get("time"),
    }
    return default_config(kind or book_kind), meta


def _state_mismatch(expected: dict[str, torch.Tensor], found: dict[str, Any]) -> str:
    """One line saying how a state dict differs from a model's, or "" when it fits."""
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    reshaped = [
        f"{k} is {_shape(found[k])} not {tuple(v.shape)}"
        for k, v in expected.items()
        if k in found and _shape(found[k]) != tuple(v.shape)
    ]
    problems = [
        f"{len(names)} {label}, e.g. {names[0]}"
        for label, names in (
            ("missing", missing),
            ("unexpected", unexpected),
            ("misshapen", reshaped),
        )
        if names
    ]
    return "; ".join(problems)


def _shape(value: Any) -> tuple[int, ...] | str:
    return tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__


def _plain(value: Any, where: str) -> Any:
    """``value`` as types ``weights_only`` loading accepts, or a ``TypeError`` naming where."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {str(k): _plain(v, f"{where}[{k!r}]") for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
    for plain_type in (bool, int, float, str):
        if isinstance(value, plain_type):
            return plain_type(value)  # numpy float64 and friends become Python numbers
    if value is None:
        return None
    if hasattr(value, "item") and getattr(value, "shape", None) == ():
        return _plain(value.item(), where)  # numpy scalars that are not float/int subclasses
    raise TypeError(f"{where}: {type(value).__name__} cannot be stored in a checkpoint")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
