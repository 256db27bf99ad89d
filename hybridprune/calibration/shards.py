"""Splitting the calibration windows into shards, and merging the shards' statistics.

Statistics are sums, so shards of the windows add up, provided every shard counts activity
against the same tau and topic centroids: those are fitted on the anchor, the first batch of
all windows, which is what a single process fits them on too (see stats.LayerAccumulator).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from functools import reduce
from pathlib import Path

import torch
from torch import Tensor

from hybridprune.cache import CorruptEntry, StatsCache, StatsKey, check_key, fix_hint
from hybridprune.calibration.stats import CalibrationStats
from hybridprune.errors import UserError


@dataclass(frozen=True)
class ShardSpec:
    """Shard `index` of `count` contiguous, nearly equal ranges of the calibration windows."""

    index: int
    count: int

    @classmethod
    def parse(cls, text: str) -> ShardSpec:
        """`i/N` as users write it on the command line (0 <= i < N)."""
        match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
        if not match or not 0 <= int(match.group(1)) < int(match.group(2)):
            raise UserError(f"--shard takes i/N with 0 <= i < N (for example 0/2), got '{text}'")
        return cls(int(match.group(1)), int(match.group(2)))

    def bounds(self, total: int) -> tuple[int, int]:
        """[start, stop) of this shard among `total` windows; every window is in exactly one shard."""
        if self.count > total:
            raise UserError(f"{self.count} shards need at least {self.count} calibration windows, got {total}")
        return total * self.index // self.count, total * (self.index + 1) // self.count

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def shard_windows(windows: Tensor, shard: ShardSpec, batch_size: int) -> tuple[Tensor, Tensor | None]:
    """The shard's windows and the anchor batch to fit on first (None when the shard starts with it)."""
    start, stop = shard.bounds(windows.shape[0])
    anchor = windows[:batch_size]
    starts_with_anchor = start == 0 and stop >= anchor.shape[0]
    return windows[start:stop], None if starts_with_anchor else anchor


def merge_statistics(shards: list[CalibrationStats]) -> CalibrationStats:
    """The statistics of all windows from those of its shards, given in shard order.

    Refuses shards whose thresholds differ: they were not fitted on the same anchor.
    """
    first = shards[0]
    for other in shards[1:]:
        for name, tau in first.tensors.items():
            if name.endswith(".nr.tau") and not torch.equal(tau, other.tensors[name]):
                raise UserError(f"the shards fitted different activity thresholds ({name}): they do not share an anchor batch")
    merged = CalibrationStats({name: tensor.clone() for name, tensor in first.tensors.items()})
    return reduce(CalibrationStats.add_, shards[1:], merged)


def shard_entries(cache: StatsCache, full_digest: str) -> list[str]:
    """The partial entries (from `calibrate --shard`) whose shards make up the entry `full_digest`."""
    check_key(full_digest)
    return sorted(
        str(manifest["digest"])
        for manifest in cache.entries()
        if isinstance(manifest.get("shard"), dict) and manifest["shard"].get("full_digest") == full_digest
    )


def merge_shard_entries(cache: StatsCache, digests: list[str]) -> tuple[StatsKey, Path]:
    """Merge the partial entries of all N shards into the entry one process would have written.

    Refuses, naming the difference, shards of other inputs (any key field but the shard index),
    entries that are no shards, and missing or duplicate shards.
    """
    if not digests:
        raise UserError("no shard entries to merge: give their keys, or --all-shards with the full key")
    keys: list[StatsKey] = []
    for digest in map(check_key, digests):
        try:
            key = StatsKey(**cache.read_manifest(digest)["key"])
        except (KeyError, TypeError):
            raise CorruptEntry(f"cache entry {digest} has a malformed manifest: {fix_hint(digest)}") from None
        if key.shard_index is None:
            raise UserError(f"cache entry {digest} is not a shard (it was calibrated without --shard)")
        keys.append(key)
    reference = dataclasses.replace(keys[0], shard_index=None).fields()
    for key in keys[1:]:
        for name, value in dataclasses.replace(key, shard_index=None).fields().items():
            if reference.get(name) != value:
                raise UserError(
                    f"cannot merge: shard {key.digest} differs from shard {keys[0].digest} in {name} "
                    f"({reference.get(name)} vs {value}): shards must come from the same model, data and options"
                )
    count = keys[0].shard_count or 0
    by_index: dict[int, StatsKey] = {}
    for key in keys:
        if key.shard_index in by_index:
            raise UserError(f"cannot merge: shard {key.shard_index}/{count} is given twice ({by_index[key.shard_index].digest}, {key.digest})")
        by_index[int(key.shard_index)] = key  # type: ignore[arg-type]
    missing = [f"{index}/{count}" for index in range(count) if index not in by_index]
    if missing:
        raise UserError(f"cannot merge: shard {', '.join(missing)} missing: calibrate it with --shard and merge again")
    ordered = [by_index[index] for index in range(count)]
    parts = [cache.load(key) for key in ordered]
    layers = {part.num_layers for part in parts}
    if len(layers) != 1:
        raise UserError(f"cannot merge: the shards hold different numbers of layers ({sorted(layers)})")
    full = ordered[0].full()
    tokens = sum(part.tensors["tokens"] for part in parts)
    with cache.lock(full), cache.writer(full) as writer:
        for layer in range(layers.pop()):  # one layer of every shard in memory at a time
            writer.add_layer(layer, merge_statistics([CalibrationStats(part.layer_tensors(layer)) for part in parts]).tensors)
        writer.finish(CalibrationStats({"tokens": tokens}), {
            "model_source": cache.read_manifest(ordered[0].digest).get("model_source"),
            "merged_from": [key.digest for key in ordered],
        })
    return full, cache.entry_dir(full.digest)
