"""Shared fixtures. Real reference files come from ``$LUNGCAD_SHARED`` (default ``../shared``)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("LUNGCAD_SHARED", REPO_ROOT.parent / "shared"))


def shared_file(relative: str) -> Path:
    """Path of a real reference file under shared/, or skip the test saying which is absent."""
    path = SHARED / relative
    if not path.exists():
        pytest.skip(f"real reference file {path} is absent (set LUNGCAD_SHARED)")
    return path
