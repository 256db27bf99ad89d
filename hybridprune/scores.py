"""Per-neuron NeuronRank scores and per-channel Wanda norms for a configuration, cached (they are small)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from hybridprune.calibration.stats import INPUT_GROUPS, CalibrationStats
from hybridprune.fsutil import atomic_file
from hybridprune.masks import prune_counts
from hybridprune.methods.hybrid import NeuronScoring, neuron_idf, score_neurons
from hybridprune.models.loading import LoadedModel


@dataclass
class LayerScores:
    layer: int
    scores: Tensor  # [I] NeuronRank s_i
    idf: Tensor  # [I]
    channel_norms: dict[str, Tensor]  # group -> ||X_j||


def compute_scores(stats: CalibrationStats, scoring: NeuronScoring, loaded: LoadedModel) -> list[LayerScores]:
    layers = loaded.adapter.layers(loaded.model)
    return [
        LayerScores(
            layer=index,
            scores=score_neurons(
                stats.neuron_stats(index), scoring, loaded.adapter.linears(layers[index])[loaded.adapter.mlp_output].weight
            ),
            idf=neuron_idf(stats.neuron_stats(index), scoring),
            channel_norms={group: stats.sumsq(index, group).sqrt() for group in INPUT_GROUPS},
        )
        for index in range(stats.num_layers)
    ]


def scores_path(root: Path, stats_key: str, scoring: NeuronScoring) -> Path:
    digest = hashlib.sha256(json.dumps(dataclasses.asdict(scoring), sort_keys=True).encode()).hexdigest()[:12]
    return root / "scores" / f"{stats_key}-{digest}.safetensors"


def save_scores(path: Path, layers: list[LayerScores]) -> None:
    """One small safetensors file, written atomically."""
    from safetensors.torch import save_file

    tensors = {}
    for entry in layers:
        tensors[f"layer.{entry.layer}.scores"] = entry.scores
        tensors[f"layer.{entry.layer}.idf"] = entry.idf
        for group, norms in entry.channel_norms.items():
            tensors[f"layer.{entry.layer}.{group}.norm"] = norms
    with atomic_file(path) as temporary:
        save_file({name: tensor.contiguous() for name, tensor in tensors.items()}, str(temporary))


def structured_share(layers: list[LayerScores], sparsity: float) -> list[float]:
    """Share of each layer's neurons below the global score threshold that removes `sparsity` of all neurons.

    Scores are compared across layers after dividing by each layer's median, so the share
    shows where a global structured cut would concentrate (per-layer cuts are uniform by default).
    """
    normalized = torch.cat([entry.scores / entry.scores.median().clamp_min(1e-30) for entry in layers])
    count = int(prune_counts(torch.tensor([normalized.numel()]), sparsity)[0])
    order = torch.argsort(normalized, stable=True)
    removed = torch.zeros(normalized.numel(), dtype=torch.bool)
    removed[order[:count]] = True
    shares, start = [], 0
    for entry in layers:
        size = entry.scores.numel()
        shares.append(float(removed[start : start + size].float().mean()))
        start += size
    return shares
