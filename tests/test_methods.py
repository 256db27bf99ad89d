"""Metrics: Wanda, magnitude and the NeuronRank pieces (TF, IDF modes, topics, thresholds)."""

from __future__ import annotations

import math

import pytest
import torch

from hybridprune.methods import (
    NeuronStats,
    assign_topics,
    idf_doc,
    idf_old,
    idf_topic,
    kmeans_cosine,
    magnitude_metric,
    neuron_scores,
    quantile_threshold,
    term_frequency,
    wanda_metric,
)


def make_stats(
    seed: int = 0,
    neurons: int = 64,
    windows: int = 8,
    window_length: int = 32,
    topics: int = 6,
    empty_topics: int = 1,
) -> NeuronStats:
    """Statistics built from random activations whose firing rate differs per neuron."""
    generator = torch.Generator().manual_seed(seed)
    firing_rate = torch.rand(neurons, generator=generator)
    fires = torch.rand(windows, window_length, neurons, generator=generator) < firing_rate
    activations = torch.randn(windows, window_length, neurons, generator=generator) * fires
    active = activations.abs() > 0.5
    flat_active = active.reshape(-1, neurons)
    tokens = windows * window_length
    topic_of_token = torch.randint(0, topics - empty_topics, (tokens,), generator=generator)
    topic_active = torch.zeros(topics, neurons, dtype=torch.long)
    topic_active.index_add_(0, topic_of_token, flat_active.long())
    return NeuronStats(
        tokens=tokens,
        abs_sum=activations.abs().sum(dim=(0, 1)).double(),
        sq_sum=activations.square().sum(dim=(0, 1)).double(),
        active_tokens=flat_active.sum(dim=0),
        window_active=active.sum(dim=1),
        window_tokens=torch.full((windows,), window_length),
        topic_active=topic_active,
        topic_tokens=torch.bincount(topic_of_token, minlength=topics),
    )


# Wanda and magnitude --------------------------------------------------------------------


def test_magnitude_is_abs_in_float32() -> None:
    weight = torch.tensor([[-2.0, 0.5], [0.0, -1.0]], dtype=torch.bfloat16)
    metric = magnitude_metric(weight)
    assert metric.dtype == torch.float32
    assert metric.tolist() == [[2.0, 0.5], [0.0, 1.0]]


def test_wanda_scales_columns_by_input_norm() -> None:
    weight = torch.tensor([[-1.0, 2.0, 3.0], [4.0, -5.0, 6.0]], dtype=torch.float16)
    input_sumsq = torch.tensor([4.0, 9.0, 0.0], dtype=torch.float64)
    metric = wanda_metric(weight, input_sumsq)
    assert metric.dtype == torch.float32
    assert metric.tolist() == [[2.0, 6.0, 0.0], [8.0, 15.0, 0.0]]


def test_wanda_rejects_mismatched_norm() -> None:
    with pytest.raises(ValueError, match="input_sumsq"):
        wanda_metric(torch.rand(2, 3), torch.rand(4))


# NeuronStats ----------------------------------------------------------------------------


def test_stats_validate_shapes() -> None:
    stats = make_stats()
    assert stats.neurons == 64
    good = {name: getattr(stats, name) for name in stats.__dataclass_fields__}
    for name, bad in [
        ("sq_sum", torch.zeros(63)),
        ("active_tokens", torch.zeros(64, 1)),
        ("window_active", torch.zeros(8, 63)),
        ("window_tokens", torch.zeros(7)),
        ("topic_active", torch.zeros(6)),
        ("topic_tokens", torch.zeros(5)),
        ("tokens", -1),
    ]:
        with pytest.raises(ValueError):
            NeuronStats(**{**good, name: bad})


# TF and IDF -----------------------------------------------------------------------------


def test_term_frequency_kinds() -> None:
    stats = NeuronStats(
        tokens=4,
        abs_sum=torch.tensor([4.0, 2.0]),
        sq_sum=torch.tensor([4.0, 4.0]),
        active_tokens=torch.tensor([4, 1]),
        window_active=torch.tensor([[4, 1]]),
        window_tokens=torch.tensor([4]),
        topic_active=torch.tensor([[4, 1]]),
        topic_tokens=torch.tensor([4]),
    )
    assert term_frequency(stats, "mean_abs").tolist() == [1.0, 0.5]
    assert term_frequency(stats, "rms").tolist() == [1.0, 1.0]
    with pytest.raises(ValueError):
        term_frequency(stats, "median")  # type: ignore[arg-type]


def test_idf_formulas_on_known_counts() -> None:
    stats = NeuronStats(
        tokens=9,
        abs_sum=torch.ones(3),
        sq_sum=torch.ones(3),
        active_tokens=torch.tensor([0, 4, 9]),
        window_active=torch.tensor([[0, 1, 3], [0, 3, 3], [0, 0, 3]]),
        window_tokens=torch.tensor([3, 3, 3]),
        topic_active=torch.tensor([[0, 1, 4], [0, 0, 0], [0, 3, 5]]),
        topic_tokens=torch.tensor([4, 0, 5]),
    )
    expected_doc = [math.log(4 / 1) + 1, math.log(4 / 3) + 1, math.log(4 / 4) + 1]
    assert torch.allclose(idf_doc(stats), torch.tensor(expected_doc, dtype=torch.float64))
    expected_doc_2 = [math.log(4 / 1) + 1, math.log(4 / 2) + 1, 1.0]
    assert torch.allclose(idf_doc(stats, min_tokens=2), torch.tensor(expected_doc_2, dtype=torch.float64))
    # Topic 1 is empty, so K = 2; neuron 1 has rates 0.25 and 0.6.
    expected_topic = [math.log(3 / 1) + 1, math.log(3 / 2) + 1, 1.0]
    assert torch.allclose(idf_topic(stats, 0.5), torch.tensor(expected_topic, dtype=torch.float64))
    expected_old = [math.log(10 / 1) + 1, math.log(10 / 5) + 1, 1.0]
    assert torch.allclose(idf_old(stats), torch.tensor(expected_old, dtype=torch.float64))


@pytest.mark.parametrize(
    "idf", [idf_doc, lambda stats: idf_topic(stats, 0.1), idf_old], ids=["doc", "topic", "old"]
)
def test_idf_varies_across_neurons_and_is_at_least_one(idf) -> None:  # type: ignore[no-untyped-def]
    values = idf(make_stats())
    assert values.dtype == torch.float64
    assert len(torch.unique(values)) > 1, "IDF must differ between neurons with different activity"
    assert bool(torch.isfinite(values).all()) and float(values.min()) >= 1.0


def test_topic_idf_never_zero_even_when_every_neuron_is_everywhere() -> None:
    stats = make_stats()
    saturated = NeuronStats(**{
        **{name: getattr(stats, name) for name in stats.__dataclass_fields__},
        "topic_active": stats.topic_tokens.unsqueeze(1).expand(-1, stats.neurons).clone(),
    })
    assert torch.equal(idf_topic(saturated, 1.0), torch.ones(stats.neurons, dtype=torch.float64))


def test_idf_rejects_missing_documents() -> None:
    stats = make_stats()
    fields = {name: getattr(stats, name) for name in stats.__dataclass_fields__}
    with pytest.raises(ValueError, match="topic"):
        idf_topic(NeuronStats(**{**fields, "topic_tokens": torch.zeros(6, dtype=torch.long)}), 0.1)
    with pytest.raises(ValueError, match="window"):
        idf_doc(NeuronStats(**{**fields, "window_tokens": torch.zeros(8, dtype=torch.long)}))
    with pytest.raises(ValueError, match="min_rate"):
        idf_topic(stats, 0.0)


def ranking(scores: torch.Tensor) -> torch.Tensor:
    return torch.argsort(scores, stable=True)


def test_exponents_change_the_ranking() -> None:
    generator = torch.Generator().manual_seed(1)
    tf = torch.rand(200, generator=generator, dtype=torch.float64)
    idf = 1.0 + 3.0 * torch.rand(200, generator=generator, dtype=torch.float64)
    base = ranking(neuron_scores(tf, idf, tf_exp=1.0, idf_exp=1.0))
    assert not torch.equal(base, ranking(neuron_scores(tf, idf, tf_exp=1.0, idf_exp=2.0)))
    assert not torch.equal(base, ranking(neuron_scores(tf, idf, tf_exp=2.0, idf_exp=1.0)))
    assert torch.equal(neuron_scores(tf, idf, 1.0, 0.0), tf)


def test_exponents_change_the_ranking_on_real_stats() -> None:
    stats = make_stats()
    tf = term_frequency(stats, "mean_abs")
    for idf in (idf_doc(stats), idf_topic(stats, 0.1), idf_old(stats)):
        base = ranking(neuron_scores(tf, idf, 1.0, 1.0))
        assert not torch.equal(base, ranking(neuron_scores(tf, idf, 1.0, 3.0)))


def test_neuron_scores_rejects_shape_mismatch() -> None:
    with pytest.raises(ValueError):
        neuron_scores(torch.rand(3), torch.rand(4), 1.0, 1.0)


# Topics ---------------------------------------------------------------------------------


def clustered_points(seed: int = 0, per_cluster: int = 50) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    directions = torch.eye(4, 16) * 5.0
    noise = torch.randn(4, per_cluster, 16, generator=generator) * 0.3
    return (directions.unsqueeze(1) + noise).reshape(-1, 16)


def test_kmeans_finds_separated_clusters() -> None:
    points = clustered_points()
    centroids = kmeans_cosine(points, k=4, seed=0)
    assert centroids.shape == (4, 16)
    assert torch.allclose(centroids.norm(dim=1), torch.ones(4), atol=1e-5)
    assignment = assign_topics(points, centroids)
    assert assignment.dtype == torch.long
    for cluster in range(4):
        labels = assignment[cluster * 50 : (cluster + 1) * 50]
        assert bool((labels == labels[0]).all())
    assert len(torch.unique(assignment)) == 4


def test_kmeans_is_deterministic_per_seed_and_depends_on_it() -> None:
    points = torch.randn(300, 8, generator=torch.Generator().manual_seed(3))
    first = kmeans_cosine(points, k=5, seed=11)
    assert torch.equal(first, kmeans_cosine(points, k=5, seed=11))
    assert not torch.equal(first, kmeans_cosine(points, k=5, seed=12))


def test_kmeans_handles_more_clusters_than_points() -> None:
    points = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    centroids = kmeans_cosine(points, k=7, seed=0)
    assert centroids.shape == (7, 2)
    assert bool(torch.isfinite(centroids).all())
    assert assign_topics(points, centroids).shape == (3,)
    zeros = kmeans_cosine(torch.zeros(2, 3), k=3, seed=0)
    assert bool(torch.isfinite(zeros).all())


# Activity threshold ---------------------------------------------------------------------


@pytest.mark.parametrize("q", [0.0, 0.1, 0.5, 0.9, 0.99, 1.0])
def test_quantile_threshold_matches_torch_on_small_inputs(q: float) -> None:
    values = torch.randn(37, 11, generator=torch.Generator().manual_seed(5))
    expected = float(torch.quantile(values.abs().double().reshape(-1), q))
    assert quantile_threshold(values, q) == pytest.approx(expected, rel=1e-12, abs=1e-12)


def test_quantile_threshold_subsamples_deterministically() -> None:
    values = torch.randn(200_000, generator=torch.Generator().manual_seed(6))
    estimate = quantile_threshold(values, 0.9, max_sample=20_000, seed=1)
    assert estimate == quantile_threshold(values, 0.9, max_sample=20_000, seed=1)
    exact = float(torch.quantile(values.abs(), 0.9))
    assert estimate == pytest.approx(exact, rel=0.03)
