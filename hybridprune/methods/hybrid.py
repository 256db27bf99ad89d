"""Per-layer masks for a pruning configuration: Wanda / magnitude / NeuronRank per module.

Pure tensor code: weights, the layer's reduced statistics and the knobs go in, keep-masks
come out. The command layer decides which layers to prune and applies the masks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from hybridprune.masks import mask_n_m, mask_rows, mask_unstructured, neuron_keep_mask, parse_pattern
from hybridprune.methods import registry
from hybridprune.methods.allocation import bound_row_sparsity, row_sparsity_of
from hybridprune.methods.neuronrank import (
    NeuronStats,
    idf_doc,
    idf_old,
    idf_topic,
    neuron_scores,
    term_frequency,
)


@dataclass(frozen=True)
class NeuronScoring:
    """How NeuronRank turns a layer's activation statistics into one score per neuron.

    No defaults here: PruneConfig holds them (pruning.neuron_scoring builds this from it)."""

    mode: str  # doc | topic | old
    tf_kind: str  # a registry.TF_KINDS name
    tf_exp: float
    idf_exp: float
    min_tokens: int
    topic_rate: float
    doc_rate: float  # doc mode: active in a window on at least this fraction of its tokens


def neuron_idf(stats: NeuronStats, scoring: NeuronScoring) -> Tensor:
    if scoring.mode == "doc":
        return idf_doc(stats, scoring.min_tokens, scoring.doc_rate)
    if scoring.mode == "topic":
        return idf_topic(stats, scoring.topic_rate)
    if scoring.mode == "old":
        return idf_old(stats)
    raise ValueError(f"unknown NeuronRank mode {scoring.mode!r}")


def neuron_tf(stats: NeuronStats, tf_kind: str, down_weight: Tensor) -> Tensor:
    """TF_i: how much neuron i moves the layer's output. `out_rms` = rms(a_i) * ||down[:, i]||
    (the RMS of the neuron's contribution to the residual stream); `rms` / `mean_abs` ignore down_proj."""
    if tf_kind == "out_rms":
        return term_frequency(stats, "rms") * down_weight.detach().double().norm(dim=0).cpu()
    return term_frequency(stats, tf_kind)


def score_neurons(stats: NeuronStats, scoring: NeuronScoring, down_weight: Tensor) -> Tensor:
    """s_i = TF_i^tf_exp * IDF_i^idf_exp (float64 [I])."""
    return neuron_scores(neuron_tf(stats, scoring.tf_kind, down_weight), neuron_idf(stats, scoring), scoring.tf_exp, scoring.idf_exp)


@dataclass(frozen=True)
class LayerPlan:
    """Targets and knobs for one decoder layer."""

    attention_method: str  # a registry.MODULE_METRICS name, or registry.NONE
    mlp_method: str  # a registry.MODULE_METRICS name, or registry.NEURONRANK
    attention_sparsity: float
    mlp_sparsity: float
    pattern: str = "unstructured"
    weight_exp: float = 1.0
    qk_shift: float = 0.0  # q/k pruned at +shift, v/o at -shift (attention total unchanged)
    update: bool = False  # weight update of the kept weights (needs the second-order entry)
    update_mask: str = "sweep"  # config.UPDATE_MASKS: sweep chooses masks inside the OBS sweep; fixed / lsq / admm start from the masks below
    sweep_group: str = "matrix"  # in the sweep, Wanda-pruned matrices compare per row ("row") or over a block of the matrix ("matrix")
    nm_order: str = "none"  # spread: N:M hybrid permutes MLP neurons so down_proj's groups mix scores
    refine: int = 0  # swap-refinement steps per row of every mask (0 = off; needs the second-order entry)
    gram_offdiag: float = 1.0  # weight of X^T X's off-diagonal in the update (1 = as calibrated), and in refine unless:
    refine_offdiag: float | None = None  # the off-diagonal's weight when the refine chooses masks (None: gram_offdiag)
    dense_targets: bool = False  # o_proj / down_proj aimed at the dense outputs first (the sequential pass's sums)
    row_bound: float = 1.0  # gate/up: each neuron's row sparsity within target +- row_bound (1 = unbounded)

    @property
    def refine_weight(self) -> float:
        return self.gram_offdiag if self.refine_offdiag is None else self.refine_offdiag


def module_metric(method: str, weight: Tensor, input_sumsq: Tensor, weight_exp: float = 1.0) -> Tensor:
    """The registry's metric `method` (Wanda |W| * ||X_j||, magnitude |W|, ...) times |W|^(a-1); an unknown
    name raises ValueError (the exponent keeps the ranking for magnitude alone)."""
    metric = registry.metric_function(method)(weight, input_sumsq)
    if weight_exp != 1.0:
        metric = metric * weight.abs().float().pow(weight_exp - 1.0)
    return metric


def _row_masks(metric: Tensor, sparsity: float, pattern: str, row_sparsity: Tensor | None = None) -> Tensor:
    parsed = parse_pattern(pattern)
    if parsed.kind == "nm":
        return mask_n_m(metric, parsed.n, parsed.m)
    if row_sparsity is None:
        row_sparsity = torch.full((metric.shape[0],), sparsity, dtype=torch.float64)
    return mask_rows(metric, row_sparsity)


@dataclass(frozen=True)
class SweepSpec:
    """How the OBS sweep chooses one matrix's mask: its target, its comparison groups, a per-row scale."""

    sparsity: float
    group: str  # row: each row prunes its share (Wanda); matrix: one group per block of columns
    row_scale: Tensor | None = None  # multiplies each row's saliency (the neuron score for gate/up)


def sweep_specs(
    attention_names: tuple[str, ...],
    mlp_names: tuple[str, str, str],
    plan: LayerPlan,
    neuron_score: Tensor | None,
) -> dict[str, SweepSpec]:
    """The masks-inside-the-sweep counterpart of `layer_masks` (unstructured and N:M; the same targets).

    Attention and down_proj: rows (Wanda's groups), or one group per block of the matrix with plan.sweep_group "matrix"
    (SparseGPT's). gate/up under NeuronRank: one group per block of the matrix with the saliency times
    (s_i / mean s)^2, as the hybrid's mask scales |W| ||x|| by s_i/mean s. Under N:M every row picks N of M.
    """
    specs: dict[str, SweepSpec] = {}
    if plan.attention_method != registry.NONE and plan.attention_sparsity > 0:
        for position, name in enumerate(attention_names):
            shift = plan.qk_shift if position < 2 else -plan.qk_shift
            specs[name] = SweepSpec(plan.attention_sparsity + shift, plan.sweep_group)
    if plan.mlp_sparsity <= 0:
        return specs
    gate, up, down = mlp_names
    relative = None
    if plan.mlp_method == registry.NEURONRANK and neuron_score is not None:
        relative = (neuron_score / neuron_score.mean()).float()
    for name in (gate, up):
        if relative is not None:
            specs[name] = SweepSpec(plan.mlp_sparsity, "matrix", relative)
        else:
            specs[name] = SweepSpec(plan.mlp_sparsity, plan.sweep_group)
    specs[down] = SweepSpec(plan.mlp_sparsity, plan.sweep_group)
    return specs


def layer_masks(
    weights: dict[str, Tensor],
    sumsq: dict[str, Tensor],
    attention_names: tuple[str, ...],
    mlp_names: tuple[str, str, str],
    plan: LayerPlan,
    neuron_score: Tensor | None,
) -> dict[str, Tensor]:
    """Keep-masks for the layer's Linears (True = keep); modules left out are not pruned.

    `mlp_names` is (gate, up, down); `sumsq[name]` is the squared input norm of that Linear.
    For `structured`, gate/up/down get whole-neuron masks ([I] bool, under the key "neurons").
    """
    masks: dict[str, Tensor] = {}
    structured = parse_pattern(plan.pattern).kind == "structured"
    attention_pattern = "unstructured" if structured else plan.pattern
    if plan.attention_method != registry.NONE and plan.attention_sparsity > 0:
        for position, name in enumerate(attention_names):
            # q and k come first in attention_names; v and o after them (equal parameter counts in pairs).
            shift = plan.qk_shift if position < 2 else -plan.qk_shift
            metric = module_metric(plan.attention_method, weights[name], sumsq[name], plan.weight_exp)
            masks[name] = _row_masks(metric, plan.attention_sparsity + shift, attention_pattern)
    if plan.mlp_sparsity <= 0:
        return masks
    gate, up, down = mlp_names
    if structured:
        score = neuron_score if neuron_score is not None else sumsq[down].sqrt() * weights[down].double().norm(dim=0)
        masks["neurons"] = neuron_keep_mask(score, plan.mlp_sparsity)
        return masks
    if plan.mlp_method != registry.NEURONRANK or neuron_score is None:
        for name in mlp_names:
            metric = module_metric(plan.mlp_method, weights[name], sumsq[name], plan.weight_exp)
            masks[name] = _row_masks(metric, plan.mlp_sparsity, plan.pattern)
        return masks
    # gate/up row i belongs to neuron i: the neuron score scales the Wanda metric and the whole matrix is
    # one comparison group, so low-score neurons lose more of their weights (the matrix stays exact).
    relative_score = (neuron_score / neuron_score.mean()).float().unsqueeze(1)
    for name in (gate, up):
        metric = module_metric("wanda", weights[name], sumsq[name], plan.weight_exp) * relative_score
        if parse_pattern(plan.pattern).kind == "nm":
            masks[name] = _row_masks(metric, plan.mlp_sparsity, plan.pattern)  # N:M blocks lie inside a row
        else:
            masks[name] = mask_unstructured(metric, plan.mlp_sparsity, group="matrix")
            if plan.row_bound < 1.0:
                rates = bound_row_sparsity(row_sparsity_of(masks[name]), plan.mlp_sparsity, plan.row_bound)
                masks[name] = mask_rows(metric, rates)
    # down_proj rows already span all neurons through ||a_i||: plain Wanda measured best there.
    metric = module_metric("wanda", weights[down], sumsq[down], plan.weight_exp)
    masks[down] = _row_masks(metric, plan.mlp_sparsity, plan.pattern)
    return masks
