"""The resolved configuration of a pruning run: what the user chose, after presets and defaults.

Precedence: an explicit flag > the preset's value > the default below.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from typing import Any

from hybridprune.errors import UserError
from hybridprune.masks import parse_pattern

PRUNE_METHODS = ("hybrid", "wanda", "magnitude", "neuronrank")
MLP_METHODS = ("neuronrank_tfidf", "neuronrank_old")
TFIDF_MODES = ("doc", "topic")
ATTENTION_METHODS = ("wanda", "none")
TF_KINDS = ("out_rms", "rms", "mean_abs")


@dataclass(frozen=True)
class PruneConfig:
    """Every knob that changes the masks (none of them changes the calibration statistics)."""

    prune_method: str = "hybrid"
    hybrid_mlp_method: str = "neuronrank_tfidf"
    nr_tfidf_mode: str = "doc"
    sparsity: float = 0.5
    pattern: str = "unstructured"
    attention_method: str = "wanda"
    pruning_last: int = 0  # 0 = all layers, N >= 1 = only the last N layers (the seed's --pruning_last)
    preserve_first: float = 0.0  # fraction of the first layers left dense (the conservative preset)
    weight_exp: float = 1.0
    tf_exp: float = 1.0
    idf_exp: float = 0.0  # chosen on the validation halves of five domains x two models (docs/validation.md): 0 won
    tf_kind: str = "out_rms"
    nr_min_tokens: int = 1
    nr_topic_rate: float = 0.05
    layer_spread: float = 0.0
    qk_shift: float = 0.0  # q/k pruned at sparsity + shift, v/o at sparsity - shift (clamped to the layer's target; no effect with N:M)
    sequential: bool = False
    update: bool = False  # OBS weight update of the kept weights, from the cached second-order statistics
    nr_doc_rate: float = 0.1  # doc mode: a neuron is in a window when active on >= this fraction of its tokens
    nr_row_bound: float = 0.05  # gate/up: each neuron's row sparsity kept within target +- this (1 = unbounded)
    update_shrink: float = 0.25  # --update: step toward the OBS-updated weights (1 = full update, 0 = none)

    def validate(self, num_layers: int | None = None) -> PruneConfig:
        """Refuse impossible combinations with one clear line naming the flag."""
        _choice("--prune-method", self.prune_method, PRUNE_METHODS)
        _choice("--hybrid-mlp-method", self.hybrid_mlp_method, MLP_METHODS)
        _choice("--nr-tfidf-mode", self.nr_tfidf_mode, TFIDF_MODES)
        _choice("--attention-method", self.attention_method, ATTENTION_METHODS)
        _choice("--tf-kind", self.tf_kind, TF_KINDS)
        if not 0.0 <= self.sparsity < 1.0:
            raise UserError(f"--sparsity must be in [0, 1), got {self.sparsity}")
        try:
            pattern = parse_pattern(self.pattern)
        except ValueError as err:
            raise UserError(f"--pattern: {err}") from None
        if pattern.kind == "nm" and abs(pattern.sparsity - self.sparsity) > 1e-9:
            raise UserError(
                f"--pattern {self.pattern} prunes exactly {pattern.sparsity:g} of the weights, but --sparsity is "
                f"{self.sparsity:g}: use --sparsity {pattern.sparsity:g} or another pattern"
            )
        if self.pruning_last < 0:
            raise UserError(f"--pruning-last must be a number of layers >= 1, got {self.pruning_last}")
        if num_layers is not None and self.pruning_last > num_layers:
            raise UserError(f"--pruning-last {self.pruning_last} exceeds the model's {num_layers} layers")
        if not 0.0 <= self.preserve_first < 1.0:
            raise UserError(f"--preserve-first must be a fraction of layers in [0, 1), got {self.preserve_first}")
        for flag, value in (("--weight-exp", self.weight_exp), ("--tf-exp", self.tf_exp), ("--idf-exp", self.idf_exp)):
            if not 0.0 <= value <= 8.0:
                raise UserError(f"{flag} must be in [0, 8], got {value}")
        if self.nr_min_tokens < 1:
            raise UserError(f"--nr-min-tokens must be >= 1, got {self.nr_min_tokens}")
        if not 0.0 < self.nr_topic_rate <= 1.0:
            raise UserError(f"--nr-topic-rate must be in (0, 1], got {self.nr_topic_rate}")
        if not 0.0 <= self.nr_doc_rate <= 1.0:
            raise UserError(f"--nr-doc-rate must be in [0, 1], got {self.nr_doc_rate}")
        if not 0.0 <= self.nr_row_bound <= 1.0:
            raise UserError(f"--nr-row-bound must be in [0, 1], got {self.nr_row_bound}")
        if not 0.0 <= self.update_shrink <= 1.0:
            raise UserError(f"--update-shrink must be in [0, 1], got {self.update_shrink}")
        if not 0.0 <= self.layer_spread < 0.5:
            raise UserError(f"--layer-spread must be in [0, 0.5), got {self.layer_spread}")
        if not abs(self.qk_shift) < 0.5:
            raise UserError(f"--qk-shift must be in (-0.5, 0.5), got {self.qk_shift}")
        # Near 0 or 1 the shift is clamped per layer so that q/k and v/o stay in [0, 1) (prune.plan_layers).
        # An N:M pattern fixes every matrix's sparsity, so --qk-shift (on by default through the balanced
        # preset) does nothing there: the masks are the pattern's (see methods/hybrid.layer_masks).
        if self.sequential and self.layer_spread:
            raise UserError("--sequential prunes layer by layer and cannot combine with --layer-spread")
        if self.sequential and self.update:
            raise UserError("--update works from the dense model's second-order statistics, --sequential from pruned inputs: use one of them")
        return self

    def pruned_layers(self, num_layers: int) -> range:
        """The decoder layers this run prunes: all, the last N (--pruning-last), or all but the first fraction."""
        if self.pruning_last:
            return range(num_layers - self.pruning_last, num_layers)
        return range(min(num_layers - 1, round(self.preserve_first * num_layers)), num_layers)

    def mlp_label(self) -> str:
        if self.prune_method in ("wanda", "magnitude"):
            return self.prune_method
        if self.hybrid_mlp_method == "neuronrank_old":
            return "neuronrank_old"
        return f"neuronrank_tfidf ({self.nr_tfidf_mode})"

    def attention_label(self) -> str:
        if self.prune_method == "magnitude":
            return "magnitude"
        if parse_pattern(self.pattern).kind == "structured" and self.attention_method == "none":
            return "none"
        return "Wanda"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]


def _choice(flag: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise UserError(f"unknown {flag} '{value}': use one of {', '.join(allowed)}")


PRUNE_FIELDS = {field.name: field for field in dataclasses.fields(PruneConfig)}
