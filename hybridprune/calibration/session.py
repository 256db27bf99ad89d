"""Statistics for a model and a text: from the cache when possible, else one calibration pass."""

from __future__ import annotations

import contextlib
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from hybridprune.cache import StatsCache, StatsKey
from hybridprune.calibration.collect import CollectionOptions, collect_statistics
from hybridprune.calibration.distributed import World
from hybridprune.calibration.shards import ShardSpec, shard_windows
from hybridprune.calibration.stats import SECOND_ORDER_ENTRIES, CalibrationStats
from hybridprune.config import CalibrationRequest
from hybridprune.data import load_text, sample_windows, tokenize, tokenizer_fingerprint
from hybridprune.errors import UserError
from hybridprune.models.loading import LoadedModel
from hybridprune.reporting import Reporter

HESSIAN_MODE = "gram"
"""Key mode of the second-order entry (sum x x^T per input group, for refine and --update, stored one file
per layer: calibration/second_order.py): the topic and q_active knobs do not change it, so its key holds
them as 0. ("hessian" entries of earlier versions held the factor of the inverse, whole: never read now.)"""
FIT_WINDOWS = 4
"""The activity threshold and the topic centroids are fitted on the first FIT_WINDOWS windows, whatever
--batch-size is (a different batch size runs them as a leading fit-only batch), so the batch size never
changes the statistics and stays out of the cache key."""


@dataclass
class CalibrationResult:
    stats: CalibrationStats
    key: StatsKey
    reused: bool
    seconds: float
    entry: Path
    second_order: CalibrationResult | None = None
    """The second-order entry when the same pass collected it (calibrated_statistics(with_second_order=True))."""


def dtype_name(model: nn.Module) -> str:
    return str(next(model.parameters()).dtype).removeprefix("torch.")


def calibration_windows(loaded: LoadedModel, request: CalibrationRequest, cache_root: Path) -> tuple[torch.Tensor, StatsKey]:
    """The seeded calibration windows and the cache key they lead to."""
    request.validate()
    request = request.for_model(loaded.model)
    source = load_text(request.data, split="calibration", text_field=request.text_field)
    ids = tokenize(source, loaded.tokenizer, cache_dir=cache_root / "tokens")
    windows = sample_windows(ids, request.nsamples, request.seqlen, request.seed)
    key = StatsKey(
        model_fingerprint=loaded.fingerprint,
        dtype=dtype_name(loaded.model),
        tokenizer_fingerprint=tokenizer_fingerprint(loaded.tokenizer),
        text_name=source.name,
        text_split=source.split,
        text_fingerprint=source.fingerprint,
        nsamples=request.nsamples,
        seqlen=request.seqlen,
        seed=request.seed,
        topics=request.topics,
        q_active=request.q_active,
    )
    return windows, key


def calibrated_statistics(
    loaded: LoadedModel,
    request: CalibrationRequest,
    cache: StatsCache,
    reporter: Reporter,
    *,
    force: bool = False,
    mode: str = "dense",
    after_layer: Callable[[int, nn.Module, CalibrationStats], None] | None = None,
    second_order: bool = False,
    with_second_order: bool = False,
    dense_targets: bool = False,
    shard: ShardSpec | None = None,
    world: World | None = None,
) -> CalibrationResult:
    """Reuse the cached entry for these inputs, or run the layer-wise pass once and store it.

    The entry's lock is held while computing, so a concurrent run with the same inputs waits
    and then reuses the result instead of calibrating twice. With `shard` only that shard's
    windows are calibrated, into a partial entry (see cache.merge_shard_entries). With `world`
    (torchrun) each rank calibrates its shard, the statistics are reduced, and rank 0 alone
    writes the entry, once every rank has contributed. `second_order` (sequential mode only: `after_layer`)
    collects each layer's second-order sums from the pruned inputs too, into the same entry.
    `with_second_order` (dense mode): when this pass must run and the second-order entry is not cached either,
    it collects both in one forward pass and stores them as their two entries (`result.second_order`).
    `dense_targets` (sequential): the dense model runs alongside; the writers' cross sums go into the entry too
    (collect.collect_statistics), so a cached entry replays the same weights.
    """
    if second_order and after_layer is None:
        raise ValueError("second_order goes with a sequential pass (after_layer); the dense entry is mode=HESSIAN_MODE")
    if (shard is not None or world is not None) and after_layer is not None:
        raise UserError("sequential calibration cannot be sharded: it prunes with the statistics collected so far")
    hessians = mode == HESSIAN_MODE
    if (shard is not None or world is not None) and hessians:
        raise UserError("second-order statistics (--hessians, --update) are not sharded: collect them in one process")
    request = request.for_model(loaded.model)
    windows, key = calibration_windows(loaded, request, cache.root)
    dense_key = key
    if mode == HESSIAN_MODE:
        key = second_order_key(key)
    elif mode != "dense":
        key = StatsKey(**{**key.fields(), "mode": mode})
    if shard is not None:
        key = key.for_shard(shard.index, shard.count, min(FIT_WINDOWS, request.nsamples))
    if after_layer is not None and request.batch_size != FIT_WINDOWS:  # sequential runs cannot take a fit-only lead batch
        key = StatsKey(**{**key.fields(), "mode": f"{key.mode}:batch{request.batch_size}"})
    part = world.shard if world is not None else shard
    leader = world is None or world.leader
    with cache.lock(key) if leader else contextlib.nullcontext():
        reuse = leader and cache.has(key) and not force
        if world is not None:
            reuse = world.agree(reuse)
        if reuse:
            started = time.perf_counter()
            stats = cache.load(key)
            what = "second-order statistics" if hessians else "statistics"
            reporter.note(f"[green]✓[/] reused cached {what} {key.digest} (no forward pass)")
            return CalibrationResult(stats, key, True, time.perf_counter() - started, cache.entry_dir(key.digest))
        reporter.note(
            f"[yellow]{'recomputing' if force else 'no cached statistics for these inputs:'} "
            f"{'collecting second-order statistics (once: every refine / --update run reuses them)' if hessians else 'calibrating first'}"
            f"[/] (key {key.digest})"
        )
        started = time.perf_counter()
        own, anchor = shard_windows(windows, part, FIT_WINDOWS) if part is not None else (windows, None)
        if anchor is None and not hessians and after_layer is None:
            fit = windows[:FIT_WINDOWS]
            if min(request.batch_size, own.shape[0]) != fit.shape[0] or not torch.equal(own[: fit.shape[0]], fit):
                anchor = fit  # fit tau and the topics on the same windows whatever the batch size
        # the second-order sums in the same pass (not with a fit-only lead batch, nor split across processes)
        both = (with_second_order and mode == "dense" and part is None and anchor is None
                and (force or not cache.has(second_order_key(dense_key))))
        second_order = second_order or both
        layers = loaded.num_layers
        # Tests only: seconds to sleep after each calibration batch, so that kill tests can land mid-calibration.
        test_delay = float(os.environ.get("HYBRIDPRUNE_TEST_SLOW_LAYER_S") or 0)
        batches = -(-own.shape[0] // request.batch_size) + (anchor is not None)
        reporter.phase(
            "Calibration",
            [
                f"model     {loaded.source}  ({layers} layers, {dtype_name(loaded.model)}, on {loaded.device})",
                f"text      {key.text_name} [{key.text_split}]  {request.nsamples} x {request.seqlen} tokens, seed {request.seed}",
                "collect   second-order sums x x^T of every Linear's inputs (for --update)"
                if hessians
                else f"collect   Wanda norms (attention + MLP) and NeuronRank doc / topic (k={request.topics}) / old "
                f"(q_active={request.q_active})" + ("" if mode == "dense" else "  [sequential]")
                + ("  + second-order sums" if second_order else ""),
                *([] if part is None else [_shard_line(part, windows.shape[0], world)]),
            ],
        )
        # Every layer's sums go to the entry's layer files as the layer finishes (the second-order ones to their own
        # entry when one pass collects both), never all in memory; under torchrun each layer is reduced first.
        companion_key = second_order_key(dense_key) if both else None
        info: dict[str, object] = {"model_source": loaded.source}
        with contextlib.ExitStack() as stack:
            writer = stack.enter_context(cache.writer(key)) if leader else None
            companion_writer = None
            if companion_key is not None:
                stack.enter_context(cache.lock(companion_key))
                companion_writer = stack.enter_context(cache.writer(companion_key))

            def sink(index: int, tensors: dict[str, torch.Tensor]) -> None:
                if world is not None:
                    tensors = world.reduce_statistics(CalibrationStats(tensors)).tensors  # every rank, layer by layer
                check_finite(CalibrationStats(tensors), loaded)
                if writer is None:
                    return
                second = {name: t for name, t in tensors.items() if name.endswith(SECOND_ORDER_ENTRIES)} if companion_writer else {}
                if companion_writer is not None:
                    companion_writer.add_layer(index, second)
                writer.add_layer(index, {name: t for name, t in tensors.items() if name not in second})

            with reporter.progress("calibrating layers", layers * batches) as advance:
                stats = collect_statistics(
                    loaded.model,
                    loaded.adapter,
                    own,
                    CollectionOptions(topics=request.topics, q_active=request.q_active, seed=request.seed),
                    batch_size=request.batch_size,
                    device=loaded.device,
                    after_layer=after_layer,
                    on_batch=lambda _layer, _batch: (advance(1), time.sleep(test_delay)),
                    anchor=anchor,
                    store=loaded.stream,
                    hessians=hessians or second_order,
                    first_order=True if both else None,
                    sink=sink,
                    dense_targets=dense_targets,
                )
            if world is not None:
                stats = world.reduce_statistics(stats)  # every rank waits here for all the others
            check_finite(stats, loaded)
            seconds = time.perf_counter() - started
            if not leader:
                return CalibrationResult(stats, key, False, seconds, cache.entry_dir(key.digest))
            info["seconds"] = round(seconds, 2)
            if shard is not None:
                info["shard"] = {"index": shard.index, "count": shard.count, "full_digest": key.full().digest}
            if world is not None:
                info["ranks"] = world.size
            assert writer is not None
            writer.finish(stats, info)  # the token count: every layer is in its file already
            if companion_writer is not None:
                companion_writer.finish(CalibrationStats({"tokens": stats.tensors["tokens"]}), info)
        companion = None
        if companion_key is not None:
            companion = CalibrationResult(cache.load(companion_key), companion_key, False, seconds, cache.entry_dir(companion_key.digest))
        stats, entry = cache.load(key), cache.entry_dir(key.digest)
        what = "statistics and second-order statistics" if both else "statistics"
        reporter.note(f"[green]✓[/] collected {what} for {layers} layers in {seconds:.1f}s")
        return CalibrationResult(stats, key, False, seconds, entry, companion)


def second_order_key(key: StatsKey) -> StatsKey:
    """The second-order entry's key for a dense entry's inputs (topics and q_active do not change it)."""
    return StatsKey(**{**key.fields(), "mode": HESSIAN_MODE, "topics": 0, "q_active": 0.0})


def _shard_line(part: ShardSpec, total: int, world: World | None) -> str:
    start, stop = part.bounds(total)
    where = f"rank {part.index} of {part.count}" if world is not None else f"shard {part}"
    return f"shard     {where}: windows {start}..{stop - 1} of {total}, tau and topics fitted on the first batch"


def check_finite(stats: CalibrationStats, loaded: LoadedModel) -> None:
    """Refuse statistics with NaN or Inf, naming the first layer that has them (nothing is cached)."""
    bad = sorted(
        (int(match.group(1)), name)
        for name, tensor in stats.tensors.items()
        if (match := re.match(r"layer\.(\d+)\.", name)) and tensor.is_floating_point() and not torch.isfinite(tensor).all()
    )
    if not bad:
        return
    layer, name = bad[0]
    modules = loaded.adapter.linears(loaded.adapter.layers(loaded.model)[layer])
    broken = [module for module, linear in modules.items()
              if not linear.weight.is_meta and not torch.isfinite(linear.weight).all()]
    cause = (
        f"its {', '.join(broken)} weights have NaN or Inf: the model file is broken"
        if broken
        else "its activations overflow or its weights (norms, embeddings) are broken: "
        "try --dtype float32, or check the model"
    )
    raise UserError(f"calibration produced NaN or Inf at layer {layer} ({name.split('.', 2)[2]}): {cause}; nothing was cached")
