"""Achieved sparsity, counted the way the benchmark defines it.

Zeros are counted in every prunable Linear weight inside the decoder layers; the total is over
those weights only. Embeddings and the LM head are reported apart (a tied LM head once, as the
embedding) so that an untouched vocabulary matrix never dilutes or inflates the figure.

A structurally pruned model has physically narrower MLPs; given the dense intermediate size,
the removed neurons count as zeros of full-size matrices, so its sparsity is comparable with an
unstructured model's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from hybridprune.models.adapters import FamilyAdapter

KINDS = ("attention", "mlp")


@dataclass(frozen=True)
class Count:
    """Zeros out of a number of weights."""

    zeros: int = 0
    total: int = 0

    @property
    def sparsity(self) -> float:
        return self.zeros / self.total if self.total else 0.0

    def __add__(self, other: Count) -> Count:
        return Count(self.zeros + other.zeros, self.total + other.total)

    def to_dict(self) -> dict[str, Any]:
        return {"zeros": self.zeros, "total": self.total, "sparsity": self.sparsity}


@dataclass(frozen=True)
class ModuleCount:
    """One Linear of one decoder layer."""

    layer: int
    name: str  # q_proj ... down_proj
    kind: str  # attention | mlp
    count: Count


@dataclass(frozen=True)
class SparsityReport:
    """Per module, per layer, per kind and total sparsity of the decoder Linears."""

    modules: tuple[ModuleCount, ...]
    names: tuple[str, ...]  # module names in adapter order (q_proj ... down_proj)
    embeddings: Count
    lm_head: Count | None  # None when tied to the embeddings (counted once, as the embeddings)

    @property
    def total(self) -> Count:
        return sum((m.count for m in self.modules), Count())

    @property
    def num_layers(self) -> int:
        return 1 + max((m.layer for m in self.modules), default=-1)

    def kind(self, kind: str) -> Count:
        return sum((m.count for m in self.modules if m.kind == kind), Count())

    def module(self, name: str) -> Count:
        """One module name (e.g. q_proj) summed over the layers."""
        return sum((m.count for m in self.modules if m.name == name), Count())

    def layer(self, index: int, kind: str | None = None) -> Count:
        return sum((m.count for m in self.modules if m.layer == index and kind in (None, m.kind)), Count())

    def layer_module(self, index: int, name: str) -> Count:
        return sum((m.count for m in self.modules if m.layer == index and m.name == name), Count())

    def to_dict(self) -> dict[str, Any]:
        return {
            "total": self.total.to_dict(),
            **{kind: self.kind(kind).to_dict() for kind in KINDS},
            "modules": {name: self.module(name).to_dict() for name in self.names},
            "layers": [
                {
                    "layer": index,
                    "total": self.layer(index).to_dict(),
                    **{kind: self.layer(index, kind).to_dict() for kind in KINDS},
                    "modules": {name: self.layer_module(index, name).to_dict() for name in self.names},
                }
                for index in range(self.num_layers)
            ],
            "embeddings": self.embeddings.to_dict(),
            "lm_head": {"tied": True} if self.lm_head is None else {"tied": False, **self.lm_head.to_dict()},
        }

    # --- rendering helpers: plain rows, the CLI turns them into tables --------------------

    def kind_rows(self) -> list[list[str]]:
        """[part, zeros, weights, sparsity]: attention, MLP, total, then the parts outside the total."""
        rows = [[label, self.kind(kind)] for kind, label in zip(KINDS, ("attention", "MLP"))]
        rows.append(["total (decoder Linears)", self.total])
        rows.append(["embeddings (not in total)", self.embeddings])
        if self.lm_head is not None:
            rows.append(["LM head (not in total)", self.lm_head])
        else:
            rows.append(["LM head (tied to embeddings)", None])
        return [
            [label, "-", "-", "-"] if count is None else [label, f"{count.zeros:,}", f"{count.total:,}", percent(count.sparsity)]
            for label, count in rows
        ]

    def layer_columns(self) -> list[str]:
        """Short headers (q, k, ..., down) so eleven columns fit a terminal; the cells are percentages."""
        return ["layer", *(name.removesuffix("_proj") for name in self.names), "attn", "MLP", "total"]

    def layer_rows(self) -> list[list[str]]:
        """One row per decoder layer: each module's sparsity in %, then attention, MLP and the layer total."""
        return [
            [
                str(index),
                *(f"{100 * self.layer_module(index, name).sparsity:.1f}" for name in self.names),
                *(f"{100 * self.layer(index, kind).sparsity:.1f}" for kind in KINDS),
                f"{100 * self.layer(index).sparsity:.1f}",
            ]
            for index in range(self.num_layers)
        ]

    def summary(self) -> str:
        """One line: attention / MLP / total."""
        return (
            f"attention {percent(self.kind('attention').sparsity)}, MLP {percent(self.kind('mlp').sparsity)}, "
            f"total {percent(self.total.sparsity)}"
        )


def percent(fraction: float) -> str:
    return f"{100 * fraction:.2f}%"


def _zeros(weight: torch.Tensor) -> int:
    return weight.numel() - int(torch.count_nonzero(weight.detach()))


@torch.no_grad()
def sparsity_report(model: nn.Module, adapter: FamilyAdapter, dense_intermediate_size: int | None = None) -> SparsityReport:
    """Count the zeros of every decoder-layer Linear, and of the embeddings and LM head apart.

    `dense_intermediate_size`: the MLP width before structured pruning; the missing neurons'
    weights (gate/up rows, down columns) then count as zeros of the dense-size matrices.
    """
    modules = [
        count
        for index, layer in enumerate(adapter.layers(model))
        for count in layer_counts(index, layer, adapter, dense_intermediate_size)
    ]
    embedding = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    tied = head is embedding or head.data_ptr() == embedding.data_ptr()
    return assemble_report(modules, adapter, zero_count(embedding), None if tied else zero_count(head))


def zero_count(weight: torch.Tensor) -> Count:
    return Count(_zeros(weight), weight.numel())


@torch.no_grad()
def layer_counts(index: int, layer: nn.Module, adapter: FamilyAdapter, dense_intermediate_size: int | None) -> list[ModuleCount]:
    """One decoder layer's part of the report (streaming counts each layer while it is resident)."""
    counts = []
    linears = adapter.linears(layer)
    width = linears[adapter.mlp_inputs[0]].out_features
    missing = max(0, (dense_intermediate_size or width) - width)
    for name, linear in linears.items():
        kind = "attention" if name in adapter.attention_names else "mlp"
        count = zero_count(linear.weight)
        if kind == "mlp" and missing:
            other = linear.in_features if name in adapter.mlp_inputs else linear.out_features
            count = count + Count(missing * other, missing * other)
        counts.append(ModuleCount(index, name, kind, count))
    return counts


def assemble_report(modules: list[ModuleCount], adapter: FamilyAdapter, embeddings: Count, lm_head: Count | None) -> SparsityReport:
    """The report from the layers' counts and the vocabulary matrices' (`lm_head` None when tied)."""
    return SparsityReport(
        modules=tuple(modules), names=adapter.attention_names + adapter.mlp_names, embeddings=embeddings, lm_head=lm_head
    )
