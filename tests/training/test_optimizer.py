"""Optimizer choice and the stateless learning-rate schedule."""

from __future__ import annotations

import math

import pytest
import torch

from lungcad.errors import LungcadError
from lungcad.training.optimizer import OptimizerSettings, schedule_factor


def test_cosine_decays_from_one_to_zero_and_constant_stays() -> None:
    assert schedule_factor("cosine", 0.0) == 1.0
    assert schedule_factor("cosine", 0.5) == pytest.approx(0.5)
    assert schedule_factor("cosine", 1.0) == pytest.approx(0.0)
    assert schedule_factor("cosine", 0.25) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    assert schedule_factor("constant", 0.7) == 1.0


def test_optimizer_settings_build_what_they_name() -> None:
    parameters = [torch.nn.Parameter(torch.zeros(3))]
    sgd = OptimizerSettings("sgd", lr=0.01, momentum=0.9).build(parameters)
    assert isinstance(sgd, torch.optim.SGD)
    assert sgd.param_groups[0]["momentum"] == 0.9 and sgd.param_groups[0]["lr"] == 0.01
    assert isinstance(OptimizerSettings().build(parameters), torch.optim.Adam)


def test_unknown_optimizer_or_bad_rate_is_a_user_error() -> None:
    with pytest.raises(LungcadError, match="--optimizer rmsprop"):
        OptimizerSettings("rmsprop")  # type: ignore[arg-type]
    with pytest.raises(LungcadError, match="--lr"):
        OptimizerSettings(lr=0.0)
