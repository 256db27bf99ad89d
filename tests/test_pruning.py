"""Pruning from statistics on tiny random models: targets, knobs, structured shrink, sequential."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from hybridprune.calibration.collect import CollectionOptions, collect_statistics
from hybridprune.config import PruneConfig
from hybridprune.models import load_model
from hybridprune.passes import prune_model
from hybridprune.pruning import plan_layers
from hybridprune.reporting import SilentReporter
from hybridprune.saving import save_pruned
from hybridprune.sparsity import sparsity_report


@pytest.fixture(scope="module")
def calibrated(tiny_llama_folder: Path, tiny_cache_dir: Path):
    loaded = load_model(str(tiny_llama_folder), cache_dir=tiny_cache_dir)
    windows = torch.randint(0, loaded.model.config.vocab_size, (6, 32), generator=torch.Generator().manual_seed(0))
    stats = collect_statistics(loaded.model, loaded.adapter, windows, CollectionOptions(topics=4, q_active=0.8), batch_size=4)
    return tiny_llama_folder, tiny_cache_dir, stats


def masks_of(folder: Path, cache_dir: Path, stats, **config) -> dict[str, torch.Tensor]:
    loaded = load_model(str(folder), cache_dir=cache_dir)
    prune_model(loaded, stats, PruneConfig(**config).validate(), SilentReporter())
    return {name: (p != 0) for name, p in loaded.model.named_parameters() if p.dim() == 2 and "layers" in name}


def kind_sparsity(folder: Path, cache_dir: Path, stats, **config) -> dict[str, float]:
    loaded = load_model(str(folder), cache_dir=cache_dir)
    prune_model(loaded, stats, PruneConfig(**config).validate(), SilentReporter())
    report = sparsity_report(loaded.model, loaded.adapter).to_dict()
    return {kind: report[kind]["sparsity"] for kind in ("attention", "mlp", "total")}


@pytest.mark.parametrize(
    "config",
    [
        dict(prune_method="wanda"),
        dict(prune_method="magnitude"),
        dict(prune_method="hybrid", nr_tfidf_mode="doc"),
        dict(prune_method="hybrid", nr_tfidf_mode="topic"),
        dict(prune_method="hybrid", hybrid_mlp_method="neuronrank_old"),
        dict(prune_method="hybrid", tf_kind="rms"),
        dict(prune_method="hybrid", layer_spread=0.1),
        dict(prune_method="hybrid", qk_shift=0.1),
        dict(prune_method="hybrid", nr_row_bound=0.05),
        dict(prune_method="hybrid", nr_row_bound=1.0),
        dict(prune_method="hybrid", nr_doc_rate=0.2),
    ],
)
def test_every_method_hits_the_target_exactly(calibrated, config):
    achieved = kind_sparsity(*calibrated, sparsity=0.5, **config)
    assert achieved["total"] == pytest.approx(0.5, abs=1e-3)
    if not config.get("layer_spread"):
        assert achieved["attention"] == pytest.approx(0.5, abs=1e-3)
        assert achieved["mlp"] == pytest.approx(0.5, abs=1e-3)  # topic mode prunes the MLPs too


@pytest.mark.parametrize(
    "knob", ["idf_exp", "tf_exp", "weight_exp", "tf_kind", "nr_min_tokens", "layer_spread", "qk_shift", "nr_row_bound", "nr_doc_rate"]
)
def test_every_knob_changes_the_masks(calibrated, knob):
    base = dict(prune_method="hybrid", idf_exp=1.0, nr_doc_rate=0.0)  # rate 0: the token count decides
    changed = {"idf_exp": 3.0, "tf_exp": 0.0, "weight_exp": 2.0, "tf_kind": "mean_abs", "nr_min_tokens": 3,
               "layer_spread": 0.1, "qk_shift": 0.1, "nr_row_bound": 0.02, "nr_doc_rate": 0.1}[knob]
    first = masks_of(*calibrated, sparsity=0.5, **base)
    second = masks_of(*calibrated, sparsity=0.5, **{**base, knob: changed})
    assert any(not torch.equal(first[name], second[name]) for name in first)


def test_topic_rate_changes_topic_mode_masks(calibrated):
    first = masks_of(*calibrated, sparsity=0.5, nr_tfidf_mode="topic", nr_topic_rate=0.05, idf_exp=2.0)
    second = masks_of(*calibrated, sparsity=0.5, nr_tfidf_mode="topic", nr_topic_rate=0.5, idf_exp=2.0)
    assert any(not torch.equal(first[name], second[name]) for name in first)


def test_same_inputs_give_bit_identical_masks(calibrated):
    first = masks_of(*calibrated, sparsity=0.6, nr_tfidf_mode="topic")
    second = masks_of(*calibrated, sparsity=0.6, nr_tfidf_mode="topic")
    assert all(torch.equal(first[name], second[name]) for name in first)


def test_pruning_last_prunes_attention_too(calibrated):
    """The seed skipped attention with --pruning_last, even in hybrid mode."""
    folder, cache_dir, stats = calibrated
    loaded = load_model(str(folder), cache_dir=cache_dir)
    prune_model(loaded, stats, PruneConfig(pruning_last=1).validate(2), SilentReporter())
    report = sparsity_report(loaded.model, loaded.adapter).to_dict()
    layers = report["layers"]
    assert layers[0]["total"]["sparsity"] == 0.0
    assert layers[1]["attention"]["sparsity"] == pytest.approx(0.5, abs=1e-3)
    assert report["total"]["sparsity"] == pytest.approx(0.25, abs=1e-3)


def test_nm_pattern_is_valid_in_every_block(calibrated):
    masks = masks_of(*calibrated, sparsity=0.5, pattern="2:4")
    for mask in masks.values():
        blocks = mask.reshape(mask.shape[0], -1, 4)
        assert (blocks.sum(-1) == 2).all()


def test_structured_model_is_smaller_and_loads_in_plain_transformers(calibrated, tmp_path):
    from transformers import AutoModelForCausalLM

    folder, cache_dir, stats = calibrated
    loaded = load_model(str(folder), cache_dir=cache_dir)
    config = PruneConfig(pattern="structured", sparsity=0.25).validate()
    prune_model(loaded, stats, config, SilentReporter())
    save_pruned(loaded, tmp_path / "out", overwrite=False, metadata={"config": config.to_dict()})
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert reloaded.config.intermediate_size == 96  # 128 neurons, 25% removed
    ids = torch.randint(0, reloaded.config.vocab_size, (1, 16))
    torch.testing.assert_close(reloaded(ids).logits, loaded.model(ids).logits)


def test_allocations_keep_total_exact(calibrated):
    folder, cache_dir, stats = calibrated
    loaded = load_model(str(folder), cache_dir=cache_dir)
    config = PruneConfig(layer_spread=0.2).validate()
    plans = plan_layers(loaded.model, loaded.adapter, stats, config)
    assert len({plan.mlp_sparsity for plan in plans.values()}) == 2
    assert dataclasses.asdict(plans[0]) != dataclasses.asdict(plans[1])


def test_sequential_calibration_prunes_on_pruned_inputs(calibrated, tiny_cache_dir: Path):
    """The original Wanda procedure: layer 1's statistics come from the pruned layer 0."""
    from hybridprune.passes import sequential_pruner

    folder, cache_dir, dense_stats = calibrated
    loaded = load_model(str(folder), cache_dir=cache_dir)
    windows = torch.randint(0, loaded.model.config.vocab_size, (6, 32), generator=torch.Generator().manual_seed(0))
    config = PruneConfig(prune_method="wanda", sequential=True).validate()
    sequential_stats = collect_statistics(
        loaded.model, loaded.adapter, windows, CollectionOptions(topics=4, q_active=0.8), batch_size=4,
        after_layer=sequential_pruner(loaded, config),
    )
    report = sparsity_report(loaded.model, loaded.adapter)
    assert report.total.sparsity == pytest.approx(0.5, abs=1e-3)
    assert torch.equal(sequential_stats.sumsq(0, "attn_in"), dense_stats.sumsq(0, "attn_in"))
    assert not torch.allclose(sequential_stats.sumsq(1, "attn_in"), dense_stats.sumsq(1, "attn_in"))


@pytest.mark.parametrize("knobs", [dict(update=True), dict(refine=5), dict(update=True, refine=5, pattern="2:4")])
def test_sequential_second_order_comes_from_pruned_inputs_and_replays(calibrated, tiny_cache_dir: Path, knobs):
    """--sequential with --update / --refine: each layer's x x^T is collected from the pruned layers before it
    (layer 0 sees the dense inputs, layer 1 does not), in the same entry as the first-order statistics; pruning
    the dense model again from that entry (the cached replay) gives the same weights."""
    from hybridprune.passes import sequential_pruner

    folder, cache_dir, _ = calibrated
    loaded = load_model(str(folder), cache_dir=cache_dir)
    windows = torch.randint(0, loaded.model.config.vocab_size, (6, 32), generator=torch.Generator().manual_seed(0))
    dense_second = collect_statistics(loaded.model, loaded.adapter, windows, CollectionOptions(topics=4, q_active=0.8),
                                      batch_size=4, hessians=True)
    config = PruneConfig(prune_method="hybrid", sequential=True, **knobs).validate()
    entry = collect_statistics(
        loaded.model, loaded.adapter, windows, CollectionOptions(topics=4, q_active=0.8), batch_size=4,
        after_layer=sequential_pruner(loaded, config), hessians=True,
    )
    assert entry.sumsq(1, "attn_in").shape == dense_second.gram(1, "attn_in")[0].shape[:1]  # both kinds there
    assert torch.equal(entry.gram(0, "attn_in")[0], dense_second.gram(0, "attn_in")[0])
    assert not torch.allclose(entry.gram(1, "attn_in")[0], dense_second.gram(1, "attn_in")[0])
    report = sparsity_report(loaded.model, loaded.adapter)
    assert report.total.sparsity == pytest.approx(0.5, abs=1e-3)
    sequential_weights = {n: p.detach().clone() for n, p in loaded.model.named_parameters()}

    replayed = load_model(str(folder), cache_dir=cache_dir)
    prune_model(replayed, entry, config, SilentReporter(), hessians=entry)
    for name, parameter in replayed.model.named_parameters():
        assert torch.equal(parameter, sequential_weights[name]), name
    if config.update:  # the update moved kept weights: not just the dense weights under a mask
        dense = load_model(str(folder), cache_dir=cache_dir).model.state_dict()
        name = "model.layers.1.mlp.down_proj.weight"
        kept = sequential_weights[name] != 0
        assert not torch.allclose(sequential_weights[name][kept], dense[name][kept])


def test_dense_targets_aim_the_writers_at_the_dense_outputs_and_replay(calibrated, tiny_cache_dir: Path):
    """--sequential --dense-targets: the dense model runs alongside; layer 0 (the same inputs in both streams) is
    pruned exactly as without it, layer 1's o_proj / down_proj differently, from two stored vectors per writer;
    pruning the dense model again from that entry (the cached replay) gives the same weights."""
    from hybridprune.passes import sequential_pruner

    folder, cache_dir, _ = calibrated
    windows = torch.randint(0, 64, (6, 32), generator=torch.Generator().manual_seed(1))

    def run(dense_targets: bool, **knobs):
        loaded = load_model(str(folder), cache_dir=cache_dir)
        config = PruneConfig(sequential=True, dense_targets=dense_targets, **knobs).validate()
        entry = collect_statistics(
            loaded.model, loaded.adapter, windows, CollectionOptions(topics=4, q_active=0.8), batch_size=4,
            after_layer=sequential_pruner(loaded, config), hessians=config.needs_second_order, dense_targets=dense_targets,
        )
        return loaded, entry, config

    own, own_entry, _ = run(False, update=True)
    aimed, entry, config = run(True, update=True)
    extra = sorted(set(entry.tensors) - set(own_entry.tensors))
    assert extra == [f"layer.{i}.{g}.{k}" for i in (0, 1) for g in ("down_in", "o_in") for k in ("cross", "own")]
    torch.testing.assert_close(entry.tensors["layer.0.o_in.cross"], entry.tensors["layer.0.o_in.own"])
    weights = [dict(m.model.named_parameters()) for m in (own, aimed)]
    for name in ("model.layers.0.self_attn.o_proj.weight", "model.layers.1.self_attn.q_proj.weight"):
        torch.testing.assert_close(weights[0][name], weights[1][name], rtol=1e-5, atol=1e-6)
    for name in ("model.layers.1.self_attn.o_proj.weight", "model.layers.1.mlp.down_proj.weight"):
        assert not torch.allclose(weights[0][name], weights[1][name]), name
    assert sparsity_report(aimed.model, aimed.adapter).total.sparsity == pytest.approx(0.5, abs=1e-3)

    replayed = load_model(str(folder), cache_dir=cache_dir)
    prune_model(replayed, entry, config, SilentReporter(), hessians=entry)
    for name, parameter in replayed.model.named_parameters():
        torch.testing.assert_close(parameter, weights[1][name], rtol=0, atol=0)
    # masks only (no second-order sums in the pass): the writers are aimed all the same
    masked, masked_aimed = run(False)[0], run(True)[0]
    name = "model.layers.1.self_attn.o_proj.weight"
    assert not torch.allclose(dict(masked.model.named_parameters())[name], dict(masked_aimed.model.named_parameters())[name])


def test_dense_targets_need_sequential():
    from hybridprune.errors import UserError

    with pytest.raises(UserError, match="add --sequential"):
        PruneConfig(dense_targets=True).validate()
    assert "dense_targets" not in PruneConfig().to_dict()  # off: the digests of every earlier configuration stay
    assert not PruneConfig(sequential=True, dense_targets=True).needs_second_order  # first-order sums suffice


@pytest.mark.parametrize(("fields", "conflict"), [(dict(sequential=True), "--sequential"),
                                                  (dict(pattern="2:4"), "--pattern N:M"), (dict(pattern="4:8"), "--pattern N:M")])
def test_layer_spread_is_refused_where_every_layers_sparsity_is_fixed(fields, conflict):
    """An N:M pattern fixes every layer's sparsity and --sequential prunes layer by layer: a spread there would do
    nothing (the N:M masks ignore a layer's target) or cannot be planned (each layer's statistics come as it goes)."""
    from hybridprune.errors import UserError

    assert PruneConfig(**fields).spread_conflict() == conflict
    with pytest.raises(UserError, match="--layer-spread"):
        PruneConfig(layer_spread=0.1, **fields).validate()
    assert PruneConfig(layer_spread=0.1, pattern="structured").validate().spread_conflict() == ""
