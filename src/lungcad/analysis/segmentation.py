"""Run the slice U-Net over a whole CT, a batch of slice stacks at a time.

Every axial slice is segmented with ``context`` neighbours above and below as input
channels (edge slices repeated, as ``lungcad.data.crops.slice_stack`` does). Only one
batch of stacks exists at a time, built from the int16 volume and converted to float32
on the model's device, so memory stays at the volume, the output and one batch.

Only a window of each slice need be segmented: ``body_window`` finds the rows and
columns holding the patient, grown by the U-Net's reach so that every output inside the
body is the one a whole-slice pass gives; the air around it is never flagged.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from scipy import ndimage

from lungcad.data.crops import HU_CLIP
from lungcad.data.ct import HU_AIR
from lungcad.models import LoadedModel

if TYPE_CHECKING:  # onnx and onnxruntime take ~1 s to import; only the onnx backend needs them
    import onnxruntime

SliceModel = Callable[[torch.Tensor], torch.Tensor]
"""(N, 2*context+1, R, C) float32 clipped HU -> (N, 1, R, C) probabilities."""
SEGMENTATION_BACKENDS = ("torch", "onnx")
SliceWindow = tuple[slice, slice]
"""(rows, columns) of each slice that are segmented; the rest is left at probability 0."""
BODY_HU = -500.0  # denser than lung and air: skin, fat, muscle, bone
BODY_SEARCH_STEP = 4  # the body is found on a grid this much coarser in-plane
# A chest CT's body is a third or more of its voxels; a phantom of a few dense blobs or a
# field of view inside the lungs has no such region and is segmented whole.
MIN_BODY_SHARE = 0.05


class OnnxSliceModel:
    """The U-Net run by onnxruntime on the CPU, as a :data:`SliceModel`.

    Without allocator tuning it runs about 2x faster than eager PyTorch on CPU; after
    ``lungcad.analysis.run.configure_process`` both cost ~0.16 CPU-s per 512x512 slice
    (measured). Outputs agree within 1e-4 (the export is refused otherwise), which can
    flip a voxel lying right at the threshold.
    """

    def __init__(self, session: onnxruntime.InferenceSession, input_name: str) -> None:
        self.session = session
        self.input_name = input_name

    @classmethod
    def export(cls, loaded: LoadedModel) -> OnnxSliceModel:
        """Export ``loaded`` (parity-checked) and open it with as many threads as torch uses."""
        import onnxruntime

        from lungcad.models.export import INPUT_NAME, export_model

        with tempfile.TemporaryDirectory(prefix="lungcad-onnx-") as folder:
            path = Path(folder) / "segmentation.onnx"
            export_model(loaded, path, "onnx")
            settings = onnxruntime.SessionOptions()
            settings.intra_op_num_threads = torch.get_num_threads()
            # Plain malloc instead of onnxruntime's arena, which grows with every batch shape.
            settings.enable_cpu_mem_arena = False
            session = onnxruntime.InferenceSession(
                str(path), settings, providers=["CPUExecutionProvider"]
            )
        return cls(session, INPUT_NAME)

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        feed = {self.input_name: batch.cpu().contiguous().numpy()}
        return torch.from_numpy(self.session.run(None, feed)[0])


def stack_indices(first: int, stop: int, slices: int, context: int) -> np.ndarray:
    """(stop - first, 2*context+1) slice indices of the stacks centred on ``first..stop-1``."""
    offsets = np.arange(-context, context + 1)
    return np.clip(np.arange(first, stop)[:, None] + offsets[None, :], 0, slices - 1)


def hu_batch(hu_stacks: np.ndarray, device: torch.device) -> torch.Tensor:
    """int16 HU -> float32 clipped to the trained range, converted after the copy to device."""
    batch = torch.from_numpy(np.ascontiguousarray(hu_stacks)).to(device)
    return batch.to(torch.float32).clamp_(*HU_CLIP)


def _aligned_span(low: int, high: int, size: int, reach: int, multiple: int) -> slice:
    """``low..high`` grown by ``reach`` on both sides, starting on a multiple of ``multiple``
    (the U-Net's pooling grid stays where a whole-slice pass puts it), within ``0..size``."""
    start = max(0, (low - reach) // multiple * multiple)
    return slice(start, min(size, high + 1 + reach))


def body_window(hu: np.ndarray, reach: int, multiple: int = 1) -> SliceWindow:
    """The part of every slice worth segmenting: the patient plus ``reach`` pixels.

    The patient is the largest connected region denser than ``BODY_HU``, found on a
    ``BODY_SEARCH_STEP`` times coarser grid; the table, arms and clothes are separate
    regions or inside the window anyway. ``reach`` is how far an input pixel can change
    the U-Net's output (``SegmentationConfig.reach``), so every output inside the body is
    the one the whole slice gives. Without a region of ``MIN_BODY_SHARE`` of the volume
    the slices are segmented whole.
    """
    if hu.ndim != 3:
        raise ValueError(f"expected an (I, R, C) volume, got shape {hu.shape}")
    step = BODY_SEARCH_STEP
    labels, _ = ndimage.label(hu[:, ::step, ::step] > BODY_HU)
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    if sizes.max() < MIN_BODY_SHARE * labels.size:
        return (slice(0, hu.shape[1]), slice(0, hu.shape[2]))
    body = labels == int(sizes.argmax())
    rows = np.flatnonzero(body.any(axis=(0, 2))) * step
    cols = np.flatnonzero(body.any(axis=(0, 1))) * step
    return (
        _aligned_span(int(rows[0]), int(rows[-1]) + step - 1, hu.shape[1], reach, multiple),
        _aligned_span(int(cols[0]), int(cols[-1]) + step - 1, hu.shape[2], reach, multiple),
    )


def _pad_to_multiple(stacks: np.ndarray, multiple: int) -> np.ndarray:
    """Air below and right of (N, K, R, C) stacks so that R and C are multiples."""
    extra = [(-size) % multiple for size in stacks.shape[-2:]]
    if not any(extra):
        return stacks
    padding = ((0, 0), (0, 0), (0, extra[0]), (0, extra[1]))
    return np.pad(stacks, padding, constant_values=HU_AIR)


def segment_volume(
    model: SliceModel,
    hu: np.ndarray,
    *,
    batch_size: int = 8,
    device: torch.device | str = "cpu",
    context: int = 3,
    window: SliceWindow | None = None,
    size_multiple: int = 1,
    progress: Callable[[int, int], None] | None = None,
) -> np.ndarray:
    """Nodule probability per voxel, float32 (I, R, C), for an int16 HU volume (I, R, C).

    ``model`` is the segmentation network already on ``device`` (or any callable with
    its contract). Only ``window`` of each slice (default: all of it) is segmented,
    padded with air up to a multiple of ``size_multiple`` pixels where the model needs
    that; outside it the probability is 0. ``progress(done, total)`` is called after
    each batch of slices.
    """
    if hu.ndim != 3:
        raise ValueError(f"expected an (I, R, C) volume, got shape {hu.shape}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = torch.device(device)
    slices = hu.shape[0]
    rows, cols = window or (slice(0, hu.shape[1]), slice(0, hu.shape[2]))
    probabilities = np.zeros(hu.shape, dtype=np.float32)
    with torch.inference_mode():
        for first in range(0, slices, batch_size):
            stop = min(first + batch_size, slices)
            stacks = hu[stack_indices(first, stop, slices, context), rows, cols]  # (N, 7, r, c)
            height, width = stacks.shape[-2:]
            stacks = _pad_to_multiple(stacks, size_multiple)
            # channels_last: the convolutions run ~1.5x faster on CPU in this layout.
            batch = hu_batch(stacks, device).contiguous(memory_format=torch.channels_last)
            output = model(batch)[:, 0, :height, :width]  # (N, r, c)
            probabilities[first:stop, rows, cols] = output.float().cpu().numpy()
            if progress is not None:
                progress(stop, slices)
    return probabilities
