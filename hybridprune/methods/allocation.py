"""Per-row sparsity allocation inside one matrix: pure tensor code.

NeuronRank prunes gate/up with one comparison group per matrix, so each neuron's row loses a share
set by its score. Unbounded, that spread fits the calibration text's domain: neurons that are quiet
on it can lose most of their row and be missed on other text. `bound_row_sparsity` keeps every row
within target +- bound while the matrix total stays exactly at the target.
"""

from __future__ import annotations

import torch
from torch import Tensor


def row_sparsity_of(keep: Tensor) -> Tensor:
    """Fraction of each row that a keep-mask [out, in] prunes (float64 [out])."""
    return 1.0 - keep.to(torch.float64).mean(dim=1)


def bound_row_sparsity(row_sparsity: Tensor, target: float, bound: float, iters: int = 60) -> Tensor:
    """Row sparsities clamped to [target - bound, target + bound] (within [0, 1]), with mean exactly `target`.

    The clamp moves the mean; a common shift c (found by bisection: the mean of clamp(r + c) is monotone in c)
    restores it, so rows keep their order and the matrix total is unchanged. bound >= 1 returns the input.
    """
    if row_sparsity.dim() != 1:
        raise ValueError(f"row_sparsity must be 1-D, got shape {tuple(row_sparsity.shape)}")
    if bound < 0:
        raise ValueError(f"bound must be >= 0, got {bound}")
    rates = row_sparsity.to(torch.float64)
    if bound >= 1.0 or rates.numel() == 0:
        return rates
    low, high = max(0.0, target - bound), min(1.0, target + bound)
    if not low <= target <= high:
        raise ValueError(f"target {target} outside [0, 1]")
    shift_low, shift_high = -1.0 - float(rates.max()), 1.0 - float(rates.min()) + 1.0
    for _ in range(iters):
        shift = 0.5 * (shift_low + shift_high)
        if float((rates + shift).clamp(low, high).mean()) < target:
            shift_low = shift
        else:
            shift_high = shift
    return (rates + 0.5 * (shift_low + shift_high)).clamp(low, high)
