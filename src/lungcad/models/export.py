"""Export a loaded model to TorchScript or ONNX, with a parity check against the eager model.

Both formats keep the batch dimension dynamic (and height and width for the U-Net), and
carry a JSON metadata record (model kind, config, source checkpoint hash) so a server can
tell what it loaded: ONNX in ``metadata_props``, TorchScript in an ``_extra_files`` entry.
The file is only written, atomically, once its outputs match eager within the tolerance.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np
import onnx
import onnxruntime
import torch
from torch import nn

import lungcad
from lungcad.atomic import atomic_write
from lungcad.data.crops import CLASSIFIER_CROP_IRC, HU_CLIP, clip_hu, crop_irc, slice_stack
from lungcad.errors import LungcadError
from lungcad.models.checkpoint import LoadedModel, ModelConfig
from lungcad.models.unet import SegmentationConfig

log = logging.getLogger(__name__)

ExportFormat = Literal["torchscript", "onnx"]
EXPORT_FORMATS: tuple[ExportFormat, ...] = get_args(ExportFormat)
PARITY_TOLERANCE = 1e-4
METADATA_KEY = "lungcad"  # ONNX metadata_props key; TorchScript extra file "lungcad.json"
_TORCHSCRIPT_EXTRA = "lungcad.json"
_ONNX_OPSET = 17
INPUT_NAME = "input"


@dataclass(frozen=True)
class ExportMetadata:
    """What an exported file says about itself; ``output_names`` end with "probabilities"."""

    kind: str
    config: dict[str, Any]
    format: str
    output_names: tuple[str, ...]
    source_sha256: str = ""
    lungcad_version: str = lungcad.__version__

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str, where: str) -> ExportMetadata:
        try:
            fields = json.loads(text)
            fields["output_names"] = tuple(fields["output_names"])
            return cls(**fields)
        except (ValueError, TypeError, KeyError) as exc:
            raise LungcadError(f"{where}: unreadable lungcad export metadata ({exc})") from None


@dataclass(frozen=True)
class ParityCheck:
    """Largest absolute difference between exported and eager outputs on one input."""

    name: str
    shape: tuple[int, ...]
    max_abs_diff: float


@dataclass(frozen=True)
class ExportReport:
    path: Path
    metadata: ExportMetadata
    checks: tuple[ParityCheck, ...]

    @property
    def max_abs_diff(self) -> float:
        return max(check.max_abs_diff for check in self.checks)


def output_names(kind: str) -> tuple[str, ...]:
    """Classifiers return (logits, probabilities), each (N, 2); the U-Net (N, C, H, W) probs."""
    return ("probabilities",) if kind == "segmentation" else ("logits", "probabilities")


def random_input(config: ModelConfig, batch: int, size_hw: int = 64, seed: int = 0) -> np.ndarray:
    """Uniform HU in the clipped range: (N, 1, 32, 48, 48) crops or (N, C, H, W) slice stacks."""
    if isinstance(config, SegmentationConfig):
        shape: tuple[int, ...] = (batch, config.in_channels, size_hw, size_hw)
    else:
        shape = (batch, 1, *CLASSIFIER_CROP_IRC)
    return np.random.default_rng(seed).uniform(*HU_CLIP, shape).astype(np.float32)


def input_from_ct(config: ModelConfig, hu: np.ndarray) -> np.ndarray:
    """A real model input cut from the middle of an (I, R, C) HU volume, batch of one.

    The U-Net gets the middle slice stack with its rows and columns trimmed to a multiple
    of its size step; classifiers get the 32x48x48 crop around the volume centre.
    """
    middle = [n // 2 for n in hu.shape]
    if isinstance(config, SegmentationConfig):
        step = config.size_multiple
        stack = slice_stack(hu, middle[0], context=config.in_channels // 2)
        rows, cols = (stack.shape[1] // step) * step, (stack.shape[2] // step) * step
        return clip_hu(stack[:, :rows, :cols])[None]
    return clip_hu(crop_irc(hu, middle, CLASSIFIER_CROP_IRC))[None, None]


def torch_outputs(
    module: nn.Module | torch.jit.ScriptModule, batch: np.ndarray
) -> list[np.ndarray]:
    """All outputs of an eager or TorchScript model on a float32 batch, as numpy arrays."""
    with torch.inference_mode():
        out = module(torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)))
    return [t.numpy() for t in (out if isinstance(out, tuple) else (out,))]


def onnx_outputs(session: onnxruntime.InferenceSession, batch: np.ndarray) -> list[np.ndarray]:
    """All outputs of an ONNX model on a float32 batch, in the exported order."""
    feed = {INPUT_NAME: np.ascontiguousarray(batch, dtype=np.float32)}
    return [np.asarray(out) for out in session.run(None, feed)]


def onnx_session(model: bytes | Path) -> onnxruntime.InferenceSession:
    """A CPU onnxruntime session for an ONNX file or its bytes."""
    source = model if isinstance(model, bytes) else str(model)
    return onnxruntime.InferenceSession(source, providers=["CPUExecutionProvider"])


def export_model(
    loaded: LoadedModel,
    out: str | Path,
    fmt: ExportFormat,
    *,
    check_inputs: Mapping[str, np.ndarray] | None = None,
    tolerance: float = PARITY_TOLERANCE,
    source_sha256: str = "",
) -> ExportReport:
    """Export ``loaded`` to ``out`` after checking parity with eager on random and given inputs.

    ``check_inputs`` are named real input batches (clipped HU). Raises ``LungcadError``
    (and writes nothing) when any output differs from eager by more than ``tolerance``.
    """
    if fmt not in EXPORT_FORMATS:
        raise LungcadError(f"unknown export format {fmt!r}; expected one of {EXPORT_FORMATS}")
    out = Path(out)
    metadata = ExportMetadata(
        kind=loaded.kind,
        config=asdict(loaded.config),
        format=fmt,
        output_names=output_names(loaded.kind),
        source_sha256=source_sha256,
    )
    # A contiguous copy: the exported graph then does not depend on the eager memory layout.
    model = copy.deepcopy(loaded.model).eval()
    model.to(memory_format=torch.contiguous_format)  # type: ignore[call-overload]
    data = (
        _torchscript_bytes(model, metadata)
        if fmt == "torchscript"
        else _onnx_bytes(model, metadata)
    )
    exported = _exported_runner(data, fmt)
    # Batch sizes (and U-Net slice sizes) other than the export example's prove the
    # dynamic axes work.
    inputs = {
        "random": random_input(loaded.config, batch=3, size_hw=48),
        "random-batch-1": random_input(loaded.config, batch=1, size_hw=32, seed=1),
        **(check_inputs or {}),
    }
    checks = []
    for name, batch in inputs.items():
        diffs = [
            float(np.max(np.abs(ours - theirs))) if ours.size else 0.0
            for ours, theirs in zip(exported(batch), torch_outputs(model, batch), strict=True)
        ]
        checks.append(ParityCheck(name, tuple(batch.shape), max(diffs)))
    report = ExportReport(out, metadata, tuple(checks))
    if report.max_abs_diff > tolerance:
        worst = max(checks, key=lambda check: check.max_abs_diff)
        raise LungcadError(
            f"{out}: {fmt} export of the {loaded.kind} model differs from eager by "
            f"{worst.max_abs_diff:.3g} on the {worst.name} input (tolerance {tolerance:g}); "
            "not written"
        )
    atomic_write(out, lambda handle: handle.write(data))
    log.info("exported %s model to %s (%s)", loaded.kind, out, fmt)
    return report


def read_export_metadata(path: str | Path) -> ExportMetadata:
    """The metadata record of a file written by ``export_model`` (either format)."""
    path = Path(path)
    if not path.is_file():
        raise LungcadError(f"{path}: no such exported model file")
    if path.suffix == ".onnx":
        try:
            props = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
        except Exception as exc:  # onnx raises DecodeError and friends
            raise LungcadError(f"{path}: not an ONNX model ({exc})") from None
        text = props.get(METADATA_KEY)
    else:
        text = load_torchscript(path)[1]
    if not text:
        raise LungcadError(f"{path}: has no lungcad metadata (not written by lungcad export)")
    return ExportMetadata.from_json(text, str(path))


def load_torchscript(source: str | Path | bytes) -> tuple[torch.jit.ScriptModule, str]:
    """A TorchScript model on CPU and its lungcad metadata JSON ("" if it has none)."""
    extra = {_TORCHSCRIPT_EXTRA: ""}
    where = "TorchScript bytes" if isinstance(source, bytes) else str(source)
    try:
        handle = io.BytesIO(source) if isinstance(source, bytes) else str(source)
        with _torchscript_is_deprecated():
            module = torch.jit.load(handle, map_location="cpu", _extra_files=extra)
    except (RuntimeError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise LungcadError(f"{where}: not a TorchScript model ({first})") from None
    module.eval()
    return module, extra[_TORCHSCRIPT_EXTRA]


def _torchscript_bytes(model: nn.Module, metadata: ExportMetadata) -> bytes:
    buffer = io.BytesIO()
    with _torchscript_is_deprecated():
        scripted = torch.jit.script(model)
        torch.jit.save(scripted, buffer, _extra_files={_TORCHSCRIPT_EXTRA: metadata.to_json()})
    return buffer.getvalue()


@contextlib.contextmanager
def _torchscript_is_deprecated() -> Iterator[None]:
    """PyTorch 2.13 warns that TorchScript is deprecated; it is still what LibTorch (C++)
    loads, which is why we export it, so the warning is noise here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", r".*(TorchScript|torch\.jit).*", DeprecationWarning)
        yield


def _onnx_bytes(model: nn.Module, metadata: ExportMetadata) -> bytes:
    is_segmenter = metadata.kind == "segmentation"
    dynamic = {0: "batch", 2: "height", 3: "width"} if is_segmenter else {0: "batch"}
    example = torch.zeros(_example_shape(metadata))
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        # The TorchScript-based exporter is deprecated, but the newer one needs onnxscript,
        # which we do not ship; this one handles our plain conv nets exactly.
        warnings.simplefilter("ignore", (DeprecationWarning, FutureWarning, UserWarning))
        torch.onnx.export(
            model,
            (example,),
            buffer,  # type: ignore[arg-type]  # file objects work; the stub says paths only
            input_names=[INPUT_NAME],
            output_names=list(metadata.output_names),
            dynamic_axes={name: dynamic for name in (INPUT_NAME, *metadata.output_names)},
            opset_version=_ONNX_OPSET,
            dynamo=False,
        )
    proto = onnx.load_from_string(buffer.getvalue())
    onnx.helper.set_model_props(proto, {METADATA_KEY: metadata.to_json()})
    onnx.checker.check_model(proto)
    return proto.SerializeToString()


def _example_shape(metadata: ExportMetadata) -> tuple[int, ...]:
    """The input shape an ONNX export is traced with (batch of one)."""
    if metadata.kind == "segmentation":
        return (1, int(metadata.config["in_channels"]), 64, 64)
    return (1, 1, *CLASSIFIER_CROP_IRC)


def _exported_runner(data: bytes, fmt: ExportFormat) -> Callable[[np.ndarray], list[np.ndarray]]:
    if fmt == "onnx":
        session = onnx_session(data)
        return lambda batch: onnx_outputs(session, batch)
    module = load_torchscript(data)[0]
    return lambda batch: torch_outputs(module, batch)
