"""Plan a mix of structured removals (MLP neurons, attention heads, whole layers) for a target prefill speed-up.

1. `measure_costs`: on this machine, batch 1 x seqlen, time the dense model against three shrunk
   copies (half the neurons of every layer gone; one query head per KV group gone; a fifth of the
   layers gone), interleaved, medians. That gives seconds per neuron (per layer), per query head
   (per layer) and per whole layer, plus the part no removal touches (embeddings, LM head).
2. `plan_speedup`: estimated loss of each removal, from the cached statistics, in one unit: the
   energy a component adds to the residual stream (sum over calibration tokens) relative to the
   residual stream's own energy at that layer. A neuron: sumsq(a_i) ||down[:, i]||^2; a query head:
   sum over its o_proj input channels of sumsq_j ||o_proj[:, j]||^2; a layer: sum ||out - in||^2.
   A standard config needs the same neuron count and the same head count in every layer, so the
   moves are: k more neurons out of every layer, one more query head out of every KV group, or one
   more layer dropped (the one with the least energy). Greedy: take the move with the least
   estimated loss per second saved until the estimated time reaches dense / target.
3. `apply_plan` builds the model; `target_speedup` also measures it against the dense model and
   re-plans for a stronger target while the measured ratio misses (a few rounds at most).

Which neurons go is decided by the pruning configuration's NeuronRank scores (as `--pattern
structured` does), which heads by the head score above, which layers by their energy.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from hybridprune.calibration.stats import CalibrationStats
from hybridprune.errors import UserError
from hybridprune.latency import paired_prefill_ratios
from hybridprune.methods.hybrid import NeuronScoring, score_neurons
from hybridprune.models.adapters import DOWN_IN, O_IN, FamilyAdapter
from hybridprune.pruning import neuron_scoring
from hybridprune.structured import (
    _channels,
    attention_shape,
    drop_layers,
    head_keep,
    head_scores,
    layer_energy,
    neuron_energy,
    removal_summary,
    remove_heads,
    remove_layers,
    remove_neurons,
    residual_energy,
    shrink_attention,
)


@dataclass
class CostModel:
    """Seconds of one batch-1 prefill, split into what each removal saves (measured on this machine)."""

    dense_seconds: float
    per_neuron: float  # one neuron out of one layer
    per_head: float  # one query head out of one layer
    per_layer: float  # one whole (dense) layer
    seqlen: int
    layers: int
    width: int
    heads: int
    kv_heads: int
    measured: dict[str, float] = field(default_factory=dict)
    source: str = "measured"  # measured | flops (the dense time measured, split by multiply-accumulates)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def estimate(self, neurons: int, heads: int, dropped: int) -> float:
        """Estimated prefill seconds with `neurons` / `heads` removed from every kept layer and `dropped` layers gone."""
        rest = self.dense_seconds - self.layers * self.per_layer
        layer = self.per_layer - neurons * self.per_neuron - heads * self.per_head
        return rest + (self.layers - dropped) * layer


def flop_costs(model: nn.Module, adapter: FamilyAdapter, dense_seconds: float, seqlen: int = 512) -> CostModel:
    """The measured dense prefill time split by multiply-accumulates per token (a causal window of `seqlen`).

    Per layer: q/k/v/o and the MLP matmuls, plus the attention scores and the weighted sum (2 x
    seqlen/2 x head_dim per query head on average); outside: the LM head. Matmul-bound CPU
    prefill follows this closely (it predicts 0.72x for half the SmolLM2 neurons; 0.76x measured),
    and unlike timings of shrunk copies it is not at the mercy of other processes on a shared machine.
    """
    config = model.config
    shape = attention_shape(config)
    hidden, width = config.hidden_size, getattr(config, adapter.intermediate_size_key)
    layers = len(adapter.layers(model))
    neuron = 3 * hidden
    head = 2 * hidden * shape.head_dim + 2 * (seqlen / 2) * shape.head_dim
    kv = 2 * hidden * shape.head_dim * shape.kv_heads
    layer = width * neuron + shape.heads * head + kv
    head_out = hidden * model.get_output_embeddings().weight.shape[0]
    per_mac = dense_seconds / (layers * layer + head_out)
    return CostModel(dense_seconds, neuron * per_mac, head * per_mac, layer * per_mac, seqlen, layers, width,
                     shape.heads, shape.kv_heads, {"dense": dense_seconds}, "flops")


def _shrunk_copy(model: nn.Module, adapter: FamilyAdapter, neurons: int = 0, heads_per_group: int = 0, drop: int = 0) -> nn.Module:
    """A copy with arbitrary components removed (costs do not depend on which)."""
    clone = copy.deepcopy(model)
    layers = adapter.layers(clone)
    shape = attention_shape(clone.config)
    if neurons:
        width = getattr(clone.config, adapter.intermediate_size_key)
        scores = {i: torch.arange(width, 0, -1, dtype=torch.float64) for i in range(len(layers))}
        remove_neurons(clone, adapter, scores, neurons)
    if heads_per_group:

        for layer in layers:
            keep_query, keep_kv = head_keep(torch.arange(shape.heads, 0, -1, dtype=torch.float64), shape, "query", heads_per_group)
            shrink_attention(adapter.attention(layer), adapter, keep_query, keep_kv, shape)
        clone.config.head_dim = shape.head_dim
        clone.config.num_attention_heads = len(keep_query)
    if drop:
        drop_layers(clone, adapter, list(range(1, 1 + drop)))
    return clone


def measure_costs(
    model: nn.Module, adapter: FamilyAdapter, seqlen: int = 512, runs: int = 3, progress: Callable[[str], None] | None = None
) -> CostModel:
    """Per-component prefill costs on this machine (dense vs three shrunk copies, paired runs, median ratios)."""
    config = model.config
    layers = len(adapter.layers(model))
    width = getattr(config, adapter.intermediate_size_key)
    shape = attention_shape(config)
    neurons, drop = width // 2, max(1, layers // 5)
    heads = 1 if shape.group > 1 else 0
    variants = {"dense": model, "neurons": _shrunk_copy(model, adapter, neurons=neurons), "layers": _shrunk_copy(model, adapter, drop=drop)}
    if heads:
        variants["heads"] = _shrunk_copy(model, adapter, heads_per_group=heads)
    dense, ratios = paired_prefill_ratios(variants.pop("dense"), variants, seqlen, runs)
    times = {"dense": dense, **{name: dense * ratio for name, ratio in ratios.items()}}
    per_layer = max(dense - times["layers"], 0.0) / drop
    per_neuron = max(dense - times["neurons"], 0.0) / (layers * neurons)
    per_head = max(dense - times["heads"], 0.0) / (layers * heads * shape.kv_heads) if heads else 0.0
    return CostModel(dense, per_neuron, per_head, per_layer, seqlen, layers, width, shape.heads, shape.kv_heads, times)


@dataclass
class Plan:
    neurons: int  # removed from every kept layer
    heads_per_group: int  # query heads removed from every KV group of every kept layer
    drop: list[int]  # dropped layers (original indices)
    estimated_seconds: float
    estimated_ratio: float  # estimated prefill time / dense
    estimated_loss: float  # sum of relative energies removed
    steps: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class LayerCosts:
    """Per layer, cumulative estimated loss of removing the first k neurons / r heads per group (k, r = 0..)."""

    neurons: list[Tensor]  # [width + 1] each
    heads: list[Tensor]  # [group] each
    layer: Tensor  # [layers]


def neuron_rank_scores(model: nn.Module, adapter: FamilyAdapter, stats: CalibrationStats, scoring: NeuronScoring) -> dict[int, Tensor]:
    """The NeuronRank score of every neuron of every layer (what --pattern structured ranks by)."""
    return {
        index: score_neurons(stats.neuron_stats(index), scoring, getattr(adapter.mlp(layer), adapter.mlp_output).weight)
        for index, layer in enumerate(adapter.layers(model))
    }


def layer_costs(model: nn.Module, adapter: FamilyAdapter, stats: CalibrationStats, scores: dict[int, Tensor]) -> LayerCosts:
    layers = adapter.layers(model)
    shape = attention_shape(model.config)
    residual = residual_energy(stats, len(layers))
    neurons, heads = [], []
    for index, layer in enumerate(layers):
        down = getattr(adapter.mlp(layer), adapter.mlp_output)
        energy = neuron_energy(down.weight, stats.sumsq(index, DOWN_IN)) / residual[index]
        order = scores[index].argsort()  # lowest score first: removed first
        neurons.append(torch.cat([torch.zeros(1, dtype=torch.float64), energy[order].cumsum(0)]))
        o_proj = getattr(adapter.attention(layer), adapter.attention_output)
        grouped = (head_scores(o_proj.weight, stats.sumsq(index, O_IN), shape) / residual[index]).view(shape.kv_heads, shape.group)
        per_r = grouped.sort(dim=1).values.cumsum(1).sum(0)  # removing r heads of every group: the r smallest
        heads.append(torch.cat([torch.zeros(1, dtype=torch.float64), per_r]))
    return LayerCosts(neurons, heads, layer_energy(stats, len(layers)) / residual)


def plan_speedup(
    costs: CostModel,
    estimates: LayerCosts,
    target: float,
    neuron_step: int | None = None,
    kinds: tuple[str, ...] = ("neurons", "heads", "layers"),
    keep_first: int = 1,
    keep_last: int = 1,
    scales: dict[str, float] | None = None,
) -> Plan:
    """Greedy plan: least estimated loss per second saved, until estimated time <= dense / target.

    `scales` (from `probe_scales`) converts each kind's energy estimate into measured loss (nats per token).
    """
    scales = scales or {}
    neuron_scale, head_scale, layer_scale = (scales.get(kind, 1.0) for kind in ("neurons", "heads", "layers"))
    if target <= 1:
        raise UserError(f"--target-speedup must be above 1, got {target}")
    goal = costs.dense_seconds / target
    step = neuron_step or max(1, costs.width // 32)
    group = costs.heads // costs.kv_heads
    k = r = 0
    dropped: list[int] = []
    steps: list[str] = []

    def loss(k: int, r: int, dropped: list[int]) -> float:
        total = 0.0
        for index in range(costs.layers):
            if index in dropped:
                total += layer_scale * float(estimates.layer[index])
            else:
                total += neuron_scale * float(estimates.neurons[index][k]) + head_scale * float(estimates.heads[index][r])
        return total

    current_time, current_loss = costs.estimate(k, r, 0), 0.0
    while current_time > goal:
        moves = []
        if "neurons" in kinds and k + step < costs.width:
            moves.append(("neurons", k + step, r, dropped))
        if "heads" in kinds and r + 1 < group and costs.per_head > 0:
            moves.append(("heads", k, r + 1, dropped))
        allowed = [i for i in range(keep_first, costs.layers - keep_last) if i not in dropped]
        if "layers" in kinds and allowed:
            best = min(allowed, key=lambda i: loss(k, r, sorted(dropped + [i])))
            moves.append(("layer", k, r, sorted(dropped + [best])))
        if not moves:
            raise UserError(f"a {target}x prefill speed-up is out of reach with {', '.join(kinds)} on this model")
        scored = []
        for kind, nk, nr, nd in moves:
            time_after = costs.estimate(nk, nr, len(nd))
            saved = current_time - time_after
            if saved <= 0:
                continue
            scored.append(((loss(nk, nr, nd) - current_loss) / saved, kind, nk, nr, nd, time_after))
        if not scored:
            raise UserError(f"no removal makes the model faster by the cost model: a {target}x speed-up is out of reach")
        _, kind, k, r, dropped, current_time = min(scored, key=lambda item: item[0])
        current_loss = loss(k, r, dropped)
        steps.append(f"{kind}: neurons {k}, heads/group {r}, dropped {len(dropped)} -> est {current_time / costs.dense_seconds:.3f}x")
    return Plan(k, r, dropped, current_time, current_time / costs.dense_seconds, current_loss, steps)


def apply_plan(
    model: nn.Module,
    adapter: FamilyAdapter,
    stats: CalibrationStats,
    plan: Plan,
    scores: dict[int, Tensor],
    hessians: CalibrationStats | None = None,
) -> None:
    """Remove the planned neurons and heads (statistics indices intact), then drop the planned layers; in place."""
    shape = attention_shape(model.config)
    remove_neurons(model, adapter, scores, plan.neurons, hessians=hessians)
    if plan.heads_per_group:
        remove_heads(model, adapter, stats, plan.heads_per_group / shape.group, mode="query", hessians=hessians)
    drop_layers(model, adapter, plan.drop)


def probe_scales(
    model: nn.Module,
    adapter: FamilyAdapter,
    stats: CalibrationStats,
    scores: dict[int, Tensor],
    estimates: LayerCosts,
    windows: Tensor,
    neuron_share: float = 0.375,
    layer_share: float = 1 / 6,
    hessians: CalibrationStats | None = None,
) -> dict[str, float]:
    """Measured loss (mean NLL increase on `windows`) per unit of estimated loss, for each kind.

    The energy estimates rank components within a kind well but are not comparable across kinds
    (a layer's output energy relative to a residual stream dominated by a few massive dimensions
    says little about the loss), so one probe per kind puts them on the measured scale: a share of
    the neurons of every layer, one query head per KV group, a share of the layers (lowest estimate).
    With `hessians` the probes compensate as the final model will (--update), so the scales match it.
    """
    from hybridprune.evaluation import perplexity

    base = perplexity(model, windows).nll
    layers = len(adapter.layers(model))
    shape = attention_shape(model.config)
    width = getattr(model.config, adapter.intermediate_size_key)
    scales = {}
    k = int(width * neuron_share)
    probe = copy.deepcopy(model)
    remove_neurons(probe, adapter, scores, k, hessians=hessians)
    scales["neurons"] = (perplexity(probe, windows).nll - base) / max(sum(float(e[k]) for e in estimates.neurons), 1e-12)
    if shape.group > 1:
        probe = copy.deepcopy(model)
        remove_heads(probe, adapter, stats, 1 / shape.group, mode="query", hessians=hessians)
        scales["heads"] = (perplexity(probe, windows).nll - base) / max(sum(float(e[1]) for e in estimates.heads), 1e-12)
    count = max(1, round(layers * layer_share))
    drop = sorted(range(1, layers - 1), key=lambda i: float(estimates.layer[i]))[:count]
    probe = copy.deepcopy(model)
    drop_layers(probe, adapter, drop)
    scales["layers"] = (perplexity(probe, windows).nll - base) / max(float(estimates.layer[drop].sum()), 1e-12)
    del probe
    return {kind: max(value, 1e-9) for kind, value in scales.items()}


@dataclass
class SpeedupOutcome:
    plan: Plan
    costs: CostModel
    measured_ratio: float  # measured prefill time / dense (interleaved, medians)
    rounds: int
    history: list[dict[str, float]] = field(default_factory=list)

    scales: dict[str, float] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"plan": self.plan.to_dict(), "costs": self.costs.to_dict(), "measured_ratio": self.measured_ratio,
                "rounds": self.rounds, "history": self.history, "scales": self.scales}


def target_speedup(
    model: nn.Module,
    adapter: FamilyAdapter,
    stats: CalibrationStats,
    target: float,
    scoring: NeuronScoring,
    hessians: CalibrationStats | None = None,
    kinds: tuple[str, ...] = ("neurons", "heads", "layers"),
    seqlen: int = 512,
    runs: int = 5,
    max_rounds: int = 3,
    costs: CostModel | None = None,
    progress: Callable[[str], None] | None = None,
    probe_windows: Tensor | None = None,
    scales: dict[str, float] | None = None,
    tolerance: float = 1.02,
) -> tuple[nn.Module, SpeedupOutcome]:
    """Plan, build (a pruned copy; `model` is left as is) and validate a `target`x faster prefill.

    Backs `prune --target-speedup X [--speedup-kinds neurons,heads,layers] [--update]`.
    `probe_windows` (a few calibration windows, e.g. 4 x 512) puts the kinds' loss estimates on one
    measured scale (probe_scales) before planning; recommended whenever more than one kind is allowed.
    While the measured ratio (median of per-run ratios, paired with the dense model) exceeds 1/target by more than
    `tolerance`, the plan is redone for a target scaled by the miss (at most `max_rounds` plans).
    """
    costs = costs or measure_costs(model, adapter, seqlen, runs, progress)
    scores = neuron_rank_scores(model, adapter, stats, scoring)
    estimates = layer_costs(model, adapter, stats, scores)
    if scales is None and probe_windows is not None and len(kinds) > 1:
        scales = probe_scales(model, adapter, stats, scores, estimates, probe_windows, hessians=hessians)
    aim, history = target, []
    for round_number in range(1, max_rounds + 1):
        plan = plan_speedup(costs, estimates, aim, kinds=kinds, scales=scales)
        pruned = copy.deepcopy(model)
        apply_plan(pruned, adapter, stats, plan, scores, hessians)
        # the median of per-run paired ratios: what `eval --latency` reports too (the minimum flattered
        # the plan: 0.66x by min-of-3 read 0.705x as eval's median on the same folder, quiet machine)
        measured = paired_prefill_ratios(model, {"pruned": pruned}, seqlen, runs, statistic="median")[1]["pruned"]
        history.append({"aim": aim, "estimated_ratio": plan.estimated_ratio, "measured_ratio": measured})
        if measured <= tolerance / target or round_number == max_rounds:
            return pruned, SpeedupOutcome(plan, costs, measured, round_number, history, scales)
        aim = aim * measured * target  # measured too slow by this factor: ask for that much more
        del pruned
    raise AssertionError("unreachable")


# --- the prune step: --drop-layers, --heads-sparsity or the --target-speedup plan ------------


def apply_structured(
    loaded: Any,
    stats: CalibrationStats,
    config: Any,
    hessians: CalibrationStats | None = None,
    probe_windows: Tensor | None = None,
    seqlen: int = 512,
    progress: Any = None,
    dense_config: Any = None,
) -> dict[str, Any] | None:
    """The structured step of `prune` after the masks (config: PruneConfig; loaded: LoadedModel, changed in place):
    --drop-layers, then --heads-sparsity, or the --target-speedup plan. None when none of them is asked for.

    Compensation (with `hessians`) may move weights that the masks zeroed; those zeros are put back, so the
    sparsity the masks gave is kept. Returns what was removed (removal_summary, plus the plan).
    """
    if not (config.heads_sparsity or config.drop_layers or config.target_speedup):
        return None
    model, adapter = loaded.model, loaded.adapter
    dense_config = dense_config if dense_config is not None else copy.deepcopy(model.config)  # before any removal
    zeros = {(i, name): linear.weight == 0 for i, layer in enumerate(adapter.layers(model))
             for name, linear in adapter.linears(layer).items()}
    outcome = None
    if config.target_speedup:
        model, outcome = target_speedup(model, adapter, stats, config.target_speedup, neuron_scoring(config), hessians,
                                        seqlen=seqlen, probe_windows=probe_windows, progress=progress)
        loaded.model = model
    else:
        indices = list(range(len(adapter.layers(model))))
        if config.drop_layers:
            dropped = remove_layers(model, adapter, stats, config.drop_layers)
            indices = [index for index in indices if index not in dropped]
        removal = None
        if config.heads_sparsity:
            shape = attention_shape(model.config)
            removal = remove_heads(model, adapter, stats, config.heads_sparsity, hessians=hessians, layer_indices=indices)
        with torch.no_grad():
            for index, layer in zip(indices, adapter.layers(model)):
                for name, linear in adapter.linears(layer).items():
                    before = zeros[(index, name)]
                    if removal is not None and name == adapter.attention_output and index in removal.kept:
                        before = before[:, _channels(torch.tensor(removal.kept[index]), shape.head_dim)]
                    if before.shape == linear.weight.shape:  # q/k/v rows of removed heads: those rows are gone
                        linear.weight.masked_fill_(before.to(linear.weight.device), 0.0)
    summary = removal_summary(dense_config, model, adapter)
    if outcome is not None:
        summary["speedup_plan"] = outcome.to_dict()
    return summary
