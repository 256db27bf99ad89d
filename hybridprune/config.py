"""The configuration of a run, and every default of the tool, defined once.

`CalibrationRequest` holds what changes the cached statistics (all of it but batch_size is in
the cache key); `PruneConfig` every knob that changes the masks and nothing that changes the
statistics. Precedence: an explicit flag > the preset's value > the default below. The CLI's
help strings are built from these defaults (`default_of`). Imports no torch.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from typing import Any

from hybridprune.errors import UserError
from hybridprune.methods import registry
from hybridprune.patterns import parse_pattern

DEFAULT_SEQLEN = 512
"""Tokens per window (calibration and evaluation), capped by the model's max_position_embeddings."""
DEFAULT_EVAL_WINDOWS = 64
"""Test windows of the benchmark protocol (BENCHMARK.md)."""
DEFAULT_DATA = "wiki-vital"
"""The evaluation text (its test split): the benchmark protocol's."""
DEFAULT_DTYPE = "float32"
"""The dtype models are loaded in (statistics always accumulate in float64)."""
DEFAULT_DEVICE = "auto"
"""Where models are computed: `auto` is the first CUDA device when there is one, else the CPU."""
SECOND_ORDER_MODES = ("cache", "recompute")
"""How refine and --update get the sums x x^T: a cache entry made once and reused, or collected in the pass
that prunes, one layer at a time, and never stored (SparseGPT's way: a forward pass more per run)."""
DEFAULT_SECOND_ORDER = "cache"
DEFAULT_SAVE_FORMAT = "dense"
"""How `prune --out` writes the model: plain safetensors with the zeros stored (dense) or compressed."""
DEFAULT_CALIBRATION_DATA = "wiki-vital+code"
"""The calibration text when --data is not given: wiki-vital with a quarter of Python source, chosen on the
validation halves of five domains (docs/validation.md): a Gram fitted to wiki alone overfits it."""


@dataclass(frozen=True)
class CalibrationRequest:
    """What the user asked to calibrate on; everything here except batch_size is in the cache key.

    batch_size only groups windows into forward passes: the activity threshold and the topic
    centroids are fitted on a fixed number of windows (calibration.collect.FIT_WINDOWS),
    whatever the batch size, so it cannot change the statistics.
    """

    data: str = DEFAULT_CALIBRATION_DATA
    text_field: str | None = None
    nsamples: int = 32
    seqlen: int | None = None  # None: DEFAULT_SEQLEN, or the model's max_position_embeddings when smaller
    seed: int = 0
    topics: int = 128
    q_active: float = 0.9
    batch_size: int = 4

    def validate(self) -> CalibrationRequest:
        if self.nsamples <= 0:
            raise UserError(f"--nsamples must be a positive number of windows, got {self.nsamples}")
        if self.seqlen is not None and self.seqlen <= 0:
            raise UserError(f"--seqlen must be a positive number of tokens, got {self.seqlen}")
        if self.topics <= 0:
            raise UserError(f"--topics must be >= 1, got {self.topics}")
        if not 0.0 < self.q_active < 1.0:
            raise UserError(f"--q-active must be a quantile strictly between 0 and 1, got {self.q_active}")
        if self.batch_size <= 0:
            raise UserError(f"--batch-size must be >= 1, got {self.batch_size}")
        return self

    def for_model(self, model: Any) -> CalibrationRequest:
        """Fill in the default seqlen: DEFAULT_SEQLEN, never more than the model's positions; refuse an explicit excess."""
        return dataclasses.replace(self, seqlen=window_length(self.seqlen, model))


def window_length(seqlen: int | None, model: Any) -> int:
    """An explicit --seqlen, refused beyond the model's context; None: DEFAULT_SEQLEN capped by it."""
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if seqlen is None:
        return min(DEFAULT_SEQLEN, limit or DEFAULT_SEQLEN)
    if limit and seqlen > limit:
        raise UserError(f"--seqlen {seqlen} exceeds the model's max_position_embeddings ({limit})")
    return seqlen

UPDATE_MASKS = {
    "sweep": "masks chosen inside the OBS sweep from already-updated weights",
    "fixed": "the hybrid's masks kept, the kept weights updated by the OBS sweep (SparseGPT's)",
    "lsq": "the hybrid's masks kept, the kept weights at the least-squares optimum of the mask (conjugate gradients)",
    "admm": "masks and kept weights solved together (ADMM from the hybrid's masks, same per-row counts)",
}
# what --refine cannot work with (PruneConfig.refine_conflict) and the one line that says so
REFINE_CONFLICTS = {
    "--pattern structured": "--refine swaps weights inside rows; --pattern structured removes whole neurons: drop one of them",
    "--update-mask sweep": "--refine improves fixed masks; with --update the masks are chosen inside the sweep: use --update-mask lsq (the default) or drop --refine",
}
# what --layer-spread cannot work with (PruneConfig.spread_conflict) and the one line that says so
SPREAD_CONFLICTS = {
    "--sequential": "--sequential prunes layer by layer and cannot combine with --layer-spread: drop one of them",
    "--pattern N:M": "--layer-spread moves sparsity between layers; an N:M pattern fixes every layer's: drop --layer-spread",
}
NM_ORDERS = {"spread": "MLP neurons permuted so each N:M group of down_proj mixes neuron scores", "none": "neurons in their order"}


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
    update: bool = False  # weight update of the kept weights (how: update_mask), from the cached second-order statistics
    heads_sparsity: float = 0.0  # structured: this share of the query heads removed in every layer (GQA-aware)
    drop_layers: int = 0  # structured: this many whole decoder layers removed (lowest block influence)
    target_speedup: float = 0.0  # structured: plan neurons / heads / layers for this prefill speed-up (0 = off)
    update_mask: str = "lsq"  # with --update: UPDATE_MASKS (benchmarks/validation_choices.md, 13 and 14)
    nm_order: str = "spread"  # N:M hybrid: permute MLP neurons so down_proj's N:M groups mix neuron scores (spread) or not (none)
    refine: int = 0  # swap-refinement steps per row of the masks under X^T X (0 = off; uses the second-order entry)
    nr_doc_rate: float = 0.1  # doc mode: a neuron is in a window when active on >= this fraction of its tokens
    nr_row_bound: float = 0.05  # gate/up: each neuron's row sparsity kept within target +- this (1 = unbounded)
    update_shrink: float = 1.0  # --update: step toward the updated weights (1 = full update, 0 = none)
    gram_offdiag: float | None = None  # --refine / --update: weight of X^T X's off-diagonal (1 = as calibrated, 0 = diagonal only); None: GRAM_OFFDIAG
    refine_offdiag: float | None = None  # --refine: the off-diagonal's weight for the masks alone; None: --gram-offdiag if given, else REFINE_OFFDIAG
    dense_targets: bool = False  # --sequential: o_proj / down_proj rescaled per input toward the dense model's outputs (reconstruct.aim_at_dense)

    def validate(self, num_layers: int | None = None) -> PruneConfig:
        """Refuse impossible combinations with one clear line naming the flag."""
        _choice("--prune-method", self.prune_method, registry.METHODS)
        _choice("--hybrid-mlp-method", self.hybrid_mlp_method, registry.MLP_SCORINGS)
        _choice("--nr-tfidf-mode", self.nr_tfidf_mode, registry.TFIDF_MODES)
        _choice("--attention-method", self.attention_method, registry.STRUCTURED_ATTENTION)
        _choice("--tf-kind", self.tf_kind, registry.TF_KINDS)
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
        if self.layer_spread and self.spread_conflict():
            raise UserError(SPREAD_CONFLICTS[self.spread_conflict()])
        if self.dense_targets and not self.sequential:
            raise UserError("--dense-targets fits each layer's pruned inputs to the dense outputs, which only --sequential "
                            "pruning has: add --sequential")
        structural = self.heads_sparsity or self.drop_layers or self.target_speedup
        if not 0.0 <= self.heads_sparsity < 1.0:
            raise UserError(f"--heads-sparsity must be a share of the heads in [0, 1), got {self.heads_sparsity}")
        if self.drop_layers < 0 or (num_layers is not None and self.drop_layers >= num_layers):
            raise UserError(f"--drop-layers must leave at least one of the model's {num_layers or '?'} layers, got {self.drop_layers}")
        if self.target_speedup and not 1.0 < self.target_speedup <= 10.0:
            raise UserError(f"--target-speedup must be a factor above 1 (such as 1.5), got {self.target_speedup}")
        if self.target_speedup and pattern.kind != "structured":
            raise UserError(f"--target-speedup plans a structured removal (it implies --pattern structured --sparsity 0): "
                            f"drop --pattern {self.pattern}")
        if structural and pattern.kind != "structured":
            raise UserError(
                "--heads-sparsity, --drop-layers and --target-speedup remove whole heads, layers or neurons: use them with "
                "--pattern structured (--sparsity then sets the MLP neurons removed; 0 keeps them all)"
            )
        if self.target_speedup and (self.heads_sparsity or self.drop_layers or self.sparsity):
            raise UserError("--target-speedup plans neurons, heads and layers itself: drop --heads-sparsity / --drop-layers "
                            "and --sparsity")
        if structural and (self.sequential or self.pruning_last or self.preserve_first):
            raise UserError("structured heads / layers / --target-speedup apply to every layer of the dense statistics: "
                            "drop --sequential, --pruning-last and --preserve-first")
        _choice("--update-mask", self.update_mask, UPDATE_MASKS)
        _choice("--nm-order", self.nm_order, NM_ORDERS)
        if self.gram_offdiag is not None and not 0.0 <= self.gram_offdiag <= 1.0:
            raise UserError(f"--gram-offdiag must be in [0, 1] (1 = the calibration Gram as it is), got {self.gram_offdiag}")
        if self.refine_offdiag is not None and not 0.0 <= self.refine_offdiag <= 1.0:
            raise UserError(f"--refine-offdiag must be in [0, 1] (1 = the calibration Gram as it is), got {self.refine_offdiag}")
        if not 0 <= self.refine <= 100_000:
            raise UserError(f"--refine must be a number of swap steps per row in [0, 100000], got {self.refine}")
        if self.refine and self.refine_conflict():
            raise UserError(REFINE_CONFLICTS[self.refine_conflict()])
        return self

    def _pattern_kind(self) -> str:
        try:
            return parse_pattern(self.pattern).kind
        except ValueError:  # a bad pattern is validate's to report
            return "unstructured"

    @property
    def gram_weight(self) -> float:
        """The update's off-diagonal weight: --gram-offdiag as given, else the pattern kind's default (GRAM_OFFDIAG)."""
        if self.gram_offdiag is not None:
            return self.gram_offdiag
        return GRAM_OFFDIAG[self._pattern_kind()]

    @property
    def refine_weight(self) -> float:
        """The refine's off-diagonal weight: --refine-offdiag, else --gram-offdiag as given, else REFINE_OFFDIAG."""
        if self.refine_offdiag is not None:
            return self.refine_offdiag
        if self.gram_offdiag is not None:
            return self.gram_offdiag
        return REFINE_OFFDIAG[self._pattern_kind()]

    def for_calibration(self, tokens: int, inputs: int) -> PruneConfig:
        """This configuration as run on `tokens` calibration tokens for `inputs` MLP input channels: with
        GRAM_TOKENS_PER_INPUT or more per input and neither weight given, the refine and the update weigh the Gram's
        off-diagonal RICH_GRAM_OFFDIAG (spelled out as --gram-offdiag, so the digest says what ran); else unchanged."""
        if (self.gram_offdiag is not None or self.refine_offdiag is not None or not self.needs_second_order
                or self._pattern_kind() == "structured" or tokens < GRAM_TOKENS_PER_INPUT * inputs):
            return self
        return dataclasses.replace(self, gram_offdiag=RICH_GRAM_OFFDIAG)

    def gram_note(self, tokens: int, inputs: int) -> str:
        """A warning when an off-diagonal weight above 0.5 meets a calibration with fewer than
        GRAM_TOKENS_PER_INPUT tokens per MLP input channel ('' when there is nothing to say)."""
        # (flag that set the weight, weight, that weight's defaults); on a tie max keeps the update's
        used = ([("--gram-offdiag", self.gram_weight, GRAM_OFFDIAG)] if self.update else []) + (
            [("--refine-offdiag" if self.refine_offdiag is not None else "--gram-offdiag", self.refine_weight,
              REFINE_OFFDIAG)] if self.refine else [])
        if not used or tokens >= GRAM_TOKENS_PER_INPUT * inputs:
            return ""
        flag, weight, defaults = max(used, key=lambda item: item[1])
        if weight <= 0.5:
            return ""
        default = defaults[self._pattern_kind()]
        return (f"[yellow]note:[/] {flag} {weight:g} with {tokens} calibration tokens for {inputs} MLP inputs "
                f"({tokens / inputs:.1f} per input): with fewer than {GRAM_TOKENS_PER_INPUT} per input the off-diagonal fits "
                "the calibration text (on SmolLM2 it lost up to 1.8x Wanda's loss on other text); the default "
                f"{default:g} is the measured choice, or calibrate with more --nsamples")

    @property
    def needs_second_order(self) -> bool:
        """--update and --refine read the second-order statistics (dense, cached; or from --sequential's pass)."""
        return bool(self.update or self.refine)

    def second_order_steps(self) -> str:
        """What runs after the masks, for progress labels: ' + refine', ' + weight update', both, or ''."""
        return (" + refine" if self.refine else "") + (" + weight update" if self.update else "")

    def refine_conflict(self) -> str:
        """The choice that excludes swap refinement ('--pattern structured', ...), or '' when --refine can run."""
        if self.pattern.strip().lower() == "structured":  # no parse: a bad pattern is validate's to report
            return "--pattern structured"
        if self.update and self.update_mask == "sweep":
            return "--update-mask sweep"
        return ""

    def spread_conflict(self) -> str:
        """The choice that excludes --layer-spread ('--sequential', '--pattern N:M'), or '' when it can run."""
        if self.sequential:
            return "--sequential"
        if ":" in self.pattern:  # no parse: a bad pattern is validate's to report
            return "--pattern N:M"
        return ""

    def pruned_layers(self, num_layers: int) -> range:
        """The decoder layers this run prunes: all, the last N (--pruning-last), or all but the first fraction."""
        if self.pruning_last:
            return range(num_layers - self.pruning_last, num_layers)
        return range(min(num_layers - 1, round(self.preserve_first * num_layers)), num_layers)

    @property
    def method(self) -> registry.PruneMethod:
        return registry.get_method(self.prune_method)

    def module_methods(self) -> tuple[str, str]:
        """(attention, MLP) treatment: a registry metric name, registry.NONE or registry.NEURONRANK."""
        method = self.method
        attention = method.attention
        if parse_pattern(self.pattern).kind == "structured" and attention != registry.NONE:
            attention = self.attention_method  # --attention-method: wanda | none
        return attention, method.mlp

    def mlp_label(self) -> str:
        mlp = self.method.mlp
        if mlp != registry.NEURONRANK:
            return registry.get_metric(mlp).label
        if self.hybrid_mlp_method == "neuronrank_old":
            return "neuronrank_old"
        return f"neuronrank_tfidf ({self.nr_tfidf_mode})"

    def attention_label(self) -> str:
        attention = self.module_methods()[0]
        return "none" if attention == registry.NONE else registry.get_metric(attention).label

    def method_label(self) -> str:
        """What summaries and hybridprune.json call this run's method."""
        return f"hybrid ({self.mlp_label()})" if self.prune_method == "hybrid" else self.prune_method

    def to_dict(self) -> dict[str, Any]:
        """The fields, defaults resolved (the digest names what runs: an explicit --gram-offdiag equal to the
        pattern's default is the same configuration)."""
        fields = {**dataclasses.asdict(self), "gram_offdiag": self.gram_weight, "refine_offdiag": self.refine_weight}
        if not self.refine or self.refine_weight == self.gram_weight:  # added later: without a refine of its own weight
            del fields["refine_offdiag"]  # a configuration keeps the digest it had before
        if not self.dense_targets:  # added later: off, it leaves the digests of every configuration before it as they were
            del fields["dense_targets"]
        return fields

    @property
    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]


# --gram-offdiag when not given, per pattern kind. 50% unstructured: 0.25, the smallest worst case over both
# models' validation halves within 0.02, the larger mean gain (benchmarks/validation_choices.md, 8); N:M: 0.5,
# better than 0.25 and 1 on SmolLM2's validation halves at 2:4 (Qwen's not measured; 6 and 9); structured
# (--pattern structured --update): 0.5, better than 1 at 25% of the neurons on SmolLM2's validation halves, worse at
# 50% (benchmarks/structured_update.py; docs/results.md, "Structured removal's compensation").
GRAM_OFFDIAG = {"unstructured": 0.25, "nm": 0.5, "structured": 0.5}
# --refine-offdiag when neither it nor --gram-offdiag is given: the weight under which the refine chooses masks.
# N:M: 0.25, the smallest worst case over both models' validation halves for `balanced` at 2:4 (1.037 against 1.148)
# and 4:8 (1.062 against 1.118) and for `quality` at 2:4 (0.869 against 0.932), Qwen's docs deciding each; SmolLM2
# alone prefers 0.5 for the masks alone and ties under the update (benchmarks/validation_choices.md, 21).
# structured removal has no refine.
REFINE_OFFDIAG = {"unstructured": 0.25, "nm": 0.25, "structured": 0.5}
# Below about this many calibration tokens per MLP input channel an off-diagonal weight above 0.5 fits the
# calibration text: on SmolLM2's validation halves the full Gram lost up to 1.18x (refine) and 1.80x (update)
# Wanda's loss at 0.67 tokens per down_proj input, 1.01x / 1.12x at 2.7, 0.93x / 0.98x at 10.7, where 0.5 is
# the best weight (benchmarks/validation_choices.md, 10). A note, not a refusal: the weight is the user's choice.
GRAM_TOKENS_PER_INPUT = 10
# The weight both the refine and the update use, every pattern but structured, when the calibration has at least
# GRAM_TOKENS_PER_INPUT tokens per MLP input and no weight is given (PruneConfig.for_calibration): the Gram is then
# estimated well enough for more of its off-diagonal. On SmolLM2's validation halves (the current presets, mean / worst
# loss vs Wanda's): at 10.7 tokens per input (32 x 512) `balanced` 0.688 / 0.745 against 0.729 / 0.794 under 0.25,
# `quality` 0.592 / 0.687 against 0.644 / 0.701; at 42.7 (128 x 512)
# `balanced` 0.694 / 0.754 against 0.746 / 0.821 under 0.25 and 0.724 / 0.865 under 1, `quality` 0.596 / 0.700
# against 0.656 / 0.707 (0.25), 0.593 / 0.751 (0.75), 0.632 / 0.875 (1); at 2.7 and 0.67 per input 0.25 was the
# better weight (above). Qwen2.5-Coder-1.5B at its protocol's 0.46 and the product's 1.8 per input stays under the
# pattern defaults (`python benchmarks/calibration_size.py table`, docs/results.md).
RICH_GRAM_OFFDIAG = 0.5
# `--layer-spread auto` (balanced's and quality's): OWL's layer spread by target sparsity, the best spread of each
# point measured on both models' validation halves (benchmarks/validation_choices.md, 17 and 18); linear between the
# points, the nearest point's spread outside them (below 50% and above 70% not measured)
SPREAD_BY_SPARSITY = ((0.6, 0.04), (0.7, 0.15))


def spread_for(value: float | str | None, sparsity: float) -> float | None:
    """--layer-spread as a number: `auto` is SPREAD_BY_SPARSITY at `sparsity`; a number (or its text) is itself."""
    if value is None or not isinstance(value, str):
        return value
    if value.strip().lower() != "auto":
        try:
            return float(value)
        except ValueError:
            raise UserError(f"--layer-spread must be a number in [0, 0.5) or auto, got {value!r}") from None
    import numpy  # here, not at import: the command line starts without it

    points, spreads = zip(*SPREAD_BY_SPARSITY)
    return round(float(numpy.interp(sparsity, points, spreads)), 6)  # linear between, the end values beyond


def _choice(flag: str, value: str, allowed: Any) -> None:
    if value not in allowed:
        raise UserError(f"unknown {flag} '{value}': use one of {', '.join(allowed)}")


PRUNE_FIELDS = {field.name: field for field in dataclasses.fields(PruneConfig)}
CALIBRATION_FIELDS = {field.name: field for field in dataclasses.fields(CalibrationRequest)}


def default_of(name: str) -> Any:
    """The built-in default of a PruneConfig or CalibrationRequest field (for help strings)."""
    field = PRUNE_FIELDS.get(name) or CALIBRATION_FIELDS[name]
    return field.default
