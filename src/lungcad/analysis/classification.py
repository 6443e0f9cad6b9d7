"""Score candidate positions with a 3D classifier on 32x48x48 crops of the in-memory CT.

Crops are cut from the int16 volume a batch at a time (never one CT load per crop, as
the book does) and converted to float32 on the model's device.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from lungcad.analysis.segmentation import hu_batch
from lungcad.data.crops import CLASSIFIER_CROP_IRC, crop_irc


def shift_inside(center_irc: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Move crop centres so the whole crop lies inside the volume, where it fits (the book's
    way: its classifier never saw padding, only windows slid back from the edges)."""
    half = np.asarray(CLASSIFIER_CROP_IRC) // 2
    high = np.asarray(shape) - np.asarray(CLASSIFIER_CROP_IRC) + half
    return np.where(high >= half, np.clip(center_irc, half, np.maximum(high, half)), center_irc)


def classify_crops(
    model: torch.nn.Module,
    hu: np.ndarray,
    centers_irc: np.ndarray,
    *,
    batch_size: int = 32,
    device: torch.device | str = "cpu",
    slide_from_edges: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> np.ndarray:
    """Positive-class probability per (N, 3) integer voxel centre, from 32x48x48 HU crops.

    Crops reaching past the volume are padded with air, as lungcad trains, or with
    ``slide_from_edges`` moved back inside it, as the book's models were trained.
    """
    if slide_from_edges:
        centers_irc = shift_inside(centers_irc, hu.shape)
    probabilities = np.empty(len(centers_irc), dtype=np.float64)
    device = torch.device(device)
    with torch.inference_mode():
        for first in range(0, len(centers_irc), batch_size):
            chunk = centers_irc[first : first + batch_size]
            crops = np.stack([crop_irc(hu, center, CLASSIFIER_CROP_IRC) for center in chunk])
            batch = hu_batch(crops[:, None], device)  # (N, 1, 32, 48, 48)
            _, output = model(batch.contiguous(memory_format=torch.channels_last_3d))  # (N, 2)
            probabilities[first : first + len(chunk)] = output[:, 1].double().cpu().numpy()
            if progress is not None:
                progress(first + len(chunk), len(centers_irc))
    return probabilities
