"""``POST /v1/classify``: one 32x48x48 HU crop -> nodule and malignancy probabilities."""

from __future__ import annotations

import math

from fastapi import APIRouter, Request

from lungcad.serving.deps import CropDep, StateDep, until_disconnected
from lungcad.serving.schemas import ClassifyPublic, ErrorPublic

router = APIRouter(tags=["inference"])
_ERRORS = {status: {"model": ErrorPublic} for status in (400, 413, 500, 503, 504)}


@router.post("/v1/classify", responses=_ERRORS)  # type: ignore[arg-type]
async def classify(request: Request, crop: CropDep, state: StateDep) -> ClassifyPublic:
    """Body: a ``.npy`` (``Content-Type: application/x-npy``) or raw little-endian bytes
    with ``X-Shape: 32,48,48`` and ``X-Dtype: float32|int16``; HU is clipped here."""
    work = state.batcher.submit(crop, timeout=state.settings.classify_timeout_s)
    p_nodule, p_malignant = (float(v) for v in await until_disconnected(request, work))
    return ClassifyPublic(
        p_nodule=p_nodule, p_malignant=None if math.isnan(p_malignant) else p_malignant
    )
