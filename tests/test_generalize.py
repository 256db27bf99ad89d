"""The knobs that keep NeuronRank's gains off the calibration domain: row-sparsity bounds, doc-mode
activity rates, and the shrunken OBS update (pure tensor functions, random tensors)."""

from __future__ import annotations

import pytest
import torch

from hybridprune.masks import mask_rows, mask_unstructured
from hybridprune.methods import NeuronStats, idf_doc
from hybridprune.methods.allocation import bound_row_sparsity, row_sparsity_of
from hybridprune.methods.hybrid import LayerPlan, layer_masks
from hybridprune.methods.reconstruct import reconstruct, shrink_update


def test_bound_row_sparsity_clamps_and_keeps_the_mean() -> None:
    rates = torch.rand(500, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    rates = rates - rates.mean() + 0.5
    bounded = bound_row_sparsity(rates, 0.5, 0.1)
    assert float(bounded.min()) >= 0.4 - 1e-12 and float(bounded.max()) <= 0.6 + 1e-12
    assert abs(float(bounded.mean()) - 0.5) < 1e-9
    # order is kept (a common shift then a clamp)
    order = torch.argsort(rates)
    assert bool((bounded[order].diff() >= -1e-12).all())


def test_bound_row_sparsity_edges() -> None:
    rates = torch.tensor([0.0, 0.2, 0.9, 0.9], dtype=torch.float64)
    assert torch.equal(bound_row_sparsity(rates, 0.5, 1.0), rates)
    zero = bound_row_sparsity(rates, 0.5, 0.0)
    assert torch.allclose(zero, torch.full((4,), 0.5, dtype=torch.float64))
    with pytest.raises(ValueError):
        bound_row_sparsity(rates, 0.5, -0.1)
    with pytest.raises(ValueError):
        bound_row_sparsity(rates.view(2, 2), 0.5, 0.1)


def test_bounded_masks_stay_exact_and_within_bounds() -> None:
    generator = torch.Generator().manual_seed(1)
    metric = torch.rand(64, 48, generator=generator) * torch.logspace(-2, 2, 64).unsqueeze(1)
    free = mask_unstructured(metric, 0.5, group="matrix")
    spread = row_sparsity_of(free)
    assert float(spread.max() - spread.min()) > 0.5  # unbounded: the score decides almost everything
    keep = mask_rows(metric, bound_row_sparsity(spread, 0.5, 0.1))
    assert int((~keep).sum()) == 64 * 48 // 2
    rows = row_sparsity_of(keep)
    assert float(rows.min()) >= 0.4 - 1 / 48 and float(rows.max()) <= 0.6 + 1 / 48


def test_layer_masks_row_bound_changes_gate_up_only() -> None:
    generator = torch.Generator().manual_seed(2)
    hidden, inter = 16, 32
    weights = {"q": torch.randn(hidden, hidden, generator=generator), "gate": torch.randn(inter, hidden, generator=generator),
               "up": torch.randn(inter, hidden, generator=generator), "down": torch.randn(hidden, inter, generator=generator)}
    sumsq = {n: torch.rand(w.shape[1], generator=generator) + 0.1 for n, w in weights.items()}
    score = torch.logspace(-1, 1, inter, dtype=torch.float64)
    free = layer_masks(weights, sumsq, ("q",), ("gate", "up", "down"), LayerPlan("wanda", "neuronrank", 0.5, 0.5), score)
    bounded = layer_masks(weights, sumsq, ("q",), ("gate", "up", "down"),
                          LayerPlan("wanda", "neuronrank", 0.5, 0.5, row_bound=0.1), score)
    assert torch.equal(free["q"], bounded["q"]) and torch.equal(free["down"], bounded["down"])
    for name in ("gate", "up"):
        assert int((~bounded[name]).sum()) == int((~free[name]).sum()) == inter * hidden // 2
        rows = row_sparsity_of(bounded[name])
        assert float(rows.max() - rows.min()) <= 0.2 + 2 / hidden + 1e-9
    assert not torch.equal(free["gate"], bounded["gate"])


def _doc_stats(window_active: torch.Tensor, window_tokens: torch.Tensor) -> NeuronStats:
    neurons = window_active.shape[1]
    zeros = torch.zeros(neurons, dtype=torch.float64)
    return NeuronStats(tokens=int(window_tokens.sum()), abs_sum=zeros + 1, sq_sum=zeros + 1, active_tokens=window_active.sum(0),
                       window_active=window_active, window_tokens=window_tokens,
                       topic_active=torch.zeros(1, neurons), topic_tokens=torch.zeros(1))


def test_idf_doc_rate_varies_where_a_count_of_one_is_constant() -> None:
    generator = torch.Generator().manual_seed(3)
    tokens = torch.full((16,), 512.0, dtype=torch.float64)
    rate = torch.rand(64, generator=generator, dtype=torch.float64) * 0.3  # per-neuron activity rate
    active = (rate.unsqueeze(0) * 512 * (0.5 + torch.rand(16, 64, generator=generator, dtype=torch.float64))).floor() + 1
    stats = _doc_stats(active, tokens)
    assert float(idf_doc(stats, 1).std()) == 0.0  # every neuron in every window
    idf = idf_doc(stats, 1, 0.1)
    assert float(idf.std()) > 0.1
    # a neuron with a higher rate is in more windows: lower IDF (on average)
    assert float(torch.corrcoef(torch.stack([rate, idf]))[0, 1]) < -0.5
    assert torch.equal(idf_doc(stats, 1, 0.0), idf_doc(stats, 1))
    with pytest.raises(ValueError):
        idf_doc(stats, 1, 1.5)


def test_shrink_update_interpolates_and_keeps_zeros() -> None:
    generator = torch.Generator().manual_seed(4)
    weight = torch.randn(8, 24, generator=generator)
    x = torch.randn(200, 24, generator=generator)
    keep = mask_unstructured(weight.abs(), 0.5)
    pruned = weight * keep
    updated = reconstruct(weight, keep, x.T @ x)
    assert torch.equal(shrink_update(pruned, updated, 1.0), updated)
    assert torch.allclose(shrink_update(pruned, updated, 0.0), pruned)
    half = shrink_update(pruned, updated, 0.5)
    assert torch.allclose(half, 0.5 * (pruned + updated), atol=1e-6)
    assert bool((half[~keep] == 0).all())
    # the output error on the calibration inputs falls monotonically with the step
    errors = [float((x @ (weight - shrink_update(pruned, updated, s)).T).norm()) for s in (0.0, 0.5, 1.0)]
    assert errors[0] > errors[1] > errors[2]
    with pytest.raises(ValueError):
        shrink_update(pruned, updated[:, :5], 0.5)
