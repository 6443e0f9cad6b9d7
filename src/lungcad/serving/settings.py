"""Every knob of the inference server in one validated class.

``lungcad serve`` builds it from the command line; with ``--workers N`` each uvicorn worker
process rebuilds it from the JSON that the parent puts in ``LUNGCAD_SERVE_SETTINGS``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from lungcad.errors import LungcadError

Backend = Literal["eager", "torchscript", "onnx"]
SETTINGS_ENVIRONMENT_VARIABLE = "LUNGCAD_SERVE_SETTINGS"
MIB = 1 << 20


class ServeSettings(BaseModel):
    """Server settings; byte limits are bytes, times are seconds unless the name says ms."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    models_dir: Path
    backend: Backend = "eager"
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    workers: int = Field(1, ge=1)
    # Dynamic batching of /v1/classify.
    max_batch_size: int = Field(64, ge=1, le=4096)
    max_wait_ms: float = Field(5.0, ge=0.0, le=10_000.0)
    max_queue: int = Field(1024, ge=1)
    classify_timeout_s: float = Field(60.0, gt=0.0)
    retry_after_s: int = Field(1, ge=0)
    # Body limits: a 32x48x48 float32 crop is 295 KB; a CT upload is hundreds of MB.
    classify_max_bytes: int = Field(400_000, ge=1)
    analyze_max_bytes: int = Field(1024 * MIB, ge=1)
    zip_max_entries: int = Field(10_000, ge=1)
    zip_max_unpacked_bytes: int = Field(4 * 1024 * MIB, ge=1)
    graceful_timeout_s: float = Field(30.0, ge=0.0)

    @field_validator("models_dir")
    @classmethod
    def _models_dir_exists(cls, value: Path) -> Path:
        if not value.is_dir():
            raise ValueError(f"{value}: models folder not found")
        return value

    @classmethod
    def build(cls, **values: object) -> ServeSettings:
        """Validated settings; a bad value is a ``LungcadError`` naming the option."""
        try:
            return cls.model_validate(values)
        except ValidationError as exc:
            raise LungcadError(_one_line(exc)) from None

    def to_environment(self) -> dict[str, str]:
        """Environment entries from which ``from_environment`` rebuilds these settings."""
        return {SETTINGS_ENVIRONMENT_VARIABLE: self.model_dump_json()}

    @classmethod
    def from_environment(cls) -> ServeSettings:
        text = os.environ.get(SETTINGS_ENVIRONMENT_VARIABLE)
        if not text:
            raise LungcadError(
                f"{SETTINGS_ENVIRONMENT_VARIABLE} is not set; start with lungcad serve"
            )
        try:
            return cls.model_validate_json(text)
        except ValidationError as exc:
            raise LungcadError(_one_line(exc)) from None


def _one_line(exc: ValidationError) -> str:
    problems = [
        f"{'.'.join(str(p) for p in error['loc']) or 'settings'}: {error['msg']}"
        for error in exc.errors()
    ]
    return "bad server settings: " + "; ".join(problems)
