"""Wanda metric (Sun et al. 2023): weight magnitude scaled by its input channel's norm."""

from __future__ import annotations

import torch
from torch import Tensor


def wanda_metric(weight: Tensor, input_sumsq: Tensor) -> Tensor:
    """|W_ij| * ||X_j||_2 in float32.

    ``input_sumsq[j]`` is the sum over calibration tokens of x_j^2 (a reduced sum, so it
    can be cached and merged across shards); its square root is the channel norm.
    """
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [out, in], got shape {tuple(weight.shape)}")
    if input_sumsq.shape != (weight.shape[1],):
        raise ValueError(
            f"input_sumsq must have shape ({weight.shape[1]},) to match weight "
            f"{tuple(weight.shape)}, got {tuple(input_sumsq.shape)}"
        )
    channel_norm = input_sumsq.detach().to(torch.float64).sqrt().to(torch.float32)
    return weight.detach().abs().to(torch.float32) * channel_norm.to(weight.device)
