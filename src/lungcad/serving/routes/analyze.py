"""``POST /v1/analyze``: a whole CT -> the JSON ``lungcad analyze`` writes for it.

The analysis runs in a worker thread (the event loop keeps answering), at most
``analysis_slots`` at a time; later uploads wait for a slot.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Query
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from lungcad.analysis.pipeline import ModelBundle, analyze_ct
from lungcad.data.ct import read_ct
from lungcad.serving.deps import StateDep, UploadedCtDep
from lungcad.serving.schemas import ErrorPublic
from lungcad.serving.thumbnails import nodule_thumbnail

router = APIRouter(tags=["inference"])
_ERRORS = {status: {"model": ErrorPublic} for status in (400, 413, 500, 503)}


def analysis_bundle(state: StateDep) -> ModelBundle:
    """The analysis models, or 503 before any upload is read when there are none."""
    if state.models.analysis is None:
        raise HTTPException(503, "no segmentation.pt in the models folder; /v1/analyze is off")
    return state.models.analysis


@router.post("/v1/analyze", responses=_ERRORS)  # type: ignore[arg-type]
async def analyze(
    bundle: Annotated[ModelBundle, Depends(analysis_bundle)],
    ct_path: UploadedCtDep,
    state: StateDep,
    thumbnails: Annotated[bool, Query(description="Add base64 PNGs of each nodule.")] = False,
) -> JSONResponse:
    """Body: a .nrrd/.nii/.nii.gz/.mha file (raw with a percent-encoded ``X-Filename``, or multipart),
    an .mhd + .raw pair (multipart), or a .zip of a DICOM series."""
    async with state.analysis_slots:
        body = await run_in_threadpool(analyze_file, ct_path, bundle, thumbnails)
    return JSONResponse(body)


def analyze_file(path: Path, bundle: ModelBundle, thumbnails: bool) -> dict[str, Any]:
    """Read and analyse one CT; ``source`` names the upload, not the temporary path."""
    start = time.perf_counter()
    volume = read_ct(path)
    result = analyze_ct(volume, bundle, load_seconds=time.perf_counter() - start)
    body = result.to_json()
    body["source"] = path.name
    if thumbnails:
        body["thumbnails"] = [nodule_thumbnail(volume.hu, d.center_irc) for d in result.nodules]
    return body
