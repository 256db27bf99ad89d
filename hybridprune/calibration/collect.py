"""Collect every statistic (Wanda and all NeuronRank modes) in one layer-wise pass."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from hybridprune.calibration.runner import LayerStore, ReferenceStream, run_layerwise
from hybridprune.calibration.second_order import GramAccumulator, pack_gram
from hybridprune.calibration.stats import CalibrationStats, LayerAccumulator
from hybridprune.config import default_of
from hybridprune.models.adapters import FamilyAdapter


@dataclass(frozen=True)
class CollectionOptions:
    """The collection knobs that change the statistics (all part of the cache key)."""

    topics: int = default_of("topics")
    q_active: float = default_of("q_active")
    seed: int = default_of("seed")


def statistics_observer(
    adapter: FamilyAdapter,
    num_windows: int,
    options: CollectionOptions,
    finished: dict[str, Tensor],
    anchored: bool = False,
) -> Callable[[int, nn.Module], Callable[[], None]]:
    """An observer for run_layerwise that fills `finished` with each layer's statistics.

    `anchored`: each layer's first batch is the anchor, run only to fit tau and the topic centroids.
    """

    def observe(index: int, layer: nn.Module) -> Callable[[], None]:
        accumulator = LayerAccumulator(
            layer=index,
            num_windows=num_windows,
            topics=options.topics,
            q_active=options.q_active,
            seed=options.seed,
            fit_only=anchored,
        )
        linears = adapter.linears(layer)
        readers = adapter.group_readers()
        taps = {
            adapter.attention_inputs[0]: lambda x: accumulator.add_sumsq(readers[adapter.attention_inputs[0]], x),
            adapter.attention_output: lambda x: accumulator.add_sumsq(readers[adapter.attention_output], x),
            adapter.mlp_inputs[0]: accumulator.observe_mlp_input,
            adapter.mlp_output: accumulator.observe_neurons,
        }
        handles = [
            linears[name].register_forward_pre_hook(lambda _module, args, tap=tap: tap(args[0].detach()))
            for name, tap in taps.items()
        ]
        block: dict[str, object] = {}

        def block_input(_module: nn.Module, args: tuple) -> None:
            # fit_only is cleared inside the layer (at down_proj): decide before the layer runs
            block["input"], block["counted"] = args[0].detach(), not accumulator.fit_only

        def block_output(_module: nn.Module, _args: tuple, output: object) -> None:
            hidden = output[0] if isinstance(output, tuple) else output
            if block.pop("counted", False):
                accumulator.observe_block(block.pop("input"), hidden.detach())
            block.clear()

        handles.append(layer.register_forward_pre_hook(block_input))
        handles.append(layer.register_forward_hook(block_output))

        def remove() -> None:
            for handle in handles:
                handle.remove()
            finished.update(accumulator.finish())

        return remove

    return observe


def hessian_observer(adapter: FamilyAdapter, finished: dict[str, Tensor]) -> Callable[[int, nn.Module], Callable[[], None]]:
    """An observer that fills `finished` with each layer's second-order entries (see stats.py): the sums
    x x^T per input group, accumulated in float32 over the batches (upper triangle) and packed once the layer
    is done (calibration/second_order.py)."""

    def observe(index: int, layer: nn.Module) -> Callable[[], None]:
        grams: dict[str, GramAccumulator] = {}
        linears = adapter.linears(layer)
        firsts = adapter.group_readers()

        def tap(group: str, x: Tensor) -> None:
            grams.setdefault(group, GramAccumulator()).add(x)

        handles = [
            linears[name].register_forward_pre_hook(lambda _module, args, group=group: tap(group, args[0]))
            for name, group in firsts.items()
        ]

        def remove() -> None:
            for handle in handles:
                handle.remove()
            for group in list(grams):
                upper = grams.pop(group).gram
                assert upper is not None
                for name, tensor in pack_gram(upper).items():  # NaN stays NaN: the finiteness check names this layer
                    finished[f"layer.{index}.{group}.{name}"] = tensor
                del upper

        return remove

    return observe


def cross_observer(adapter: FamilyAdapter, reference: ReferenceStream, finished: dict[str, Tensor]) -> Callable[[int, nn.Module], Callable[[], None]]:
    """An observer that fills `finished` with each layer's per-input sums over the tokens, float64, for the Linears
    that write into the residual stream (o_proj, down_proj: adapter.writers): `<group>.cross` sum x_p x_d (the
    pruned stream's input times the dense stream's of the same token, which `reference` kept) and `<group>.own`
    sum x_p^2. Two vectors per layer, stored with the pass's other statistics (prune_layer aims the writers at the
    dense outputs with them: methods/reconstruct.aim_at_dense)."""

    def observe(index: int, layer: nn.Module) -> Callable[[], None]:
        sums: dict[str, Tensor] = {}
        seen: dict[str, int] = {}
        linears = adapter.linears(layer)
        readers = adapter.group_readers()

        def tap(name: str, x: Tensor) -> None:
            number = seen.get(name, 0)
            seen[name] = number + 1
            pruned = x.detach().reshape(-1, x.shape[-1]).to(torch.float32)
            dense = reference.inputs[name][number].reshape(-1, x.shape[-1]).to(torch.float32)
            both = torch.stack([(pruned * dense).sum(0), pruned.square().sum(0)]).to(torch.float64)
            sums[name] = sums[name].add_(both) if name in sums else both

        handles = [
            linears[name].register_forward_pre_hook(lambda _module, args, name=name: tap(name, args[0]))
            for name in adapter.writers
        ]

        def remove() -> None:
            for handle in handles:
                handle.remove()
            reference.inputs = {}
            for name, total in sums.items():
                finished[f"layer.{index}.{readers[name]}.cross"] = total[0].clone()
                finished[f"layer.{index}.{readers[name]}.own"] = total[1].clone()

        return remove

    return observe


def combined(observers: list[Callable[[int, nn.Module], Callable[[], None]]]) -> Callable[[int, nn.Module], Callable[[], None]]:
    """Several observers over the same pass (their hooks on the same layer, removed together)."""

    def observe(index: int, layer: nn.Module) -> Callable[[], None]:
        removers = [observer(index, layer) for observer in observers]

        def remove() -> None:
            for remover in removers:
                remover()

        return remove

    return observe


def collect_statistics(
    model: nn.Module,
    adapter: FamilyAdapter,
    windows: Tensor,
    options: CollectionOptions,
    *,
    batch_size: int = 4,
    device: torch.device = torch.device("cpu"),
    after_layer: Callable[[int, nn.Module, CalibrationStats], None] | None = None,
    on_batch: Callable[[int, int], None] | None = None,
    anchor: Tensor | None = None,
    store: LayerStore | None = None,
    hessians: bool = False,
    first_order: bool | None = None,
    sink: Callable[[int, dict[str, Tensor]], None] | None = None,
    rerun: bool = True,
    dense_targets: bool = False,
) -> CalibrationStats:
    """One pass over `windows` [N, seqlen]; with `after_layer` it is the sequential (pruned-inputs) mode.

    With `hessians` the pass collects the second-order sums x x^T that --update / --refine need: instead of
    the first-order statistics in the dense pass (unless `first_order`: both in one pass), as well as them in
    the sequential one (the callback then updates each layer from its pruned inputs).
    `anchor` (a shard's run: the first batch of all windows, see shards.shard_windows) is the batch
    that tau and the topic centroids are fitted on instead of the first batch of `windows`; it is
    run through every layer but not counted. `store`: layers are loaded one at a time (streaming).
    `sink`: each layer's entries (first and second order) are handed to it as the layer finishes and leave
    memory (the returned statistics then hold only `tokens`): what keeps a pass's memory to one layer.
    `dense_targets` (sequential): the dense model runs next to the pruned one and each layer's writers get their
    `<group>.cross` and `<group>.own` entries (cross_observer) before `after_layer` prunes it.
    """
    if dense_targets and after_layer is None:
        raise ValueError("dense targets belong to a sequential pass")
    if anchor is not None and after_layer is not None:
        raise ValueError("sequential calibration prunes with the statistics collected so far: it cannot be sharded")
    tensors: dict[str, Tensor] = {"tokens": torch.tensor(float(windows.numel()), dtype=torch.float64)}
    if hessians and anchor is not None:
        raise ValueError("second-order statistics are collected in one piece")
    if first_order is None:  # a dense second-order pass collects only those; every other pass the first order too
        first_order = not hessians or after_layer is not None
    observers = [statistics_observer(adapter, windows.shape[0], options, tensors, anchored=anchor is not None)] if first_order else []
    if hessians:
        observers.append(hessian_observer(adapter, tensors))
    reference = None
    if dense_targets:
        reference = ReferenceStream(lambda layer: {name: adapter.linears(layer)[name] for name in adapter.writers})
        observers.append(cross_observer(adapter, reference, tensors))
    observer = observers[0] if len(observers) == 1 else combined(observers)

    def after(index: int, layer: nn.Module) -> None:
        if after_layer is not None:
            after_layer(index, layer, CalibrationStats(tensors))  # the layers collected so far
        if sink is not None:
            prefix = f"layer.{index}."
            sink(index, {name: tensors.pop(name) for name in [name for name in tensors if name.startswith(prefix)]})

    run_layerwise(
        model,
        adapter,
        windows,
        batch_size=batch_size,
        device=device,
        observe=observer,
        after_layer=after if after_layer is not None or sink is not None else None,
        on_batch=on_batch,
        lead=anchor,
        store=store,
        rerun=rerun and after_layer is not None,
        reference=reference,
    )
    return CalibrationStats(tensors)
