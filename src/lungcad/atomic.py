"""Write files so that readers see the old version or the new one, never half of one.

Every output of lungcad (cache entries, checkpoints, reports, CSVs) goes through here, so
a crash or Ctrl-C mid-write leaves no truncated file behind.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def atomic_write(path: str | Path, writer: Callable[[BinaryIO], object]) -> Path:
    """Call ``writer`` on a temporary sibling file, then rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        with tmp.open("wb") as handle:
            writer(handle)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Atomically write UTF-8 text."""
    return atomic_write(path, lambda handle: handle.write(text.encode("utf-8")))
