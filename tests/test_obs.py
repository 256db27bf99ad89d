"""Masks chosen inside the OBS sweep, the neuron order for N:M, and the update / refine options end to end."""

from __future__ import annotations

import pytest
import torch

from helpers import correlated_inputs
from hybridprune.masks import mask_unstructured
from hybridprune.methods.obs import spread_order, sweep_counts, sweep_prune
from hybridprune.methods.reconstruct import inverse_hessian_factor


def lowest(values: torch.Tensor, count: int) -> torch.Tensor:
    """Flat indices of the `count` lowest values, ties to the lower index (a stable sort)."""
    return torch.argsort(values.reshape(-1), stable=True)[:count]


def reference_sweep(weight, factor, groups, counts, row_scale, nm, block):
    """SparseGPT's algorithm written plainly: one column at a time, every update applied at once (float64)."""
    w = weight.clone().double()
    u = factor.double()
    rows, columns = w.shape
    keep = torch.ones(rows, columns, dtype=torch.bool)
    for index, start in enumerate(range(0, columns, block)):
        end = min(start + block, columns)
        if nm is None:
            saliency = w[:, start:end] ** 2 / u.diagonal()[start:end] ** 2 * row_scale.double().unsqueeze(1) ** 2
            for group in range(counts.shape[0]):
                members = torch.nonzero(groups == group).squeeze(1)
                flat = lowest(saliency[members], int(counts[group, index]))
                width = end - start
                keep[members[flat // width], start + flat % width] = False
        for j in range(start, end):
            if nm is not None and (j - start) % nm[1] == 0:
                for r in range(rows):
                    saliency = w[r, j : j + nm[1]] ** 2 / u.diagonal()[j : j + nm[1]] ** 2
                    keep[r, j + lowest(saliency, nm[0])] = False
            for r in range(rows):
                if not keep[r, j]:
                    error = w[r, j] / u[j, j]
                    w[r, j:] -= error * u[j, j:]
    w[~keep] = 0
    return w, keep


@pytest.mark.parametrize("kind", ["rows", "groups", "2:4", "4:8"])
def test_sweep_selection_equals_a_plain_reference(kind: str):
    inputs = correlated_inputs()
    generator = torch.Generator().manual_seed(1)
    weight = torch.randn(12, 24, generator=generator, dtype=torch.float64)
    factor, dead = inverse_hessian_factor(inputs.T @ inputs)
    factor = factor.double()
    row_scale = torch.rand(12, generator=generator, dtype=torch.float64) + 0.5
    block, nm = 8, None
    if kind == "rows":
        groups = torch.arange(12)
        sparsity = torch.tensor([0.5] * 4 + [0.6] * 4 + [0.4] * 4, dtype=torch.float64)
        row_scale = torch.ones(12, dtype=torch.float64)
    elif kind == "groups":
        groups = torch.tensor([0] * 6 + [1] * 6)
        sparsity = torch.full((12,), 0.5, dtype=torch.float64)
    else:
        nm = (2, 4) if kind == "2:4" else (4, 8)
        groups, sparsity = torch.arange(12), torch.full((12,), 0.5, dtype=torch.float64)
    counts = sweep_counts(sparsity, groups, 24, block)
    expected, expected_keep = reference_sweep(weight, factor, groups, counts, row_scale, nm, block)
    updated, keep = sweep_prune(weight, factor, dead, groups=groups, counts=counts, row_scale=row_scale, nm=nm, block=block)
    assert torch.equal(keep, expected_keep)
    assert torch.equal(updated != 0, keep)
    torch.testing.assert_close(updated, expected, rtol=1e-4, atol=1e-4)  # float32 sweep vs float64 reference
    # exact counts: per row (Wanda's rows), per group, or N:M
    if kind == "rows":
        pruned = (~keep).sum(1)  # each row floor or ceiling of its share, each target's rows exact in total
        assert bool(((pruned - sparsity * 24).abs() < 1).all())
        assert [int(pruned[i : i + 4].sum()) for i in (0, 4, 8)] == [48, 58, 38]
    elif kind == "groups":
        assert [int((~keep[groups == g]).sum()) for g in (0, 1)] == [72, 72]
    else:
        assert bool(((~keep).reshape(12, -1, nm[1]).sum(2) == nm[0]).all())


def test_sweep_mask_beats_the_fixed_mask_update():
    """Choosing the mask on updated weights lowers the output error below the Wanda mask + update."""
    from hybridprune.methods.reconstruct import reconstruct_with_factor

    inputs = correlated_inputs(tokens=2048, features=64, rank=8)
    weight = torch.randn(32, 64, generator=torch.Generator().manual_seed(3))
    gram = inputs.T @ inputs
    factor, dead = inverse_hessian_factor(gram)
    fixed = reconstruct_with_factor(weight, mask_unstructured(weight.abs() * gram.diag().sqrt().float(), 0.5), factor, dead)
    groups = torch.arange(32)
    counts = sweep_counts(torch.full((32,), 0.5, dtype=torch.float64), groups, 64, 16)
    swept, keep = sweep_prune(weight, factor, dead, groups=groups, counts=counts, block=16)
    error = lambda w: float(((inputs.float() @ (w - weight).T) ** 2).sum())  # noqa: E731
    assert int((~keep).sum()) == 32 * 32
    assert error(swept) < error(fixed)


def test_spread_order_puts_one_neuron_of_each_band_in_every_group():
    score = torch.rand(32, generator=torch.Generator().manual_seed(6))
    order = spread_order(score, 4)
    assert torch.equal(order.sort().values, torch.arange(32))
    ranks = torch.empty(32, dtype=torch.long)
    ranks[torch.argsort(-score)] = torch.arange(32)
    bands = (ranks[order] // 8).reshape(8, 4)
    assert torch.equal(bands, torch.arange(4).expand(8, 4))


# --- through prune_model on a tiny random LLaMA -------------------------------------------------------

from pathlib import Path  # noqa: E402

from hybridprune.calibration.collect import CollectionOptions, collect_statistics  # noqa: E402
from hybridprune.config import PruneConfig  # noqa: E402
from hybridprune.models import load_model  # noqa: E402
from hybridprune.passes import prune_model  # noqa: E402
from hybridprune.pruning import permute_neurons  # noqa: E402
from hybridprune.reporting import SilentReporter  # noqa: E402
from hybridprune.sparsity import sparsity_report  # noqa: E402


def test_neuron_permutation_leaves_the_dense_logits_unchanged(tiny_llama_folder: Path, tiny_cache_dir: Path):
    loaded = load_model(str(tiny_llama_folder), cache_dir=tiny_cache_dir)
    ids = torch.randint(0, loaded.model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = loaded.model(input_ids=ids).logits
        for index, layer in enumerate(loaded.adapter.layers(loaded.model)):
            width = loaded.adapter.linears(layer)[loaded.adapter.mlp_output].weight.shape[1]
            order = spread_order(torch.rand(width, generator=torch.Generator().manual_seed(index)), 4)
            assert not torch.equal(order, torch.arange(width))
            permute_neurons(loaded.adapter.mlp(layer), loaded.adapter, order)
        after = loaded.model(input_ids=ids).logits
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)


def _tiny_run(folder: Path, cache: Path, **fields):
    loaded = load_model(str(folder), cache_dir=cache)
    windows = torch.randint(0, loaded.model.config.vocab_size, (4, 32), generator=torch.Generator().manual_seed(0))
    stats = collect_statistics(loaded.model, loaded.adapter, windows, CollectionOptions(topics=4), batch_size=2)
    hessians = collect_statistics(loaded.model, loaded.adapter, windows, CollectionOptions(), batch_size=2, hessians=True)
    config = PruneConfig(**fields).validate()
    prune_model(loaded, stats, config, SilentReporter(), hessians)
    return loaded, config


@pytest.mark.parametrize(
    "fields",
    [
        dict(update=True),  # the defaults: the hybrid's masks kept, the kept weights at their least-squares optimum
        dict(update=True, update_mask="fixed"),  # the OBS sweep on the hybrid's masks
        dict(update=True, update_mask="sweep"),  # masks chosen inside the sweep
        dict(update=True, update_mask="sweep", qk_shift=0.1, update_shrink=1.0),
        dict(update=True, update_mask="sweep", pattern="2:4"),
        dict(update=True, update_mask="sweep", pattern="2:4", nm_order="none"),
        dict(pattern="2:4"),  # mask only, neurons permuted
        dict(refine=20),
        dict(refine=20, pattern="2:4"),
        dict(refine=20, update=True, update_mask="fixed"),
        dict(refine=20, gram_offdiag=0.3),
        dict(update=True, update_mask="sweep", gram_offdiag=0.3),
        dict(prune_method="wanda", update=True),
        dict(refine=5, update=True, update_mask="admm"),  # the joint solve, from refined masks
        dict(update=True, update_mask="admm", pattern="2:4"),
        dict(refine=5, update=True, update_mask="lsq"),  # the least-squares weights of the refined masks
        dict(update=True, update_mask="lsq", pattern="2:4"),
        dict(refine=5, update=True, update_mask="lsq", pattern="2:4"),  # quality at 2:4: the N:M refine's residual
        # masks under one Gram weight, the update under another: the held Gram reweighted before the OBS sweep / ADMM
        dict(refine=5, update=True, update_mask="fixed", refine_offdiag=0.25, gram_offdiag=0.5),
        dict(refine=5, update=True, update_mask="admm", pattern="2:4", refine_offdiag=0.25, gram_offdiag=0.5),
    ],
)
def test_every_update_and_refine_mode_hits_the_target(tiny_llama_folder: Path, tiny_cache_dir: Path, fields: dict):
    loaded, config = _tiny_run(tiny_llama_folder, tiny_cache_dir, **fields)
    report = sparsity_report(loaded.model, loaded.adapter, dense_intermediate_size=loaded.model.config.intermediate_size)
    assert report.kind("mlp").sparsity == pytest.approx(0.5, abs=1e-3)
    assert report.total.sparsity == pytest.approx(0.5, abs=1e-3)
    assert all(torch.isfinite(p).all() for p in loaded.model.parameters())
    if config.pattern == "2:4":
        for layer in loaded.adapter.layers(loaded.model):
            for linear in loaded.adapter.linears(layer).values():
                assert bool(((linear.weight == 0).reshape(linear.weight.shape[0], -1, 4).sum(2) >= 2).all())


def test_update_under_the_diagonal_gram_changes_no_kept_weight(tiny_llama_folder: Path, tiny_cache_dir: Path):
    """--gram-offdiag 0: no input channel co-varies with another, so the update has nothing to move."""
    updated, _ = _tiny_run(tiny_llama_folder, tiny_cache_dir, update=True, update_shrink=1.0, gram_offdiag=0.0)
    masked, _ = _tiny_run(tiny_llama_folder, tiny_cache_dir)
    for layer_u, layer_m in zip(updated.adapter.layers(updated.model), masked.adapter.layers(masked.model)):
        for name, linear in updated.adapter.linears(layer_u).items():
            torch.testing.assert_close(linear.weight, masked.adapter.linears(layer_m)[name].weight, rtol=1e-5, atol=1e-6)


def test_least_squares_update_keeps_the_sweeps_masks_and_changes_nothing_under_the_diagonal_gram(
        tiny_llama_folder: Path, tiny_cache_dir: Path):
    swept, _ = _tiny_run(tiny_llama_folder, tiny_cache_dir, refine=5, update=True, update_mask="fixed")
    solved, _ = _tiny_run(tiny_llama_folder, tiny_cache_dir, refine=5, update=True, update_mask="lsq")
    diagonal, _ = _tiny_run(tiny_llama_folder, tiny_cache_dir, update=True, update_mask="lsq", gram_offdiag=0.0)
    masked, _ = _tiny_run(tiny_llama_folder, tiny_cache_dir)
    moved = 0
    for layers in zip(*(run.adapter.layers(run.model) for run in (swept, solved, diagonal, masked))):
        linears = [swept.adapter.linears(layer) for layer in layers]
        for name in linears[0]:
            w_swept, w_solved, w_diagonal, w_masked = (lin[name].weight for lin in linears)
            assert torch.equal(w_swept == 0, w_solved == 0)  # the same masks, other kept values
            moved += int((w_solved != w_swept).sum())
            torch.testing.assert_close(w_diagonal, w_masked, rtol=1e-5, atol=1e-6)
    assert moved > 0


def test_refine_needs_fixed_masks_with_update():
    from hybridprune.errors import UserError

    with pytest.raises(UserError, match="--refine"):
        PruneConfig(refine=10, update=True, update_mask="sweep").validate()
    with pytest.raises(UserError, match="--update-mask"):
        PruneConfig(update_mask="best").validate()
    with pytest.raises(UserError, match="--gram-offdiag"):
        PruneConfig(refine=10, gram_offdiag=1.5).validate()


def test_gram_offdiag_defaults_by_pattern_and_an_explicit_default_is_the_same_configuration():
    from hybridprune.config import GRAM_OFFDIAG

    assert PruneConfig(refine=10).gram_weight == GRAM_OFFDIAG["unstructured"] == 0.25
    assert PruneConfig(refine=10, pattern="2:4").gram_weight == GRAM_OFFDIAG["nm"] == 0.5
    assert PruneConfig(refine=10, pattern="2:4", gram_offdiag=0.8).gram_weight == 0.8
    assert PruneConfig(refine=10, gram_offdiag=0.25).digest == PruneConfig(refine=10).digest
    assert PruneConfig(refine=10, gram_offdiag=0.5).digest != PruneConfig(refine=10).digest
    assert PruneConfig(refine=10).to_dict()["gram_offdiag"] == 0.25  # the run record names what ran


def test_the_refine_weight_follows_gram_offdiag_unless_given_and_only_a_second_weight_changes_the_digest():
    from hybridprune.config import REFINE_OFFDIAG
    from hybridprune.errors import UserError

    assert PruneConfig(refine=10).refine_weight == REFINE_OFFDIAG["unstructured"]
    assert PruneConfig(refine=10, pattern="2:4").refine_weight == REFINE_OFFDIAG["nm"]
    assert PruneConfig(refine=10, pattern="2:4", gram_offdiag=0.8).refine_weight == 0.8  # one flag sets both
    both = PruneConfig(refine=10, update=True, pattern="2:4", gram_offdiag=0.5, refine_offdiag=0.25)
    assert (both.refine_weight, both.gram_weight) == (0.25, 0.5)
    assert both.to_dict()["refine_offdiag"] == 0.25 and both.digest != PruneConfig(**{**both.to_dict(), "refine_offdiag": 0.5}).digest
    assert "refine_offdiag" not in PruneConfig(update=True, pattern="2:4").to_dict()  # no refine: its weight is no knob
    same = PruneConfig(refine=10, gram_offdiag=0.5, refine_offdiag=0.5)
    assert "refine_offdiag" not in same.to_dict() and same.digest == PruneConfig(refine=10, gram_offdiag=0.5).digest
    with pytest.raises(UserError, match="--refine-offdiag"):
        PruneConfig(refine=10, refine_offdiag=-0.1).validate()


@pytest.mark.parametrize(("pattern", "refine_weight"), [("unstructured", 0.25), ("2:4", 0.25), ("unstructured", 0.0)])
def test_masks_refined_under_one_weight_get_the_least_squares_weights_under_the_other(
        tiny_llama_folder: Path, tiny_cache_dir: Path, pattern: str, refine_weight: float):
    """--refine-offdiag 0.25 with --gram-offdiag 0.5: the masks of the refine alone under 0.25, the kept weights
    the least-squares optimum of those masks under 0.5 (checked on layer 0's q/k/v, computed here from scratch)."""
    from hybridprune.methods.reconstruct import least_squares
    from hybridprune.methods.refine import shrink_offdiagonal

    common = dict(refine=5, pattern=pattern, nm_order="none")
    both, _ = _tiny_run(tiny_llama_folder, tiny_cache_dir, update=True, refine_offdiag=refine_weight, gram_offdiag=0.5,
                        **common)
    masks, _ = _tiny_run(tiny_llama_folder, tiny_cache_dir, gram_offdiag=refine_weight, **common)
    one, _ = _tiny_run(tiny_llama_folder, tiny_cache_dir, update=True, gram_offdiag=0.5, **common)
    for layer_b, layer_m in zip(both.adapter.layers(both.model), masks.adapter.layers(masks.model)):
        for name, linear in both.adapter.linears(layer_b).items():
            assert torch.equal(linear.weight == 0, masks.adapter.linears(layer_m)[name].weight == 0)
    dense = load_model(str(tiny_llama_folder), cache_dir=tiny_cache_dir)
    windows = torch.randint(0, dense.model.config.vocab_size, (4, 32), generator=torch.Generator().manual_seed(0))
    hessians = collect_statistics(dense.model, dense.adapter, windows, CollectionOptions(), batch_size=2, hessians=True)
    names = [name for name in dense.adapter.attention_names if dense.adapter.input_group(name) == dense.adapter.input_group(
        dense.adapter.attention_names[0])]
    stack = lambda run: torch.cat([run.adapter.linears(run.adapter.layers(run.model)[0])[n].weight.detach() for n in names])  # noqa: E731
    gram = shrink_offdiagonal(hessians.gram(0, dense.adapter.input_group(names[0]))[0].double(), 0.5)
    solved, weight = stack(both).double(), stack(dense).double()

    def error(v):  # per row, (w - v)^T G (w - v) under the update's Gram
        return (((weight - v) @ gram) * (weight - v)).sum(1)

    exact = torch.zeros_like(weight)  # each row's exact optimum on its support, a dense solve
    for row in range(weight.shape[0]):
        kept = solved[row] != 0
        exact[row, kept] = torch.linalg.solve(gram[kept][:, kept], (weight[row] @ gram)[kept])
    assert bool((error(solved) <= error(exact) * (1 + 1e-3) + 1e-9).all())  # to the update's stopping rule
    under_refine_weight = least_squares(weight, solved != 0, shrink_offdiagonal(gram, refine_weight / 0.5))
    assert float(error(under_refine_weight).sum()) > float(error(exact).sum()) * (1 + 1e-3)  # the weight tells
    assert not torch.equal(solved, stack(one))  # the masks refined under 0.5 are other masks (or other weights)


@pytest.mark.parametrize(
    ("fields", "conflict"),
    [
        (dict(pattern="structured"), "--pattern structured"),
        (dict(sequential=True), ""),  # --sequential refines from the second-order sums of its own pass
        (dict(update=True, update_mask="sweep"), "--update-mask sweep"),
        (dict(update=True, update_mask="fixed"), ""),
        (dict(pattern="2:4"), ""),
    ],
)
def test_refine_conflict_is_the_rule_validate_and_presets_share(fields, conflict):
    """One rule: validate refuses --refine with the conflicting choice, presets drop their refine for it."""
    from hybridprune.errors import UserError

    assert PruneConfig(**fields).refine_conflict() == conflict
    if conflict:
        with pytest.raises(UserError, match="--refine"):
            PruneConfig(refine=10, **fields).validate()
    else:
        PruneConfig(refine=10, **fields).validate()


def test_the_grams_default_weight_follows_the_calibration_tokens_per_input():
    """At GRAM_TOKENS_PER_INPUT tokens per MLP input or more, the refine and the update weigh the off-diagonal
    RICH_GRAM_OFFDIAG, spelled out; a weight given, a configuration without a Gram, or structured removal: unchanged."""
    from hybridprune.config import GRAM_TOKENS_PER_INPUT, RICH_GRAM_OFFDIAG

    inputs = 1536
    few, many = GRAM_TOKENS_PER_INPUT * inputs - 1, GRAM_TOKENS_PER_INPUT * inputs
    for fields in (dict(refine=50), dict(refine=50, update=True), dict(update=True, pattern="2:4"),
                   dict(refine=50, pattern="4:8")):
        config = PruneConfig(**fields)
        assert config.for_calibration(few, inputs) is config
        rich = config.for_calibration(many, inputs)
        assert rich.gram_offdiag == RICH_GRAM_OFFDIAG and rich.gram_weight == rich.refine_weight == RICH_GRAM_OFFDIAG
        assert rich.digest == PruneConfig(**fields, gram_offdiag=RICH_GRAM_OFFDIAG).digest
    for config in (PruneConfig(refine=50, gram_offdiag=0.25), PruneConfig(refine=50, refine_offdiag=0.1),
                   PruneConfig(), PruneConfig(pattern="structured", update=True)):
        assert config.for_calibration(many, inputs) is config


def test_a_full_gram_on_few_calibration_tokens_gets_a_note():
    """Measured (validation_choices.md, 10): the full Gram with few tokens per input fits the calibration text."""
    from hybridprune.config import GRAM_TOKENS_PER_INPUT

    inputs = 1536
    few, many = GRAM_TOKENS_PER_INPUT * inputs - 1, GRAM_TOKENS_PER_INPUT * inputs
    note = PruneConfig(refine=50, gram_offdiag=1.0).gram_note(few, inputs)
    assert "--gram-offdiag 1" in note and f"{few} calibration tokens" in note and "--nsamples" in note
    assert PruneConfig(refine=50, gram_offdiag=1.0).gram_note(many, inputs) == ""
    assert PruneConfig(refine=50).gram_note(few, inputs) == ""  # the default 0.25
    assert PruneConfig(update=True, pattern="2:4").gram_note(few, inputs) == ""  # N:M's default 0.5
    assert PruneConfig(gram_offdiag=1.0).gram_note(few, inputs) == ""  # no refine, no update: no Gram used
    assert "the default 0.5 " in PruneConfig(refine=50, update=True, pattern="2:4", gram_offdiag=1.0).gram_note(few, inputs)
    assert "the default 0.25 " in PruneConfig(refine=50, pattern="2:4", gram_offdiag=1.0).gram_note(few, inputs)  # refine
    assert "the default 0.25 " in note
    refine_note = PruneConfig(refine=50, update=True, refine_offdiag=1.0).gram_note(few, inputs)
    assert "--refine-offdiag 1 " in refine_note and "the default 0.25 " in refine_note
    assert PruneConfig(update=True, refine_offdiag=1.0).gram_note(few, inputs) == ""  # no refine: its weight unused
