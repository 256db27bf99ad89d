"""Magnitude pruning metric: the baseline every other metric is compared against."""

from __future__ import annotations

import torch
from torch import Tensor


def magnitude_metric(weight: Tensor, input_sumsq: Tensor | None = None) -> Tensor:
    """|W| in float32, so the same mask code serves every model dtype (`input_sumsq` is ignored: the
    registry calls every module metric with the same arguments)."""
    return weight.detach().abs().to(torch.float32)
