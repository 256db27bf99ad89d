"""The OBS weight update: same zero pattern as the mask, smaller output error, exact sparsity end to end."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from hybridprune.calibration.collect import CollectionOptions, collect_statistics
from hybridprune.config import PruneConfig
from hybridprune.masks import mask_unstructured
from hybridprune.methods.reconstruct import reconstruct
from hybridprune.models import load_model
from hybridprune.passes import prune_model
from hybridprune.reporting import SilentReporter
from hybridprune.sparsity import sparsity_report


def correlated_inputs(tokens: int = 2048, features: int = 64, rank: int = 8) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randn(tokens, rank, generator=generator) @ torch.randn(rank, features, generator=generator) + 0.1 * torch.randn(
        tokens, features, generator=generator
    )


def test_update_keeps_the_mask_and_reduces_the_output_error():
    inputs = correlated_inputs()
    weight = torch.randn(32, 64, generator=torch.Generator().manual_seed(1))
    gram = inputs.T @ inputs
    keep = mask_unstructured(weight.abs() * gram.diag().sqrt(), 0.5)
    updated = reconstruct(weight, keep, gram)
    assert torch.equal(updated != 0, keep)
    masked_error = ((inputs @ (weight * keep).T - inputs @ weight.T) ** 2).mean()
    updated_error = ((inputs @ updated.T - inputs @ weight.T) ** 2).mean()
    assert updated_error < 0.5 * masked_error


def test_dead_input_channels_are_zeroed_without_nan():
    inputs = correlated_inputs()
    inputs[:, 3] = 0.0
    weight = torch.randn(8, 64)
    gram = inputs.T @ inputs
    updated = reconstruct(weight, torch.ones_like(weight, dtype=torch.bool), gram)
    assert torch.isfinite(updated).all()
    assert (updated[:, 3] == 0).all()


def test_stacked_rows_update_as_each_matrix_alone():
    """q/k/v (and gate/up) share their inputs: one stacked update equals separate ones."""
    inputs = correlated_inputs()
    gram = inputs.T @ inputs
    generator = torch.Generator().manual_seed(2)
    weights = [torch.randn(rows, 64, generator=generator) for rows in (16, 8, 8)]
    keeps = [mask_unstructured(weight.abs(), 0.5) for weight in weights]
    stacked = reconstruct(torch.cat(weights), torch.cat(keeps), gram)
    for alone, rows in zip((reconstruct(w, k, gram) for w, k in zip(weights, keeps)), stacked.split([16, 8, 8])):
        torch.testing.assert_close(rows, alone)


def test_second_order_entry_holds_the_input_grams(tiny_llama_folder: Path, tiny_cache_dir: Path):
    """The stored Gram is the sum x x^T computed directly from the inputs each Linear saw (its correlations
    to float16's precision), and its factor that of the damped Gram."""
    loaded = load_model(str(tiny_llama_folder), cache_dir=tiny_cache_dir)
    windows = torch.randint(0, loaded.model.config.vocab_size, (4, 16), generator=torch.Generator().manual_seed(0))
    captured: dict[str, list[torch.Tensor]] = {}
    layer = loaded.adapter.layers(loaded.model)[1]
    for name, linear in loaded.adapter.linears(layer).items():
        linear.register_forward_pre_hook(lambda _m, args, name=name: captured.setdefault(name, []).append(args[0].detach().clone()))
    hessians = collect_statistics(loaded.model, loaded.adapter, windows, CollectionOptions(), batch_size=3, hessians=True)
    for name in ("q_proj", "o_proj", "up_proj", "down_proj"):
        flats = [x.reshape(-1, x.shape[-1]).float() for x in captured[name]]
        exact = sum((flat.T @ flat).double() for flat in flats)
        expected_dead = exact.diagonal() == 0
        group = loaded.adapter.input_group(name)
        gram, dead = hessians.gram(1, group)
        scale = exact.diagonal().sqrt()
        damped = exact + 0.01 * exact.diagonal().mean() * torch.eye(exact.shape[0], dtype=torch.float64)
        assert float(((gram.double() - damped).abs() / torch.outer(scale, scale)).max()) < 1e-3  # float16 correlations
        assert torch.equal(gram, gram.T) and torch.equal(dead, expected_dead)
        factor, _ = hessians.inverse_factor(1, group)
        identity = torch.eye(gram.shape[0], dtype=torch.float64)
        torch.testing.assert_close((factor.double().T @ factor.double()) @ gram.double(), identity, rtol=0, atol=1e-4)
        assert torch.equal(factor, factor.triu())
    assert hessians.num_layers == loaded.num_layers and hessians.tokens == windows.numel()


@pytest.mark.parametrize("pattern, sparsity", [("unstructured", 0.5), ("2:4", 0.5), ("structured", 0.25)])
def test_update_path_hits_the_target(tiny_llama_folder: Path, tiny_cache_dir: Path, pattern: str, sparsity: float):
    loaded = load_model(str(tiny_llama_folder), cache_dir=tiny_cache_dir)
    windows = torch.randint(0, loaded.model.config.vocab_size, (4, 32), generator=torch.Generator().manual_seed(0))
    stats = collect_statistics(loaded.model, loaded.adapter, windows, CollectionOptions(topics=4), batch_size=2)
    hessians = collect_statistics(loaded.model, loaded.adapter, windows, CollectionOptions(), batch_size=2, hessians=True)
    dense_width = loaded.model.config.intermediate_size
    config = PruneConfig(pattern=pattern, sparsity=sparsity, update=True).validate()
    prune_model(loaded, stats, config, SilentReporter(), hessians)
    report = sparsity_report(loaded.model, loaded.adapter, dense_intermediate_size=dense_width)
    assert report.kind("mlp").sparsity == pytest.approx(sparsity, abs=1e-3)
    assert report.total.sparsity == pytest.approx(sparsity, abs=1e-3)
    assert all(torch.isfinite(p).all() for p in loaded.model.parameters())


def test_zero_pattern_is_the_mask_plus_dead_channels():
    """What the docstring promises: zeros exactly at ~keep and in the dead input channels' columns."""
    generator = torch.Generator().manual_seed(3)
    inputs = torch.randn(64, 12, generator=generator, dtype=torch.float64)
    inputs[:, [2, 7]] = 0.0  # two channels never active in calibration
    weight = torch.randn(5, 12, generator=generator)
    keep = torch.rand(5, 12, generator=generator) > 0.5
    result = reconstruct(weight, keep, inputs.T @ inputs)
    dead = torch.zeros(12, dtype=torch.bool)
    dead[[2, 7]] = True
    expected_zero = ~keep | dead.unsqueeze(0)
    assert bool((result[expected_zero] == 0).all())
    assert bool((result[~expected_zero] != 0).all())
