"""bfloat16 autocast: on only where asked, or where the hardware has it for ``auto``."""

from __future__ import annotations

import pytest
import torch

from lungcad.errors import LungcadError
from lungcad.precision import has_native_bf16, mixed_precision


def test_mixed_precision_runs_convolutions_in_bf16_only_when_asked() -> None:
    conv = torch.nn.Conv3d(1, 2, 3)
    x = torch.randn(1, 1, 4, 4, 4)
    cpu = torch.device("cpu")
    with mixed_precision("bf16", cpu):
        assert conv(x).dtype == torch.bfloat16
    with mixed_precision("fp32", cpu):
        assert conv(x).dtype == torch.float32
    with mixed_precision("auto", cpu):
        expected = torch.bfloat16 if has_native_bf16(cpu) else torch.float32
        assert conv(x).dtype == expected
    with pytest.raises(LungcadError, match="--precision fp8"):
        mixed_precision("fp8", cpu)  # type: ignore[arg-type]
