"""The weight updates for a fixed mask (OBS sweep, least squares): same zero pattern as the mask, smaller output error, exact sparsity end to end."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from hybridprune.calibration.collect import CollectionOptions, collect_statistics
from hybridprune.config import PruneConfig
from hybridprune.masks import mask_unstructured
from hybridprune.methods.reconstruct import (
    Spectrum,
    fast_low_precision,
    gram_spectrum,
    keep_columns,
    least_squares,
    reconstruct,
    resolve_on_support,
    row_dots,
)
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


def _exact_rows(weight: torch.Tensor, keep: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    """Brute force: each row's kept weights from the restricted normal equations G_SS v_S = (G w)_S."""
    exact = torch.zeros_like(weight)
    for r in range(weight.shape[0]):
        s = torch.nonzero(keep[r]).squeeze(1)
        exact[r, s] = torch.linalg.solve(gram[s][:, s], (gram @ weight[r])[s])
    return exact


def test_the_conjugate_gradient_re_solve_is_the_least_squares_weights_of_its_support():
    inputs = correlated_inputs(tokens=128, features=24).double()
    gram = inputs.T @ inputs
    gram.diagonal().add_(0.01 * gram.diagonal().mean())
    weight = torch.randn(6, 24, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    keep = mask_unstructured(weight.abs() * gram.diag().sqrt(), 0.5)
    solved = resolve_on_support(gram, weight @ gram, keep, weight * keep, steps=200, tolerance=1e-12)
    torch.testing.assert_close(solved, _exact_rows(weight, keep, gram), rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("offdiag", [1.0, 0.5])
def test_least_squares_is_the_optimum_of_the_mask_and_beats_the_sweep(offdiag: float):
    from hybridprune.methods.refine import shrink_offdiagonal

    inputs = correlated_inputs()
    gram = shrink_offdiagonal(inputs.T @ inputs, offdiag)
    gram.diagonal().add_(0.01 * gram.diagonal().mean())
    weight = torch.randn(32, 64, generator=torch.Generator().manual_seed(1))
    keep = mask_unstructured(weight.abs() * gram.diag().sqrt(), 0.5)
    solved = least_squares(weight, keep, gram, steps=200, tolerance=1e-7, settle=0.0, products=None)
    assert solved.dtype == weight.dtype and bool((solved[~keep] == 0).all())
    exact = _exact_rows(weight.double(), keep, gram.double())
    torch.testing.assert_close(solved.double(), exact, rtol=2e-3, atol=2e-4)

    def error(v):  # per row (v - w)^T G (v - w): the layer output's squared error on the calibration tokens
        d = (v - weight).double()
        return ((d @ gram.double()) * d).sum(1)

    sweep = error(reconstruct(weight, keep, gram, damping=0.0))
    assert bool((error(solved) <= sweep * (1 + 1e-4)).all())  # the optimum, row by row
    assert float(error(solved).sum()) < 0.9 * float(sweep.sum())  # and strictly better than the sequential sweep here
    # chunks of rows give the same weights as the whole matrix
    chunked = torch.cat([least_squares(weight[i : i + 8], keep[i : i + 8], gram, steps=200, tolerance=1e-7, settle=0.0,
                                       products=None)
                         for i in range(0, 32, 8)])
    torch.testing.assert_close(chunked, solved, rtol=1e-3, atol=1e-4)  # a chunk stops when all its rows have converged
    # the right-hand side given (as the refine hands it over) gives the same weights as made here
    given = least_squares(weight, keep, gram, target=(weight * ~keep) @ gram, steps=200, tolerance=1e-7, settle=0.0,
                          products=None)
    torch.testing.assert_close(given, solved, rtol=1e-4, atol=1e-5)


def test_the_jacobi_preconditioned_iteration_is_plain_conjugate_gradients_on_the_unit_diagonal_gram():
    """The preconditioner replaces the n x n unit-diagonal copy: the same iterates, step by step."""
    inputs = correlated_inputs(tokens=128, features=32).double()
    gram = inputs.T @ inputs
    gram.diagonal().add_(0.01 * gram.diagonal().mean())
    gram.diagonal().mul_(torch.logspace(-3, 3, 32, dtype=torch.float64))  # scales far apart: the case it is for
    weight = torch.randn(5, 32, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    keep = mask_unstructured(weight.abs() * gram.diag().sqrt(), 0.5)
    scale = gram.diagonal().sqrt()
    unit = gram / scale.unsqueeze(0) / scale.unsqueeze(1)
    pruned = weight * ~keep
    for steps in (1, 2, 4):
        plain = resolve_on_support(unit, (pruned * scale) @ unit, keep, None, steps=steps, tolerance=0.0)
        jacobi = resolve_on_support(gram, pruned @ gram, keep, None, steps=steps, tolerance=0.0,
                                    preconditioner=1 / gram.diagonal())
        torch.testing.assert_close(jacobi * scale, plain, rtol=1e-9, atol=1e-12)


def test_a_spectrum_that_is_the_whole_gram_solves_every_row_on_its_own_support_in_one_step():
    """The preconditioner is, per row, the exact inverse of sigma D^1/2 (I + V E V^T) D^1/2 on that row's support
    (Woodbury): for a Gram of exactly that form, one step is the optimum of every row, whatever its mask."""
    generator = torch.Generator().manual_seed(11)
    width, rank = 40, 3
    vectors = torch.linalg.qr(torch.randn(width, rank, generator=generator, dtype=torch.float64))[0]
    excess = torch.tensor([50.0, 8.0, 2.0], dtype=torch.float64)
    scale = torch.logspace(-1, 1, width, dtype=torch.float64)[torch.randperm(width, generator=generator)]  # D^-1/2
    unit = torch.eye(width, dtype=torch.float64) + vectors @ torch.diag(excess) @ vectors.T
    gram = 3.0 * unit / scale[:, None] / scale[None, :]  # sigma = 3: a scalar CG does not see
    weight = torch.randn(7, width, generator=generator, dtype=torch.float64)
    keep = torch.rand(7, width, generator=generator) < torch.linspace(0.2, 0.9, 7)[:, None]  # every row its own support
    solved = resolve_on_support(gram, (weight * ~keep) @ gram, keep, None, steps=1, tolerance=0.0,
                                preconditioner=Spectrum(scale, vectors, excess))
    torch.testing.assert_close(weight * keep + solved, _exact_rows(weight, keep, gram), rtol=1e-9, atol=1e-9)
    # from a start (as ADMM's re-solve calls it): the same one step
    started = resolve_on_support(gram, weight @ gram, keep, weight * keep, steps=1, tolerance=0.0,
                                 preconditioner=Spectrum(scale, vectors, excess))
    torch.testing.assert_close(started, _exact_rows(weight, keep, gram), rtol=1e-9, atol=1e-9)
    jacobi = resolve_on_support(gram, (weight * ~keep) @ gram, keep, None, steps=1, tolerance=0.0,
                                preconditioner=1 / gram.diagonal())
    assert not torch.allclose(weight * keep + jacobi, _exact_rows(weight, keep, gram), rtol=1e-3, atol=1e-3)


def test_gram_spectrum_finds_the_largest_directions_of_the_unit_diagonal_gram():
    inputs = correlated_inputs(tokens=1024, features=96, rank=6)
    inputs = inputs * torch.logspace(-1, 1, 96)  # channel scales far apart: the directions are of the unit-diagonal Gram
    gram = inputs.T @ inputs
    gram.diagonal().add_(0.01 * gram.diagonal().mean())
    spectrum = gram_spectrum(gram, rank=4)
    scale = gram.diagonal().rsqrt()
    values, vectors = torch.linalg.eigh((gram * scale[:, None] * scale[None, :]).double())
    torch.testing.assert_close(spectrum.scale, scale)
    # the subspace found is the top-4 eigen-space (projections agree), its eigenvalues over the rest's mean
    top = vectors[:, -4:]
    torch.testing.assert_close((spectrum.vectors.double() @ spectrum.vectors.double().T), top @ top.T, atol=1e-4, rtol=0)
    sigma = (96 - values[-4:].sum()) / 92
    torch.testing.assert_close(spectrum.excess.double().sort().values, (values[-4:] / sigma - 1), rtol=1e-4, atol=0)
    assert gram_spectrum(gram, rank=0) is None and gram_spectrum(gram[:8, :8], rank=4) is None  # off / too narrow
    assert gram_spectrum(torch.eye(50), rank=4) is None  # no direction above the rest


def test_the_spectral_preconditioner_takes_fewer_steps_to_the_same_optimum_than_the_diagonal():
    from hybridprune.methods.refine import shrink_offdiagonal

    inputs = correlated_inputs(tokens=1024, features=128, rank=8) * torch.logspace(-1, 1, 128)
    gram = shrink_offdiagonal(inputs.T @ inputs, 0.5)
    gram.diagonal().add_(0.01 * gram.diagonal().mean())
    weight = torch.randn(32, 128, generator=torch.Generator().manual_seed(3))
    keep = mask_unstructured(weight.abs() * gram.diag().sqrt(), 0.5)

    def gap(solved):  # distance of (v - w)^T G (v - w) from the optimum's, summed over rows
        d = (solved - weight).double()
        return float(((d @ gram.double()) * d).sum())

    optimum = gap(_exact_rows(weight.double(), keep, gram.double()).float())
    masked = gap(weight * keep)
    for steps in (2, 3):
        spectral = gap(least_squares(weight, keep, gram, steps=steps, tolerance=0.0, settle=0.0, products=None))
        diagonal = gap(least_squares(weight, keep, gram, steps=steps, tolerance=0.0, settle=0.0, products=None,
                                     spectrum=None))
        assert spectral - optimum < 0.2 * (diagonal - optimum), (steps, spectral, diagonal, optimum, masked)
    converged = least_squares(weight, keep, gram, steps=200, tolerance=1e-7, settle=0.0, products=None)
    torch.testing.assert_close(converged.double(), _exact_rows(weight.double(), keep, gram.double()), rtol=2e-3, atol=2e-4)


def test_the_products_default_bfloat16_and_early_stop_land_within_a_percent_of_the_optimums_gain():
    from hybridprune.methods.refine import shrink_offdiagonal

    inputs = correlated_inputs(tokens=512, features=256, rank=32)
    gram = shrink_offdiagonal(inputs.T @ inputs, 0.5)
    gram.diagonal().add_(0.01 * gram.diagonal().mean())
    weight = torch.randn(64, 256, generator=torch.Generator().manual_seed(4))
    keep = mask_unstructured(weight.abs() * gram.diag().sqrt(), 0.5)

    def error(v):
        d = (v - weight).double()
        return float(((d @ gram.double()) * d).sum())

    masked = error(weight * keep)
    optimum = error(least_squares(weight, keep, gram, steps=300, tolerance=1e-9, settle=0.0, products=None))
    for products in ("auto", torch.bfloat16, None):
        fast = error(least_squares(weight, keep, gram, products=products))
        assert fast - optimum <= 0.01 * (masked - optimum), (products, fast, optimum, masked)


@pytest.mark.parametrize(("amx", "avx512_bf16", "expected"), [(True, False, torch.bfloat16), (False, True, torch.bfloat16),
                                                            (False, False, None)])
def test_bfloat16_products_where_the_cpu_has_amx_tiles_or_avx512_bf16(amx, avx512_bf16, expected, monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)
    assert fast_low_precision(torch.device("cpu")) is expected


def test_least_squares_keeps_unseen_inputs_and_rejects_mismatched_shapes():
    inputs = correlated_inputs()
    inputs[:, 5] = 0.0
    gram = inputs.T @ inputs
    gram[5, 5] = 1.0  # as the cache's damped Gram: a dead channel's diagonal is set before damping
    gram.diagonal().add_(0.01 * gram.diagonal().mean())
    weight = torch.randn(8, 64, generator=torch.Generator().manual_seed(2))
    keep = torch.ones_like(weight, dtype=torch.bool)
    keep[:, ::2] = False
    solved = least_squares(weight, keep, gram)
    assert bool(torch.isfinite(solved).all())
    # never seen non-zero: nothing to fit, the dense weight stays (to the solve's precision: the preconditioner's
    # eigen-directions, found iteratively, touch that input by ~1e-7)
    assert torch.allclose(solved[:, 5], weight[:, 5], atol=1e-5)
    assert torch.equal(least_squares(weight, keep, gram, spectrum=None)[:, 5], weight[:, 5])  # the diagonal alone: exactly
    with pytest.raises(ValueError, match="shapes"):
        least_squares(weight, keep[:, :10], gram)
    with pytest.raises(ValueError, match="shapes"):
        least_squares(weight, keep, gram, target=weight[:, :10])


def test_keep_columns_is_the_least_squares_optimum_of_a_shared_column_mask_and_beats_the_sweep():
    """Whole neurons / heads removed: one column mask for every row, solved exactly by one k x k Cholesky."""
    inputs = correlated_inputs()
    inputs[:, 7] = 0.0  # a dead input among the kept ones
    gram = inputs.T @ inputs
    gram[7, 7] = 1.0
    gram.diagonal().add_(0.01 * gram.diagonal().mean())
    weight = torch.randn(32, 64, generator=torch.Generator().manual_seed(3))
    columns = torch.ones(64, dtype=torch.bool)
    columns[torch.randperm(64, generator=torch.Generator().manual_seed(4))[:24]] = False
    columns[7] = True
    solved = keep_columns(weight, columns, gram)
    keep = columns.unsqueeze(0).expand_as(weight)
    assert solved.dtype == weight.dtype and bool((solved[:, ~columns] == 0).all())
    torch.testing.assert_close(solved.double(), _exact_rows(weight.double(), keep, gram.double()), rtol=1e-4, atol=1e-5)
    assert torch.allclose(solved[:, 7], weight[:, 7])  # never seen non-zero: its weight stays

    def error(v):
        d = (v - weight).double()
        return ((d @ gram.double()) * d).sum(1)

    sweep = error(reconstruct(weight, keep, gram, damping=0.0))
    assert bool((error(solved) <= sweep * (1 + 1e-6)).all())
    assert float(error(solved).sum()) < 0.95 * float(sweep.sum())
    assert torch.equal(keep_columns(weight, torch.zeros(64, dtype=torch.bool), gram), torch.zeros_like(weight))
    with pytest.raises(ValueError, match="shapes"):
        keep_columns(weight, columns[:10], gram)


def test_aim_at_dense_is_each_inputs_least_squares_to_the_dense_outputs():
    """V[:, j] = argmin_v ||x_d,j W[:, j] - x_p,j v||^2 + lambda ||v - W[:, j]||^2 for every input j (brute force:
    torch.linalg.lstsq per column); identical inputs give W back; dead inputs keep their weights."""
    from hybridprune.methods.reconstruct import aim_at_dense

    generator = torch.Generator().manual_seed(3)
    tokens, width, rows, damping = 200, 12, 5, 0.01
    dense_inputs = torch.randn(tokens, width, generator=generator, dtype=torch.float64)
    # a pruned earlier layer: the inputs scaled, and partly replaced by what the dense model does not have
    pruned_inputs = 0.8 * dense_inputs + 0.4 * torch.randn(tokens, width, generator=generator, dtype=torch.float64)
    pruned_inputs[:, 3] = 0.0
    weight = torch.randn(rows, width, generator=generator, dtype=torch.float64)
    own, cross = pruned_inputs.square().sum(0), (pruned_inputs * dense_inputs).sum(0)
    aimed = aim_at_dense(weight, own, cross, damping)

    lam = damping * float(own.mean())
    for j in range(width):
        design = torch.cat([pruned_inputs[:, j : j + 1], torch.full((1, 1), lam**0.5, dtype=torch.float64)])
        for i in range(rows):
            target = torch.cat([dense_inputs[:, j] * weight[i, j], (lam**0.5 * weight[i, j]).reshape(1)])
            expected = torch.linalg.lstsq(design, target[:, None]).solution.item()
            assert float(aimed[i, j]) == pytest.approx(expected, rel=1e-9, abs=1e-12)
    torch.testing.assert_close(aimed[:, 3], weight[:, 3])
    same = dense_inputs.square().sum(0)
    torch.testing.assert_close(aim_at_dense(weight, same, same, damping), weight, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="shapes"):
        aim_at_dense(weight, own[:-1], cross, damping)


def test_row_dots_are_each_rows_dot_product_for_strided_and_empty_inputs():
    """row_dots (the update's per-row a_i . b_i as one batched product) gives vecdot's values, for rows read through a
    column slice (strided) and for no rows at all."""
    generator = torch.Generator().manual_seed(40)
    a, b = torch.randn(37, 300, generator=generator), torch.randn(37, 300, generator=generator)
    torch.testing.assert_close(row_dots(a, b), torch.linalg.vecdot(a, b, dim=1))
    torch.testing.assert_close(row_dots(a[:, 10:250], b[:, 10:250]), torch.linalg.vecdot(a[:, 10:250], b[:, 10:250], dim=1))
    assert row_dots(a[:0], b[:0]).shape == (0,)
