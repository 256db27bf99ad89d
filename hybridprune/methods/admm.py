"""Masks and weights solved together: ADMM on the layer objective, then a least-squares re-solve on the support.

For one matrix W [rows, n] and the Gram G [n, n] (damped, shrunk as the refine and the update use it), each row
w minimises (v - w)^T G (v - w) over v with a fixed number of non-zeros (the row's count in the starting mask)
or an N:M pattern. This is ALPS's splitting (Meng et al., NeurIPS 2024), written here for per-row counts:

    v-step  V = (G + rho I)^-1 (G w - u + rho d)       one eigendecomposition of G serves every rho
    d-step  D = projection of V + u / rho on the sparsity set (largest |.| per row, or per N:M group)
    u-step  u = u + rho (V - D)

in coordinates scaled by sqrt(diag G) (so |d| is Wanda's metric and G has unit diagonal), with rho raised
as the support settles (ALPS's schedule: by how many mask entries changed in the last steps). The support the
iteration ends on is then re-solved exactly on G by conjugate gradients (every row's kept weights, jointly),
so the result is never worse than the least-squares weights of that mask; a row where the starting mask, re-solved
the same way, does better keeps that (ADMM is a heuristic row by row).

It starts from the hybrid's masks (refined or not): their per-row counts are kept, so NeuronRank's allocation
over gate/up neurons and the q/k shift keep their say in how the sparsity is spread; ADMM chooses which
weights of each row carry it and what values they take. Pure tensor code.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from hybridprune.masks import _keep_all_but_lowest, mask_n_m
from hybridprune.methods.reconstruct import FLOAT64_BYTES, SPECTRAL_RANK, resolve_on_support, spectrum_of

RHO = 0.1  # the first penalty, in the unit-diagonal scale (ALPS's)
MAX_STEPS = 300
CHECK_EVERY = 3  # steps between two looks at the support (and rho updates)
MIN_STEPS = 30  # before this, a settled support does not end the iteration
SETTLED = 3e-4  # fraction of the kept entries that may still change once it has settled


@dataclass
class AdmmReport:
    """What one solve did: steps taken, the final rho, the objective (unit-diagonal scale) at ADMM's last iterate
    and after the re-solve, and how many rows kept their starting mask."""

    steps: int
    rho: float
    error_admm: float
    error_final: float
    rows_kept_start: int


def project(values: Tensor, prune: Tensor | None, nm: tuple[int, int] | None) -> Tensor:
    """Keep-mask of `values` [rows, n] on the sparsity set: each row loses its prune[r] smallest |.|, or per N:M."""
    magnitude = values.abs()
    if nm is not None:
        return mask_n_m(magnitude, *nm)
    assert prune is not None
    return _keep_all_but_lowest(magnitude, prune)


def objective(weight: Tensor, solution: Tensor, gram: Tensor) -> Tensor:
    """Per row, (v - w)^T G (v - w): the layer output's squared error on the calibration tokens."""
    delta = (solution - weight).to(torch.float64)
    return ((delta @ gram.to(torch.float64)) * delta).sum(1)


def admm_prune(weight: Tensor, keep: Tensor, gram: Tensor, nm: tuple[int, int] | None = None,
               max_steps: int = MAX_STEPS, rho: float = RHO) -> tuple[Tensor, Tensor, AdmmReport]:
    """(weights [rows, n] in weight's dtype, zero off the mask; the mask; a report) for W, a starting mask, G.

    `keep` fixes how many weights each row keeps (unstructured) and is where the iteration starts; with `nm` the
    set is N:M over each row's inputs (n pruned of every m) and `keep` must already follow it. `gram` is the
    damped, shrunk X^T X [n, n]."""
    rows, width = weight.shape
    if keep.shape != weight.shape or gram.shape != (width, width):
        raise ValueError(f"shapes: weight {tuple(weight.shape)}, keep {tuple(keep.shape)}, gram {tuple(gram.shape)}")
    device = weight.device
    # float64 where one n x n float64 matrix fits FLOAT64_BYTES (as the factorization of the update), else float32
    gram = gram.to(device, torch.float64 if width * width * 8 <= FLOAT64_BYTES else torch.float32)
    scale = gram.diagonal().clamp_min(1e-30).sqrt()
    unit = gram / scale.unsqueeze(0) / scale.unsqueeze(1)  # unit diagonal: |scaled weight| is Wanda's metric
    del gram
    eigenvalues, basis = torch.linalg.eigh(unit)
    eigenvalues = eigenvalues.clamp_min(0).to(torch.float32)
    basis = basis.to(torch.float32)
    unit = unit.to(torch.float32)
    keep = keep.to(device)
    prune = None if nm is not None else (~keep).sum(1)
    kept = max(int(keep.sum()), 1)
    start = weight.to(torch.float32) * scale.to(torch.float32)
    target = start @ unit  # G w per row
    solution = start * keep
    support = keep.clone()
    dual = torch.zeros_like(start)
    started_rising = False
    steps, new_support = 0, keep
    for steps in range(1, max_steps + 1):
        rhs = target - dual + rho * solution
        value = ((rhs @ basis) / (eigenvalues + rho)) @ basis.T
        shifted = value + dual / rho
        new_support = project(shifted, prune, nm)
        solution = shifted * new_support
        dual.add_(value - solution, alpha=rho)
        if steps % CHECK_EVERY:
            continue
        changed = int((new_support != support).sum())
        support = new_support
        # ALPS's schedule: raise rho faster while the support moves a lot, stop once it has settled
        if changed > 0.1 * kept:
            rho, started_rising = rho * 1.3, True
        elif changed > 0.005 * kept:
            rho, started_rising = rho * 1.2, True
        elif changed > 0:
            rho = rho * 1.1 if started_rising else rho / 5
        elif started_rising:
            break
        else:
            rho /= 5
        rho = min(rho, 1e6)
        if steps >= MIN_STEPS and changed < SETTLED * kept:
            break
    final = new_support  # the last projection: exact per-row counts (or N:M)
    error_admm = float(objective(start, solution * final, unit).sum())
    # the re-solves preconditioned by the largest eigen-directions, here exact (least_squares': gram_spectrum)
    rank = min(SPECTRAL_RANK, width // 2)
    spectrum = spectrum_of(torch.ones_like(start[0]), eigenvalues[-rank:], basis[:, -rank:]) if rank else None
    solved = resolve_on_support(unit, target, final, solution, preconditioner=spectrum)
    # ADMM is a heuristic row by row: where the starting mask re-solved the same way does better, that row keeps it
    # (so no row ends worse than the least-squares weights of the hybrid's own mask)
    fallback = resolve_on_support(unit, target, keep, start * keep, preconditioner=spectrum)
    errors, fallback_errors = objective(start, solved, unit), objective(start, fallback, unit)
    better = fallback_errors < errors
    if bool(better.any()):
        final = torch.where(better.unsqueeze(1), keep, final)
        solved = torch.where(better.unsqueeze(1), fallback, solved)
    error_final = float(torch.minimum(errors, fallback_errors).sum())
    result = (solved / scale.to(torch.float32)) * final
    return result.to(weight.dtype), final, AdmmReport(steps, rho, error_admm, error_final, int(better.sum()))
