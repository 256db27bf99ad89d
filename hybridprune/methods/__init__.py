"""Pure tensor maths for the pruning metrics: tensors in, tensors out, no I/O."""

from __future__ import annotations

from hybridprune.methods.magnitude import magnitude_metric
from hybridprune.methods.neuronrank import (
    NeuronStats,
    TermFrequencyKind,
    assign_topics,
    idf_doc,
    idf_old,
    idf_topic,
    kmeans_cosine,
    neuron_scores,
    quantile_threshold,
    term_frequency,
)
from hybridprune.methods.wanda import wanda_metric

__all__ = [
    "NeuronStats",
    "TermFrequencyKind",
    "assign_topics",
    "idf_doc",
    "idf_old",
    "idf_topic",
    "kmeans_cosine",
    "magnitude_metric",
    "neuron_scores",
    "quantile_threshold",
    "term_frequency",
    "wanda_metric",
]
