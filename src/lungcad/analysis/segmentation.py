"""Run the slice U-Net over a whole CT, a batch of slice stacks at a time.

Every axial slice is segmented with ``context`` neighbours above and below as input
channels (edge slices repeated, as ``lungcad.data.crops.slice_stack`` does). Only one
batch of stacks exists at a time, built from the int16 volume and converted to float32
on the model's device, so memory stays at the volume, the output and one batch.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from lungcad.data.crops import HU_CLIP
from lungcad.models import LoadedModel

if TYPE_CHECKING:  # onnx and onnxruntime take ~1 s to import; only the onnx backend needs them
    import onnxruntime

SliceModel = Callable[[torch.Tensor], torch.Tensor]
"""(N, 2*context+1, R, C) float32 clipped HU -> (N, 1, R, C) probabilities."""
SEGMENTATION_BACKENDS = ("torch", "onnx")


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


def segment_volume(
    model: SliceModel,
    hu: np.ndarray,
    *,
    batch_size: int = 8,
    device: torch.device | str = "cpu",
    context: int = 3,
    progress: Callable[[int, int], None] | None = None,
) -> np.ndarray:
    """Nodule probability per voxel, float32 (I, R, C), for an int16 HU volume (I, R, C).

    ``model`` is the segmentation network already on ``device`` (or any callable with
    its contract). ``progress(done, total)`` is called after each batch of slices.
    """
    if hu.ndim != 3:
        raise ValueError(f"expected an (I, R, C) volume, got shape {hu.shape}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = torch.device(device)
    slices = hu.shape[0]
    probabilities = np.empty(hu.shape, dtype=np.float32)
    with torch.inference_mode():
        for first in range(0, slices, batch_size):
            stop = min(first + batch_size, slices)
            stacks = hu[stack_indices(first, stop, slices, context)]  # (N, 7, R, C) int16
            # channels_last: the convolutions run ~1.5x faster on CPU in this layout.
            batch = hu_batch(stacks, device).contiguous(memory_format=torch.channels_last)
            output = model(batch)  # (N, 1, R, C)
            probabilities[first:stop] = output[:, 0].float().cpu().numpy()
            if progress is not None:
                progress(stop, slices)
    return probabilities
