"""Weight updates for a fixed mask: the optimal-brain-surgeon sweep and the least-squares optimum.

After a mask is chosen (by Wanda / NeuronRank), the kept weights of each row are adjusted so
the layer's output on the calibration inputs moves as little as possible.

- `reconstruct` (SparseGPT's column sweep, mask given): pruning column j's weights is compensated on the
  columns after it through the inverse Hessian H^-1, H = X^T X (a sum over tokens, like every other
  statistic here). Sequential: a kept weight before column j is never revisited, so the result is not the
  optimum of the mask.
- `least_squares`: the optimum itself, argmin over v (v = 0 off the mask) of (v - w)^T H (v - w) per row,
  by conjugate gradients preconditioned by H's diagonal (no factorization). On SmolLM2's cached Grams at 50% it
  removes 1.6x (Gram shrunk to 0.25) to 1.5x (unshrunk) the sweep's error reduction, converged in 5-25
  steps (docs/results.md, "The least-squares update"; chosen for `quality`: benchmarks/validation_choices.md, 13).
  Preconditioned by the Gram's diagonal and its largest eigen-directions (`gram_spectrum`), per row exactly on
  that row's support (Woodbury): about half the steps of the diagonal alone to the same objective (SPECTRAL_RANK).
- `keep_columns`: that optimum when one column mask serves every row (structured removal of whole neurons or
  heads): one k x k Cholesky solve, exact.

Pure tensor code.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

CG_STEPS = 25
"""Conjugate-gradient steps at most per least-squares solve (each one rows x n x n multiply-adds)."""
CG_TOLERANCE = 1e-5
"""Relative residual at which a least-squares solve stops early."""
CG_SETTLE = 1e-3
"""`least_squares` also stops once a step lowers the objective by less than this fraction of what the steps before
it removed: on Qwen2.5-1.5B's and SmolLM2's cached Grams the error is then within 0.5% of the converged one's gain
(10-15 steps at the 0.5-shrunk Gram, 5 at 0.25, where the residual test took 25). Under a `Spectrum` it stops a step
sooner: once what the preconditioner estimates is left (r^T P r / sigma, exact where the spectrum is the whole Gram;
the shrunk Grams' other eigenvalues, >= 1 - offdiag, bound it within 2x) is below this fraction of what was
removed, rather than taking the step that would show it (`python benchmarks/lsq_steps.py real` on 32 real cases at
rank 16: 118 steps against 143 with the confirming step at a29d49a, 0.9993-0.99995 of the converged decrease
against 0.99957-1.0, 2026-12-07)."""

SPECTRAL_RANK = 16
"""Largest eigen-directions of the unit-diagonal Gram the least-squares update's preconditioner takes in besides
its diagonal (0: the diagonal alone). On 32 real cases of SmolLM2 and Qwen2.5-1.5B (16 input groups; Wanda masks at
50% under the 0.25-shrunk Gram, 2:4 under 0.5) the stopping rule ends after 118 steps in all where the diagonal alone
took 228 (8 directions: 135; 32: 105, at 4x the per-row set-up), at 0.9993-0.99995 of the converged decrease
(2026-12-07, `python benchmarks/lsq_steps.py real`)."""
SPECTRAL_PASSES = 4
"""Subspace-iteration passes that find those directions (rank + 8 vectors; each pass one n x n x (rank + 8) product).
They need not be exact: any orthonormal directions give a symmetric positive definite preconditioner."""


def fast_low_precision(device: torch.device) -> torch.dtype | None:
    """bfloat16 where its matrix products are much faster than float32's: CUDA, CPUs with AMX tiles (an Intel Xeon,
    one thread, 2048 x 4096 @ 4096 x 4096: 986 against 180 GFLOPS) and CPUs with AVX-512 BF16 dot products (an AMD
    EPYC, 2 threads: 411 against 191 GFLOPS, 2026-12-07, `python benchmarks/refine_pool.py products`); None (float32)
    elsewhere, where bfloat16 products on a CPU are slower. torch exposes both checks only privately: without them,
    float32."""
    if device.type == "cuda":
        return torch.bfloat16
    if device.type == "cpu" and any(getattr(torch.cpu, check, lambda: False)()
                                    for check in ("_is_amx_tile_supported", "_is_avx512_bf16_supported")):
        return torch.bfloat16
    return None


FLOAT64_BYTES = 2**30
"""The factorization runs in float64 while one n x n float64 matrix takes at most this many bytes (n <= 11585:
every validated model), in float32 above (SparseGPT's precision), where float64 n x n buffers would exceed
the per-layer memory goal (70B down_proj: 6.6 GB each)."""


def inverse_hessian_factor(gram: Tensor, damping: float = 0.01) -> tuple[Tensor, Tensor]:
    """Upper Cholesky factor of (H + lambda I)^-1 and the mask of dead input channels (never seen non-zero)."""
    hessian = gram.to(torch.float64).clone()
    dead = torch.diag(hessian) == 0
    hessian[dead, dead] = 1.0
    hessian.diagonal().add_(damping * torch.diag(hessian).mean())
    return inverse_factor(hessian), dead


def inverse_factor(gram: Tensor) -> Tensor:
    """The upper Cholesky factor U of G^-1 (U^T U = G^-1), float32, for a damped Gram G (consumed: freed early).

    With J the reversal of the inputs: if J G J = M M^T (Cholesky), then U = J M^-1 J. One Cholesky and one
    triangular inverse (2n^3/3 flops) instead of SparseGPT's Cholesky, inverse from it and second Cholesky
    (4n^3/3): the same U to 1e-15 relative in float64, in half the time (2048 inputs on 2 cores: 1.0 s
    against 2.2 s). Runs in float64 where one n x n float64 matrix fits FLOAT64_BYTES, else in float32."""
    width = gram.shape[0]
    dtype = torch.float64 if width * width * 8 <= FLOAT64_BYTES else torch.float32
    flipped = gram.to(dtype).flip(0, 1)
    del gram
    lower = torch.linalg.cholesky(flipped)
    del flipped
    inverse = torch.eye(width, dtype=dtype, device=lower.device)
    torch.linalg.solve_triangular(lower, inverse, upper=False, out=inverse)  # in place: no third n x n buffer
    del lower
    return inverse.flip(0, 1).to(torch.float32)


def reconstruct(weight: Tensor, keep: Tensor, gram: Tensor, damping: float = 0.01) -> Tensor:
    """The weight [out, in] with pruned entries zero and kept entries updated to compensate.

    `keep` is the bool mask [out, in] (True = keep); `gram` is sum_t x_t x_t^T [in, in].
    The result is zero wherever ~keep, and also in the columns of dead input channels (never non-zero
    on the calibration inputs): those weights contributed nothing there, so they are dropped too.
    Every other kept weight stays (in general non-zero).
    """
    return reconstruct_with_factor(weight, keep, *inverse_hessian_factor(gram, damping))


def reconstruct_with_factor(weight: Tensor, keep: Tensor, factor: Tensor, dead: Tensor, block: int = 128) -> Tensor:
    """`reconstruct` from the factor and dead channels of `inverse_hessian_factor` (computed once, cached).

    Rows are independent, so matrices that read the same inputs can be stacked and updated in one
    call. Each block of columns is worked on transposed (a column is then a contiguous row) with
    in-place rank-1 updates.
    """
    factor = factor.to(weight.device, torch.float32)
    updated = weight.detach().to(torch.float32).clone()
    updated[:, dead.to(weight.device)] = 0.0
    scale = (~keep).to(torch.float32) / factor.diagonal()  # error of column j = w_j * scale_j
    columns = updated.shape[1]
    for start in range(0, columns, block):
        end = min(start + block, columns)
        chunk = updated[:, start:end].T.contiguous()
        chunk_scale = scale[:, start:end].T.contiguous()
        errors = torch.empty_like(chunk)
        local = factor[start:end, start:end]
        for offset in range(end - start):
            error = torch.mul(chunk[offset], chunk_scale[offset], out=errors[offset])
            chunk[offset:].addr_(local[offset, offset:], error, alpha=-1)
        updated[:, start:end] = chunk.T
        updated[:, end:].addmm_(errors.T, factor[start:end, end:], alpha=-1)
    updated[~keep] = 0.0
    return updated.to(weight.dtype)


def keep_columns(weight: Tensor, keep: Tensor, gram: Tensor) -> Tensor:
    """The weight [out, in] with the input columns ~`keep` removed (zero) and the kept ones at the least-squares
    optimum: argmin over V (V[:, ~keep] = 0) of tr((V - W) G (V - W)^T) for the damped `gram` G [in, in].

    One column mask for every row (whole neurons or heads removed), so the optimum is one solve shared by all rows:
    V_K = W_K + W_P G[P, K] G[K, K]^-1 (K kept, P removed), one k x k Cholesky where `reconstruct` factors the
    whole n x n Gram and then sweeps the columns in order, never revisiting a kept column before a removed one.
    Inputs never seen non-zero keep their weight (their only Gram entry is the damped diagonal). Float64 where
    one k x k float64 matrix fits FLOAT64_BYTES, float32 above."""
    keep = keep.to(torch.bool).cpu()
    if keep.dim() != 1 or keep.shape[0] != weight.shape[1] or gram.shape != (weight.shape[1],) * 2:
        raise ValueError(f"shapes: weight {tuple(weight.shape)}, keep {tuple(keep.shape)}, gram {tuple(gram.shape)}")
    kept, removed = keep.nonzero().squeeze(1), (~keep).nonzero().squeeze(1)
    result = torch.zeros_like(weight)
    if len(kept) == 0:
        return result
    dtype = torch.float64 if len(kept) ** 2 * 8 <= FLOAT64_BYTES else torch.float32
    device = weight.device
    kept_d, removed_d = kept.to(gram.device), removed.to(gram.device)
    lower = torch.linalg.cholesky(gram[kept_d][:, kept_d].to(device, dtype))
    coupling = gram[kept_d][:, removed_d].to(device, dtype)  # G[K, P]
    # (W_P G[P, K] G[K, K]^-1)^T = G[K, K]^-1 G[K, P] W_P^T
    shift = torch.cholesky_solve(coupling @ weight[:, removed.to(device)].to(dtype).T, lower)
    del lower, coupling
    result[:, kept.to(device)] = (weight[:, kept.to(device)].to(dtype) + shift.T).to(weight.dtype)
    return result


def aim_at_dense(weight: Tensor, own: Tensor, cross: Tensor, damping: float) -> Tensor:
    """The weight [out, in] rescaled per input column so that this layer's inputs in the pruned model reproduce,
    column by column, what the dense model's inputs of the same tokens gave (sequential pruning with dense
    targets: earlier layers are pruned, so the inputs X_p [tokens, in] differ from the dense model's X_d):

        V[:, j] = W[:, j] (c_j + lambda) / (g_j + lambda),   c = sum_t x_p x_d,  g = sum_t x_p^2  (`cross`, `own`, [in])
        lambda = damping * mean(g)

    the least squares of the dense targets x_d,j W[:, j] from x_p,j one input at a time, pulled toward W by lambda.
    Where x_p is x_d it is W; where the pruned stream has drifted (uncorrelated, or larger) it shrinks the
    column, the regression's dilution. One scalar per input, not a matrix: the full least squares
    V = W C^T (X_p^T X_p)^-1 fitted the calibration text and multiplied SmolLM2's perplexity by 2.2x-45x (2026-12-06,
    docs/results.md), and it needs two n x n sums per input group where this needs two vectors."""
    width = weight.shape[1]
    if own.shape != (width,) or cross.shape != (width,):
        raise ValueError(f"shapes: weight {tuple(weight.shape)}, own {tuple(own.shape)}, cross {tuple(cross.shape)}")
    own, cross = own.to(torch.float64), cross.to(torch.float64)
    mean = float(own.mean())
    shift = damping * mean if mean > 0 else 1.0
    scale = (cross + shift) / (own + shift)
    work = torch.promote_types(weight.dtype, torch.float32)
    return (weight.to(work) * scale.to(weight.device, work)[None, :]).to(weight.dtype)


def shrink_update(pruned: Tensor, updated: Tensor, shrink: float) -> Tensor:
    """pruned + shrink * (updated - pruned): the OBS update scaled toward the mask-only weights.

    `pruned` is the dense weight times the mask, `updated` the reconstructed weight (same zeros);
    shrink 1 is the full update, 0 none. The update is fitted to the calibration text's X^T X, so a
    partial step trades in-domain error for robustness on other text.
    """
    if pruned.shape != updated.shape:
        raise ValueError(f"shapes differ: {tuple(pruned.shape)} vs {tuple(updated.shape)}")
    if shrink == 1.0:
        return updated
    result = pruned.to(torch.float32) + shrink * (updated.to(torch.float32) - pruned.to(torch.float32))
    return result.to(updated.dtype)


@dataclass(frozen=True)
class Spectrum:
    """G ~ sigma D^1/2 (I + V diag(excess) V^T) D^1/2: `scale` = D^-1/2 [n] (D = diag G), `vectors` V [n, k] the
    largest eigenvectors of the unit-diagonal C = D^-1/2 G D^-1/2 (orthonormal), `excess` [k] their eigenvalues over
    `sigma`, the mean of C's other eigenvalues, less one (> 0); `sigma` also scales the stopping rule's estimate
    (CG_SETTLE). From `gram_spectrum` or `spectrum_of`."""

    scale: Tensor
    vectors: Tensor
    excess: Tensor
    sigma: float = 1.0


def gram_spectrum(gram: Tensor, rank: int | None = None, passes: int = SPECTRAL_PASSES) -> Spectrum | None:
    """The `Spectrum` of the (damped, float32) `gram` by subspace iteration from a seeded random start (the same
    directions every run), applied as s * (G (s * q)) without an n x n copy; None where rank (None: SPECTRAL_RANK)
    is 0, the Gram is too narrow to gain from it (n <= 2 rank: the diagonal alone), or no direction stands above the
    rest."""
    rank = SPECTRAL_RANK if rank is None else rank
    width = gram.shape[0]
    if rank <= 0 or width <= 2 * rank:
        return None
    scale = gram.diagonal().clamp_min(1e-30).rsqrt()

    def unit(block: Tensor) -> Tensor:  # C @ block
        return scale[:, None] * (gram @ (scale[:, None] * block))

    start = torch.randn(width, min(width, rank + 8), generator=torch.Generator().manual_seed(0))
    basis = torch.linalg.qr(start.to(gram.device, gram.dtype))[0]
    for _ in range(passes):
        basis = torch.linalg.qr(unit(basis))[0]
    values, rotation = torch.linalg.eigh(basis.T @ unit(basis))  # ascending
    return spectrum_of(scale, values[-rank:], basis @ rotation[:, -rank:])


def spectrum_of(scale: Tensor, values: Tensor, vectors: Tensor) -> Spectrum | None:
    """The `Spectrum` of a Gram with diagonal 1 / scale^2 from the largest eigenpairs of its unit-diagonal form
    (`values` [k] ascending, `vectors` [n, k]); None where none stands above the mean of the others."""
    width, rank = vectors.shape
    sigma = ((width - values.sum()) / (width - rank)).clamp_min(1e-6)  # trace C = n
    excess = values / sigma - 1
    chosen = excess > 1e-3
    if not bool(chosen.any()):
        return None
    return Spectrum(scale, vectors[:, chosen].contiguous(), excess[chosen], float(sigma))


def _woodbury_factor(spectrum: Spectrum, scaling: Tensor) -> Tensor:
    """Per row r, the Cholesky factor of diag(1 / excess) + V_S^T V_S (S the row's support) [rows, k, k], from
    `scaling` = keep * D^-1/2 [rows, n]: with it (I + V_S diag(excess) V_S^T)^-1 = I - V_S M^-1 V_S^T, each row's
    preconditioner exactly on its own support."""
    vectors = spectrum.vectors
    width, rank = vectors.shape
    # V_S^T V_S = sum_j keep_j v_j v_j^T: keep = scaling / scale, so one [rows, n] x [n, k^2] product
    pairs = (vectors[:, :, None] * vectors[:, None, :]).reshape(width, rank * rank) / spectrum.scale[:, None]
    inner = (scaling @ pairs).view(-1, rank, rank)
    inner.diagonal(dim1=1, dim2=2).add_(1.0 / spectrum.excess)
    return torch.linalg.cholesky(inner)


def resolve_on_support(gram: Tensor, target: Tensor, keep: Tensor, start: Tensor | None, steps: int = CG_STEPS,
                       tolerance: float = CG_TOLERANCE, settle: float = 0.0, products: torch.dtype | None = None,
                       preconditioner: Tensor | Spectrum | None = None) -> Tensor:
    """argmin over v with v = 0 off `keep` of (v - w)^T G (v - w), per row, by conjugate gradients from `start`
    (None: from zero, which saves the first n x n product).

    `target` is w G (rows x n, the right-hand side); rows are solved together (one n x n product per step).
    The restricted system is G_SS v_S = (G w)_S; the iteration stays on the support by masking. It stops after
    `steps`, when every row's residual is below `tolerance` (relative, in the preconditioned norm), or when a step
    lowers the objective (summed over rows) by less than `settle` times what the steps before it removed (under a
    `Spectrum`: or what it estimates is left is, CG_SETTLE). `products`:
    the dtype of the step's n x n product (bfloat16 where that is fast, `fast_low_precision`); the residual and the
    iterate stay float32. `preconditioner` [n]: 1 / diag G (Jacobi), the same iterates as plain conjugate gradients on
    the unit-diagonal D^-1/2 G D^-1/2 without that n x n copy; a `Spectrum` of G: that and G's largest eigen-directions,
    per row the exact inverse of the spectrum's approximation of G on the row's support (`_woodbury_factor`); None:
    plain (G is unit-diagonal already, or small)."""
    low = _converted(gram, products) if products is not None else gram
    spectral = isinstance(preconditioner, Spectrum)
    # off the support the residual is left as it comes (never read): z = residual * scaling is zero there, and so
    # are the directions and the solution, so the n x n product needs no masking
    scaling = keep.to(target.dtype)
    if spectral:
        scaling.mul_(preconditioner.scale)
        factor = _woodbury_factor(preconditioner, scaling)
    elif preconditioner is not None:
        scaling.mul_(preconditioner)
    if start is None:
        solution = torch.zeros_like(target)
        residual = target.clone()
    else:
        solution = start * keep
        residual = target - solution @ gram
    # every [rows, n] buffer of a step is made once and written in place: a fresh float32 -> bfloat16 copy took
    # 97 ms per 16384 x 4096 matrix against 14 ms into a kept buffer
    # (2 cores, 2026-12-07)
    product = torch.empty_like(target)  # the step's n x n product; between steps the preconditioner's scratch

    def precondition(vector: Tensor, out: Tensor) -> Tensor:
        torch.mul(vector, scaling, out=out)
        if spectral:  # y = D^-1/2 r on S, then (y - V_S M^-1 V_S^T y) D^-1/2 on S
            coefficients = torch.cholesky_solve((out @ preconditioner.vectors).unsqueeze(2), factor).squeeze(2)
            torch.matmul(coefficients, preconditioner.vectors.T, out=product)
            out.sub_(product).mul_(scaling)
        return out

    z = precondition(residual, torch.empty_like(target))
    direction = z.clone()
    rr = row_dots(residual, z)
    if start is None:
        stop = (tolerance ** 2) * rr.clamp_min(1e-30)
    else:
        stop = (tolerance ** 2) * row_dots(target, precondition(target, direction.clone())).clamp_min(1e-30)
    if products is not None:
        low_direction = torch.empty(target.shape, dtype=products, device=target.device)
        low_product = torch.empty(target.shape, dtype=products, device=target.device)
    removed = 0.0
    for _ in range(steps):
        if bool((rr <= stop).all()):
            break
        if products is not None:
            low_direction.copy_(direction)
            product.copy_(torch.matmul(low_direction, low, out=low_product))
        else:
            torch.matmul(direction, gram, out=product)
        curvature = row_dots(direction, product)
        alpha = torch.where(curvature > 0, rr / curvature.clamp_min(1e-30), torch.zeros_like(rr))
        solution.addcmul_(alpha.unsqueeze(1), direction)
        residual.addcmul_(alpha.unsqueeze(1), product, value=-1)
        decrease = float((alpha * rr).sum())  # what this step took off (v - w)^T G (v - w), over all rows
        precondition(residual, z)
        rr_next = row_dots(residual, z)
        beta = torch.where(rr > 0, rr_next / rr.clamp_min(1e-30), torch.zeros_like(rr))
        torch.addcmul(z, beta.unsqueeze(1), direction, out=direction)  # z + beta * direction, in one pass
        rr = rr_next
        if settle and removed > 0 and decrease <= settle * removed:
            break
        removed += decrease
        # rr = r^T P r is sigma times what the spectrum estimates a full solve would still remove
        if settle and spectral and float(rr.sum()) <= settle * preconditioner.sigma * removed:
            break
    return solution


def row_dots(a: Tensor, b: Tensor) -> Tensor:
    """Per row, a_i . b_i ([rows, n] each) as one batched matrix product, without the [rows, n] temporary that
    torch.linalg.vecdot and (a * b).sum(1) fill first: 49 against vecdot's 125 ms per 16384 x 4096 float32 pair where
    that temporary's pages fault in one by one; under transparent huge pages (hybridprune/env.py sets them, unless
    torch was imported first) within noise either way (52 / 48 against 41 / 60 ms in two runs, 6144 x 4096 up to 4 ms
    slower); `python benchmarks/lsq_steps.py dots` at load 3, AMD EPYC, 2026-12-07."""
    return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).view(-1)


def _converted(tensor: Tensor, dtype: torch.dtype) -> Tensor:
    """`tensor` in `dtype`, copied into a new buffer (7x faster than .to() for float32 -> bfloat16 here)."""
    return torch.empty(tensor.shape, dtype=dtype, device=tensor.device).copy_(tensor)


def least_squares(weight: Tensor, keep: Tensor, gram: Tensor, *, target: Tensor | None = None, steps: int = CG_STEPS,
                  tolerance: float = CG_TOLERANCE, settle: float = CG_SETTLE,
                  products: torch.dtype | None | str = "auto", spectrum: Spectrum | None | str = "auto") -> Tensor:
    """The weight [out, in] with pruned entries zero and kept entries at the least-squares optimum of the mask.

    Per row, argmin over v (v = 0 off `keep`) of (v - w)^T G (v - w) for the damped `gram` G [in, in] (float32),
    by conjugate gradients preconditioned by G's diagonal (in the coordinates where G has a unit diagonal, |w| is
    Wanda's metric and the iteration converges in a few steps) and its largest eigen-directions (`spectrum`: "auto"
    computes `gram_spectrum` here, a caller solving several chunks of rows on one Gram computes it once and hands it
    to each; None: the diagonal alone), solved for the change d of the kept weights:
    G_SS d_S = (G p)_S for the pruned part p = w * ~keep, from d = 0. `target`: p G [out, in] where the caller has it
    (the swap refinement ends with exactly this residual, in float32), which saves the one n x n product that makes
    it. `products` "auto": bfloat16 n x n products where they are fast (`fast_low_precision`; on the probes in
    docs/results.md the same objective to 4 digits at a third of the time), else float32.
    Unlike `reconstruct`, inputs never seen non-zero keep their weight where the mask keeps it (G's only entry there
    is its damped diagonal, which pins the weight to its dense value)."""
    if keep.shape != weight.shape or gram.shape != (weight.shape[1],) * 2:
        raise ValueError(f"shapes: weight {tuple(weight.shape)}, keep {tuple(keep.shape)}, gram {tuple(gram.shape)}")
    keep = keep.to(weight.device)
    gram = gram.to(weight.device, torch.float32)
    if products == "auto":
        products = fast_low_precision(weight.device)
    start = weight.to(torch.float32)
    if target is None:
        # one n x n product (in `products`' dtype: its rounding moves the objective by about its square, 1e-5 of the
        # gain) where w G and the start's residual took two in float32, each several of the steps' time
        # (Llama-3.1-8B's down_proj here: 8.8 s float32 against 1.9 s bfloat16 per product)
        pruned = start * ~keep
        if products is not None:
            target = (_converted(pruned, products) @ _converted(gram, products)).to(torch.float32)
        else:
            target = pruned @ gram
        del pruned
    elif target.shape != weight.shape:
        raise ValueError(f"shapes: weight {tuple(weight.shape)}, target {tuple(target.shape)}")
    if isinstance(spectrum, str):
        spectrum = gram_spectrum(gram)
    preconditioner = spectrum if spectrum is not None else 1.0 / gram.diagonal().clamp_min(1e-30)
    change = resolve_on_support(gram, target.to(torch.float32), keep, None, steps, tolerance, settle, products,
                                preconditioner)
    return ((start + change) * keep).to(weight.dtype)
