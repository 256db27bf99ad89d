"""Swap refinement of masks under the calibration Gram (methods/refine.py): pure tensor tests on small random layers."""

from __future__ import annotations

import pytest
import torch

from helpers import correlated_inputs
from hybridprune.masks import mask_n_m, mask_unstructured
from hybridprune.methods import refine
from hybridprune.methods.refine import (
    reconstruction_error,
    refine_swaps,
    reweight_residual,
    scale_offdiagonal,
    shrink_offdiagonal,
)


def use_pool(monkeypatch, pooled: bool) -> None:
    """Pooled: a pool of 16 blocks of each side (the candidates: fewer than a side of these rows), rescored every 3
    steps; else the exact search of every step."""
    monkeypatch.setattr(refine, "POOL", 16)
    monkeypatch.setattr(refine, "REFRESH", 3 if pooled else 1)


@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(("nm", "pooled"), [(None, False), (None, True), ((2, 4), False)])
def test_refinement_never_increases_the_error_and_keeps_the_counts(nm, pooled, dtype, batch, monkeypatch):
    use_pool(monkeypatch, pooled)
    inputs = correlated_inputs(tokens=1024, features=32, rank=6, seed=4)
    gram = inputs.T @ inputs
    weight = torch.randn(20, 32, generator=torch.Generator().manual_seed(5), dtype=torch.float64).to(dtype)
    metric = weight.abs() * gram.diagonal().sqrt()
    keep = mask_unstructured(metric, 0.5) if nm is None else mask_n_m(metric, *nm)
    before = reconstruction_error(weight, keep, gram)
    refined = refine_swaps(weight, keep, gram, steps=50, nm=nm, batch=batch)
    after = reconstruction_error(weight, refined, gram)
    assert bool((after <= before * (1 + 1e-9)).all())  # errors measured in float64
    assert float(after.sum()) < 0.9 * float(before.sum())  # it does find swaps
    assert torch.equal(refined.sum(1), keep.sum(1))
    if nm is not None:
        assert bool(((~refined).reshape(20, -1, 4).sum(2) == 2).all())
    for steps in (1, 3, 10):  # and monotone in the number of steps
        partial = reconstruction_error(weight, refine_swaps(weight, keep, gram, steps=steps, nm=nm, batch=batch), gram)
        assert bool((partial <= before * (1 + 1e-9)).all())


def test_shrink_offdiagonal_keeps_the_diagonal_and_scales_the_rest():
    inputs = correlated_inputs(features=16)
    gram = inputs.T @ inputs
    assert shrink_offdiagonal(gram, 1.0) is gram
    half = shrink_offdiagonal(gram, 0.5)
    torch.testing.assert_close(half.diagonal(), gram.diagonal())
    off = ~torch.eye(16, dtype=torch.bool)
    torch.testing.assert_close(half[off], 0.5 * gram[off])
    assert torch.count_nonzero(shrink_offdiagonal(gram, 0.0)[off]) == 0
    with pytest.raises(ValueError, match="offdiag"):
        shrink_offdiagonal(gram, 1.5)


def test_a_shrunk_gram_reweighted_in_place_is_the_gram_shrunk_to_the_new_weight():
    gram = correlated_inputs(features=16).T @ correlated_inputs(features=16)
    for have, want in ((0.25, 0.5), (0.5, 0.25), (0.5, 1.0)):
        held = shrink_offdiagonal(gram.clone(), have)
        reweighted = scale_offdiagonal(held, want / have, inplace=True)
        assert reweighted.data_ptr() == held.data_ptr()
        torch.testing.assert_close(reweighted, shrink_offdiagonal(gram, want))
    with pytest.raises(ValueError, match="factor"):
        scale_offdiagonal(gram, -1.0)


def test_the_residual_under_one_weight_converts_to_the_residual_under_another():
    inputs = correlated_inputs(features=16)
    gram = (inputs.T @ inputs).double()
    weight = torch.randn(6, 16, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    pruned = weight * (torch.rand(6, 16, generator=torch.Generator().manual_seed(4)) < 0.5)
    for have, want in ((0.25, 0.5), (0.5, 0.25), (1.0, 0.0)):
        residual = pruned @ shrink_offdiagonal(gram, have)
        converted = reweight_residual(residual, pruned, gram.diagonal(), want / have)
        assert converted.data_ptr() == residual.data_ptr()
        torch.testing.assert_close(converted, pruned @ shrink_offdiagonal(gram, want))


def test_refinement_under_the_diagonal_gram_reaches_wandas_per_row_mask():
    """Diagonal G: the error is separable, sum of w_j^2 G_jj over the pruned, so its per-row optimum is Wanda's."""
    inputs = correlated_inputs(tokens=1024, features=32, rank=6, seed=7)
    gram = shrink_offdiagonal(inputs.T @ inputs, 0.0)
    weight = torch.randn(12, 32, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    wanda = mask_unstructured(weight.abs() * gram.diagonal().sqrt(), 0.5)
    random_start = mask_unstructured(torch.rand(12, 32, generator=torch.Generator().manual_seed(9), dtype=torch.float64), 0.5)
    assert not torch.equal(random_start, wanda)
    assert torch.equal(refine_swaps(weight, random_start, gram, steps=100), wanda)
    assert torch.equal(refine_swaps(weight, wanda, gram, steps=100), wanda)  # nothing to improve


@pytest.mark.parametrize("nm", [(2, 4), (1, 4), (4, 8)])
def test_nm_refine_step_finds_the_best_swap_of_every_group(nm):
    """The N:M search evaluates only (pruned, kept) pairs; a plain loop over every pair of every group agrees."""
    from hybridprune.methods.refine import _NMSearch

    n, m = nm
    inputs = correlated_inputs(tokens=256, features=16, rank=4, seed=11)
    gram = inputs.T @ inputs
    weight = torch.randn(5, 16, generator=torch.Generator().manual_seed(12), dtype=torch.float64)
    keep = mask_n_m(torch.rand(5, 16, generator=torch.Generator().manual_seed(13), dtype=torch.float64), n, m)
    residual = (weight * ~keep) @ gram
    search = _NMSearch(weight, keep, weight * weight * gram.diagonal(), gram, nm)
    delta, revive, prune = search.best(weight, keep, residual, gram, batch=1)
    for row in range(5):
        best = (float("inf"), -1, -1)
        for start in range(0, 16, m):
            for i in range(start, start + m):
                for j in range(start, start + m):
                    if keep[row, i] or not keep[row, j]:
                        continue
                    after = keep[row].clone()
                    after[i], after[j] = True, False
                    change = float(reconstruction_error(weight[row:row + 1], after.unsqueeze(0), gram)
                                   - reconstruction_error(weight[row:row + 1], keep[row:row + 1], gram))
                    best = min(best, (change, i, j))
        assert float(delta[row]) == pytest.approx(best[0], rel=1e-9, abs=1e-9)
        assert (int(revive[row]), int(prune[row])) == best[1:]


@pytest.mark.parametrize(("nm", "pooled"), [(None, False), (None, True), ((2, 4), False)])
def test_refining_stacked_matrices_gives_each_ones_own_refinement(nm, pooled, monkeypatch):
    """Rows refine independently under one Gram, so q/k/v (gate/up) are refined as one stacked matrix."""
    use_pool(monkeypatch, pooled)
    inputs = correlated_inputs(tokens=1024, features=32, rank=6, seed=10)
    gram = inputs.T @ inputs
    generator = torch.Generator().manual_seed(11)
    parts = [torch.randn(rows, 32, generator=generator, dtype=torch.float64) for rows in (12, 4, 4)]
    keeps = [
        mask_unstructured(p.abs() * gram.diagonal().sqrt(), 0.5) if nm is None else mask_n_m(p.abs(), *nm)
        for p in parts
    ]
    stacked = refine_swaps(torch.cat(parts), torch.cat(keeps), gram, steps=20, nm=nm, batch=4)
    separate = torch.cat([refine_swaps(p, k, gram, steps=20, nm=nm, batch=4) for p, k in zip(parts, keeps)])
    assert torch.equal(stacked, separate)


@pytest.mark.parametrize("pooled", [False, True])
@pytest.mark.parametrize("batch", [1, 4])
def test_a_row_without_kept_or_pruned_weights_does_not_stop_the_others(batch, pooled, monkeypatch):
    use_pool(monkeypatch, pooled)
    inputs = correlated_inputs(tokens=1024, features=32, rank=6, seed=12)
    gram = inputs.T @ inputs
    weight = torch.randn(6, 32, generator=torch.Generator().manual_seed(13), dtype=torch.float64)
    keep = mask_unstructured(weight.abs() * gram.diagonal().sqrt(), 0.5)
    keep[0] = False  # a fully pruned row (a dead neuron at high sparsity)
    keep[1] = True  # and a dense one
    keep[2, :30] = False  # and one with two kept weights: fewer than the candidates
    keep[2, 30:] = True
    refined = refine_swaps(weight, keep, gram, steps=50, batch=batch)
    assert torch.equal(refined[:2], keep[:2])
    assert torch.equal(refined.sum(1), keep.sum(1))
    before, after = reconstruction_error(weight, keep, gram), reconstruction_error(weight, refined, gram)
    assert bool((after <= before * (1 + 1e-9)).all())
    assert float(after[2:].sum()) < 0.95 * float(before[2:].sum())
    alone = refine_swaps(weight[2:], keep[2:], gram, steps=50, batch=batch)
    assert torch.equal(refined[2:], alone)


@pytest.mark.parametrize("nm", [(2, 4), (1, 4), (4, 8)])
def test_nm_search_state_after_swaps_matches_a_fresh_search(nm):
    """The N:M search keeps each group's swap constants and updates only the swapped groups: after swaps it
    finds what a search built from scratch on the new mask finds."""
    from hybridprune.methods.refine import _NMSearch

    n, m = nm
    inputs = correlated_inputs(tokens=256, features=16, rank=4, seed=14)
    gram = inputs.T @ inputs
    weight = torch.randn(6, 16, generator=torch.Generator().manual_seed(15), dtype=torch.float64)
    keep = mask_n_m(torch.rand(6, 16, generator=torch.Generator().manual_seed(16), dtype=torch.float64), n, m)
    squared = weight * weight * gram.diagonal()
    search = _NMSearch(weight, keep, squared, gram, nm)
    after = keep.clone()
    rows, revived, pruned = [], [], []
    for row, group in ((0, 0), (1, 2), (3, 1), (5, 3)):
        group %= 16 // m
        cols = range(group * m, group * m + m)
        i = next(c for c in cols if not after[row, c])
        j = next(c for c in cols if after[row, c])
        after[row, i], after[row, j] = True, False
        rows.append(row), revived.append(i), pruned.append(j)
    search.swapped(weight, torch.tensor(rows), torch.tensor(revived).unsqueeze(1), torch.tensor(pruned).unsqueeze(1))
    residual = (weight * ~after) @ gram
    fresh = _NMSearch(weight, after, squared, gram, nm)
    for got, want in zip(search.best(weight, after, residual, gram, 1), fresh.best(weight, after, residual, gram, 1)):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("batch", [1, 4])
def test_a_pool_of_one_weight_per_block_searches_like_the_exact_search_and_the_steps_between_search_the_pool(
        batch, monkeypatch):
    """Blocks of one column (POOL >= the columns): a pooled refine's first step is the exact search's. Wider blocks:
    later steps search the pool, each swap lowering the error by its exact amount."""
    inputs = correlated_inputs(tokens=1024, features=48, rank=6, seed=20)
    gram = inputs.T @ inputs
    weight = torch.randn(16, 48, generator=torch.Generator().manual_seed(21), dtype=torch.float64)
    keep = mask_unstructured(weight.abs() * gram.diagonal().sqrt(), 0.5)
    use_pool(monkeypatch, False)
    exact = [refine_swaps(weight, keep, gram, steps=steps, batch=batch) for steps in (1, 12)]
    use_pool(monkeypatch, True)
    monkeypatch.setattr(refine, "POOL", 48)
    assert torch.equal(refine_swaps(weight, keep, gram, steps=1, batch=batch), exact[0])
    use_pool(monkeypatch, True)
    pooled = [refine_swaps(weight, keep, gram, steps=steps, batch=batch) for steps in (1, 12)]
    assert not torch.equal(pooled[1], exact[1])  # later steps do search another set
    errors = [reconstruction_error(weight, k, gram).sum() for k in (keep, pooled[0], pooled[1])]
    assert errors[2] < errors[1] < errors[0]


def test_the_pool_is_each_blocks_best_move_and_a_block_without_one_is_none(monkeypatch):
    """The full search's pool: per row and side, the best move of each block of columns (the last block padded),
    -inf where a block has no weight on that side."""
    from hybridprune.methods.refine import _Search

    torch.manual_seed(3)
    weight = torch.randn(3, 10, dtype=torch.float64)
    keep = torch.rand(3, 10) < 0.5
    keep[0, :4] = True  # row 0: the first block of 4 has no pruned weight
    gram = torch.eye(10, dtype=torch.float64) + 0.1
    residual = (weight * ~keep) @ gram
    squared = weight * weight * gram.diagonal()
    monkeypatch.setattr(refine, "POOL", 3)  # blocks of ceil(10 / 3) = 4 columns: [0, 4), [4, 8), [8, 10)
    monkeypatch.setattr(refine, "REFRESH", 4)
    search = _Search(weight, keep, squared, gram.diagonal(), candidates=2)
    search.best(weight, keep, residual, gram, 1, full=True)
    pool_keep, pool_pruned, _, _, base_keep, base_pruned = search.pool
    cost = squared + 2 * weight * residual  # what pruning a kept weight adds
    gain = 2 * weight * residual - squared  # what reviving a pruned one removes
    for row in range(3):
        for block, (start, stop) in enumerate(((0, 4), (4, 8), (8, 10))):
            for side, score, members, pool, base in ((0, -cost, keep, pool_keep, base_keep),
                                                     (1, gain, ~keep, pool_pruned, base_pruned)):
                columns = [c for c in range(start, stop) if members[row, c]]
                if not columns:
                    assert base[row, block] == -torch.inf
                    continue
                best = max(columns, key=lambda c: float(score[row, c]))
                assert int(pool[row, block]) == best, (row, block, side)


def test_a_pooled_refine_ends_only_where_a_full_search_finds_no_improving_swap(monkeypatch):
    """A row whose pool has no improving swap waits for the next full search; it does not stop there (rows that
    stopped after an empty pool were the pool's whole loss on real layers)."""
    inputs = correlated_inputs(tokens=1024, features=64, rank=6, seed=30)
    gram = inputs.T @ inputs
    weight = torch.randn(24, 64, generator=torch.Generator().manual_seed(31), dtype=torch.float64)
    keep = mask_unstructured(weight.abs() * gram.diagonal().sqrt(), 0.5)
    use_pool(monkeypatch, True)
    refined = refine_swaps(weight, keep, gram, steps=1000, batch=4)
    assert not torch.equal(refined, keep)
    # a refine's first step is a full search: it finds nothing left to improve
    assert torch.equal(refine_swaps(weight, refined, gram, steps=1, batch=4), refined)


@pytest.mark.parametrize(("nm", "pooled"), [(None, False), (None, True), ((2, 4), False)])
def test_the_residual_handed_over_is_that_of_the_refined_masks_for_rows_that_stopped_early_too(nm, pooled, monkeypatch):
    """with_residual: (w * ~keep) G of the final masks, which the least-squares update takes as its right-hand side;
    half the rows start at their own converged masks, so they leave at the first full search (the state is gathered)."""
    use_pool(monkeypatch, pooled)
    inputs = correlated_inputs(tokens=1024, features=32, rank=6, seed=9)
    gram = (inputs.T @ inputs).float()
    weight = torch.randn(64, 32, generator=torch.Generator().manual_seed(3))
    metric = weight.abs() * gram.diagonal().sqrt()
    keep = mask_unstructured(metric, 0.5) if nm is None else mask_n_m(metric, *nm)
    converged = refine_swaps(weight, keep, gram, steps=1000, nm=nm, batch=4)
    start = torch.cat([converged[:32], keep[32:]])
    plain = refine_swaps(weight, start, gram, steps=50, nm=nm, batch=4)
    masks, residual = refine_swaps(weight, start, gram, steps=50, nm=nm, batch=4, with_residual=True)
    assert torch.equal(masks, plain)
    assert residual.shape == weight.shape and residual.dtype == torch.float32
    torch.testing.assert_close(residual, (weight * ~masks) @ gram, rtol=1e-4, atol=1e-3 * float(gram.abs().max()))
    assert not torch.equal(masks[32:], start[32:])  # the other rows did move
