"""Whole-model pruning passes: every planned layer pruned in memory, streamed layer by layer, in the
sequential calibration pass, or in a pass that collects each layer's second-order sums just before
pruning it (`--second-order recompute`). The per-layer work is pruning.prune_layer."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from hybridprune.calibration.collect import CollectionOptions, collect_statistics
from hybridprune.calibration.runner import return_freed_memory
from hybridprune.calibration.stats import CalibrationStats
from hybridprune.config import PruneConfig
from hybridprune.errors import UserError
from hybridprune.masks import parse_pattern
from hybridprune.methods.hybrid import LayerPlan
from hybridprune.models.loading import LoadedModel
from hybridprune.models.streaming import ShardWriter, outside_layer_names, parameter_name
from hybridprune.models.weights import read_tensors
from hybridprune.pruning import layer_plan, neuron_scoring, plan_layers, prune_layer
from hybridprune.reporting import Reporter
from hybridprune.sparsity import ModuleCount, SparsityReport, assemble_report, layer_counts, zero_count


@dataclass
class PruneOutcome:
    plans: dict[int, LayerPlan]
    seconds: float


def check_layer_count(stats: CalibrationStats, loaded: LoadedModel) -> None:
    if stats.num_layers != loaded.num_layers:
        raise UserError(f"statistics have {stats.num_layers} layers, the model {loaded.num_layers}: recalibrate with --force")


def prune_model(
    loaded: LoadedModel,
    stats: CalibrationStats,
    config: PruneConfig,
    reporter: Reporter,
    hessians: CalibrationStats | None = None,
) -> PruneOutcome:
    """Prune every planned layer from the statistics, with a progress bar over layers.

    With `hessians` (config.update: the cached second-order entry) the kept weights are updated too.
    """
    started = time.perf_counter()
    adapter, model = loaded.adapter, loaded.model
    check_layer_count(stats, loaded)
    plans = plan_layers(model, adapter, stats, config)
    scoring = neuron_scoring(config)
    layers = adapter.layers(model)
    with reporter.progress("applying pruning" + config.second_order_steps(), len(layers)) as advance:
        for index in range(len(layers)):
            if index in plans:
                prune_layer(layers[index], index, adapter, stats, plans[index], scoring, hessians, config.update_shrink)
            advance(1)
    finish_structured(loaded, config)
    return PruneOutcome(plans, time.perf_counter() - started)


def prune_streaming(
    loaded: LoadedModel,
    stats: CalibrationStats,
    config: PruneConfig,
    reporter: Reporter,
    folder: Path,
    hessians: CalibrationStats | None = None,
) -> tuple[PruneOutcome, SparsityReport]:
    """prune_model for a streamed model: each layer is loaded, pruned, written to `folder` and released.

    Writes the weights as one shard for everything outside the decoder layers plus one shard per layer
    (with model.safetensors.index.json); the caller adds config, tokenizer and metadata (write_extras).
    """
    started = time.perf_counter()
    stream = loaded.stream
    if stream is None:
        raise ValueError("prune_streaming needs a model loaded with streaming=True")
    check_layer_count(stats, loaded)
    plans = plan_layers(loaded.model, loaded.adapter, stats, config, stream)
    scoring = neuron_scoring(config)
    output = StreamedOutput(loaded, folder)
    stream.release_trunk()  # the layers are pruned from statistics alone
    description = "pruning and writing layers" + config.second_order_steps()
    with reporter.progress(description, loaded.num_layers) as advance:
        for index in range(loaded.num_layers):
            with stream.resident(index) as layer:
                if index in plans:
                    prune_layer(layer, index, loaded.adapter, stats, plans[index], scoring, hessians, config.update_shrink)
                advance(1)
                output.write_layer(index, layer)
            return_freed_memory()  # the layer's Gram, factor and refine state: back to the OS, not kept in the heap
    report = output.finish()
    finish_structured(loaded, config)
    return PruneOutcome(plans, time.perf_counter() - started), report


class StreamedOutput:
    """Where a streamed prune writes, a layer at a time: one shard for everything outside the decoder layers
    (first), one shard per layer (model.safetensors.index.json at the end), and the counts of the report."""

    def __init__(self, loaded: LoadedModel, folder: Path) -> None:
        model, adapter, stream = loaded.model, loaded.adapter, loaded.stream
        assert stream is not None
        self.adapter = adapter
        self.dense_width = getattr(model.config, adapter.intermediate_size_key)
        self.writer = ShardWriter(folder, shards=loaded.num_layers + 1)
        names, state = outside_layer_names(model, adapter), model.state_dict()
        outside = {name: state[name] for name in names if not state[name].is_meta}  # the resident trunk, not read twice
        outside.update(read_tensors(loaded.folder, stream.dtype, set(names) - set(outside)))
        embedding_name = parameter_name(model, model.get_input_embeddings().weight)
        head_name = parameter_name(model, model.get_output_embeddings().weight)
        self.embeddings = zero_count(outside[embedding_name])
        self.lm_head = None if head_name == embedding_name else zero_count(outside[head_name])
        self.writer.write(outside)
        self.counts: list[ModuleCount] = []

    def write_layer(self, index: int, layer: nn.Module) -> None:
        self.counts.extend(layer_counts(index, layer, self.adapter, self.dense_width))
        self.writer.write({f"{self.adapter.layers_path}.{index}.{name}": tensor for name, tensor in layer.state_dict().items()})

    def finish(self) -> SparsityReport:
        self.writer.finish()
        return assemble_report(self.counts, self.adapter, self.embeddings, self.lm_head)


def finish_structured(loaded: LoadedModel, config: PruneConfig) -> None:
    """After structured pruning every pruned layer has the same, smaller intermediate size."""
    if parse_pattern(config.pattern).kind != "structured":
        return
    sizes = {getattr(loaded.adapter.mlp(layer), loaded.adapter.mlp_output).in_features for layer in loaded.adapter.layers(loaded.model)}
    if len(sizes) != 1:
        raise UserError(
            "structured pruning of only some layers gives layers of different sizes, which a standard "
            "config cannot describe: drop --pruning-last / --preserve-first with --pattern structured"
        )
    setattr(loaded.model.config, loaded.adapter.intermediate_size_key, sizes.pop())


def sequential_pruner(loaded: LoadedModel, config: PruneConfig):
    """The after_layer callback of sequential calibration: prune each layer right after its statistics.

    With --update / --refine the sequential pass collects each layer's second-order sums as well, from
    the same pruned inputs (SparseGPT's order), and the layer is updated / refined from them.
    """
    scoring = neuron_scoring(config)
    pruned = set(config.pruned_layers(loaded.num_layers))
    plan = layer_plan(config, config.sparsity)
    second_order = config.needs_second_order

    def prune_now(index: int, layer: nn.Module, stats: CalibrationStats) -> None:
        if index in pruned:
            prune_layer(layer, index, loaded.adapter, stats, plan, scoring, stats if second_order else None, config.update_shrink)

    return prune_now


def prune_recompute(
    loaded: LoadedModel,
    stats: CalibrationStats,
    config: PruneConfig,
    reporter: Reporter,
    windows: torch.Tensor,
    *,
    batch_size: int,
    folder: Path | None = None,
) -> tuple[PruneOutcome, SparsityReport | None]:
    """Prune with refine / --update without a cached second-order entry: one pass over the calibration `windows`
    collects each layer's sums x x^T from its dense inputs, prunes the layer from them, and drops them before
    the next layer (SparseGPT's way; nothing second-order is stored). The layers' outputs go on unpruned, so the
    masks and weights are those that the cached entry gives. A streamed model (`loaded.stream`) is written
    layer by layer to `folder` (then the report is returned; in memory it is None: the caller measures).
    """
    started = time.perf_counter()
    check_layer_count(stats, loaded)
    adapter, model, stream = loaded.adapter, loaded.model, loaded.stream
    plans = plan_layers(model, adapter, stats, config, stream)
    scoring = neuron_scoring(config)
    output = StreamedOutput(loaded, folder) if stream is not None and folder is not None else None
    if stream is not None and output is None:
        raise ValueError("a streamed model is pruned into a folder")

    def prune_now(index: int, layer: nn.Module, collected: CalibrationStats) -> None:
        if index in plans:
            prune_layer(layer, index, adapter, stats, plans[index], scoring, collected, config.update_shrink)
        if output is not None:
            output.write_layer(index, layer)

    batches = -(-windows.shape[0] // batch_size)
    description = "collecting x x^T and pruning layers" + config.second_order_steps()
    with reporter.progress(description, loaded.num_layers * batches) as advance:
        collect_statistics(
            model, adapter, windows, CollectionOptions(), batch_size=batch_size, device=next(model.parameters()).device,
            after_layer=prune_now, on_batch=lambda _layer, _batch: advance(1), store=stream,
            hessians=True, first_order=False, sink=lambda _index, _tensors: None, rerun=False,
        )
    report = output.finish() if output is not None else None
    finish_structured(loaded, config)
    return PruneOutcome(plans, time.perf_counter() - started), report
