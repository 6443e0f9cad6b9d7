"""Pure array functions that cut what the models see out of a (I, R, C) HU volume."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from lungcad.data.ct import HU_AIR

CLASSIFIER_CROP_IRC = (32, 48, 48)
HU_CLIP = (-1000.0, 1000.0)


def clip_hu(array: np.ndarray, low: float = HU_CLIP[0], high: float = HU_CLIP[1]) -> np.ndarray:
    """HU as float32 clipped to the range the models were trained on (bone and metal flattened)."""
    return np.clip(array, low, high).astype(np.float32, copy=False)


def crop_irc(
    volume: np.ndarray,
    center_irc: Sequence[float],
    width_irc: Sequence[int] = CLASSIFIER_CROP_IRC,
    fill: int = HU_AIR,
) -> np.ndarray:
    """A copy of the box of ``width_irc`` voxels centred on ``center_irc``.

    The box starts at ``center - width // 2``. Parts outside the volume read as ``fill``
    (air), so a crop at the edge keeps its shape and its centre stays at the candidate.
    """
    starts = [int(c) - int(w) // 2 for c, w in zip(center_irc, width_irc, strict=True)]
    ends = [s + int(w) for s, w in zip(starts, width_irc, strict=True)]
    inside = all(s >= 0 and e <= n for s, e, n in zip(starts, ends, volume.shape, strict=True))
    if inside:
        return np.array(volume[starts[0] : ends[0], starts[1] : ends[1], starts[2] : ends[2]])
    out = np.full(tuple(int(w) for w in width_irc), fill, dtype=volume.dtype)
    src = tuple(
        slice(max(s, 0), min(e, n)) for s, e, n in zip(starts, ends, volume.shape, strict=True)
    )
    if any(sl.start >= sl.stop for sl in src):
        return out
    dst = tuple(slice(sl.start - s, sl.stop - s) for sl, s in zip(src, starts, strict=True))
    out[dst] = volume[src]
    return out


def slice_stack(volume: np.ndarray, index: int, context: int = 3) -> np.ndarray:
    """Slice ``index`` with ``context`` neighbours above and below: (2*context+1, R, C).

    Neighbours past the first or last slice repeat the edge slice (no wrap-around).
    """
    if not 0 <= index < volume.shape[0]:
        raise IndexError(f"slice {index} outside volume of {volume.shape[0]} slices")
    indices = np.clip(np.arange(index - context, index + context + 1), 0, volume.shape[0] - 1)
    return np.asarray(volume[indices])
