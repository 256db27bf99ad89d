"""Per-layer masks for a pruning configuration: Wanda / magnitude / NeuronRank per module.

Pure tensor code: weights, the layer's reduced statistics and the knobs go in, keep-masks
come out. The command layer decides which layers to prune and applies the masks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from hybridprune.masks import mask_n_m, mask_rows, mask_unstructured, neuron_keep_mask, parse_pattern
from hybridprune.methods.allocation import bound_row_sparsity, row_sparsity_of
from hybridprune.methods.magnitude import magnitude_metric
from hybridprune.methods.neuronrank import (
    NeuronStats,
    idf_doc,
    idf_old,
    idf_topic,
    neuron_scores,
    term_frequency,
)
from hybridprune.methods.wanda import wanda_metric


@dataclass(frozen=True)
class NeuronScoring:
    """How NeuronRank turns a layer's activation statistics into one score per neuron."""

    mode: str = "doc"  # doc | topic | old
    tf_kind: str = "out_rms"  # out_rms | rms | mean_abs
    tf_exp: float = 1.0
    idf_exp: float = 1.0
    min_tokens: int = 1
    topic_rate: float = 0.05
    doc_rate: float = 0.0  # doc mode: active in a window on at least this fraction of its tokens


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

    attention_method: str  # wanda | magnitude | none
    mlp_method: str  # wanda | magnitude | neuronrank
    attention_sparsity: float
    mlp_sparsity: float
    pattern: str = "unstructured"
    weight_exp: float = 1.0
    qk_shift: float = 0.0  # q/k pruned at +shift, v/o at -shift (attention total unchanged)
    row_bound: float = 1.0  # gate/up: each neuron's row sparsity within target +- row_bound (1 = unbounded)


def module_metric(method: str, weight: Tensor, input_sumsq: Tensor, weight_exp: float = 1.0) -> Tensor:
    """Wanda |W|^a * ||X_j|| or magnitude |W|^a (the exponent keeps the ranking for magnitude alone)."""
    metric = magnitude_metric(weight) if method == "magnitude" else wanda_metric(weight, input_sumsq)
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
    if plan.attention_method != "none" and plan.attention_sparsity > 0:
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
    if plan.mlp_method != "neuronrank" or neuron_score is None:
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
