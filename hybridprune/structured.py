"""Structured removal beyond MLP neurons: attention heads and whole decoder layers, from cached statistics.

Each removal physically shrinks the model and rewrites its config, so the saved folder is a standard,
smaller model that plain `transformers` loads (and that runs faster everywhere).

Heads. A config has one `num_attention_heads` / `num_key_value_heads` for all layers, so every layer
loses the same number of heads (which ones is chosen per layer). With grouped-query attention the
default removes the same number r of query heads inside every KV group (`mode="query"`): k_proj /
v_proj, the KV cache and `num_key_value_heads` stay as they are, every group keeps its own best
query heads, and a fraction F of the query heads can be removed in steps of 1/group. When a group
has a single query head (multi-head attention, or F asking for whole groups) whole KV groups go
(`mode="groups"`): the group's query heads and its k/v heads together, `num_key_value_heads` shrinks.
`head_dim` is written explicitly into the config (Llama/Qwen2 compute it as hidden/heads otherwise).

Head score (an estimate of the energy the head adds to the residual stream, summed over calibration
tokens, cross-terms ignored): sum over the head's o_proj input channels j of sumsq_j * ||o_proj[:, j]||^2,
from the `o_in` sums of squares every statistics entry holds. With the second-order entry (`hessian`),
o_proj's remaining columns are updated to compensate for the removed ones (methods/reconstruct.py),
as the structured MLP path does for down_proj.

Layers. Block influence BI_l = mean over tokens of 1 - cos(layer input, layer output) (ShortGPT),
collected once in calibration (stats `layer.l.block.*`); the layers with the lowest BI go. Removing
a layer renumbers the attention modules' `layer_idx` (the KV cache slot) and `layer_types`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from hybridprune.calibration.stats import CalibrationStats
from hybridprune.errors import UserError
from hybridprune.methods.reconstruct import keep_columns
from hybridprune.models.adapters import DOWN_IN, O_IN, FamilyAdapter
from hybridprune.pruning import _select

RECALIBRATE = "the cached statistics predate block-influence scores (cache schema 2): recalibrate with --force"


# --- geometry ----------------------------------------------------------------------------


@dataclass(frozen=True)
class AttentionShape:
    heads: int
    kv_heads: int
    head_dim: int

    @property
    def group(self) -> int:
        return self.heads // self.kv_heads


def attention_shape(config: Any) -> AttentionShape:
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return AttentionShape(heads, kv_heads, head_dim)


# --- scores ------------------------------------------------------------------------------


def head_scores(o_weight: Tensor, o_sumsq: Tensor, shape: AttentionShape) -> Tensor:
    """Per query head: sum over its o_proj input channels of sumsq_j * ||o_proj[:, j]||^2 (float64 [heads])."""
    channel = o_sumsq.double().cpu() * o_weight.detach().double().pow(2).sum(0).cpu()
    return channel.view(shape.heads, shape.head_dim).sum(1)


def neuron_energy(down_weight: Tensor, down_sumsq: Tensor) -> Tensor:
    """Per MLP neuron: sumsq(a_i) * ||down[:, i]||^2, the same units as head_scores."""
    return down_sumsq.double().cpu() * down_weight.detach().double().pow(2).sum(0).cpu()


def block_influence(stats: CalibrationStats, layers: int) -> Tensor:
    """BI_l = mean over tokens of 1 - cos(input, output) of each decoder layer (float64 [layers])."""
    try:
        return torch.tensor([stats.block_influence(index) for index in range(layers)], dtype=torch.float64)
    except KeyError:
        raise UserError(RECALIBRATE) from None


def residual_energy(stats: CalibrationStats, layers: int) -> Tensor:
    """Sum over tokens of ||layer input||^2 per layer: what the energies above are relative to."""
    try:
        return torch.tensor([stats.block(index, "input_sumsq") for index in range(layers)], dtype=torch.float64)
    except KeyError:
        raise UserError(RECALIBRATE) from None


def layer_energy(stats: CalibrationStats, layers: int) -> Tensor:
    """Sum over tokens of ||output - input||^2 per layer (what removing the whole layer takes away)."""
    try:
        return torch.tensor([stats.block(index, "delta_sumsq") for index in range(layers)], dtype=torch.float64)
    except KeyError:
        raise UserError(RECALIBRATE) from None


# --- heads -------------------------------------------------------------------------------


def heads_to_remove(heads_sparsity: float, shape: AttentionShape, mode: str = "auto") -> tuple[str, int]:
    """(mode, count): "query" removes `count` query heads per KV group, "groups" removes `count` whole groups.

    `heads_sparsity` F is rounded to the nearest step the mode allows (1/group or 1/kv_heads of the heads).
    """
    if not 0 <= heads_sparsity < 1:
        raise UserError(f"--heads-sparsity must be in [0, 1), got {heads_sparsity}")
    if mode == "auto":
        mode = "query" if shape.group > 1 and round(heads_sparsity * shape.group) < shape.group else "groups"
    if mode == "query":
        count = round(heads_sparsity * shape.group)
        if count >= shape.group:
            raise UserError(f"--heads-sparsity {heads_sparsity} would remove every query head of a KV group: use mode groups")
    elif mode == "groups":
        count = round(heads_sparsity * shape.kv_heads)
        if count >= shape.kv_heads:
            raise UserError(f"--heads-sparsity {heads_sparsity} would remove every attention head")
    else:
        raise UserError(f"unknown head removal mode '{mode}': use auto, query or groups")
    return mode, count


def head_keep(scores: Tensor, shape: AttentionShape, mode: str, count: int) -> tuple[Tensor, Tensor]:
    """(kept query heads, kept KV heads), sorted indices, from the per-query-head scores of one layer."""
    grouped = scores.view(shape.kv_heads, shape.group)
    if mode == "query":
        keep_in_group = grouped.topk(shape.group - count, dim=1).indices.sort(dim=1).values
        query = (keep_in_group + torch.arange(shape.kv_heads).unsqueeze(1) * shape.group).flatten()
        return query, torch.arange(shape.kv_heads)
    kv = grouped.sum(1).topk(shape.kv_heads - count).indices.sort().values
    query = (kv.unsqueeze(1) * shape.group + torch.arange(shape.group)).flatten()
    return query, kv


def _channels(heads: Tensor, head_dim: int) -> Tensor:
    return (heads.unsqueeze(1) * head_dim + torch.arange(head_dim)).flatten()


def shrink_attention(
    attention: nn.Module,
    adapter: FamilyAdapter,
    keep_query: Tensor,
    keep_kv: Tensor,
    shape: AttentionShape,
    o_gram: Tensor | None = None,
) -> None:
    """Keep only the given query / KV heads of one attention module (q, k, v rows; o columns), in place.

    `o_gram` (the second-order entry's damped o_in Gram) compensates the removed o_proj columns on the
    remaining ones before they are dropped (their least-squares optimum, `keep_columns`).
    """
    q_name, k_name, v_name = adapter.attention_inputs
    o_name = adapter.attention_output
    query_channels, kv_channels = _channels(keep_query, shape.head_dim), _channels(keep_kv, shape.head_dim)
    o_proj = getattr(attention, o_name)
    if o_gram is not None and len(keep_query) < shape.heads:
        keep = torch.zeros(o_proj.in_features, dtype=torch.bool)
        keep[query_channels] = True
        with torch.no_grad():
            o_proj.weight.copy_(keep_columns(o_proj.weight, keep, o_gram))
    setattr(attention, q_name, _select(getattr(attention, q_name), query_channels, dim=0))
    setattr(attention, o_name, _select(o_proj, query_channels, dim=1))
    if len(keep_kv) < shape.kv_heads:
        setattr(attention, k_name, _select(getattr(attention, k_name), kv_channels, dim=0))
        setattr(attention, v_name, _select(getattr(attention, v_name), kv_channels, dim=0))
    heads, kv_heads = len(keep_query), len(keep_kv)
    for name, value in (("num_heads", heads), ("num_key_value_heads", kv_heads), ("num_key_value_groups", heads // kv_heads)):
        if hasattr(attention, name):
            setattr(attention, name, value)


@dataclass
class HeadRemoval:
    mode: str
    removed_per_layer: int  # query heads
    heads: int  # remaining query heads per layer
    kv_heads: int
    kept: dict[int, list[int]] = field(default_factory=dict)  # layer -> kept query heads (original numbering)

    def to_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "removed_per_layer": self.removed_per_layer, "heads": self.heads, "kv_heads": self.kv_heads}


def remove_heads(
    model: nn.Module,
    adapter: FamilyAdapter,
    stats: CalibrationStats,
    heads_sparsity: float,
    mode: str = "auto",
    hessians: CalibrationStats | None = None,
    layer_indices: list[int] | None = None,
) -> HeadRemoval:
    """Remove the lowest-scoring attention heads of every layer (same count everywhere), update the config.

    `layer_indices[i]` is the statistics index of the model's layer i (when layers were dropped first;
    default: the same numbering). Backs `prune --heads-sparsity F [--heads-mode] [--update]`.
    """
    shape = attention_shape(model.config)
    mode, count = heads_to_remove(heads_sparsity, shape, mode)
    layers = adapter.layers(model)
    indices = layer_indices or list(range(len(layers)))
    removal = HeadRemoval(mode, 0, shape.heads, shape.kv_heads)
    if count == 0:
        return removal
    for layer, index in zip(layers, indices):
        attention = adapter.attention(layer)
        o_proj = getattr(attention, adapter.attention_output)
        scores = head_scores(o_proj.weight, stats.sumsq(index, O_IN), shape)
        keep_query, keep_kv = head_keep(scores, shape, mode, count)
        gram = hessians.gram(index, O_IN)[0] if hessians is not None else None
        shrink_attention(attention, adapter, keep_query, keep_kv, shape, gram)
        removal.kept[index] = keep_query.tolist()
    removal.heads, removal.kv_heads = len(keep_query), len(keep_kv)
    removal.removed_per_layer = shape.heads - removal.heads
    model.config.head_dim = shape.head_dim  # explicit: hidden / heads no longer gives it
    model.config.num_attention_heads = removal.heads
    model.config.num_key_value_heads = removal.kv_heads
    return removal


# --- layers ------------------------------------------------------------------------------


def layers_to_drop(stats: CalibrationStats, num_layers: int, count: int, keep_first: int = 0, keep_last: int = 1) -> list[int]:
    """The `count` layers with the lowest block influence (never the first `keep_first` / last `keep_last`)."""
    if not 0 <= count < num_layers:
        raise UserError(f"--drop-layers must be between 0 and {num_layers - 1}, got {count}")
    scores = block_influence(stats, num_layers)
    allowed = [i for i in range(keep_first, num_layers - keep_last)]
    if count > len(allowed):
        raise UserError(f"--drop-layers {count}: only {len(allowed)} layers may be dropped")
    ranked = sorted(allowed, key=lambda i: float(scores[i]))
    return sorted(ranked[:count])


def drop_layers(model: nn.Module, adapter: FamilyAdapter, drop: list[int]) -> list[int]:
    """Remove decoder layers `drop` (indices of the current model), in place; returns the kept original indices.

    The config's num_hidden_layers and per-layer lists (layer_types) follow; every attention module's
    layer_idx (its KV-cache slot) is renumbered.
    """
    layers = adapter.layers(model)
    kept = [i for i in range(len(layers)) if i not in set(drop)]
    if not kept:
        raise UserError("cannot drop every decoder layer")
    parent = adapter.base_model(model)
    new_layers = nn.ModuleList([layers[i] for i in kept])
    setattr(parent, adapter.layers_path.rsplit(".", 1)[1], new_layers)
    for position, layer in enumerate(new_layers):
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = position
        if hasattr(layer, "layer_idx"):
            layer.layer_idx = position
    config = model.config
    for key in ("layer_types",):
        values = getattr(config, key, None)
        if isinstance(values, (list, tuple)) and len(values) == len(layers):
            setattr(config, key, [values[i] for i in kept])
    config.num_hidden_layers = len(kept)
    if hasattr(config, "max_window_layers") and getattr(config, "max_window_layers", None) is not None:
        config.max_window_layers = min(config.max_window_layers, len(kept))
    return kept


def remove_layers(model: nn.Module, adapter: FamilyAdapter, stats: CalibrationStats, count: int) -> list[int]:
    """Drop the `count` lowest-influence layers; returns the dropped (original) indices. Backs `prune --drop-layers N`."""
    drop = layers_to_drop(stats, len(adapter.layers(model)), count)
    drop_layers(model, adapter, drop)
    return drop


# --- MLP neurons (uniform count, any chosen score) -----------------------------------------


def remove_neurons(
    model: nn.Module,
    adapter: FamilyAdapter,
    scores: dict[int, Tensor],
    count: int,
    layer_indices: list[int] | None = None,
    hessians: CalibrationStats | None = None,
) -> int:
    """Remove the `count` lowest-scoring neurons of every layer (scores keyed by statistics index)."""
    from hybridprune.pruning import shrink_mlp

    layers = adapter.layers(model)
    indices = layer_indices or list(range(len(layers)))
    width = getattr(model.config, adapter.intermediate_size_key)
    if count <= 0:
        return width
    for layer, index in zip(layers, indices):
        keep = torch.zeros(width, dtype=torch.bool)
        keep[scores[index].topk(width - count).indices] = True
        mlp = adapter.mlp(layer)
        if hessians is not None:
            down = getattr(mlp, adapter.mlp_output)
            with torch.no_grad():
                down.weight.copy_(keep_columns(down.weight, keep, hessians.gram(index, DOWN_IN)[0]))
        shrink_mlp(mlp, adapter, keep)
    setattr(model.config, adapter.intermediate_size_key, width - count)
    return width - count


# --- summary -----------------------------------------------------------------------------


def decoder_linear_parameters(config: Any, intermediate_key: str = "intermediate_size") -> int:
    """Weights of the decoder Linears (q, k, v, o, gate, up, down over all layers) a config describes."""
    shape = attention_shape(config)
    hidden, width = config.hidden_size, getattr(config, intermediate_key)
    attention = hidden * shape.head_dim * (2 * shape.heads + 2 * shape.kv_heads)
    return config.num_hidden_layers * (attention + 3 * hidden * width)


def removal_summary(dense_config: Any, model: nn.Module, adapter: FamilyAdapter) -> dict[str, Any]:
    """What structured removal took away: geometry before/after and the share of decoder Linear weights removed.

    (sparsity.py counts zeros inside the remaining matrices; removed heads and layers are not in them.)
    """
    before = decoder_linear_parameters(dense_config, adapter.intermediate_size_key)
    after = sum(linear.weight.numel() for layer in adapter.layers(model) for linear in adapter.linears(layer).values())
    config = model.config
    return {
        "layers": [dense_config.num_hidden_layers, config.num_hidden_layers],
        "heads": [dense_config.num_attention_heads, config.num_attention_heads],
        "kv_heads": [attention_shape(dense_config).kv_heads, attention_shape(config).kv_heads],
        "intermediate_size": [getattr(dense_config, adapter.intermediate_size_key), getattr(config, adapter.intermediate_size_key)],
        "decoder_weights": [before, after],
        "removed_share": 1 - after / before,
    }
