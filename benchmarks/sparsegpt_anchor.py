"""SparseGPT's own per-layer work, as the anchor of benchmarks/scale.py (not part of the product).

Written from the paper (Frantar & Alistarh 2023, "SparseGPT: Massive Language Models Can Be Accurately
Pruned in One-Shot", Algorithm 1) and the reference code's `SparseGPT.fasterprune`
(github.com/IST-DASLab/sparsegpt, sparsegpt.py): per Linear, from H = X^T X of its inputs,
  1. dead inputs (H_jj = 0) get H_jj = 1 and their weights zeroed; H += 1% mean(diag H) I;
  2. U = upper Cholesky factor of H^-1 (cholesky, cholesky_inverse, cholesky upper), in float32;
  3. a sweep over blocks of 128 columns: at the start of a block, the block's mask prunes the
     lowest w_ij^2 / U_jj^2 over the whole block (all rows x 128 columns: unstructured, 50%); then column
     by column, the pruned weights' error (w - q) / U_jj is spread over the block's later columns
     (rank-1 updates with row j of U), and after the block over all later columns (one matmul).
Differences from the reference code, none of which changes the amount of work: (a) the factor is computed
once per input group (q/k/v share it, gate/up share it; the reference computes it once per Linear);
(b) the block is worked on transposed, so that a column is a contiguous row on the CPU (the product's
methods/reconstruct.py does the same); (c) the block's mask prunes exactly floor(rows * width * sparsity)
weights (topk; the reference's `<= sorted[k]` prunes k + 1), so the sparsity is exact.
"""

from __future__ import annotations

import torch
from torch import Tensor


def inverse_factor(gram: Tensor, percdamp: float = 0.01) -> tuple[Tensor, Tensor]:
    """(U, dead): U upper with U^T U = (H + damp I)^-1, float32 as in the reference; dead = never-seen inputs."""
    hessian = gram.to(torch.float32).clone()
    dead = torch.diag(hessian) == 0
    hessian[dead, dead] = 1.0
    hessian.diagonal().add_(percdamp * torch.diag(hessian).mean())
    lower = torch.linalg.cholesky(hessian)
    del hessian
    inverse = torch.cholesky_inverse(lower)
    del lower
    return torch.linalg.cholesky(inverse, upper=True), dead


def sweep(weight: Tensor, factor: Tensor, dead: Tensor, sparsity: float = 0.5, blocksize: int = 128) -> Tensor:
    """SparseGPT's column sweep (unstructured, mask chosen per block): the pruned and updated weight (float32)."""
    w = weight.detach().to(torch.float32).clone()
    w[:, dead] = 0.0
    rows, columns = w.shape
    diagonal = factor.diagonal()
    for start in range(0, columns, blocksize):
        end = min(start + blocksize, columns)
        count = end - start
        block = w[:, start:end].T.contiguous()  # [count, rows]
        local = factor[start:end, start:end]
        d = diagonal[start:end]
        saliency = (block / d.unsqueeze(1)).pow(2)
        pruned = torch.zeros(count * rows, dtype=torch.bool)
        k = int(count * rows * sparsity)
        if k:
            pruned[torch.topk(saliency.reshape(-1), k, largest=False).indices] = True
        pruned = pruned.reshape(count, rows)
        errors = torch.empty_like(block)
        for i in range(count):
            column = block[i]
            q = column.masked_fill(pruned[i], 0.0)
            error = torch.div(column - q, d[i], out=errors[i])
            block[i:].addr_(local[i, i:], error, alpha=-1)  # column i becomes q exactly (up to rounding)
            block[i] = q
        w[:, start:end] = block.T
        if end < columns:
            w[:, end:].addmm_(errors.T, factor[start:end, end:], alpha=-1)
    return w


def _sweep_plain(weight: Tensor, factor: Tensor, dead: Tensor, sparsity: float = 0.5, blocksize: int = 128) -> Tensor:
    """The reference code's loop as written there (columns of W1 [rows, count], Q1 and Err1), for the check."""
    w = weight.detach().to(torch.float32).clone()
    w[:, dead] = 0.0
    rows, columns = w.shape
    for i1 in range(0, columns, blocksize):
        i2 = min(i1 + blocksize, columns)
        w1, hinv1 = w[:, i1:i2].clone(), factor[i1:i2, i1:i2]
        q1, err1 = torch.zeros_like(w1), torch.zeros_like(w1)
        tmp = (w1**2 / torch.diag(hinv1).reshape(1, -1) ** 2).T.reshape(-1)  # ordered as in `sweep` for equal ties
        mask1 = torch.zeros_like(tmp, dtype=torch.bool)
        mask1[torch.topk(tmp, int(tmp.numel() * sparsity), largest=False).indices] = True
        mask1 = mask1.reshape(i2 - i1, rows).T
        for i in range(i2 - i1):
            col, d = w1[:, i], hinv1[i, i]
            q = col.clone()
            q[mask1[:, i]] = 0
            q1[:, i] = q
            err = (col - q) / d
            w1[:, i:] -= err.unsqueeze(1).matmul(hinv1[i, i:].unsqueeze(0))
            err1[:, i] = err
        w[:, i1:i2] = q1
        w[:, i2:] -= err1.matmul(factor[i1:i2, i2:])
    return w


def prune_group(weights: list[Tensor], gram: Tensor, sparsity: float = 0.5) -> tuple[list[Tensor], float, float]:
    """One input group (the Linears that read the same inputs): (pruned weights, seconds of the inverse,
    seconds of the sweeps)."""
    import time

    started = time.perf_counter()
    factor, dead = inverse_factor(gram)
    inverted = time.perf_counter()
    pruned = [sweep(weight, factor, dead, sparsity) for weight in weights]
    return pruned, inverted - started, time.perf_counter() - inverted


def self_check(seed: int = 0) -> dict[str, float]:
    """On a tiny random layer with correlated inputs: exact 50% sparsity, and an output error on the calibration
    inputs below Wanda's (per-row |W| ||x_j||) and below plain magnitude. Raises AssertionError otherwise."""
    generator = torch.Generator().manual_seed(seed)
    rows, columns, tokens = 96, 320, 2048
    mixing = torch.randn(columns, columns, generator=generator) / columns**0.5
    x = torch.randn(tokens, columns, generator=generator) @ (torch.eye(columns) + mixing)
    x[:, 7] = 0.0  # one dead input channel
    weight = torch.randn(rows, columns, generator=generator)
    gram = x.T @ x
    (pruned,), _, _ = prune_group([weight], gram, 0.5)
    zeros = int((pruned == 0).sum())
    assert zeros == rows * columns // 2, zeros  # 320 columns = 2.5 blocks: each block prunes exactly half
    norms = x.pow(2).sum(0).sqrt()
    metric = weight.abs() * norms
    keep = torch.ones_like(weight, dtype=torch.bool)
    keep.scatter_(1, torch.topk(metric, columns // 2, dim=1, largest=False).indices, False)
    wanda = weight * keep

    def error(w: Tensor) -> float:
        return float(((x @ (weight - w).T) ** 2).sum())

    plain = _sweep_plain(weight, *inverse_factor(gram))
    assert torch.equal(plain == 0, pruned == 0), "the transposed sweep chose other weights than the reference's loop"
    assert torch.allclose(plain, pruned, rtol=1e-4, atol=1e-4 * float(weight.abs().max())), "the updates differ"
    result = {"zeros": zeros, "weights": rows * columns, "sparsegpt_error": error(pruned), "wanda_error": error(wanda)}
    assert result["sparsegpt_error"] < result["wanda_error"], result
    return result
