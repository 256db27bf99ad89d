"""The layer-wise engine: run windows through one decoder layer at a time.

Layer 0's inputs (and each layer's keyword arguments: masks, rotary embeddings) are
captured by running the trunk with every decoder layer replaced by a recorder, which
costs only the embedding. Then layer l runs on all windows, its outputs become layer
l+1's inputs. Peak activation memory is two copies of windows x seqlen x hidden, and
only one layer has to be resident on the accelerator at a time.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from hybridprune.models.adapters import FamilyAdapter


@dataclass
class WindowBatch:
    """Hidden states of a batch of windows and the per-layer keyword arguments they need."""

    hidden: Tensor
    layer_kwargs: list[dict[str, Any]]
    reference: Tensor | None = None  # the dense model's hidden states of the same windows (ReferenceStream)


class _StopCapture(Exception):
    pass


def capture_layer_inputs(
    model: nn.Module,
    adapter: FamilyAdapter,
    windows: Tensor,
    batch_size: int,
    device: torch.device,
    lead: Tensor | None = None,
) -> list[WindowBatch]:
    """Layer-0 inputs and every layer's kwargs, for each batch of windows, at the cost of the embedding.

    `lead`, if given, becomes one extra first batch (a shard's anchor windows, see stats.LayerAccumulator).
    """
    layers = adapter.layers(model)
    base = adapter.base_model(model)
    batches: list[WindowBatch] = []
    recorded: list[dict[str, Any]] = []
    first_input: list[Tensor] = []

    def recorder(hidden_states: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        if args:
            raise RuntimeError("decoder layers are expected to take keyword arguments after hidden_states")
        kwargs.pop("cache", None)
        kwargs.pop("past_key_values", None)
        kwargs["use_cache"] = False
        recorded.append(kwargs)
        if not first_input:
            first_input.append(hidden_states)
        return hidden_states

    try:
        for layer in layers:
            layer.forward = recorder
        with torch.no_grad():
            parts = [windows[start : start + batch_size] for start in range(0, windows.shape[0], batch_size)]
            for part in parts if lead is None else [lead, *parts]:
                recorded, first_input = [], []
                base(input_ids=part.to(device), use_cache=False)
                batches.append(WindowBatch(hidden=first_input[0], layer_kwargs=recorded))
    finally:
        for layer in layers:
            layer.__dict__.pop("forward", None)  # back to the class's own method
    return batches


LayerObserver = Callable[[int, nn.Module], Callable[[], None]]
"""Called before layer l runs; installs its hooks and returns the function that removes them."""


class ReferenceStream:
    """The dense model's hidden states next to the pruned ones (sequential calibration with dense targets).

    Before a layer is observed (and pruned) it runs, still dense, on the reference hidden states, which become
    the next layer's; the inputs of the Linears `taps(layer)` names are kept per batch in `inputs[name]`, for
    the observers that pair them with the pruned stream's inputs of the same tokens (calibration/collect.py).
    """

    def __init__(self, taps: Callable[[nn.Module], dict[str, nn.Module]]) -> None:
        self.taps = taps
        self.inputs: dict[str, list[Tensor]] = {}

    def run(self, layer: nn.Module, index: int, batches: list[WindowBatch]) -> None:
        self.inputs = {}
        handles = [
            linear.register_forward_pre_hook(
                lambda _module, args, name=name: self.inputs.setdefault(name, []).append(args[0].detach()))
            for name, linear in self.taps(layer).items()
        ]
        try:
            with torch.no_grad(), kept_freed_memory():
                for batch in batches:
                    assert batch.reference is not None
                    output = layer(batch.reference, **batch.layer_kwargs[index])
                    batch.reference = output[0] if isinstance(output, tuple) else output
        finally:
            for handle in handles:
                handle.remove()


class LayerStore(Protocol):
    """Where layers live between uses (models.streaming.LayerStream): loaded before a layer runs, released after."""

    def materialize(self, index: int, layer: nn.Module) -> None: ...

    def release(self, index: int, layer: nn.Module) -> None: ...


def run_layerwise(
    model: nn.Module,
    adapter: FamilyAdapter,
    windows: Tensor,
    *,
    batch_size: int,
    device: torch.device,
    observe: LayerObserver | None = None,
    after_layer: Callable[[int, nn.Module], None] | None = None,
    on_batch: Callable[[int, int], None] | None = None,
    lead: Tensor | None = None,
    store: LayerStore | None = None,
    rerun: bool = True,
    reference: ReferenceStream | None = None,
) -> list[Tensor]:
    """Run all windows through the decoder layers one layer at a time; return the last layer's outputs.

    `after_layer` (used by sequential calibration) may change the layer, for example prune it;
    the layer's outputs are then recomputed so the next layer sees the changed layer's outputs (with `rerun`
    False they are not: `after_layer` only reads the layer, or changes it without changing what the next
    layer sees).
    `lead` windows run as an extra first batch through every layer (its outputs are included).
    With `store` each layer is materialized just before it runs and released after `after_layer`.
    `reference` runs the dense model's hidden states through each layer before it is observed (see ReferenceStream).
    """
    batches = capture_layer_inputs(model, adapter, windows, batch_size, device, lead)
    if reference is not None:
        for batch in batches:
            batch.reference = batch.hidden  # never changed in place: the layers' outputs replace it
    for index, layer in enumerate(adapter.layers(model)):
        if store is not None:
            store.materialize(index, layer)
        try:
            if reference is not None:
                reference.run(layer, index, batches)
            _run_one(layer, index, batches, observe, after_layer, on_batch, rerun)
        finally:
            if store is not None:
                store.release(index, layer)
            return_freed_memory()
    return [batch.hidden for batch in batches]


@functools.cache
def _libc() -> ctypes.CDLL | None:
    """glibc, where there is one (Linux; musl has no malloc_trim and other mallopt numbers)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim, libc.mallopt, libc.gnu_get_libc_version  # noqa: B018 (glibc's symbols, or AttributeError)
    except (OSError, AttributeError):  # not glibc
        return None
    return libc


def _malloc_trim() -> Callable[[int], int] | None:
    libc = _libc()
    return None if libc is None else libc.malloc_trim


# glibc's mallopt parameters (malloc.h) and the values kept_freed_memory leaves behind: glibc's own steady state once
# large blocks have been freed (its dynamic threshold rises to at most 32 MB, the trim threshold to twice that)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -3, -4
MMAP_THRESHOLD_AFTER, TRIM_THRESHOLD_AFTER, MMAP_MAX_DEFAULT = 32 * 2**20, 64 * 2**20, 65536


@contextlib.contextmanager
def kept_freed_memory():
    """While windows run through a layer: blocks of any size from glibc's heap, freed ones kept for the next batch.

    glibc maps every block over 32 MB afresh and unmaps it when freed, so each batch's large activations (the MLP's
    [tokens, intermediate] at 8B: 58 MB) are page-faulted in again, and on the VMs measured that costs more than
    the arithmetic. Kept in the heap, the same Llama-3.1-8B-shaped layer ran its plain forward in 0.72x the time,
    the first-order calibration in 0.78x and the second-order in 0.93x, for 0.1-0.4 GB more peak memory (16384
    tokens, `python benchmarks/scale.py run --shapes llama8b`, HYBRIDPRUNE_MALLOC=system for the reference,
    2026-12-06). Not around the pruning: there the kept blocks fragment the heap (peak +1.6 GB for `balanced`
    and +2.6 GB for `quality` per 8B layer, for 0.89x the time; around the refine's chunks alone +1.0 / +1.2 GB
    for 0.91x, measured back to back the same day), and the refine keeps its own buffers.
    return_freed_memory still trims once per layer, so the peak does not grow with depth.
    HYBRIDPRUNE_MALLOC=system leaves glibc's defaults alone."""
    libc = None if os.environ.get("HYBRIDPRUNE_MALLOC", "").lower() == "system" else _libc()
    if libc is None:
        yield
        return
    libc.mallopt(M_MMAP_MAX, 0)
    libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1)
    try:
        yield
    finally:
        libc.mallopt(M_MMAP_MAX, MMAP_MAX_DEFAULT)
        libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_AFTER)
        libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_AFTER)


def return_freed_memory() -> None:
    """Hand the heap's free pages back to the OS, once per layer.

    Activation temporaries are freed into glibc's heap, which then keeps growing with fragmentation
    layer after layer (+40% peak RSS on the embedded model). Forcing big blocks to mmap instead costs
    a page fault per fresh tensor (+50% calibration time); trimming once per layer keeps malloc's fast
    reuse within a layer and a flat RSS across layers, for ~10 ms a layer.
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def _run_one(
    layer: nn.Module,
    index: int,
    batches: list[WindowBatch],
    observe: LayerObserver | None,
    after_layer: Callable[[int, nn.Module], None] | None,
    on_batch: Callable[[int, int], None] | None,
    rerun: bool = True,
) -> None:
    """Observe and run one layer over every batch; with after_layer, change it (and with `rerun`, rerun it)."""
    remove_hooks = observe(index, layer) if observe else (lambda: None)
    try:
        # Without after_layer each batch's inputs can be overwritten at once: one copy of the activations.
        outputs = _run_layer(layer, index, batches, on_batch, in_place=after_layer is None or not rerun)
    except BaseException:
        # Ctrl-C or an error mid-layer: the hooks go, but finishing half-collected statistics may fail
        # too, and that must not replace the original exception (a KeyboardInterrupt must stay one).
        with contextlib.suppress(Exception):
            remove_hooks()
        raise
    remove_hooks()
    if after_layer is not None:
        after_layer(index, layer)
    if after_layer is not None and rerun:
        for batch, output in zip(batches, _run_layer(layer, index, batches, None, in_place=False)):
            batch.hidden = output
    del outputs


def _run_layer(
    layer: nn.Module,
    index: int,
    batches: list[WindowBatch],
    on_batch: Callable[[int, int], None] | None,
    in_place: bool,
) -> list[Tensor]:
    outputs = []
    with torch.no_grad(), kept_freed_memory():
        for number, batch in enumerate(batches):
            output = layer(batch.hidden, **batch.layer_kwargs[index])
            output = output[0] if isinstance(output, tuple) else output
            if in_place:
                batch.hidden = output
            else:
                outputs.append(output)
            if on_batch:
                on_batch(index, number)
    return outputs
