"""Structured removal of attention heads and decoder layers on tiny random LLaMA / Qwen2 models."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hybridprune.calibration.collect import CollectionOptions, collect_statistics
from hybridprune.errors import UserError
from hybridprune.models import load_model
from hybridprune.structured import (
    AttentionShape,
    attention_shape,
    block_influence,
    drop_layers,
    head_keep,
    heads_to_remove,
    remove_heads,
    remove_layers,
    remove_neurons,
)

REPO = Path(__file__).resolve().parents[1]


def calibrated(folder: Path, hessians: bool = False):
    loaded = load_model(str(folder))
    windows = torch.randint(0, loaded.model.config.vocab_size, (4, 24), generator=torch.Generator().manual_seed(0))
    stats = collect_statistics(loaded.model, loaded.adapter, windows, CollectionOptions(topics=4, q_active=0.8), batch_size=2)
    second = (
        collect_statistics(loaded.model, loaded.adapter, windows, CollectionOptions(), batch_size=2, hessians=True)
        if hessians
        else None
    )
    return loaded, stats, second


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def fresh_logits(folder: Path, ids: torch.Tensor) -> torch.Tensor:
    """Plain transformers in a new process."""
    torch.save(ids, folder / "ids.pt")
    code = (
        "import torch; from transformers import AutoModelForCausalLM; "
        f"m = AutoModelForCausalLM.from_pretrained({str(folder)!r}); ids = torch.load({str(folder / 'ids.pt')!r}); "
        f"torch.save(m(input_ids=ids).logits, {str(folder / 'logits.pt')!r})"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}, timeout=300)
    return torch.load(folder / "logits.pt")


def test_head_selection_modes():
    shape = AttentionShape(heads=9, kv_heads=3, head_dim=64)
    assert heads_to_remove(0.34, shape) == ("query", 1)
    assert heads_to_remove(0.0, shape) == ("query", 0)
    assert heads_to_remove(0.34, shape, "groups") == ("groups", 1)
    assert heads_to_remove(0.5, AttentionShape(4, 4, 16)) == ("groups", 2)  # MHA: whole heads with their K/V
    with pytest.raises(UserError):
        heads_to_remove(0.95, shape, "query")
    scores = torch.tensor([5.0, 1, 3, 2, 9, 4, 7, 8, 0])
    query, kv = head_keep(scores, shape, "query", 1)
    assert query.tolist() == [0, 2, 4, 5, 6, 7] and kv.tolist() == [0, 1, 2]
    query, kv = head_keep(scores, shape, "groups", 1)
    assert kv.tolist() == [1, 2] and query.tolist() == [3, 4, 5, 6, 7, 8]


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_removing_nothing_changes_nothing(tiny_model_factory, family):
    loaded, stats, _ = calibrated(tiny_model_factory(family))
    ids = torch.randint(0, loaded.model.config.vocab_size, (1, 16))
    before = logits(loaded.model, ids)
    remove_heads(loaded.model, loaded.adapter, stats, 0.0)
    drop_layers(loaded.model, loaded.adapter, [])
    assert torch.equal(logits(loaded.model, ids), before)


@pytest.mark.parametrize("family,mode", [("llama", "query"), ("qwen2", "groups"), ("llama", "groups")])
def test_heads_and_layers_removed_load_in_plain_transformers(tiny_model_factory, tmp_path, family, mode):
    folder = tiny_model_factory(family)
    loaded, stats, hessians = calibrated(folder, hessians=family == "llama")
    model, adapter = loaded.model, loaded.adapter
    shape = attention_shape(model.config)
    removal = remove_heads(model, adapter, stats, 0.5, mode=mode, hessians=hessians)
    assert removal.mode == mode
    if mode == "query":  # 4 heads / 2 KV: one query head per group goes, K/V stay
        assert (removal.heads, removal.kv_heads) == (2, 2)
    else:
        assert (removal.heads, removal.kv_heads) == (2, 1)
    attention = adapter.attention(adapter.layers(model)[0])
    assert attention.q_proj.out_features == removal.heads * shape.head_dim
    assert attention.k_proj.out_features == removal.kv_heads * shape.head_dim
    assert attention.o_proj.in_features == removal.heads * shape.head_dim
    dropped = remove_layers(model, adapter, stats, 1)
    assert len(dropped) == 1 and model.config.num_hidden_layers == 1
    assert len(getattr(model.config, "layer_types", None) or [0]) == (1 if family == "qwen2" else 1)
    ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    expected = logits(model, ids)
    model.save_pretrained(tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["head_dim"] == shape.head_dim and config["num_attention_heads"] == removal.heads
    assert (fresh_logits(tmp_path / "out", ids) - expected).abs().max() <= 1e-4
    # the KV cache works after renumbering (greedy decode runs)
    with torch.no_grad():
        out = model.generate(ids[:1], max_new_tokens=4, do_sample=False, use_cache=True)
    assert out.shape[1] == 16


def test_block_influence_and_neurons(tiny_model_factory):
    loaded, stats, _ = calibrated(tiny_model_factory("llama"))
    influence = block_influence(stats, 2)
    assert influence.shape == (2,) and (influence > 0).all() and (influence <= 2).all()
    width = remove_neurons(loaded.model, loaded.adapter, {i: torch.rand(128) for i in range(2)}, 32)
    assert width == 96 and loaded.model.config.intermediate_size == 96
    stats.tensors = {k: v for k, v in stats.tensors.items() if ".block." not in k}
    with pytest.raises(UserError, match="recalibrate"):
        block_influence(stats, 2)


def test_head_compensation_reduces_output_error(tiny_model_factory):
    """With the second-order entry, o_proj's kept columns absorb part of what the removed heads contributed."""
    folder = tiny_model_factory("llama")
    ids = torch.randint(0, 300, (4, 24), generator=torch.Generator().manual_seed(0))
    errors = []
    for use_update in (False, True):
        loaded, stats, hessians = calibrated(folder, hessians=True)
        reference = logits(loaded.model, ids)
        remove_heads(loaded.model, loaded.adapter, stats, 0.5, mode="query", hessians=hessians if use_update else None)
        errors.append(float((logits(loaded.model, ids) - reference).pow(2).mean()))
    assert errors[1] < errors[0]


# --- the target-speedup planner ------------------------------------------------------------


def test_plan_prefers_cheap_losses_per_second():
    from hybridprune.planner import CostModel, LayerCosts, plan_speedup

    costs = CostModel(dense_seconds=1.0, per_neuron=0.001, per_head=0.004, per_layer=0.2, seqlen=8, layers=4,
                      width=100, heads=4, kv_heads=2)
    flat = torch.linspace(0, 1, 101).double()
    estimates = LayerCosts(neurons=[flat.clone() for _ in range(4)], heads=[torch.tensor([0.0, 0.01]).double()] * 4,
                           layer=torch.tensor([5.0, 0.05, 5.0, 5.0]).double())
    plan = plan_speedup(costs, estimates, 1.25)
    assert plan.estimated_ratio <= 0.8
    assert plan.drop == [1]  # the nearly idle layer goes first: least loss per second
    only = plan_speedup(costs, estimates, 1.25, kinds=("neurons",))
    assert only.drop == [] and only.heads_per_group == 0 and only.neurons > 0
    with pytest.raises(UserError):
        plan_speedup(costs, estimates, 0.9)


def test_target_speedup_builds_a_smaller_loadable_model(tiny_model_factory, tmp_path):
    from hybridprune.planner import CostModel, target_speedup

    loaded, stats, _ = calibrated(tiny_model_factory("llama"))
    costs = CostModel(dense_seconds=1.0, per_neuron=0.001, per_head=0.01, per_layer=0.4, seqlen=16, layers=2,
                      width=128, heads=4, kv_heads=2)
    probe = torch.randint(0, loaded.model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(3))
    from hybridprune.config import PruneConfig
    from hybridprune.pruning import neuron_scoring

    pruned, outcome = target_speedup(
        loaded.model, loaded.adapter, stats, 1.3, neuron_scoring(PruneConfig()), costs=costs, seqlen=16, runs=1, max_rounds=1, probe_windows=probe
    )
    assert outcome.plan.estimated_ratio <= 1 / 1.3 and outcome.measured_ratio > 0
    assert set(outcome.scales) == {"neurons", "heads", "layers"} and all(v > 0 for v in outcome.scales.values())
    assert loaded.model.config.intermediate_size == 128  # the input model is left as is
    config = pruned.config
    assert (config.intermediate_size, config.num_attention_heads) != (128, 4)
    ids = torch.randint(0, config.vocab_size, (1, 10))
    expected = logits(pruned, ids)
    pruned.save_pretrained(tmp_path / "out")
    assert (fresh_logits(tmp_path / "out", ids) - expected).abs().max() <= 1e-4


def test_removal_summary(tiny_model_factory):
    import copy

    from hybridprune.structured import removal_summary

    loaded, stats, _ = calibrated(tiny_model_factory("llama"))
    dense_config = copy.deepcopy(loaded.model.config)
    summary = removal_summary(dense_config, loaded.model, loaded.adapter)
    assert summary["removed_share"] == 0
    remove_heads(loaded.model, loaded.adapter, stats, 0.5, mode="query")
    remove_layers(loaded.model, loaded.adapter, stats, 1)
    summary = removal_summary(dense_config, loaded.model, loaded.adapter)
    assert summary["layers"] == [2, 1] and summary["heads"] == [4, 2]
    # 1 of 2 layers gone, and the other lost q/o of 2 heads: 64*16*2*2 of its 64*16*12 + 3*64*128 weights
    per_layer = 64 * 16 * 12 + 3 * 64 * 128
    assert summary["removed_share"] == pytest.approx(1 - (per_layer - 64 * 16 * 4) / (2 * per_layer))


def test_flop_costs_split_the_dense_time(tiny_model_factory):
    from hybridprune.planner import flop_costs

    loaded = load_model(str(tiny_model_factory("llama")))
    costs = flop_costs(loaded.model, loaded.adapter, 1.0, seqlen=64)
    assert costs.source == "flops"
    assert costs.estimate(0, 0, 0) == pytest.approx(1.0)
    half = costs.estimate(64, 0, 0)
    assert 0.5 < half < 1.0
    head_share = costs.estimate(0, 0, 2)  # every layer gone: the LM head is left
    assert 0 < head_share < half
    assert costs.per_layer > costs.per_head * 4 + costs.per_neuron * 128 - 1e-12
