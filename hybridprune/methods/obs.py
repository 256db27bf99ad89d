"""Masks chosen inside the OBS sweep and N:M-friendly neuron orders (the swap refinement: methods/refine.py).

Pure tensor code (tensors in, tensors out). The weight update itself is SparseGPT's column sweep
(methods/reconstruct.py): column j's pruned weights are compensated on the later columns through
the upper Cholesky factor U of H^-1 (H = X^T X + damping). Here the mask is not fixed in advance:
each block of columns chooses its own mask on the weights already updated by the earlier blocks,
with SparseGPT's saliency w_ij^2 / U_jj^2 (the OBS error of pruning w_ij given the columns left),
optionally times a per-row scale (the NeuronRank score for gate/up rows), in comparison groups of
rows given by the caller (one row each = Wanda-like rows; several rows = one group over the block).
"""

from __future__ import annotations

import torch
from torch import Tensor

from hybridprune.masks import _keep_all_but_lowest, prune_counts


def block_bounds(columns: int, block: int) -> list[tuple[int, int]]:
    return [(start, min(start + block, columns)) for start in range(0, columns, block)]


def sweep_counts(row_sparsity: Tensor, groups: Tensor, columns: int, block: int = 128) -> Tensor:
    """How many weights each comparison group prunes in each block of columns (LongTensor [G, blocks]).

    `row_sparsity` [rows] is every row's target; `groups` [rows] (0..G-1) the comparison group of each row
    (rows of one group share a target). A group of one row prunes exactly its Wanda-style per-row count
    (prune_counts over the rows of that target, so a matrix total stays exact to one weight); a group of
    several rows prunes round(rows * columns * sparsity). Either way the group's count is spread over the
    blocks in proportion to their widths (floor or ceiling, prune_counts), so the total is exact.
    """
    groups = groups.to(torch.long).cpu()
    row_sparsity = row_sparsity.to(torch.float64).cpu()
    n_groups = int(groups.max()) + 1 if groups.numel() else 0
    sizes = torch.bincount(groups, minlength=n_groups)
    widths = torch.tensor([end - start for start, end in block_bounds(columns, block)], dtype=torch.long)
    totals = torch.zeros(n_groups, dtype=torch.long)
    single = sizes[groups] == 1
    # single-row groups: per target value, the rows' counts as Wanda's per-row groups would have them
    for value in row_sparsity[single].unique().tolist():
        rows = single & (row_sparsity == value)
        totals[groups[rows]] = prune_counts(torch.full((int(rows.sum()),), columns, dtype=torch.long), value)
    for group in torch.nonzero(sizes > 1).squeeze(1).tolist():
        members = groups == group
        rates = row_sparsity[members]
        if not bool((rates == rates[0]).all()):
            raise ValueError(f"rows of comparison group {group} have different sparsities")
        totals[group] = prune_counts(torch.tensor([int(sizes[group]) * columns]), float(rates[0]))[0]
    counts = torch.zeros(n_groups, widths.shape[0], dtype=torch.long)
    for group in range(n_groups):
        if totals[group] > 0:
            share = float(totals[group]) / (int(sizes[group]) * columns)
            counts[group] = prune_counts(widths * int(sizes[group]), share)
    return counts


class _BlockSelector:
    """Per-block selection of the lowest metrics in each comparison group (ties: lower index first)."""

    def __init__(self, groups: Tensor, device: torch.device) -> None:
        groups = groups.to(torch.long).to(device)
        sizes = torch.bincount(groups)
        self.groups = groups
        self.single_rows = torch.nonzero(sizes[groups] == 1).squeeze(1)
        self.single_groups = groups[self.single_rows]
        self.multi = [(int(g), torch.nonzero(groups == g).squeeze(1)) for g in torch.nonzero(sizes > 1).squeeze(1).tolist()]

    def keep(self, metric: Tensor, counts: Tensor) -> Tensor:
        """Keep-mask [rows, width] for one block; `counts` [G] is what each group prunes in it."""
        keep = torch.ones(metric.shape, dtype=torch.bool, device=metric.device)
        counts = counts.to(metric.device)
        if self.single_rows.numel():
            keep[self.single_rows] = _keep_all_but_lowest(metric[self.single_rows], counts[self.single_groups])
        for group, rows in self.multi:
            flat = metric[rows].reshape(1, -1)
            keep[rows] = _keep_all_but_lowest(flat, counts[group : group + 1]).reshape(rows.shape[0], -1)
        return keep


def sweep_prune(
    weight: Tensor,
    factor: Tensor,
    dead: Tensor,
    *,
    groups: Tensor | None = None,
    counts: Tensor | None = None,
    row_scale: Tensor | None = None,
    nm: tuple[int, int] | None = None,
    block: int = 128,
) -> tuple[Tensor, Tensor]:
    """SparseGPT's sweep with the mask chosen inside it: (updated weight, keep-mask), zeros exactly at ~keep.

    Unstructured (`nm` None): at the start of each block of columns, the saliency
    w_ij^2 / U_jj^2 * row_scale_i^2 of the already-updated weights picks, in each comparison group
    (`groups` [rows], ids 0..G-1), the `counts[g, block]` lowest (see `sweep_counts`) to prune.
    N:M: at every M-th column, the N lowest saliencies of each row among the next M (already updated
    by the columns before them) are pruned; `block` is rounded down to a multiple of M.
    Dead input channels (never non-zero) are zeroed first, so they are pruned first.
    """
    rows, columns = weight.shape
    device = weight.device
    factor = factor.to(device, torch.float32)
    updated = weight.detach().to(torch.float32).clone()
    updated[:, dead.to(device)] = 0.0
    diagonal = factor.diagonal()
    keep_all = torch.ones(rows, columns, dtype=torch.bool, device=device)
    if nm is not None:
        n, m = nm
        if columns % m:
            raise ValueError(f"N:M with M={m} needs the input size to be a multiple of {m}, got {columns}")
        block = max(m, block - block % m)
        selector = None
    else:
        if groups is None or counts is None:
            raise ValueError("unstructured selection needs groups and counts (see sweep_counts)")
        selector = _BlockSelector(groups, device)
        scale2 = None if row_scale is None else row_scale.to(device, torch.float32).pow(2).unsqueeze(1)
    bounds = block_bounds(columns, block)
    for index, (start, end) in enumerate(bounds):
        chunk = updated[:, start:end].T.contiguous()  # [width, rows]: a column is a contiguous row
        local = factor[start:end, start:end]
        inverse_d = 1.0 / diagonal[start:end]
        errors = torch.empty_like(chunk)
        if selector is not None:
            metric = (chunk * inverse_d.unsqueeze(1)).pow(2).T
            if scale2 is not None:
                metric = metric * scale2
            keep = selector.keep(metric.contiguous(), counts[:, index])  # type: ignore[index]
            keep_all[:, start:end] = keep
            chunk_scale = (~keep).T.to(torch.float32) * inverse_d.unsqueeze(1)
        else:
            chunk_scale = torch.empty_like(chunk)
        for offset in range(end - start):
            if selector is None and offset % m == 0:
                saliency = (chunk[offset : offset + m] * inverse_d[offset : offset + m].unsqueeze(1)).pow(2)  # [m, rows]
                lowest = torch.sort(saliency, dim=0, stable=True).indices[:n]  # ties: lower index first
                pruned = torch.zeros_like(saliency).scatter_(0, lowest, 1.0)
                keep_all[:, start + offset : start + offset + m] = (pruned == 0).T
                chunk_scale[offset : offset + m] = pruned * inverse_d[offset : offset + m].unsqueeze(1)
            error = torch.mul(chunk[offset], chunk_scale[offset], out=errors[offset])
            chunk[offset:].addr_(local[offset, offset:], error, alpha=-1)
        updated[:, start:end] = chunk.T
        if end < columns:
            updated[:, end:].addmm_(errors.T, factor[start:end, end:], alpha=-1)
    updated[~keep_all] = 0.0
    return updated.to(weight.dtype), keep_all


# --- neuron orders for N:M ---------------------------------------------------------------------------


def spread_order(score: Tensor, m: int) -> Tensor:
    """A permutation of the neurons (LongTensor [I]) that spreads the important ones over the N:M groups
    along down_proj's input: sorted by score, neuron of rank r goes to group r mod (I / M), so each group of
    M consecutive positions holds one neuron from each score band (the best M-quantile first)."""
    neurons = score.shape[0]
    if neurons % m:
        raise ValueError(f"{neurons} neurons do not split into groups of {m}")
    groups = neurons // m
    ranked = torch.argsort(-score.to(torch.float64), stable=True)
    # position p = group * m + band; rank r = band * groups + group
    return ranked.reshape(m, groups).T.reshape(-1)


def kept_metric(metric: Tensor, order: Tensor, n: int, m: int) -> Tensor:
    """Sum over rows of the metric an N:M mask keeps when the inputs are taken in `order` (float64 scalar)."""
    grouped = metric[:, order].to(torch.float64).reshape(metric.shape[0], -1, m)
    return torch.topk(grouped, m - n, dim=2).values.sum()


def balanced_order(metric: Tensor, score: Tensor, n: int, m: int, rounds: int = 20, seed: int = 0) -> Tensor:
    """A neuron order for N:M along down_proj's input that keeps more of the metric than `spread_order`:
    start from it, then in each round pair the groups at random and, in every pair, make the single
    exchange of one neuron between the two groups that most raises the metric the N:M mask keeps
    (summed over the rows), if any raises it (RIA-style channel permutation by local search).
    """
    rows, neurons = metric.shape
    positions = spread_order(score, m).reshape(-1, m).clone()  # [groups, m] neuron ids
    groups = positions.shape[0]
    if groups < 2:
        return positions.reshape(-1)
    metric = metric.to(torch.float64)
    generator = torch.Generator().manual_seed(seed)
    keep = m - n
    ii, jj = torch.meshgrid(torch.arange(m), torch.arange(m), indexing="ij")
    ii, jj = ii.reshape(-1), jj.reshape(-1)  # candidate exchange: slot ii of group a <-> slot jj of group b
    for _ in range(rounds):
        shuffled = torch.randperm(groups, generator=generator)
        pairs = groups // 2
        a, b = shuffled[:pairs], shuffled[pairs : 2 * pairs]
        left, right = metric[:, positions[a]], metric[:, positions[b]]  # [rows, pairs, m]
        current = torch.topk(left, keep, dim=2).values.sum((0, 2)) + torch.topk(right, keep, dim=2).values.sum((0, 2))
        cand_left = left.unsqueeze(2).repeat(1, 1, m * m, 1)  # [rows, pairs, m*m, m]
        cand_right = right.unsqueeze(2).repeat(1, 1, m * m, 1)
        slots = torch.arange(m * m)
        cand_left[:, :, slots, ii] = right[:, :, jj]
        cand_right[:, :, slots, jj] = left[:, :, ii]
        value = torch.topk(cand_left, keep, dim=3).values.sum((0, 3)) + torch.topk(cand_right, keep, dim=3).values.sum((0, 3))
        best_value, best = value.max(1)
        better = best_value > current * (1 + 1e-12)
        for pair in torch.nonzero(better).squeeze(1).tolist():
            i, j = int(ii[best[pair]]), int(jj[best[pair]])
            ga, gb = int(a[pair]), int(b[pair])
            positions[ga, i], positions[gb, j] = positions[gb, j].clone(), positions[ga, i].clone()
    return positions.reshape(-1)
