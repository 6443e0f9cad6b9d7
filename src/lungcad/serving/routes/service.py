"""``GET /health`` (what is loaded, queue depth) and ``GET /metrics`` (Prometheus text)."""

from __future__ import annotations

from dataclasses import asdict

from fastapi import APIRouter, Response

from lungcad.serving.deps import StateDep
from lungcad.serving.metrics import CONTENT_TYPE
from lungcad.serving.schemas import HealthPublic, ModelPublic

router = APIRouter(tags=["service"])


@router.get("/health")
async def health(state: StateDep) -> HealthPublic:
    """Answers as long as the event loop runs, also while an analysis computes."""
    return HealthPublic(
        backend=state.settings.backend,
        models=[ModelPublic(**asdict(info)) for info in state.models.info],
        analyze_available=state.models.analysis is not None,
        queue_depth=state.batcher.queue_depth,
        max_batch_size=state.batcher.max_batch_size,
    )


@router.get("/metrics", response_class=Response)
async def metrics(state: StateDep) -> Response:
    return Response(state.metrics.render(), media_type=CONTENT_TYPE)
