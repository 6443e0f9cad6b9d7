"""What routes share, as FastAPI dependencies: the server state, bounded body reading,
the decoded crop, the uploaded CT in a temporary folder, and waiting with disconnect care.

Body limits are checked on ``Content-Length`` first and again while the body streams in
(a client may send no length, or lie about it).
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, TypeVar
from urllib.parse import unquote

import anyio
import numpy as np
from fastapi import Depends, HTTPException, Request
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from lungcad.serving.batching import DynamicBatcher
from lungcad.serving.metrics import Metrics
from lungcad.serving.models import ServingModels
from lungcad.serving.payloads import BadPayloadError, parse_crop
from lungcad.serving.settings import ServeSettings
from lungcad.serving.uploads import prepare_ct, safe_name

T = TypeVar("T")
MAX_UPLOAD_FILES = 2


@dataclass(frozen=True)
class ServerState:
    """Everything a request may need, built once in the app's lifespan."""

    settings: ServeSettings
    models: ServingModels
    batcher: DynamicBatcher
    metrics: Metrics
    analysis_slots: asyncio.Semaphore


class ClientDisconnectedError(Exception):
    """The client went away before its answer was ready."""


def get_state(request: Request) -> ServerState:
    state: ServerState = request.app.state.serving
    return state


StateDep = Annotated[ServerState, Depends(get_state)]


async def body_chunks(request: Request, limit: int) -> AsyncGenerator[bytes]:
    """The request body in chunks; 413 as soon as it is known to exceed ``limit`` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise HTTPException(413, f"body of {declared} bytes exceeds the limit of {limit} bytes")
    received = 0
    async for chunk in request.stream():
        received += len(chunk)
        if received > limit:
            raise HTTPException(413, f"body exceeds the limit of {limit} bytes")
        yield chunk


async def classify_crop(request: Request, state: StateDep) -> np.ndarray:
    """The (32, 48, 48) float32 clipped-HU crop of a ``/v1/classify`` request, or 400/413."""
    body = b"".join(
        [chunk async for chunk in body_chunks(request, state.settings.classify_max_bytes)]
    )
    headers = request.headers
    try:
        return parse_crop(
            body, headers.get("content-type"), headers.get("x-shape"), headers.get("x-dtype")
        )
    except BadPayloadError as exc:
        raise HTTPException(400, str(exc)) from None


CropDep = Annotated[np.ndarray, Depends(classify_crop)]


async def uploaded_ct(request: Request, state: StateDep) -> AsyncIterator[Path]:
    """The uploaded CT saved in a temporary folder (removed afterwards), as a path for
    ``read_ct``: a raw body (name from ``X-Filename``, else sniffed) or multipart files."""
    settings = state.settings
    workdir = Path(await run_in_threadpool(tempfile.mkdtemp, prefix="lungcad-upload-"))
    try:
        incoming = workdir / "incoming"
        incoming.mkdir()
        chunks = body_chunks(request, settings.analyze_max_bytes)
        if request.headers.get("content-type", "").startswith("multipart/form-data"):
            files = await _save_multipart(request, chunks, incoming)
        else:
            saved = await _save_stream(chunks, incoming / "body")
            # Percent-encoded: HTTP header values cannot carry every character of a file name.
            files = [(safe_name(unquote(request.headers.get("x-filename", ""))), saved)]
        yield await run_in_threadpool(
            prepare_ct, files, workdir, settings.zip_max_entries, settings.zip_max_unpacked_bytes
        )
    finally:
        await run_in_threadpool(shutil.rmtree, workdir, True)


UploadedCtDep = Annotated[Path, Depends(uploaded_ct)]


async def until_disconnected(request: Request, work: Awaitable[T]) -> T:
    """``work``'s result, or ``ClientDisconnectedError`` (with ``work`` cancelled) once the
    client hangs up first. Call only after the body has been read."""
    work_task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        done, _ = await asyncio.wait({work_task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        work_task.cancel()
        raise
    finally:
        watcher.cancel()
    if work_task not in done:
        work_task.cancel()  # drops the request from the batch queue
        raise ClientDisconnectedError("client disconnected")
    return work_task.result()


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _save_stream(chunks: AsyncIterator[bytes], path: Path) -> Path:
    async with await anyio.open_file(path, "wb") as handle:
        async for chunk in chunks:
            await handle.write(chunk)
    return path


async def _save_multipart(
    request: Request, chunks: AsyncGenerator[bytes], incoming: Path
) -> list[tuple[str, Path]]:
    parser = MultiPartParser(
        request.headers, chunks, max_files=MAX_UPLOAD_FILES, max_fields=MAX_UPLOAD_FILES
    )
    try:
        form = await parser.parse()
    except MultiPartException as exc:
        raise HTTPException(400, f"bad multipart upload ({exc.message})") from None
    uploads = [value for _, value in form.multi_items() if isinstance(value, UploadFile)]
    try:
        files = []
        for index, upload in enumerate(uploads):
            path = incoming / f"part-{index}"
            await run_in_threadpool(_copy_upload, upload, path)
            files.append((upload.filename or f"upload-{index}", path))
        return files
    finally:
        for upload in uploads:
            await upload.close()


def _copy_upload(upload: UploadFile, path: Path) -> None:
    upload.file.seek(0)
    with path.open("wb") as sink:
        shutil.copyfileobj(upload.file, sink, 1 << 20)
