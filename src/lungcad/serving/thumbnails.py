"""Small PNG pictures of each detected nodule for the web page, as base64 strings."""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence

import numpy as np
from matplotlib import image

from lungcad.data.crops import crop_irc

LUNG_WINDOW_HU = (-1000.0, 400.0)  # air black, soft tissue light grey, bone white
THUMBNAIL_PIXELS = 64


def nodule_thumbnail(
    hu: np.ndarray, center_irc: Sequence[int], size: int = THUMBNAIL_PIXELS
) -> str:
    """Base64 PNG of the axial slice through ``center_irc`` of an (I, R, C) HU volume:
    ``size`` x ``size`` voxels centred on it (air outside the volume), lung window."""
    window = crop_irc(hu, center_irc, (1, size, size))[0]
    buffer = io.BytesIO()
    image.imsave(
        buffer, window, cmap="gray", vmin=LUNG_WINDOW_HU[0], vmax=LUNG_WINDOW_HU[1], format="png"
    )
    return base64.b64encode(buffer.getvalue()).decode("ascii")
