"""bfloat16 autocast, used where the hardware does it natively (training and, opt-in, analysis).

Weights stay float32; only convolutions and matmuls run in bfloat16. On CPUs with
AVX512-BF16 / AMX that makes a LunaModel training step about 1.6x faster and U-Net
inference about 2x faster; elsewhere bfloat16 is emulated and slower, so ``auto`` keeps
float32 there.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Any, Literal

import torch

from lungcad.errors import LungcadError

Precision = Literal["auto", "fp32", "bf16"]
PRECISIONS: tuple[Precision, ...] = ("auto", "fp32", "bf16")


def has_native_bf16(device: torch.device) -> bool:
    """Whether bfloat16 math is done in hardware here (CUDA bf16, or AVX512-BF16 / AMX CPUs)."""
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    if device.type == "cpu":
        cpu = torch.cpu
        checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
        return any(bool(getattr(cpu, name, lambda: False)()) for name in checks)
    return False


def check_precision(precision: str) -> None:
    """A user error, not a crash later, for a name that is not a precision."""
    if precision not in PRECISIONS:
        raise LungcadError(f"--precision {precision}: must be one of {', '.join(PRECISIONS)}")


def mixed_precision(precision: Precision, device: torch.device) -> AbstractContextManager[Any]:
    """Autocast to bfloat16 for ``bf16``, and for ``auto`` where the hardware has it."""
    check_precision(precision)
    enabled = precision == "bf16" or (precision == "auto" and has_native_bf16(device))
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)
