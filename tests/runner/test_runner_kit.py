"""Pieces of the training kit a recipe's step calls."""

import math

import pytest
import torch

from latentforge_core.errors import NumericalError
from latentforge_runner.training import Optimization, TrainingSettings


def _optimization(w: torch.Tensor, **settings) -> Optimization:
    return Optimization([w], TrainingSettings(**settings))


def test_backward_scales_by_the_parts_and_returns_the_share():
    w = torch.tensor([2.0], requires_grad=True)
    share = _optimization(w).backward((w * 3).sum(), parts=4, step=0)
    assert share == pytest.approx(1.5) and w.grad.item() == pytest.approx(0.75)


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_a_non_finite_loss_stops_before_any_gradient(bad):
    w = torch.tensor([1.0], requires_grad=True)
    with pytest.raises(NumericalError, match=r"at step 7; lower training.lr"):
        _optimization(w).backward(w.sum() * bad, parts=1, step=7)
    assert w.grad is None
