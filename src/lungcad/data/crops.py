"""Pure array functions that cut what the models see out of a (I, R, C) HU volume."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from lungcad.data.ct import HU_AIR

CLASSIFIER_CROP_IRC = (32, 48, 48)
HU_CLIP = (-1000.0, 1000.0)


def clip_hu(array: np.ndarray, low: float = HU_CLIP[0], high: float = HU_CLIP[1]) -> np.ndarray:
    """HU as float32 clipped to the range the models were trained on (bone and metal flattened)."""
    # Convert first: clipping int16 against float bounds would build a float64 copy.
    return np.clip(np.asarray(array, dtype=np.float32), low, high, dtype=np.float32)


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
    (i0, r0, c0), (i1, r1, c1) = starts, ends
    n_i, n_r, n_c = volume.shape
    if i0 >= 0 and r0 >= 0 and c0 >= 0 and i1 <= n_i and r1 <= n_r and c1 <= n_c:
        return volume[i0:i1, r0:r1, c0:c1].copy()
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
