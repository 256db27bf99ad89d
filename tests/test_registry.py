"""The method registry: one source of method names for validation, help, labels and masks."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from hybridprune.cli.main import app
from hybridprune.config import PruneConfig
from hybridprune.errors import UserError
from hybridprune.methods import registry
from hybridprune.methods.hybrid import module_metric


def test_every_method_names_known_treatments():
    for method in registry.METHODS.values():
        assert method.attention in (*registry.MODULE_METRICS, registry.NONE)
        assert method.mlp in (*registry.MODULE_METRICS, registry.NEURONRANK)
    for name in registry.MODULE_METRICS:
        assert callable(registry.metric_function(name))


def test_validation_accepts_exactly_the_registry():
    for name in registry.METHODS:
        PruneConfig(prune_method=name).validate()
    with pytest.raises(UserError, match="unknown --prune-method 'sparsegpt': use one of hybrid, wanda, magnitude, neuronrank"):
        PruneConfig(prune_method="sparsegpt").validate()


def test_an_unknown_metric_is_an_error_not_wanda():
    weight, sumsq = torch.randn(4, 8), torch.rand(8, dtype=torch.float64)
    with pytest.raises(ValueError, match="unknown module metric 'ria'"):
        module_metric("ria", weight, sumsq)
    assert torch.equal(module_metric("magnitude", weight, sumsq), weight.abs())


def test_help_lists_every_method_and_default():
    shown = CliRunner().invoke(app, ["prune", "--help"], terminal_width=200).output
    for name in registry.METHODS:
        assert name in shown
    assert f"default {PruneConfig().idf_exp}" in shown


def test_labels_come_from_the_registry():
    assert PruneConfig(prune_method="wanda").mlp_label() == "Wanda"
    assert PruneConfig(prune_method="magnitude").attention_label() == "magnitude"
    assert PruneConfig(prune_method="neuronrank").attention_label() == "none"
    assert PruneConfig().method_label().startswith("hybrid (neuronrank_tfidf")
