"""The ASGI app, assembled: settings in, models loaded in the lifespan, routers mounted.

Shutdown: uvicorn stops accepting connections and waits (``graceful_timeout_s``) for
in-flight requests; then the lifespan drains the batch queue and removes exported files.
"""

from __future__ import annotations

import asyncio
import logging
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI
from starlette.concurrency import run_in_threadpool

import lungcad
from lungcad.serving.batching import DynamicBatcher
from lungcad.serving.deps import ServerState
from lungcad.serving.errors import install_error_handlers
from lungcad.serving.metrics import Metrics, MetricsMiddleware
from lungcad.serving.models import ServingModels, load_serving_models
from lungcad.serving.routes import ENDPOINTS, ROUTERS
from lungcad.serving.settings import ServeSettings

log = logging.getLogger(__name__)
ANALYSES_AT_ONCE = 1  # a real CT needs ~1.5 GB and both cores for a minute


def create_app(settings: ServeSettings, models: ServingModels | None = None) -> FastAPI:
    """The server app; ``models`` replaces loading from ``settings.models_dir`` (tests)."""
    metrics = Metrics(ENDPOINTS)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        with tempfile.TemporaryDirectory(prefix="lungcad-serve-") as workdir:
            loaded = models
            if loaded is None:
                loaded = await run_in_threadpool(load_serving_models, settings, Path(workdir))
            batcher = DynamicBatcher(
                loaded.classify,
                max_batch_size=settings.max_batch_size,
                max_wait_s=settings.max_wait_ms / 1000,
                max_queue=settings.max_queue,
                on_batch=metrics.record_batch,
            )
            metrics.queue_depth = lambda: batcher.queue_depth
            app.state.serving = ServerState(
                settings, loaded, batcher, metrics, asyncio.Semaphore(ANALYSES_AT_ONCE)
            )
            batcher.start()
            log.info("serving %s (%s backend)", settings.models_dir, settings.backend)
            try:
                yield
            finally:
                await batcher.close(timeout=settings.graceful_timeout_s)

    app = FastAPI(
        title="lungcad",
        version=lungcad.__version__,
        summary="Lung nodule classification and whole-CT analysis",
        lifespan=lifespan,
    )
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    install_error_handlers(app, settings.retry_after_s)
    for router in ROUTERS:
        app.include_router(router)
    return app


def app_from_environment() -> FastAPI:
    """uvicorn factory for worker processes: settings come from the environment."""
    return create_app(ServeSettings.from_environment())
