"""Data-parallel calibration under `torchrun`: each rank calibrates one shard, then the sums are reduced.

torchrun sets RANK, WORLD_SIZE (and LOCAL_RANK, MASTER_ADDR, MASTER_PORT) for every process;
`World.joined` joins the process group they describe (gloo on CPU, nccl on CUDA).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

from hybridprune.calibration.shards import ShardSpec
from hybridprune.calibration.stats import PER_WINDOW_ENTRIES, CalibrationStats


@dataclass(frozen=True)
class World:
    """This process's place among the calibration processes, and the collectives they share."""

    rank: int
    size: int
    device: torch.device  # where collectives run: CPU tensors for gloo, this rank's GPU for nccl

    @classmethod
    @contextlib.contextmanager
    def joined(cls, device: str) -> Iterator[World | None]:
        """Join the process group torchrun describes in the environment (None outside torchrun); leave it after."""
        if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
            yield None
            return
        from hybridprune.models.loading import resolve_device

        on_cuda = resolve_device(device).type == "cuda"
        local = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if on_cuda else torch.device("cpu")
        if on_cuda:
            torch.cuda.set_device(local)  # nccl needs each rank on its own GPU
        dist.init_process_group(backend="nccl" if on_cuda else "gloo")
        try:
            yield cls(dist.get_rank(), dist.get_world_size(), local)
        finally:
            dist.destroy_process_group()

    @property
    def shard(self) -> ShardSpec:
        return ShardSpec(self.rank, self.size)

    @property
    def leader(self) -> bool:
        """Rank 0: the one that shows progress and writes the cache entry."""
        return self.rank == 0

    def agree(self, flag: bool) -> bool:
        """The leader's `flag`, on every rank (so all ranks take the same branch)."""
        value = torch.tensor([int(flag)], device=self.device)
        dist.broadcast(value, src=0)
        return bool(value.item())

    def reduce_statistics(self, stats: CalibrationStats) -> CalibrationStats:
        """All ranks' statistics merged, on every rank: sums all-reduced, per-window rows gathered in rank order.

        tau is the same on every rank (the shared anchor), so it is kept as is.
        """
        merged: dict[str, torch.Tensor] = {}
        for name in sorted(stats.tensors):  # the same order on every rank
            tensor = stats.tensors[name]
            if name.endswith(".nr.tau"):
                merged[name] = tensor
            elif name.endswith(PER_WINDOW_ENTRIES):
                merged[name] = self._gather_rows(tensor)
            else:
                total = tensor.to(self.device)
                dist.all_reduce(total)
                merged[name] = total.cpu()
        return CalibrationStats(merged)

    def _gather_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """Concatenate every rank's rows (shards may differ by one window: pad, gather, trim)."""
        counts = [torch.zeros(1, dtype=torch.int64, device=self.device) for _ in range(self.size)]
        dist.all_gather(counts, torch.tensor([rows.shape[0]], device=self.device))
        longest = int(max(count.item() for count in counts))
        padded = torch.zeros((longest, *rows.shape[1:]), dtype=rows.dtype, device=self.device)
        padded[: rows.shape[0]] = rows.to(self.device)
        parts = [torch.empty_like(padded) for _ in range(self.size)]
        dist.all_gather(parts, padded)
        return torch.cat([part[: int(count.item())] for part, count in zip(parts, counts)]).cpu()
