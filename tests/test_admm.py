"""The joint mask-and-weight solver (methods/admm.py) against brute force and the fixed-mask update."""

from __future__ import annotations

import itertools

import pytest
import torch

from hybridprune.masks import mask_n_m, mask_unstructured
from hybridprune.methods.admm import admm_prune, objective
from hybridprune.methods.reconstruct import reconstruct


def _layer(seed: int, n: int, rows: int, tokens: int = 64, mixing: float = 0.5):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, n, generator=generator, dtype=torch.float64)
    x = x @ (torch.eye(n, dtype=torch.float64) + mixing * torch.randn(n, n, generator=generator, dtype=torch.float64))
    gram = x.T @ x
    gram.diagonal().add_(0.01 * gram.diagonal().mean())
    weight = torch.randn(rows, n, generator=generator, dtype=torch.float64)
    return weight, gram


def _start(weight, gram, nm):
    metric = weight.abs() * gram.diagonal().sqrt()  # Wanda's metric
    return mask_unstructured(metric, 0.5) if nm is None else mask_n_m(metric, *nm)


def _best(w: torch.Tensor, gram: torch.Tensor, supports) -> float:
    """The smallest (v - w)^T G (v - w) over the given supports, each solved exactly."""
    best = float("inf")
    for support in supports:
        s = list(support)
        v = torch.zeros_like(w)
        v[s] = torch.linalg.solve(gram[s][:, s], (gram @ w)[s])
        best = min(best, float((v - w) @ gram @ (v - w)))
    return best


def _supports(n: int, nm):
    if nm is None:
        return list(itertools.combinations(range(n), n // 2))
    pairs = list(itertools.combinations(range(4), 2))
    return [tuple(g + i for g, pair in zip(range(0, n, 4), combo) for i in pair) for combo in itertools.product(pairs, repeat=n // 4)]


@pytest.mark.parametrize("nm", [None, (2, 4)])
def test_admm_is_near_the_brute_force_optimum_and_never_worse_than_the_fixed_mask_update(nm):
    """8 inputs, half pruned per row: every support enumerated and solved exactly (the true optimum). Measured over
    these 12 layers (2026-12-05): ADMM 1.15x the optimum on average, the OBS update of Wanda's mask 2.9x."""
    ratios = []
    for seed in range(12):
        weight, gram = _layer(seed, n=8, rows=3)
        keep = _start(weight, gram, nm)
        solved, mask, _ = admm_prune(weight, keep, gram, nm=nm)
        error = objective(weight, solved, gram)
        fixed = objective(weight, reconstruct(weight, keep, gram), gram)
        optimum = torch.tensor([_best(weight[r], gram, _supports(8, nm)) for r in range(3)])
        assert bool((error <= fixed * (1 + 1e-6)).all()), (seed, error, fixed)
        assert bool((error >= optimum * (1 - 1e-6)).all())  # nothing beats the enumeration: the objective is right
        ratios.append(float(error.sum() / optimum.sum()))
    assert sum(ratios) / len(ratios) < 1.4, ratios


@pytest.mark.parametrize("nm", [None, (2, 4)])
def test_admm_keeps_each_rows_count_or_the_pattern_and_zeros_off_the_mask(nm):
    weight, gram = _layer(3, n=64, rows=40, tokens=256)
    keep = _start(weight, gram, nm)
    if nm is None:  # rows with different counts, as NeuronRank's allocation gives them
        keep[:10] = mask_unstructured(weight[:10].abs(), 0.7)
    solved, mask, report = admm_prune(weight.float(), keep, gram.float(), nm=nm)
    assert solved.dtype == torch.float32 and report.steps >= 1
    assert bool((solved[~mask] == 0).all())
    if nm is None:
        assert torch.equal(mask.sum(1), keep.sum(1))
    else:
        assert bool((mask.reshape(40, -1, 4).sum(2) == 2).all())
    assert report.error_final <= report.error_admm
    assert float(objective(weight, solved.double(), gram).sum()) < float(objective(weight, reconstruct(weight, keep, gram), gram).sum())


def test_admm_rejects_mismatched_shapes():
    weight, gram = _layer(0, n=8, rows=2)
    with pytest.raises(ValueError, match="shapes"):
        admm_prune(weight, torch.ones(2, 4, dtype=torch.bool), gram)


def test_the_projection_is_the_exact_selection_also_with_ties():
    from hybridprune.masks import _keep_all_but_lowest
    from hybridprune.methods.admm import project

    values = torch.randint(-3, 4, (50, 16)).float()  # many ties at every threshold
    prune = torch.randint(0, 16, (50,))
    assert torch.equal(project(values, prune, None), _keep_all_but_lowest(values.abs(), prune))
    keep = project(values, None, (2, 4))
    assert bool((keep.reshape(50, 4, 4).sum(2) == 2).all())
