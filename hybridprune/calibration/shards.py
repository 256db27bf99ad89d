"""Splitting the calibration windows into shards, and merging the shards' statistics.

Statistics are sums, so shards of the windows add up, provided every shard counts activity
against the same tau and topic centroids: those are fitted on the anchor, the first batch of
all windows, which is what a single process fits them on too (see stats.LayerAccumulator).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import reduce

import torch
from torch import Tensor

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
