"""Apply a pruning configuration to a loaded model from calibration statistics (saving the result: saving.py)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from torch import nn

from hybridprune.calibration.second_order import DAMPING
from hybridprune.calibration.stats import CalibrationStats
from hybridprune.config import PruneConfig
from hybridprune.errors import UserError
from hybridprune.masks import allocate_sparsity, parse_pattern
from hybridprune.methods import registry
from hybridprune.methods.admm import admm_prune
from hybridprune.methods.hybrid import (
    LayerPlan,
    NeuronScoring,
    layer_masks,
    score_neurons,
    sweep_specs,
)
from hybridprune.methods.obs import spread_order, sweep_counts, sweep_prune
from hybridprune.methods.reconstruct import (
    aim_at_dense,
    gram_spectrum,
    inverse_factor,
    keep_columns,
    least_squares,
    reconstruct_with_factor,
    shrink_update,
)
from hybridprune.methods.refine import refine_swaps, reweight_residual, scale_offdiagonal, shrink_offdiagonal
from hybridprune.models.adapters import FamilyAdapter
from hybridprune.models.streaming import (
    LayerStream,
)

SWEEP_BLOCK = 128  # columns per block of the OBS sweep (SparseGPT's)
REFINE_BATCH_NM = 8  # N:M refinement: up to 8 swaps (in distinct groups) per row and step (faster, as good)
# unstructured: up to 4 swaps per row and step; on SmolLM2 layer 10 (gram_offdiag 0.5, 2026-12-01) it took 0.57 / 1.08 / 0.20 s
# for gate / down / q against 0.83 / 1.66 / 0.28 s one swap at a time, at the same or lower error (benchmarks/refine_speed.py at 5946eb9).
REFINE_BATCH = 4
REFINE_CHUNK_ELEMENTS = 2**26
"""Rows refine independently (the same masks whatever the grouping, tested), so a stacked matrix is refined
in chunks of at most this many weights: the refine's peak is about eight float32 buffers of its rows x inputs
(the residual, two base terms, two search buffers, copies while it compacts rows): 8.2-8.4 on a 16384 x 4096
chunk, 2.2 GB above the start, 9.4-9.5 before 2026-12-07 (`python benchmarks/refine_pool.py peak [REV]`)."""


def neuron_scoring(config: PruneConfig) -> NeuronScoring:
    mode = "old" if config.hybrid_mlp_method == "neuronrank_old" else config.nr_tfidf_mode
    return NeuronScoring(
        mode=mode,
        tf_kind=config.tf_kind,
        tf_exp=config.tf_exp,
        idf_exp=config.idf_exp,
        min_tokens=config.nr_min_tokens,
        topic_rate=config.nr_topic_rate,
        doc_rate=config.nr_doc_rate,
    )


def layer_importance(
    model: nn.Module, adapter: FamilyAdapter, stats: CalibrationStats, layers: range, stream: LayerStream | None = None
) -> torch.Tensor:
    """Outlier ratio of each layer's Wanda metric (OWL): layers with more outliers are kept denser."""
    ratios = []
    for index in layers:
        outliers, total = 0, 0
        with stream.resident(index) if stream else contextlib.nullcontext():
            for name, linear in adapter.linears(adapter.layers(model)[index]).items():
                metric = linear.weight.detach().abs().float() * stats.sumsq(index, adapter.input_group(name)).sqrt().float()
                outliers += int((metric > 5 * metric.mean()).sum())
                total += metric.numel()
        ratios.append(outliers / total)
    return torch.tensor(ratios, dtype=torch.float64)


def clamp_shift(shift: float, target: float) -> float:
    """--qk-shift limited so that q/k (target + shift) and v/o (target - shift) stay in [0, 1)."""
    limit = max(0.0, min(target, 1.0 - target - 1e-9))
    return max(-limit, min(limit, shift))


def plan_layers(
    model: nn.Module, adapter: FamilyAdapter, stats: CalibrationStats, config: PruneConfig, stream: LayerStream | None = None
) -> dict[int, LayerPlan]:
    """The sparsity targets of every pruned layer; allocations keep the total at the target.

    With `stream` (layers on the meta device) a non-uniform allocation loads each layer once more to weigh it.
    """
    layers = adapter.layers(model)
    pruned = config.pruned_layers(len(layers))
    if config.layer_spread and len(pruned) > 1:
        sizes = torch.tensor(
            [sum(linear.weight.numel() for linear in adapter.linears(layers[i]).values()) for i in pruned],
            dtype=torch.float64,
        )
        importance = layer_importance(model, adapter, stats, pruned, stream)
        targets = allocate_sparsity(importance, sizes, config.sparsity, config.layer_spread)
    else:
        targets = torch.full((len(pruned),), config.sparsity, dtype=torch.float64)
    return {index: layer_plan(config, target) for index, target in zip(pruned, targets.tolist())}


def layer_plan(config: PruneConfig, target: float) -> LayerPlan:
    """One pruned layer's plan at sparsity `target` (the whole run's config otherwise)."""
    attention_method, mlp_method = config.module_methods()
    return LayerPlan(
        attention_method=attention_method,
        mlp_method=mlp_method,
        attention_sparsity=target if attention_method != registry.NONE else 0.0,
        mlp_sparsity=target,
        pattern=config.pattern,
        weight_exp=config.weight_exp,
        qk_shift=clamp_shift(config.qk_shift, target),
        row_bound=config.nr_row_bound,
        update=config.update,
        update_mask=config.update_mask,
        nm_order=config.nm_order,
        refine=config.refine,
        gram_offdiag=config.gram_weight,
        refine_offdiag=config.refine_weight,
        dense_targets=config.dense_targets,
    )


def prune_layer(
    layer: nn.Module,
    index: int,
    adapter: FamilyAdapter,
    stats: CalibrationStats,
    plan: LayerPlan,
    scoring: NeuronScoring,
    hessians: CalibrationStats | None = None,
    update_shrink: float = 1.0,
) -> None:
    """Compute and apply one layer's masks (in place; structured pruning shrinks the MLP).

    With `hessians` (the second-order entry: per input group, the Gram x x^T) and plan.update the kept
    weights are updated to compensate for the pruned ones; the Linears that read the same inputs (q/k/v,
    gate/up) are updated together, as one matrix. plan.update_mask "lsq" (default) sets the kept weights of the
    hybrid's masks to the least-squares optimum of those masks, "fixed" updates around them by the OBS sweep (both
    methods/reconstruct.py); structured removal (one column mask for every row) takes the exact least squares
    whatever the mask choice (`keep_columns`); "admm" solves masks and weights together
    (methods/admm.py), "sweep" chooses the masks inside the OBS sweep on the already-updated weights (methods/obs.py). plan.refine > 0 (needs `hessians`)
    improves the hybrid's masks by swaps before they are applied.
    plan.nm_order "spread" (N:M with NeuronRank) permutes the MLP neurons first (the same function).
    plan.dense_targets (sequential pruning with --dense-targets) first aims o_proj and down_proj at the dense
    model's outputs from the pass's sums in `stats` (aim_layer_at_dense); the masks and the update are then chosen
    for those weights.
    """
    linears = adapter.linears(layer)
    if plan.dense_targets:
        aim_layer_at_dense(linears, index, adapter, stats)
    weights = {name: linear.weight.detach() for name, linear in linears.items()}
    sumsq = {name: stats.sumsq(index, adapter.input_group(name)) for name in linears}
    for name, tensor in weights.items():
        if not torch.isfinite(tensor).all():
            raise UserError(f"layer {index} {name} has NaN or Inf weights: the model is broken, nothing was pruned")
    for name, norms in sumsq.items():
        if not torch.isfinite(norms).all():
            raise UserError(f"layer {index} {name}: NaN or Inf activations in the calibration statistics")
    score = (
        score_neurons(stats.neuron_stats(index), scoring, weights[adapter.mlp_output])
        if plan.mlp_method == registry.NEURONRANK
        else None
    )
    pattern = parse_pattern(plan.pattern)
    if pattern.kind == "nm" and plan.nm_order == "spread" and score is not None:
        # MLP neurons are interchangeable (gate/up rows with down_proj columns): spread the high-score ones over
        # down_proj's N:M groups. The layer computes the same function; the saved model is the permuted one.
        order = spread_order(score, pattern.m)
        permute_neurons(adapter.mlp(layer), adapter, order)
        linears = adapter.linears(layer)
        weights = {name: linear.weight.detach() for name, linear in linears.items()}
        score = score[order.to(score.device)]
        sumsq[adapter.mlp_output] = sumsq[adapter.mlp_output][order.to(sumsq[adapter.mlp_output].device)]
    else:
        order = None

    device = next(iter(weights.values())).device
    cached: dict[tuple[str, str], Any] = {}  # per input group, each computed once per layer and only when asked for

    def once(kind: str, group: str, compute: Callable[[], Any]) -> Any:
        if (kind, group) not in cached:
            cached[(kind, group)] = compute()
        return cached[(kind, group)]

    def permutation(group: str) -> torch.Tensor | None:
        """The neuron order down_proj's inputs were permuted to (None: the group's inputs as cached)."""
        if order is None or group != adapter.input_group(adapter.mlp_output):
            return None
        return order

    def gram_of(group: str, weight: float | None = None) -> torch.Tensor:
        """The damped X^T X (float32, from the layer's second-order entry), its off-diagonal weighted `weight` (None:
        plan.gram_offdiag, the update's; the refine asks for plan.refine_weight). One per group is held: asked for
        another weight, the held Gram is reweighted in place (one pass over it) rather than unpacked again."""
        weight = plan.gram_offdiag if weight is None else weight
        held = cached.get(("gram", group))
        if held is not None:
            have, gram = held
            if have == weight:
                return gram
            if have > 0:  # diag + b/a (G_a - diag) = G_b
                cached[("gram", group)] = (weight, scale_offdiagonal(gram, weight / have, inplace=True))
                return gram
            del cached[("gram", group)], gram, held  # the diagonal alone: nothing to scale back
        assert hessians is not None
        gram = hessians.gram(index, group)[0].to(device)  # unpacked on the CPU, then worked on where the layer is
        if (p := permutation(group)) is not None:  # a permuted G is a gather
            p = p.to(gram.device)
            gram = gram[p][:, p]
        gram = shrink_offdiagonal(gram, weight, inplace=True)  # a fresh copy: scaled in place
        cached[("gram", group)] = (weight, gram)
        return gram

    def factor_of(group: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The upper factor of G^-1 (G shrunk as gram_of says; permuted inputs: of the permuted G) and the dead channels."""
        def compute() -> tuple[torch.Tensor, torch.Tensor]:
            assert hessians is not None
            dead = (hessians.layer_entry(index, f"{group}.gram_diag") == 0).to(device)
            p = permutation(group)
            gram_of(group)
            # handed over, not kept: the Gram's n x n buffer can go before the factorization makes its own
            factor = inverse_factor(cached.pop(("gram", group))[1])
            return factor, (dead if p is None else dead[p.to(dead.device)])
        return once("factor", group, compute)

    sweep = hessians is not None and plan.update and plan.update_mask == "sweep" and pattern.kind != "structured"
    masks = {} if sweep else layer_masks(weights, sumsq, adapter.attention_names, adapter.mlp_names, plan, score)
    with torch.no_grad():
        if "neurons" in masks:
            keep = masks.pop("neurons")
            if hessians is not None and plan.update:  # the removed neurons compensated on down_proj's remaining columns
                down = linears[adapter.mlp_output]
                updated = keep_columns(down.weight, keep, gram_of(adapter.input_group(adapter.mlp_output)))
                down.weight.copy_(shrink_update(down.weight * keep.to(down.weight.device), updated, update_shrink))
            shrink_mlp(adapter.mlp(layer), adapter, keep)
        if sweep:
            _sweep_layer(linears, adapter, plan, score, factor_of, update_shrink)
            return
        # the least-squares update runs chunk by chunk right after the refine of the same rows, on the same Gram, from
        # the refine's final residual (its right-hand side: one n x n product per chunk saved), and writes the group's
        # weights before the next group starts
        lsq = hessians is not None and plan.update and plan.update_mask == "lsq"
        # masks refined under one Gram weight, weights solved under another: per chunk the held Gram is reweighted in
        # place (one pass over it each way) and the refine's residual converted to the update's (elementwise)
        apart = lsq and plan.refine > 0 and plan.refine_weight != plan.gram_offdiag
        solved: set[str] = set()
        if hessians is not None and (plan.refine > 0 or lsq) and masks:
            # rows refine independently under their group's Gram: the Linears that read the same inputs (q/k/v,
            # gate/up) are refined as one matrix, the same masks in fewer, larger steps
            for group in dict.fromkeys(adapter.input_group(name) for name in masks):
                names = [name for name in masks if adapter.input_group(name) == group]
                device = weights[names[0]].device
                stacked = torch.cat([weights[name] for name in names])
                keep = torch.cat([masks[name].to(device) for name in names])
                rows = max(1, REFINE_CHUNK_ELEMENTS // stacked.shape[1])  # the refine's state is ~10 rows x inputs buffers
                keeps, updates = [], []
                for start in range(0, stacked.shape[0], rows):
                    part, part_keep, target = stacked[start : start + rows], keep[start : start + rows], None
                    gram = gram_of(group, plan.refine_weight if plan.refine > 0 else None).to(device)
                    if plan.refine > 0:
                        # the update starts from the refine's final residual (w * ~keep) G: one n x n product saved;
                        # a refine under the diagonal alone holds no off-diagonal to convert
                        residual = lsq and plan.refine_weight > 0
                        refined = refine_swaps(
                            part, part_keep, gram, steps=plan.refine,
                            nm=(pattern.n, pattern.m) if pattern.kind == "nm" else None,
                            batch=REFINE_BATCH_NM if pattern.kind == "nm" else REFINE_BATCH, with_residual=residual,
                        )
                        part_keep, target = refined if residual else (refined, None)
                    keeps.append(part_keep)
                    if lsq:
                        if apart:
                            if target is not None:
                                target = reweight_residual(target, part * ~part_keep, gram.diagonal(),
                                                           plan.gram_offdiag / plan.refine_weight)
                            gram = gram_of(group).to(device)
                        # the preconditioner's eigen-directions of the update's Gram: once per group, for every chunk
                        spectrum = once("spectrum", group, partial(gram_spectrum, gram))
                        updates.append(least_squares(part, part_keep, gram, target=target, spectrum=spectrum))
                    del target
                keep = torch.cat(keeps)
                masks.update(zip(names, keep.split([weights[name].shape[0] for name in names])))
                if lsq:
                    del gram
                    cached.pop(("gram", group), None)  # each group's Gram freed once its rows are solved
                    cached.pop(("spectrum", group), None)
                    updated = shrink_update(stacked * keep, torch.cat(updates), update_shrink)
                    for name, rows_of in zip(names, updated.split([weights[name].shape[0] for name in names])):
                        linears[name].weight.copy_(rows_of)
                    solved.update(names)
                del stacked, keep, keeps, updates
        if hessians is None or not plan.update:
            for name, mask in masks.items():
                linears[name].weight.mul_(mask.to(linears[name].weight.device))
            return
        for group in dict.fromkeys(adapter.input_group(name) for name in masks if name not in solved):
            names = [name for name in masks if adapter.input_group(name) == group]
            stacked = [linears[name].weight for name in names]
            device = stacked[0].device
            keep = torch.cat([masks[name].to(device) for name in names])
            dense = torch.cat(stacked)
            if plan.update_mask == "admm":
                updated, keep = _joint_solve(dense, keep, gram_of(group), pattern)
            else:
                updated = reconstruct_with_factor(dense, keep, *factor_of(group))
            updated = shrink_update(dense * keep, updated, update_shrink)
            for weight, rows in zip(stacked, updated.split([weight.shape[0] for weight in stacked])):
                weight.copy_(rows)


def aim_layer_at_dense(linears: dict[str, nn.Module], index: int, adapter: FamilyAdapter, stats: CalibrationStats) -> None:
    """--dense-targets: o_proj's and down_proj's weights rescaled per input (in place) so that their inputs in the
    pruned model give the dense model's outputs (methods/reconstruct.aim_at_dense), from the sequential pass's
    `<group>.cross` / `<group>.own` sums (in memory during the pass, the layer's file in a cached replay)."""
    for name in adapter.writers:
        group = adapter.input_group(name)
        own, cross = stats.layer_entry(index, f"{group}.own"), stats.layer_entry(index, f"{group}.cross")
        with torch.no_grad():
            linears[name].weight.copy_(aim_at_dense(linears[name].weight, own, cross, DAMPING))


def _joint_solve(dense: torch.Tensor, keep: torch.Tensor, gram: torch.Tensor, pattern) -> tuple[torch.Tensor, torch.Tensor]:
    """--update-mask admm: masks and kept weights of a stacked matrix solved together (methods/admm.py), from the
    hybrid's masks and their per-row counts, in chunks of rows as the refine (each chunk its own penalty schedule)."""
    rows = max(1, REFINE_CHUNK_ELEMENTS // dense.shape[1])
    nm = (pattern.n, pattern.m) if pattern.kind == "nm" else None
    solved = [admm_prune(dense[start : start + rows], keep[start : start + rows], gram, nm=nm)
              for start in range(0, dense.shape[0], rows)]
    return torch.cat([weights for weights, _, _ in solved]), torch.cat([mask for _, mask, _ in solved])


def _sweep_layer(linears, adapter: FamilyAdapter, plan: LayerPlan, score, factor_of, update_shrink: float = 1.0) -> None:
    """Masks chosen inside the OBS sweep, per input group (q/k/v together, gate/up together); with update_shrink < 1
    the kept weights move only that far from their dense values toward the update (the sweep's masks kept)."""
    pattern = parse_pattern(plan.pattern)
    specs = sweep_specs(adapter.attention_names, adapter.mlp_names, plan, score)
    for group in dict.fromkeys(adapter.input_group(name) for name in specs):
        names = [name for name in specs if adapter.input_group(name) == group]
        stacked = [linears[name].weight for name in names]
        device = stacked[0].device
        columns = stacked[0].shape[1]
        groups, counts, scales, offset = [], [], [], 0
        for name, weight in zip(names, stacked):
            spec = specs[name]
            rows = weight.shape[0]
            ids = torch.arange(rows) if spec.group == "row" else torch.zeros(rows, dtype=torch.long)
            counts.append(sweep_counts(torch.full((rows,), spec.sparsity, dtype=torch.float64), ids, columns, SWEEP_BLOCK))
            groups.append(ids + offset)
            offset += int(ids.max()) + 1
            scales.append(spec.row_scale.to(device, torch.float32) if spec.row_scale is not None else torch.ones(rows, device=device))
        updated, _ = sweep_prune(
            torch.cat(stacked),
            *factor_of(group),
            groups=torch.cat(groups),
            counts=torch.cat(counts),
            row_scale=torch.cat(scales),
            nm=(pattern.n, pattern.m) if pattern.kind == "nm" else None,
            block=SWEEP_BLOCK,
        )
        if update_shrink < 1.0:
            dense = torch.cat(stacked)
            updated = shrink_update(dense * (updated != 0), updated, update_shrink)
        for weight, rows in zip(stacked, updated.split([weight.shape[0] for weight in stacked])):
            weight.copy_(rows)


def permute_neurons(mlp: nn.Module, adapter: FamilyAdapter, order: torch.Tensor) -> None:
    """Reorder the MLP's neurons in place: gate/up rows and down_proj columns (the same function)."""
    with torch.no_grad():
        for name in adapter.mlp_inputs:
            linear = getattr(mlp, name)
            index = order.to(linear.weight.device)
            linear.weight.copy_(linear.weight.index_select(0, index))
            if linear.bias is not None:
                linear.bias.copy_(linear.bias.index_select(0, index))
        down = getattr(mlp, adapter.mlp_output)
        down.weight.copy_(down.weight.index_select(1, order.to(down.weight.device)))


def shrink_mlp(mlp: nn.Module, adapter: FamilyAdapter, keep: torch.Tensor) -> None:
    """Remove whole neurons: rows of gate/up and columns of down, as smaller nn.Linear modules."""
    index = keep.nonzero().squeeze(1)
    for name in adapter.mlp_inputs:
        setattr(mlp, name, _select(getattr(mlp, name), index, dim=0))
    setattr(mlp, adapter.mlp_output, _select(getattr(mlp, adapter.mlp_output), index, dim=1))


def _select(linear: nn.Linear, index: torch.Tensor, dim: int) -> nn.Linear:
    weight = linear.weight.detach().index_select(dim, index.to(linear.weight.device))
    smaller = nn.Linear(weight.shape[1], weight.shape[0], bias=linear.bias is not None, dtype=weight.dtype, device=weight.device)
    smaller.weight.data.copy_(weight)
    if linear.bias is not None:
        bias = linear.bias.detach()
        smaller.bias.data.copy_(bias.index_select(0, index.to(bias.device)) if dim == 0 else bias)
    return smaller
