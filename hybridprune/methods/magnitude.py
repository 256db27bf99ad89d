"""Magnitude pruning metric: the baseline every other metric is compared against."""

from __future__ import annotations

import torch
from torch import Tensor


def magnitude_metric(weight: Tensor) -> Tensor:
    """|W| in float32, so the same mask code serves every model dtype."""
    return weight.detach().abs().to(torch.float32)
