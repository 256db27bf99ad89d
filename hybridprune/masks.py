"""Turn metrics into keep-masks (bool, True = keep) and decide how many weights go where.

Every selection prunes equal metrics lower index first (as a stable sort would), so the
same inputs always give the same mask (``torch.topk`` gives no such guarantee).
Counts go through :func:`prune_counts`, so an achieved sparsity equals its target to
one weight.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

from hybridprune.patterns import Pattern, PatternKind, parse_pattern  # noqa: F401 (re-exported)

UnstructuredGroup = Literal["row", "matrix"]


def _check_sparsity(sparsity: Tensor) -> None:
    if bool(torch.isnan(sparsity).any()) or bool(((sparsity < 0) | (sparsity > 1)).any()):
        raise ValueError("sparsity must be in [0, 1]")


def _check_metric(metric: Tensor, dims: int) -> None:
    if metric.dim() != dims:
        raise ValueError(f"metric must be {dims}-D, got shape {tuple(metric.shape)}")
    if metric.is_floating_point() and bool(torch.isnan(metric).any()):
        raise ValueError("metric contains NaN; the statistics or weights behind it are broken")


def prune_counts(sizes: Tensor, sparsities: Tensor | float) -> Tensor:
    """How many to prune in each unit (LongTensor [U]).

    The total is exactly round(sum(sizes * sparsities)) (round half to even, like
    Python's ``round``) and each unit gets the floor or the ceiling of its own share;
    the leftover units go to the largest fractional parts, ties to the lower index.
    """
    if sizes.dim() != 1:
        raise ValueError(f"sizes must be 1-D, got shape {tuple(sizes.shape)}")
    if bool((sizes < 0).any()):
        raise ValueError("sizes must be >= 0")
    rates = torch.as_tensor(sparsities, dtype=torch.float64, device=sizes.device)
    if rates.dim() != 0 and rates.shape != sizes.shape:
        raise ValueError(
            f"sparsities must be a float or have shape {tuple(sizes.shape)}, got {tuple(rates.shape)}"
        )
    _check_sparsity(rates)
    shares = sizes.to(torch.float64) * rates
    floors = shares.floor()
    missing = round(float(shares.sum())) - int(floors.sum())
    counts = floors.to(torch.long)
    if missing > 0:
        by_fraction = torch.argsort(-(shares - floors), stable=True)
        counts[by_fraction[:missing]] += 1
    return counts


def row_counts(mask: Tensor) -> Tensor:
    """Per row, the True entries of a 2-D bool mask (int64). As bytes summed into int32: 62 ms per 28672 x 4096
    mask against 125 ms for count_nonzero(1) (2 cores, 2026-12-07)."""
    return mask.view(torch.uint8).sum(1, dtype=torch.int32).long()


def _keep_all_but_lowest(metric: Tensor, counts: Tensor) -> Tensor:
    """Keep-mask for a 2-D metric where row r loses its counts[r] lowest entries.

    The same mask as a stable sort (equal metrics pruned lower index first), found by a selection of each
    row's threshold (`_thresholds`, 4-7x faster than sorting the rows). Only rows whose threshold value is shared
    by more entries than it may prune go through the tie-breaking, which takes the first of the tied entries by
    their positions (float32 metrics tie by the thousand in a matrix pruned as one group: with a cumulative count
    over the row and a one-thread kthvalue, an 8B gate_proj's mask took 2.1-3.3 s, 0.75 s now; 2 threads).
    """
    counts = counts.to(metric.device)
    active = counts > 0
    if not bool(active.any()):
        return torch.ones(metric.shape, dtype=torch.bool, device=metric.device)
    every = bool(active.all())
    block, counts = (metric, counts) if every else (metric[active], counts[active])
    threshold = _thresholds(block, counts)
    pruned = block <= threshold
    # the rows with more entries equal to their threshold than they may prune
    tied = torch.nonzero(row_counts(pruned) != counts).squeeze(1)
    if len(tied):
        sub, limit = block[tied], threshold[tied]
        below = sub < limit
        still_needed = counts[tied] - row_counts(below)
        # the tied entries of each row in index order (nonzero is row-major): the first still_needed are pruned
        row, column = torch.nonzero(sub == limit, as_tuple=True)
        first = torch.searchsorted(row, torch.arange(len(tied), device=row.device))
        take = torch.arange(len(row), device=row.device) - first[row] < still_needed[row]
        below[row[take], column[take]] = True
        pruned[tied] = below
    if every:
        return ~pruned
    keep = torch.ones(metric.shape, dtype=torch.bool, device=metric.device)
    keep[active] = ~pruned
    return keep


def _thresholds(block: Tensor, counts: Tensor) -> Tensor:
    """Per row, its counts[r]-th smallest value ([rows, 1]; every count >= 1): a kthvalue per distinct count (rows
    have one or two, NeuronRank's bounded rows hundreds: one call over rows padded to a common count, -inf and +inf
    by row, took 1.1-2x their time at 14336 x 4096). One row wider than WIDE_ROW (a whole matrix as one group) goes
    through `_kth_of_wide_row`."""
    rows, columns = block.shape
    unique = counts.unique().tolist()
    if rows == 1 and columns > WIDE_ROW:
        return _kth_of_wide_row(block[0], unique[0]).view(1, 1)
    if len(unique) == 1:
        return torch.kthvalue(block, unique[0], dim=1, keepdim=True).values
    threshold = torch.empty(rows, 1, dtype=block.dtype, device=block.device)
    for count in unique:
        chosen = counts == count
        threshold[chosen] = torch.kthvalue(block[chosen], count, dim=1, keepdim=True).values
    return threshold


WIDE_ROW = 2**20
WIDE_SAMPLE = 2**18
"""A row wider than WIDE_ROW (a matrix pruned as one group: NeuronRank's gate/up) has its k-th smallest found
from a sample of about WIDE_SAMPLE of its values: the sample's quantiles a few standard errors either side of
k / n bracket it, two counts check the bracket and a kthvalue over the values inside it finishes (the whole row
when the bracket misses: the result is exact either way). torch's kthvalue of one row runs on one thread: 2.1 s
for Llama-3.1-8B's 14336 x 4096 gate_proj as one row, against 0.4 s bracketed (2 threads, 2026-12-07)."""


def _kth_of_wide_row(values: Tensor, k: int) -> Tensor:
    """The k-th smallest of a 1-D tensor (1 <= k <= its size), exactly."""
    n = values.numel()
    sample = torch.sort(values[:: max(1, n // WIDE_SAMPLE)]).values
    m = sample.numel()
    at, margin = (k - 0.5) / n * m, 6 * math.sqrt(m) + 2
    lo = sample[max(0, math.floor(at - margin))]
    hi = sample[min(m - 1, math.ceil(at + margin))]
    below, upto = int(torch.count_nonzero(values < lo)), int(torch.count_nonzero(values <= hi))
    if below < k <= upto:
        return torch.kthvalue(values[(values >= lo) & (values <= hi)], k - below).values
    return torch.kthvalue(values, k).values


def mask_unstructured(
    metric: Tensor, sparsity: float, group: UnstructuredGroup = "row"
) -> Tensor:
    """Prune the lowest-metric weights of an [out, in] matrix.

    ``row``: each output row loses its share (Wanda's published comparison groups).
    ``matrix``: one group for the whole matrix (what magnitude pruning often uses).
    """
    _check_metric(metric, 2)
    rows, cols = metric.shape
    if group == "row":
        counts = prune_counts(torch.full((rows,), cols, dtype=torch.long), sparsity)
        return _keep_all_but_lowest(metric, counts)
    if group == "matrix":
        count = prune_counts(torch.tensor([rows * cols]), sparsity)
        return _keep_all_but_lowest(metric.reshape(1, -1), count).reshape(rows, cols)
    raise ValueError(f"unknown group {group!r}; use 'row' or 'matrix'")


def mask_rows(metric: Tensor, row_sparsity: Tensor) -> Tensor:
    """Like row-group unstructured pruning, but each row has its own sparsity.

    Used when a neuron's score sets its row's share; the matrix total stays exact.
    """
    _check_metric(metric, 2)
    rows, cols = metric.shape
    if row_sparsity.shape != (rows,):
        raise ValueError(f"row_sparsity must have shape ({rows},), got {tuple(row_sparsity.shape)}")
    counts = prune_counts(torch.full((rows,), cols, dtype=torch.long), row_sparsity.cpu())
    return _keep_all_but_lowest(metric, counts)


def mask_n_m(metric: Tensor, n: int, m: int) -> Tensor:
    """In each block of m consecutive inputs of each row, prune the n lowest (N:M sparsity)."""
    _check_metric(metric, 2)
    if not 0 < n < m:
        raise ValueError(f"invalid N:M {n}:{m}: need 0 < N < M")
    rows, cols = metric.shape
    if cols % m != 0:
        raise ValueError(f"N:M with M={m} needs the input size to be a multiple of {m}, got {cols}")
    blocks = metric.reshape(-1, m)
    counts = torch.full((blocks.shape[0],), n, dtype=torch.long)
    return _keep_all_but_lowest(blocks, counts).reshape(rows, cols)


def neuron_keep_mask(scores: Tensor, sparsity: float) -> Tensor:
    """Keep the best I - round(sparsity * I) neurons (structured pruning of an MLP)."""
    _check_metric(scores, 1)
    count = prune_counts(torch.tensor([scores.shape[0]]), sparsity)
    return _keep_all_but_lowest(scores.unsqueeze(0), count).squeeze(0)


def _normalized_rank(importance: Tensor) -> Tensor:
    """Rank in [0, 1] (0 = least important); equal importances share their mean rank."""
    units = importance.shape[0]
    if units == 1:
        return torch.full((1,), 0.5, dtype=torch.float64)
    ordered = importance.sort().values
    below = torch.searchsorted(ordered, importance, right=False)
    below_or_equal = torch.searchsorted(ordered, importance, right=True)
    mean_rank = (below + below_or_equal - 1).to(torch.float64) / 2.0
    return mean_rank / (units - 1)


def allocate_sparsity(
    importance: Tensor,
    sizes: Tensor,
    target: float,
    spread: float,
    max_sparsity: float = 0.95,
) -> Tensor:
    """Non-uniform sparsities (float64 [U]) whose size-weighted mean is exactly ``target``.

    Less important units get more: s_u = target + spread * (1 - 2 r_u), r_u the
    normalized importance rank, then a common shift is found (bisection, so clipping to
    [0, max_sparsity] is accounted for) that restores the weighted mean to ``target``.
    """
    if importance.dim() != 1 or sizes.shape != importance.shape or importance.shape[0] == 0:
        raise ValueError(
            f"importance and sizes must be non-empty 1-D tensors of equal shape, got "
            f"{tuple(importance.shape)} and {tuple(sizes.shape)}"
        )
    if bool(torch.isnan(importance.to(torch.float64)).any()):
        raise ValueError("importance contains NaN")
    weights = sizes.detach().cpu().to(torch.float64)
    if bool((weights < 0).any()) or float(weights.sum()) <= 0:
        raise ValueError("sizes must be >= 0 with a positive total")
    if not 0.0 <= max_sparsity <= 1.0:
        raise ValueError(f"max_sparsity must be in [0, 1], got {max_sparsity}")
    if not 0.0 <= target <= max_sparsity:
        raise ValueError(f"target sparsity {target} is infeasible: it must be in [0, {max_sparsity}]")
    if spread < 0 or math.isnan(spread):
        raise ValueError(f"spread must be >= 0, got {spread}")
    if spread == 0:
        return torch.full(importance.shape, target, dtype=torch.float64)

    base = target + spread * (1.0 - 2.0 * _normalized_rank(importance.detach().cpu()))
    total_weight = float(weights.sum())

    def weighted_mean(shift: float) -> float:
        return float((weights * (base + shift).clamp(0.0, max_sparsity)).sum()) / total_weight

    # The mean is non-decreasing in the shift with slope <= 1 (0 at `low`, max_sparsity at
    # `high`), so once high - low <= 1e-12 the mean at `high` is within 1e-12 of target.
    low, high = -float(base.max()), max_sparsity - float(base.min())
    while high - low > 1e-12:
        middle = (low + high) / 2.0
        if weighted_mean(middle) < target:
            low = middle
        else:
            high = middle
    return (base + high).clamp(0.0, max_sparsity)
