"""Response bodies by role. ``/v1/analyze`` answers with ``ScanResult.to_json()`` itself,
the same JSON ``lungcad analyze`` writes, plus optional ``thumbnails``."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field


class ClassifyPublic(BaseModel):
    """Probabilities for one crop; ``p_malignant`` is null when no malignancy model is loaded."""

    p_nodule: float = Field(ge=0.0, le=1.0)
    p_malignant: float | None = Field(default=None, ge=0.0, le=1.0)


class ModelPublic(BaseModel):
    """One loaded model: its role, kind, how it runs, and the exact file behind it."""

    role: str
    kind: str
    backend: str
    file: str
    sha256: str


class HealthPublic(BaseModel):
    status: Literal["ok"] = "ok"
    backend: str
    models: list[ModelPublic]
    analyze_available: bool
    queue_depth: int
    max_batch_size: int


class ErrorPublic(BaseModel):
    """Every error answer (400, 413, 500, 503, 504): one line saying what went wrong."""

    detail: str
