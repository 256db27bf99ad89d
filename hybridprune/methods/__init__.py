"""Pure tensor maths for the pruning metrics: tensors in, tensors out, no I/O.

The names below are imported on first use, so that the torch-free registry
(`hybridprune.methods.registry`) can be read without importing torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "magnitude_metric": "magnitude",
    "wanda_metric": "wanda",
    **{
        name: "neuronrank"
        for name in (
            "NeuronStats",
            "TermFrequencyKind",
            "assign_topics",
            "idf_doc",
            "idf_old",
            "idf_topic",
            "kmeans_cosine",
            "neuron_scores",
            "quantile_threshold",
            "term_frequency",
        )
    },
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"hybridprune.methods.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'hybridprune.methods' has no attribute {name!r}")
