"""Calibration statistics: reduced sums per decoder layer, accumulated in float64.

Names inside `stats.safetensors` (l = layer index):
  tokens                       scalar, calibration tokens seen
  layer.l.attn_in.sumsq  [H]   sum of x_j^2 at the input of q/k/v (Wanda's squared norm)
  layer.l.o_in.sumsq     [A]   ... at the input of o_proj
  layer.l.mlp_in.sumsq   [H]   ... at the input of gate/up
  layer.l.down_in.sumsq  [I]   ... at the input of down_proj (= sum a_i^2 for NeuronRank)
  layer.l.nr.abs_sum     [I]   sum |a_i|
  layer.l.nr.tau         scalar activity threshold (the q_active quantile of |a|)
  layer.l.nr.active_tokens [I], layer.l.nr.window_active [N, I], layer.l.nr.window_tokens [N]
  layer.l.nr.topic_active [k, I], layer.l.nr.topic_tokens [k]
  layer.l.block.cos_sum      scalar, sum over tokens of 1 - cos(layer input, layer output) (block influence)
  layer.l.block.delta_sumsq  scalar, sum over tokens of ||layer output - layer input||^2
  layer.l.block.input_sumsq  scalar, sum over tokens of ||layer input||^2 (the residual stream's energy)
Every entry is a sum over tokens (or windows), so disjoint shards of the text add up.
(The block.* entries came with cache schema 2; older entries lack them: structured.py asks to recalibrate.)

A second-order entry (key mode "gram", for refine and --update) holds instead, next to `tokens`, for
each input group above, from H = sum_t x_t x_t^T over its inputs (calibration/second_order.py):
  layer.l.<group>.gram_diag [n]            float64  H_jj (0: an input channel that was always zero)
  layer.l.<group>.gram_corr [n(n-1)/2]     float16  H_ij / sqrt(H_ii H_jj), i < j, packed row by row
On disk every entry written since 2026-12-06 (first order and second order alike; older first-order entries
hold everything in `stats.safetensors` and still load) keeps each layer's entries in a
file of its own (cache.py: `layer-00000.safetensors` ...), written as the layer finishes and read one layer at
a time: `shards` is then set and the tensors dict holds only `tokens`. Read a layer's entries through the
accessors below (`layer_entry`, `sumsq`, `neuron_stats`, ...), never `tensors` directly.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import Tensor

from hybridprune.calibration.second_order import damped_gram
from hybridprune.methods.neuronrank import NeuronStats, assign_topics, kmeans_cosine, quantile_threshold
from hybridprune.methods.reconstruct import inverse_factor
from hybridprune.models.adapters import DOWN_IN, INPUT_GROUPS, MLP_IN  # noqa: F401 (INPUT_GROUPS re-exported)

TOPIC_SAMPLE_TOKENS = 2048
SECOND_ORDER_ENTRIES = (".gram_diag", ".gram_corr")
PER_WINDOW_ENTRIES = (".nr.window_active", ".nr.window_tokens")
COUNT_ENTRIES = ("nr.active_tokens", "nr.window_active", "nr.window_tokens", "nr.topic_active", "nr.topic_tokens")


@dataclass
class CalibrationStats:
    """All layers' statistics as one flat dict of tensors (the on-disk format, see module doc)."""

    tensors: dict[str, Tensor]
    shards: LayerReader | None = None
    """Where per-layer entries live when they are not in `tensors` (a cache entry's layer files)."""

    @property
    def tokens(self) -> int:
        return int(self.tensors["tokens"].item())

    @property
    def num_layers(self) -> int:
        if self.shards is not None:
            return self.shards.num_layers
        return len({match.group(1) for name in self.tensors if (match := re.match(r"layer\.(\d+)\.", name))})

    def layer_entry(self, layer: int, name: str) -> Tensor:
        """`layer.<layer>.<name>`, from memory or from the layer's file."""
        full = f"layer.{layer}.{name}"
        if full in self.tensors or self.shards is None:
            return self.tensors[full]
        return self.shards.layer(layer)[full]

    def layer_tensors(self, layer: int) -> dict[str, Tensor]:
        """Every `layer.<layer>.*` entry (from memory, or that layer's file)."""
        prefix = f"layer.{layer}."
        held = {name: tensor for name, tensor in self.tensors.items() if name.startswith(prefix)}
        if self.shards is not None:  # a layer without its file is refused there, naming the entry
            held.update(self.shards.layer(layer))
        return held

    def all_tensors(self) -> dict[str, Tensor]:
        """Every entry of every layer in one dict, read layer by layer (small models and tests: at 8B a first-order
        entry is about 0.5 GB, a second-order one 8 GB)."""
        merged = dict(self.tensors)
        for layer in range(self.shards.num_layers if self.shards is not None else 0):
            merged.update({name: tensor.clone() for name, tensor in self.layer_tensors(layer).items()})
        return merged

    def sumsq(self, layer: int, group: str) -> Tensor:
        return self.layer_entry(layer, f"{group}.sumsq")

    def gram(self, layer: int, group: str) -> tuple[Tensor, Tensor]:
        """A second-order entry's damped Gram G [n, n] (float32) and dead-channel mask [n]."""
        return damped_gram(self.layer_entry(layer, f"{group}.gram_diag"), self.layer_entry(layer, f"{group}.gram_corr"))

    def inverse_factor(self, layer: int, group: str) -> tuple[Tensor, Tensor]:
        """The upper Cholesky factor [n, n] of G^-1 (what --update's sweep needs) and the dead-channel mask [n]."""
        gram, dead = self.gram(layer, group)
        return inverse_factor(gram), dead

    def block(self, layer: int, name: str) -> float:
        """A block entry (cos_sum, delta_sumsq, input_sumsq) of one layer; KeyError on statistics without them."""
        return float(self.layer_entry(layer, f"block.{name}").item())

    def block_influence(self, layer: int) -> float:
        """Mean over tokens of 1 - cos(layer input, layer output): how much the layer changes the residual stream."""
        return self.block(layer, "cos_sum") / self.tokens

    def tau(self, layer: int) -> float:
        return float(self.layer_entry(layer, "nr.tau").item())

    def neuron_stats(self, layer: int) -> NeuronStats:
        def entry(name: str) -> Tensor:
            return self.layer_entry(layer, f"nr.{name}").double()

        return NeuronStats(
            tokens=self.tokens,
            abs_sum=entry("abs_sum"),
            sq_sum=self.sumsq(layer, DOWN_IN),
            active_tokens=entry("active_tokens"),
            window_active=entry("window_active"),
            window_tokens=entry("window_tokens"),
            topic_active=entry("topic_active"),
            topic_tokens=entry("topic_tokens"),
        )

    def add_(self, other: CalibrationStats) -> CalibrationStats:
        """Merge another shard's statistics (other windows) into this one.

        Sums add; the per-window entries (one row per window) are concatenated, `other`'s
        windows after this one's; tau is kept from self (it is a threshold, not a sum).
        """
        if self.tensors.keys() != other.tensors.keys():
            raise ValueError("statistics of different layouts cannot be added")
        for name, tensor in list(self.tensors.items()):
            if name.endswith(PER_WINDOW_ENTRIES):
                self.tensors[name] = torch.cat([tensor, other.tensors[name]])
            elif not name.endswith(".nr.tau"):
                tensor.add_(other.tensors[name])
        return self


class LayerReader(Protocol):
    """Per-layer entries kept outside memory, read one layer at a time (cache.LayerShards)."""

    num_layers: int

    def layer(self, index: int) -> dict[str, Tensor]: ...


@dataclass
class LayerAccumulator:
    """Collects one decoder layer's statistics from forward pre-hooks on its Linears.

    The activity threshold tau and the topic centroids are fitted on the first batch of
    windows (a random sample of the text) and then applied to every batch, so the whole
    collection needs a single forward pass of the layer. A shard of the windows fits them on
    the same anchor batch as the whole run would (the first batch of all windows), passed as
    a leading `fit_only` batch that is not counted, so that the shards' counts add up.
    """

    layer: int
    num_windows: int
    topics: int
    q_active: float
    seed: int
    sums: dict[str, Tensor] = field(default_factory=dict)
    tau: float | None = None
    centroids: Tensor | None = None
    batch_topics: Tensor | None = None
    window_offset: int = 0
    tokens: int = 0
    fit_only: bool = False  # the current batch only fits tau and the centroids (cleared after it)
    scratch: dict[tuple, Tensor] = field(default_factory=dict, repr=False)  # float32 buffers kept across batches

    def _scratch(self, slot: int, like: Tensor) -> Tensor:
        """A float32 buffer of `like`'s 2-D shape, kept across batches. Allocating a fresh temporary of a
        batch's activations per operation cost more than the arithmetic on this CPU (page faults: the
        Llama-3.1-8B down_proj input's threshold test took 0.077 s allocating, 0.015 s into a kept buffer);
        the same operations in the same order, so the sums are bit for bit what they were."""
        key = (slot, tuple(like.shape), str(like.device))
        buffer = self.scratch.get(key)
        if buffer is None:
            buffer = self.scratch[key] = torch.empty(like.shape, dtype=torch.float32, device=like.device)
        return buffer

    def _float(self, x: Tensor, slot: int = 0) -> Tensor:
        """x [..., n] as a float32 [tokens, n] in scratch `slot` (x itself when it already is float32)."""
        flat = x.reshape(-1, x.shape[-1])
        if flat.dtype == torch.float32:
            return flat
        return self._scratch(slot, flat).copy_(flat)

    def _sumsq(self, flat: Tensor) -> Tensor:
        return torch.mul(flat, flat, out=self._scratch(1, flat)).sum(0)

    def add_sumsq(self, group: str, x: Tensor) -> None:
        if self.fit_only:
            return
        self._add(f"{group}.sumsq", self._sumsq(self._float(x)))

    def observe_mlp_input(self, x: Tensor) -> None:
        """Input of gate/up: Wanda sums, and the token-to-topic assignment for this batch."""
        flat = self._float(x)
        if not self.fit_only:
            self._add(f"{MLP_IN}.sumsq", self._sumsq(flat))
        if self.centroids is None:
            generator = torch.Generator().manual_seed(self.seed * 1000 + self.layer)
            count = min(TOPIC_SAMPLE_TOKENS, flat.shape[0])
            sample = flat[torch.randperm(flat.shape[0], generator=generator)[:count].to(flat.device)]
            self.centroids = kmeans_cosine(sample.cpu(), self.topics, seed=self.seed + self.layer, iters=8)
        if self.fit_only:
            return
        self.batch_topics = assign_topics(flat, self.centroids.to(flat.device))

    def observe_neurons(self, a: Tensor) -> None:
        """Input of down_proj (the neuron activations a = act(gate) * up) of a batch of windows."""
        batch, seqlen, neurons = a.shape
        flat = self._float(a)
        if self.tau is None:
            self.tau = quantile_threshold(flat.abs(), self.q_active, max_sample=2**18, seed=self.seed + self.layer)
        if self.fit_only:
            self.fit_only = False  # down_proj is the batch's last Linear: the next batch counts
            return
        self._add("down_in.sumsq", self._sumsq(flat))
        magnitude = flat.abs() if flat.data_ptr() == a.data_ptr() else torch.abs(flat, out=flat)  # never a's memory
        active = torch.gt(magnitude, self.tau, out=self._scratch(1, magnitude))  # 0/1 in float32
        per_window = active.view(batch, seqlen, neurons).sum(1)
        self._add("nr.abs_sum", magnitude.sum(0))
        self._add("nr.active_tokens", per_window.sum(0))
        window_active = self.sums.setdefault(
            "nr.window_active", torch.zeros(self.num_windows, neurons, dtype=torch.float64)
        )
        window_tokens = self.sums.setdefault("nr.window_tokens", torch.zeros(self.num_windows, dtype=torch.float64))
        rows = slice(self.window_offset, self.window_offset + batch)
        window_active[rows] += per_window.double().cpu()
        window_tokens[rows] += seqlen
        assert self.batch_topics is not None
        topics = self.batch_topics.to(a.device)
        # index_add of the tokens' rows: 0.008 s against 0.034 s for one_hot^T @ active at 2048 x 14336
        self._add("nr.topic_active", torch.zeros(self.topics, neurons, device=a.device).index_add_(0, topics, active))
        self._add("nr.topic_tokens", torch.bincount(topics, minlength=self.topics).float())
        self.window_offset += batch
        self.tokens += batch * seqlen

    def observe_block(self, x_in: Tensor, x_out: Tensor) -> None:
        """A decoder layer's input and output hidden states (one batch): the block-influence sums."""
        a = self._float(x_in, slot=0)
        b = self._float(x_out, slot=2)
        self._add("block.cos_sum", (1 - torch.nn.functional.cosine_similarity(a, b, dim=-1)).sum())
        self._add("block.delta_sumsq", torch.sub(b, a, out=self._scratch(1, a)).pow_(2).sum())
        self._add("block.input_sumsq", torch.mul(a, a, out=self._scratch(1, a)).sum())

    def _add(self, name: str, value: Tensor) -> None:
        value = value.double().cpu()
        if name in self.sums:
            self.sums[name] += value
        else:
            self.sums[name] = value.clone()

    def finish(self) -> dict[str, Tensor]:
        """This layer's entries, named as in the module doc; counts are stored as int32 (exact, half the bytes)."""
        named = {
            f"layer.{self.layer}.{name}": tensor.to(torch.int32) if name in COUNT_ENTRIES else tensor
            for name, tensor in self.sums.items()
        }
        named[f"layer.{self.layer}.nr.tau"] = torch.tensor(float(self.tau), dtype=torch.float64)
        return named
