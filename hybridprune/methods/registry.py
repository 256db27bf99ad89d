"""The one registry of pruning methods: names, what they do to each module kind, and their maths.

Everything that knows a method name reads it here: configuration validation, the CLI help
text, the labels in summaries and `hybridprune.json`, and the per-layer masks
(methods/hybrid.py). An unknown name is an error everywhere.

This module imports no torch: the metric functions are named as "module:function" and
imported on first use, so `hybridprune --help` and preset validation stay light.

Adding a method: write its maths in its own module under methods/ (tensors in, tensors out),
add a `ModuleMetric` and/or a `PruneMethod` entry below, and a unit test.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from typing import Any

NEURONRANK = "neuronrank"
"""The MLP treatment that scores whole neurons (methods/neuronrank.py) and allocates by score."""
NONE = "none"
"""A module kind left dense."""


@dataclass(frozen=True)
class ModuleMetric:
    """A per-weight importance metric: `function(weight [out, in], input_sumsq [in]) -> metric [out, in]`."""

    name: str
    label: str
    function: str  # "module:function", imported on first use
    uses_activations: bool


@dataclass(frozen=True)
class PruneMethod:
    """A --prune-method: which treatment attention and MLP projections get."""

    name: str
    summary: str
    attention: str  # a MODULE_METRICS name, or NONE
    mlp: str  # a MODULE_METRICS name, or NEURONRANK

    @property
    def uses_neuron_scores(self) -> bool:
        return self.mlp == NEURONRANK


MODULE_METRICS: dict[str, ModuleMetric] = {
    metric.name: metric
    for metric in (
        ModuleMetric("wanda", "Wanda", "hybridprune.methods.wanda:wanda_metric", uses_activations=True),
        ModuleMetric("magnitude", "magnitude", "hybridprune.methods.magnitude:magnitude_metric", uses_activations=False),
    )
}

METHODS: dict[str, PruneMethod] = {
    method.name: method
    for method in (
        PruneMethod("hybrid", "Wanda on attention, NeuronRank on the MLPs", attention="wanda", mlp=NEURONRANK),
        PruneMethod("wanda", "Wanda (|W| x input norm, per output row) everywhere", attention="wanda", mlp="wanda"),
        PruneMethod("magnitude", "|W| per output row everywhere (the baseline)", attention="magnitude", mlp="magnitude"),
        PruneMethod("neuronrank", "NeuronRank on the MLPs only; attention stays dense", attention=NONE, mlp=NEURONRANK),
    )
}

MLP_SCORINGS: dict[str, str] = {
    "neuronrank_tfidf": "TF x IDF with documents = windows (doc) or topics (topic)",
    "neuronrank_old": "TF x IDF with documents = single tokens",
}
TFIDF_MODES: dict[str, str] = {"doc": "documents are the calibration windows", "topic": "documents are k-means topics"}
TF_KINDS: dict[str, str] = {
    "out_rms": "rms(a_i) x ||down[:, i]|| (the neuron's RMS contribution to the residual stream)",
    "rms": "rms(a_i)",
    "mean_abs": "mean |a_i|",
}
STRUCTURED_ATTENTION: dict[str, str] = {"wanda": "attention pruned unstructured with Wanda", NONE: "attention kept dense"}


def choices(table: dict[str, Any]) -> str:
    """'a | b | c' for help text and error messages."""
    return " | ".join(table)


def get_method(name: str) -> PruneMethod:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown pruning method {name!r}: use one of {', '.join(METHODS)}") from None


def get_metric(name: str) -> ModuleMetric:
    try:
        return MODULE_METRICS[name]
    except KeyError:
        raise ValueError(f"unknown module metric {name!r}: use one of {', '.join(MODULE_METRICS)}") from None


@cache
def metric_function(name: str) -> Callable[..., Any]:
    """The metric's function, imported on first use."""
    module, function = get_metric(name).function.split(":")
    return getattr(importlib.import_module(module), function)
