"""NeuronRank: score MLP neurons like TF-IDF terms over calibration activations.

A neuron's activation a_{t,i} is the input of ``down_proj`` at token t. TF says how
strongly a neuron fires on average; IDF says how selective it is (neurons active in
every document carry little information). Everything here works on reduced sums
(:class:`NeuronStats`), never on raw activations, so statistics can be cached and merged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

TermFrequencyKind = Literal["mean_abs", "rms"]


@dataclass(frozen=True)
class NeuronStats:
    """Reduced activation statistics of one decoder layer's MLP neurons (I neurons).

    ``tokens``: calibration tokens seen. ``abs_sum``/``sq_sum`` [I]: sums of |a| and a^2.
    ``active_tokens`` [I]: tokens with |a| > tau. ``window_active`` [N, I] and
    ``window_tokens`` [N]: active-token counts and token counts per calibration window.
    ``topic_active`` [k, I] and ``topic_tokens`` [k]: the same per topic (empty topics
    have zero tokens).
    """

    tokens: int
    abs_sum: Tensor
    sq_sum: Tensor
    active_tokens: Tensor
    window_active: Tensor
    window_tokens: Tensor
    topic_active: Tensor
    topic_tokens: Tensor

    def __post_init__(self) -> None:
        if self.tokens < 0:
            raise ValueError(f"tokens must be >= 0, got {self.tokens}")
        if self.abs_sum.dim() != 1:
            raise ValueError(f"abs_sum must be 1-D [I], got shape {tuple(self.abs_sum.shape)}")
        neurons = self.abs_sum.shape[0]
        for name in ("sq_sum", "active_tokens"):
            _require_shape(name, getattr(self, name), (neurons,))
        for matrix_name, counts_name in (
            ("window_active", "window_tokens"),
            ("topic_active", "topic_tokens"),
        ):
            matrix = getattr(self, matrix_name)
            if matrix.dim() != 2 or matrix.shape[1] != neurons:
                raise ValueError(
                    f"{matrix_name} must be 2-D [documents, {neurons}], got shape {tuple(matrix.shape)}"
                )
            _require_shape(counts_name, getattr(self, counts_name), (matrix.shape[0],))

    @property
    def neurons(self) -> int:
        """Number of MLP neurons (intermediate size) these statistics describe."""
        return self.abs_sum.shape[0]


def _require_shape(name: str, tensor: Tensor, shape: tuple[int, ...]) -> None:
    if tuple(tensor.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(tensor.shape)}")


def _smoothed_idf(documents: int, document_frequency: Tensor) -> Tensor:
    """ln((D+1)/(DF+1)) + 1: smoothed so it is finite and >= 1 whenever DF <= D."""
    df = document_frequency.to(torch.float64)
    return torch.log((documents + 1.0) / (df + 1.0)) + 1.0


def term_frequency(stats: NeuronStats, kind: TermFrequencyKind) -> Tensor:
    """Mean |a| ("mean_abs") or sqrt(mean a^2) ("rms") per neuron, float64.

    RMS weighs rare large activations more than the mean absolute value does.
    """
    if stats.tokens <= 0:
        raise ValueError("term frequency needs statistics from at least one token")
    if kind == "mean_abs":
        return stats.abs_sum.to(torch.float64) / stats.tokens
    if kind == "rms":
        return (stats.sq_sum.to(torch.float64) / stats.tokens).sqrt()
    raise ValueError(f"unknown term frequency kind {kind!r}; use 'mean_abs' or 'rms'")


def idf_doc(stats: NeuronStats, min_tokens: int = 1, min_rate: float = 0.0) -> Tensor:
    """IDF with calibration windows as documents.

    A neuron appears in a window when it is active on at least ``min_tokens`` of its
    tokens and on at least ``min_rate`` of them (a rate, so that the window length does not
    decide: at q_active 0.9 nearly every neuron clears one token in every 512-token window,
    which makes a count of 1 a constant IDF). Only windows that saw tokens count as documents.
    """
    if min_tokens < 1:
        raise ValueError(f"min_tokens must be >= 1, got {min_tokens}")
    if not 0.0 <= min_rate <= 1.0:
        raise ValueError(f"min_rate must be in [0, 1], got {min_rate}")
    documents = stats.window_tokens > 0
    document_count = int(documents.sum())
    if document_count == 0:
        raise ValueError("doc-mode IDF needs at least one calibration window with tokens")
    counts = stats.window_active[documents].to(torch.float64)
    needed = (stats.window_tokens[documents].to(torch.float64) * min_rate).clamp_min(min_tokens).unsqueeze(1)
    frequency = (counts >= needed).sum(dim=0)
    return _smoothed_idf(document_count, frequency)


def idf_topic(stats: NeuronStats, min_rate: float) -> Tensor:
    """IDF with the non-empty topics (hidden-state clusters) as documents.

    A neuron appears in a topic when it is active on at least ``min_rate`` of that
    topic's tokens; a rate rather than a count so large and small topics weigh the same.
    """
    if not 0.0 < min_rate <= 1.0:
        raise ValueError(f"min_rate must be in (0, 1], got {min_rate}")
    topics = stats.topic_tokens > 0
    topic_count = int(topics.sum())
    if topic_count == 0:
        raise ValueError("topic-mode IDF needs at least one non-empty topic")
    rates = stats.topic_active[topics].to(torch.float64) / stats.topic_tokens[topics].to(
        torch.float64
    ).unsqueeze(1)
    frequency = (rates >= min_rate).sum(dim=0)
    return _smoothed_idf(topic_count, frequency)


def idf_old(stats: NeuronStats) -> Tensor:
    """IDF with single tokens as documents (the original ``neuronrank_old`` mode)."""
    if stats.tokens <= 0:
        raise ValueError("token-mode IDF needs statistics from at least one token")
    return _smoothed_idf(stats.tokens, stats.active_tokens)


def neuron_scores(tf: Tensor, idf: Tensor, tf_exp: float, idf_exp: float) -> Tensor:
    """s_i = TF_i^tf_exp * IDF_i^idf_exp in float64; the exponents trade strength against selectivity."""
    if tf.shape != idf.shape:
        raise ValueError(f"tf and idf shapes differ: {tuple(tf.shape)} vs {tuple(idf.shape)}")
    return tf.to(torch.float64).pow(tf_exp) * idf.to(torch.float64).pow(idf_exp)


def _unit_rows(x: Tensor) -> Tensor:
    """Rows scaled to unit length (zero rows stay zero), in at least float32."""
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    x = x.detach().to(dtype)
    return x / x.norm(dim=1, keepdim=True).clamp_min(torch.finfo(dtype).tiny)


def kmeans_cosine(x: Tensor, k: int, seed: int, iters: int = 20) -> Tensor:
    """Unit-norm centroids [k, d] of cosine (spherical) k-means with k-means++ init.

    Deterministic for a seed: all randomness comes from one CPU ``torch.Generator`` and
    cluster sums use a one-hot matmul rather than atomics. With fewer distinct points
    than k, centroids repeat and clusters stay empty, which callers must tolerate.
    """
    if x.dim() != 2 or x.shape[0] == 0:
        raise ValueError(f"x must be 2-D [n >= 1, d], got shape {tuple(x.shape)}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if iters < 0:
        raise ValueError(f"iters must be >= 0, got {iters}")
    points = _unit_rows(x)
    n = points.shape[0]
    generator = torch.Generator(device="cpu").manual_seed(seed)

    chosen = [int(torch.randint(n, (1,), generator=generator))]
    nearest_distance = (1.0 - points @ points[chosen[0]]).clamp_min(0.0)
    for _ in range(1, k):
        weights = nearest_distance.square().to("cpu", torch.float64)
        if float(weights.sum()) > 0.0:
            index = int(torch.multinomial(weights, 1, generator=generator))
        else:
            index = int(torch.randint(n, (1,), generator=generator))
        chosen.append(index)
        distance = (1.0 - points @ points[index]).clamp_min(0.0)
        nearest_distance = torch.minimum(nearest_distance, distance)
    centroids = points[chosen].clone()

    assignment: Tensor | None = None
    for _ in range(iters):
        new_assignment = assign_topics(points, centroids)
        if assignment is not None and torch.equal(new_assignment, assignment):
            break
        assignment = new_assignment
        one_hot = torch.zeros(n, k, dtype=points.dtype, device=points.device)
        one_hot[torch.arange(n, device=points.device), assignment] = 1.0
        sums = one_hot.T @ points
        occupied = one_hot.sum(dim=0) > 0
        centroids = torch.where(occupied.unsqueeze(1), _unit_rows(sums), centroids)
    return centroids


def assign_topics(x: Tensor, centroids: Tensor) -> Tensor:
    """Index of the most cosine-similar centroid per row of x (LongTensor [n]).

    Centroids are unit-norm, so the row norm of x does not change the argmax; ties go
    to the lower topic index.
    """
    if x.dim() != 2 or centroids.dim() != 2 or x.shape[1] != centroids.shape[1]:
        raise ValueError(
            "x [n, d] and centroids [k, d] must agree on d, "
            f"got {tuple(x.shape)} and {tuple(centroids.shape)}"
        )
    similarity = x.detach().to(centroids.dtype) @ centroids.to(x.device).T
    return similarity.argmax(dim=1)


def quantile_threshold(values: Tensor, q: float, max_sample: int = 2**22, seed: int = 0) -> float:
    """q-quantile of |values| (linear interpolation, like ``torch.quantile``).

    Above ``max_sample`` elements it is estimated from a seeded uniform subsample, so it
    is deterministic, bounded in memory and works where ``torch.quantile`` refuses
    (more than 16M elements).
    """
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"q must be in [0, 1], got {q}")
    if max_sample < 1:
        raise ValueError(f"max_sample must be >= 1, got {max_sample}")
    flat = values.detach().reshape(-1)
    if flat.numel() == 0:
        raise ValueError("quantile_threshold needs at least one value")
    if flat.numel() > max_sample:
        generator = torch.Generator(device="cpu").manual_seed(seed)
        sample_index = torch.randint(flat.numel(), (max_sample,), generator=generator)
        flat = flat[sample_index.to(flat.device)]
    ordered = flat.abs().to(torch.float64).sort().values
    position = q * (ordered.numel() - 1)
    lower = math.floor(position)
    upper = min(lower + 1, ordered.numel() - 1)
    fraction = position - lower
    return float(ordered[lower] + (ordered[upper] - ordered[lower]) * fraction)
