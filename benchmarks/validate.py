"""Validation beyond one text and one model: every configuration on five domains and two models.

    python benchmarks/validate.py                      # the standard run (test halves, both models) + docs
    python benchmarks/validate.py run --model smollm2 --half validation --configs wanda,balanced
    python benchmarks/validate.py report               # docs/validation.md + docs/validation.json from the rows
    python benchmarks/ablations.py                     # the ablation rows (test halves) + docs/research/2026-12-ablations.md

Loads each model once, calibrates once per (model, seed) on the wiki-vital calibration split, and
applies every configuration in-process with the product's own pruning code
(hybridprune.pruning.plan_layers / prune_layer), restoring the dense weights in between. Perplexity
uses hybridprune.evaluation.perplexity on the first W non-overlapping windows of each domain half
(benchmarks/domains.py). Rows are appended to benchmarks/validation_results.jsonl and a row that is
already there (same model, configuration digest, seed, domain, half, windows) is not measured again.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import statistics
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from domains import DOMAINS, domain_texts, fingerprint  # noqa: E402

import hybridprune.pruning as pruning  # noqa: E402
from hybridprune.calibration.collect import CollectionOptions, collect_statistics  # noqa: E402
from hybridprune.calibration.stats import CalibrationStats  # noqa: E402
from hybridprune.config import DEFAULT_CALIBRATION_DATA, PRUNE_FIELDS, PruneConfig  # noqa: E402
from hybridprune.data import eval_windows, load_text, sample_windows, tokenize  # noqa: E402
from hybridprune.data.tokens import encode_text  # noqa: E402
from hybridprune.evaluation import perplexity  # noqa: E402
from hybridprune.models import load_model  # noqa: E402
from hybridprune.passes import sequential_pruner  # noqa: E402
from hybridprune.presets import Preset, resolve  # noqa: E402
from hybridprune.pruning import neuron_scoring, plan_layers, prune_layer  # noqa: E402

CACHE = Path(os.environ.get("HYBRIDPRUNE_VALIDATE_CACHE", "/tmp/hpcache/validate"))
RESULTS = ROOT / "benchmarks" / "validation_results.jsonl"
DOCS = ROOT / "docs"

# Protocol per model. Qwen on 2 CPU cores: bf16, 256-token windows, few windows (see docs/validation.md).
MODELS = {
    "smollm2": {"spec": None, "dtype": "float32", "nsamples": 32, "seqlen": 512, "windows": 8, "batch": 4,
                "mlp_inputs": 1536},
    "qwen": {"spec": "/work/models/qwen-coder-1.5b", "dtype": "bfloat16", "nsamples": 16, "seqlen": 256,
             "windows": 16, "batch": 4, "mlp_inputs": 8960},  # 16 windows since 6c89776, 2026-12-01 (4 before: rows kept, docs/research/2026-12-earlier-results.md)
}
# A model's calibration windows may be longer than its evaluation windows ("calibration_seqlen", default "seqlen"):
# benchmarks/calibration_size.py runs Qwen at the product's own 32 x 512 this way, evaluated as the protocol does.


def calibration_shape(spec: dict) -> tuple[int, int]:
    return spec["nsamples"], spec.get("calibration_seqlen", spec["seqlen"])


def resolved(config: PruneConfig, model: str) -> PruneConfig:
    """A configuration as the product runs it on this model's calibration (PruneConfig.for_calibration: the Gram's
    default weight follows the tokens per MLP input), so that its rows carry the digest of what ran. Only the current
    presets (`preset(current=True)`) leave the weights to the default; every other configuration spells them out."""
    nsamples, seqlen = calibration_shape(MODELS[model])
    return config.for_calibration(nsamples * seqlen, MODELS[model]["mlp_inputs"])


TOPICS, Q_ACTIVE = 128, 0.9
# The calibration text (--calibration): every row records it; rows without the field used wiki-vital.
CALIBRATION = os.environ.get("HYBRIDPRUNE_VALIDATE_CALIBRATION", DEFAULT_CALIBRATION_DATA)


def calibration_of(row: dict) -> str:
    return row.get("calibration", "wiki-vital")


def preset(name: str, *, current: bool = False, **overrides) -> PruneConfig:
    """A preset from this worktree's presets.toml (PruneConfig fields only) plus overrides.

    Not `current`: its --layer-spread pinned at 0 unless an override gives one, as every variant below was
    measured before the presets spread sparsity over layers, so that their digests (and measured rows) stay;
    `current`: the preset as the product defines it now."""
    table = tomllib.loads((ROOT / "presets.toml").read_text())[name]
    values = {k: v for k, v in table.items() if k in PRUNE_FIELDS}
    explicit = dict(overrides) if current else {"layer_spread": 0.0, **overrides}
    if not {**values, **explicit}.get("update"):  # no update: update_mask changes nothing, spelled as it was so the digest stays
        explicit.setdefault("update_mask", values.get("update_mask", "fixed"))
    # the product's own merge: explicit > preset, and a preset knob gives way where the explicit choices exclude it
    config = resolve(explicit, Preset(name=name, values=values, source="presets.toml"))
    if current:
        return config
    # the Gram's weights spelled out as the pattern's defaults (the same digest): a variant measured under them keeps
    # them where the product's default follows the calibration's tokens per input (`resolved`, 2026-12-08)
    return dataclasses.replace(config, gram_offdiag=config.gram_weight, refine_offdiag=config.refine_weight)


# The product defaults of the new fields before this work, and idf_exp's old default: every
# configuration below except the presets spells them out, so that its digest (and its measured rows)
# does not change when the product defaults do. None of them changes Wanda's masks.
OLD_DEFAULTS = dict(idf_exp=0.25, nr_doc_rate=0.0, nr_row_bound=1.0, update_shrink=1.0, qk_shift=0.0, gram_offdiag=1.0,
                    update_mask="fixed")
# `balanced` as it was when the refine / Gram-shrink rows were measured (2026-12-01, before 7ac1f23 made it the
# default's definition), spelled out so those rows keep their digests: B(**knobs) is that plus knobs.
BALANCED_AT_87425C2 = dict(prune_method="hybrid", hybrid_mlp_method="neuronrank_tfidf", nr_tfidf_mode="doc", qk_shift=0.1,
                   idf_exp=0.0, nr_doc_rate=0.1, nr_row_bound=0.05, update_shrink=0.25, gram_offdiag=1.0, update_mask="fixed")


def B(**overrides) -> PruneConfig:
    return PruneConfig(**{**BALANCED_AT_87425C2, **overrides})


def P(**overrides) -> PruneConfig:
    return PruneConfig(**{**OLD_DEFAULTS, **overrides})


def _point(point: str) -> dict:
    """The pattern or sparsity a configuration name's suffix says ('@2:4', '@60', '' for 50%)."""
    tail = point.lstrip("@")
    return {"pattern": tail} if ":" in tail else {"sparsity": int(tail) / 100} if tail else {}


def configs() -> dict[str, PruneConfig]:
    """Every named configuration the harness knows (the report and the ablations pick from these)."""
    c: dict[str, PruneConfig] = {
        "wanda": P(prune_method="wanda"),
        "wanda+update": preset("wanda", update=True, current=True),  # the product's --update (least squares since 2026-12-06; its Gram weight by calibration tokens, 2026-12-08)
        "wanda+update@full": P(prune_method="wanda", update=True),  # full step, full Gram ("wanda+update" up to 87425c2)
        "wanda+qk0.1": P(prune_method="wanda", qk_shift=0.1),
        "wanda+qk0.1+update": P(prune_method="wanda", qk_shift=0.1, update=True),
        "balanced": preset("balanced", current=True),
        "quality": preset("quality", current=True),
        "conservative": preset("conservative"),
        "fast": preset("fast"),
    }
    # 2:4 (issue 12's pattern on this protocol): each ratio is against Wanda at 2:4 (`report` pairs them)
    c["wanda@2:4"] = preset("wanda", pattern="2:4")
    c["wanda+update@2:4"] = preset("wanda", pattern="2:4", update=True, current=True)
    c["balanced@2:4"] = preset("balanced", pattern="2:4", current=True)
    c["quality@2:4"] = preset("quality", pattern="2:4", current=True)
    for point in ("@60", "@70", "@4:8"):  # --update alone (least squares since 2026-12-06) at the higher points
        c[f"wanda+update{point}"] = preset("wanda", update=True, current=True, **_point(point))
    # OWL's layer allocation (--layer-spread: layers with more Wanda-metric outliers kept denser) at the high
    # sparsities, where its paper measured its gains (lambda 0.08 at 70%); 2026-12-06
    for point in ("", "@60", "@70"):
        c[f"wanda{point}:owl0.08"] = preset("wanda", layer_spread=0.08, **_point(point))
        for spread in (0.0, 0.04, 0.08, 0.15):  # 0: every layer at the target (the presets before 2026-12-06)
            c[f"quality{point}:owl{spread:g}"] = preset("quality", layer_spread=spread, **_point(point))
            c[f"balanced{point}:owl{spread:g}"] = preset("balanced", layer_spread=spread, **_point(point))
    # sequential pruning (each layer from the pruned earlier layers' outputs), fitted to its own pruned outputs or, with
    # dense targets, to the dense model's (2026-12-06)
    for point in ("", "@2:4", "@60", "@70", "@4:8"):
        c[f"quality{point}:seq"] = preset("quality", sequential=True, **_point(point))
        c[f"quality{point}:seqdense"] = preset("quality", sequential=True, dense_targets=True, **_point(point))
        c[f"wanda+update{point}:seqdense"] = preset("wanda", update=True, sequential=True, dense_targets=True, **_point(point))
    # the default presets with one knob changed (84ecbf2, 2026-12-01: chosen on both models' validation halves);
    # quality's were measured with the OBS sweep (its update before 2026-12-06), so they say so
    for name in ("balanced", "quality"):
        was = {"update_mask": "fixed"} if name == "quality" else {}
        c[f"{name}:refine0"] = preset(name, refine=0, gram_offdiag=0.5, **was)  # as measured (0.5 was the default then)
        for a in (0.1, 0.25, 0.5, 1.0):
            c[f"{name}:off{a}"] = preset(name, gram_offdiag=a, **was)
    c["wanda+update:off0.5"] = preset("wanda", update=True, gram_offdiag=0.5, update_mask="fixed")  # the update before 84ecbf2
    # the presets as the product defines them (layer spread, least-squares update) with the Gram's off-diagonal weight
    # changed: how that weight should follow the calibration's token count (benchmarks/calibration_size.py, 2026-12-08)
    for name in ("balanced", "quality"):
        for a in (0.25, 0.5, 0.75, 1.0):
            c[f"{name}:off{a}:now"] = preset(name, gram_offdiag=a, current=True)
    # `quality` without the layer spread, the Gram's weight left to the calibration (joint's comparison)
    c["quality:owl0:now"] = preset("quality", layer_spread=0.0, current=True)
    c["balanced@2:4:off0.25"] = preset("balanced", pattern="2:4", gram_offdiag=0.25)
    c["quality@2:4:off0.25"] = preset("quality", pattern="2:4", gram_offdiag=0.25, update_mask="fixed")
    c["balanced@2:4:off0.5"] = preset("balanced", pattern="2:4", gram_offdiag=0.5)
    c["quality@2:4:off0.5"] = preset("quality", pattern="2:4", gram_offdiag=0.5, update_mask="fixed")
    c["balanced@2:4:off1"] = preset("balanced", pattern="2:4", gram_offdiag=1.0)
    c["quality@2:4:off1"] = preset("quality", pattern="2:4", gram_offdiag=1.0, update_mask="fixed")
    # the presets as of 87425c2 (measured on the new calibration text before 7ac1f23 changed them)
    c["balanced@87425c2"] = B()
    c["quality@87425c2"] = B(update=True)
    # the defaults and presets before this work (explicit, so they do not follow later changes)
    old = dict(nr_doc_rate=0.0, nr_row_bound=1.0, update_shrink=1.0, idf_exp=0.25, tf_exp=1.0, tf_kind="out_rms")
    c["balanced@old"] = P(nr_tfidf_mode="doc", **old)
    c["quality@old"] = P(nr_tfidf_mode="topic", qk_shift=0.1, update=True, **old)
    # candidates (chosen on validation halves)
    for bound in (0.05, 0.1, 0.15, 0.2, 0.3):
        c[f"hyb:idf0:bound{bound}"] = P(idf_exp=0.0, nr_row_bound=bound)
        c[f"hyb:idf0:bound{bound}:qk0.1"] = P(idf_exp=0.0, nr_row_bound=bound, qk_shift=0.1)
    for tf in (0.25, 0.5):
        c[f"hyb:idf0:tf{tf}"] = P(idf_exp=0.0, tf_exp=tf)
    c["hyb:idf0"] = P(idf_exp=0.0)
    for g in (0.5, 1.0):
        c[f"hyb:bound0.1:qk0.1:topic:idf{g}"] = P(nr_tfidf_mode="topic", idf_exp=g, nr_row_bound=0.1, qk_shift=0.1)
    c["hyb:bound0.1:qk0.1:tf0.5"] = P(idf_exp=0.0, tf_exp=0.5, nr_row_bound=0.1, qk_shift=0.1)
    c["hyb:idf0:qk0.1"] = P(idf_exp=0.0, qk_shift=0.1)
    for rate in (0.05, 0.1, 0.2):
        for g in (0.25, 0.5):
            c[f"hyb:docrate{rate}:idf{g}"] = P(idf_exp=g, nr_doc_rate=rate)
    for bound in (0.05, 0.1):
        for rate in (0.1, 0.2):
            for g in (0.25, 0.5, 1.0):
                c[f"hyb:bound{bound}:qk0.1:docrate{rate}:idf{g}"] = P(
                    idf_exp=g, nr_doc_rate=rate, nr_row_bound=bound, qk_shift=0.1)
    for bound in (0.05, 0.1, 0.2):
        for shrink in (1.0, 0.75, 0.5, 0.25):
            c[f"hyb:bound{bound}:qk0.1:upd{shrink}"] = P(idf_exp=0.0, nr_row_bound=bound, qk_shift=0.1,
                                                                  update=True, update_shrink=shrink)
            c[f"hyb:topic:bound{bound}:qk0.1:upd{shrink}"] = P(
                nr_tfidf_mode="topic", idf_exp=0.0, nr_row_bound=bound, qk_shift=0.1, update=True, update_shrink=shrink)
            c[f"hyb:bound{bound}:qk0.1:docrate0.1:idf1.0:upd{shrink}"] = P(
                idf_exp=1.0, nr_doc_rate=0.1, nr_row_bound=bound, qk_shift=0.1, update=True, update_shrink=shrink)
    for shrink in (0.75, 0.5, 0.25):
        c[f"wanda+update{shrink}"] = P(prune_method="wanda", update=True, update_shrink=shrink)
    # swap refinement of the masks under the calibration Gram (mask only, or before the shrunk update)
    for steps in (50, 200):
        c[f"balanced+refine{steps}"] = B(refine=steps)
        c[f"quality+refine{steps}"] = B(update=True, refine=steps)
        c[f"wanda+refine{steps}"] = P(prune_method="wanda", refine=steps)
    # the Gram shrunk toward its diagonal (--gram-offdiag) for refine and for the update
    for a in (0.1, 0.2, 0.3, 0.5, 0.7, 1.0):
        c[f"balanced+refine200+off{a}"] = B(refine=200, gram_offdiag=a)
        c[f"balanced+refine100+off{a}"] = B(refine=100, gram_offdiag=a)
        for steps in (25, 50):
            c[f"balanced+refine{steps}+off{a}"] = B(refine=steps, gram_offdiag=a)
        c[f"balanced+refine100+update0.25+off{a}"] = B(refine=100, update=True, update_shrink=0.25, gram_offdiag=a)
        c[f"balanced+refine100+update0.5+off{a}"] = B(refine=100, update=True, update_shrink=0.5, gram_offdiag=a)
        c[f"balanced+update1+off{a}"] = B(update=True, update_shrink=1.0, gram_offdiag=a)
        c[f"balanced+update0.5+off{a}"] = B(update=True, update_shrink=0.5, gram_offdiag=a)
        c[f"balanced+sweep1+off{a}"] = B(update=True, update_mask="sweep", update_shrink=1.0, gram_offdiag=a)
        c[f"balanced+refine200+update1+off{a}"] = B(refine=200, update=True, update_shrink=1.0, gram_offdiag=a)
        c[f"balanced+refine200+update0.5+off{a}"] = B(refine=200, update=True, update_shrink=0.5, gram_offdiag=a)
        c[f"wanda+refine200+off{a}"] = P(prune_method="wanda", refine=200, gram_offdiag=a)
        c[f"wanda+update1+off{a}"] = P(prune_method="wanda", update=True, gram_offdiag=a)
    # the joint solver (--update-mask admm), 60% / 70% unstructured and 4:8 (issue 22); each against Wanda at the same point
    c["joint"] = preset("joint", current=True)
    for name in ("wanda", "balanced", "quality", "joint"):
        for pattern in ("2:4", "4:8"):
            c[f"{name}@{pattern}"] = preset(name, pattern=pattern, current=True)
        for sparsity in (0.6, 0.7):
            c[f"{name}@{round(sparsity * 100)}"] = preset(name, sparsity=sparsity, current=True)
    # Qwen at 2:4 loses more than Wanda on docs and poetry (docs/qwen_e2e.md): which part of balanced@2:4 does it
    c["balanced@2:4:refine0"] = preset("balanced", pattern="2:4", refine=0)  # the hybrid's masks, unrefined
    c["balanced@2:4:wanda-mlp"] = preset("balanced", pattern="2:4", prune_method="wanda")  # Wanda's MLP masks, q/k shift + refine
    c["quality@2:4:refine0"] = preset("quality", pattern="2:4", refine=0)  # the hybrid's N:M masks unrefined, then the update
    # the contributions, one component added at a time (Wanda -> ... -> quality -> joint): docs/contributions.png
    c["step:score"] = preset("balanced", qk_shift=0.0, refine=0, nr_row_bound=1.0)  # NeuronRank's allocation, rows unbounded
    c["step:bound"] = preset("balanced", qk_shift=0.0, refine=0)  # + each row within 0.05 of the target
    c["step:qk"] = preset("balanced", refine=0)  # + q/k pruned more than v/o
    c["step:refine"] = preset("balanced")  # + the swap refinement, every layer at the target (= balanced:owl0)
    # the update's weights at the least-squares optimum of the masks (--update-mask lsq) instead of the OBS sweep;
    # `quality` itself since 2026-12-06 (benchmarks/validation_choices.md, 13): `:obs` is quality as it was before
    # `--update` alone too since 2026-12-06 (14): `wanda+update{point}:obs` is Wanda + update as it was before
    for point in ("", "@2:4", "@4:8", "@60", "@70"):
        was = {"refine_offdiag": 0.5} if ":" in point else {}  # N:M refined under 0.5 before item 21
        c[f"quality{point}:obs"] = preset("quality", update_mask="fixed", **was, **_point(point))
        c[f"wanda+update{point}:obs"] = preset("wanda", update=True, update_mask="fixed", **_point(point))
        for name in ("quality", "wanda+update"):
            # every layer at the target (as measured, before the presets' layer spread)
            base = preset("quality", **_point(point)) if name == "quality" else preset("wanda", update=True, **_point(point))
            c[f"{name}{point}:lsq"] = PruneConfig(**{**base.to_dict(), "update_mask": "lsq"})
    # the Gram's off-diagonal weight under N:M with the least-squares update (0.5 is N:M's default; 0.25 is
    # unstructured's, and item 12's choice for the mask alone over both models): 2026-12-06
    for point in ("@2:4", "@4:8"):
        c[f"quality{point}:lsq-off0.25"] = preset("quality", gram_offdiag=0.25, **_point(point))
        c[f"wanda+update{point}:lsq-off0.25"] = preset("wanda", update=True, gram_offdiag=0.25, **_point(point))
    # masks refined under the off-diagonal weight the mask alone chose (0.25, item 12) and the update under N:M's 0.5
    # (--refine-offdiag, 2026-12-07)
    # (--refine-offdiag, 2026-12-07; the N:M default since, item 21: `quality@2:4` and `quality@4:8` themselves)
    for point in ("@2:4", "@4:8"):
        c[f"quality{point}:refine-off0.25"] = preset("quality", refine_offdiag=0.25, **_point(point))
        c[f"quality{point}:refine-off0.5"] = preset("quality", refine_offdiag=0.5, **_point(point))  # as before item 21
    # more swap steps per row at N:M (2026-12-08): the same masks as the presets' 50 (validation_choices.md, 24)
    for steps in (100, 200):
        c[f"balanced@2:4:refine{steps}"] = preset("balanced", pattern="2:4", refine=steps, current=True)
    c["balanced@4:8:off0.25"] = preset("balanced", pattern="4:8", gram_offdiag=0.25)
    c["balanced@4:8:off0.5"] = preset("balanced", pattern="4:8", gram_offdiag=0.5)
    for pattern in ("2:4", "4:8"):  # `joint` at N:M as measured (2026-12-05), before item 21
        c[f"joint@{pattern}:refine-off0.5"] = preset("joint", pattern=pattern, refine_offdiag=0.5, current=True)
    # ablations
    c["abl:nr-constant-score"] = P(idf_exp=0.0, tf_exp=0.0)  # gate/up matrix groups, every s_i equal
    for mode in ("doc", "topic"):
        for g in (0.0, 0.25, 1.0):
            c[f"abl:{mode}:idf{g}"] = P(nr_tfidf_mode=mode, idf_exp=g)
    for g in (0.0, 0.25, 1.0):
        c[f"abl:old:idf{g}"] = P(hybrid_mlp_method="neuronrank_old", idf_exp=g)
    for kind in ("out_rms", "rms", "mean_abs"):
        c[f"abl:tf-kind:{kind}"] = P(tf_kind=kind)
    return c


class RefineMemo:
    """The harness's stand-in for `pruning.refine_swaps`: refined masks of this process by (configuration
    without its update knobs, seed, layer, call within the layer). `quality` refines exactly as `balanced`
    does (same masks, same Gram, from the dense weights), so measuring both refines once; on Qwen the
    refine is most of a run's time. Harness only: the product computes what each run asks for."""

    def __init__(self) -> None:
        self.masks: dict[tuple, torch.Tensor] = {}
        self.key: tuple = ()
        self.calls = 0

    def layer(self, key: tuple) -> None:
        self.key, self.calls = key, 0

    def __call__(self, weight: torch.Tensor, keep: torch.Tensor, gram: torch.Tensor, *, with_residual: bool = False,
                 **options):
        key = (*self.key, self.calls)
        self.calls += 1
        if key not in self.masks:
            self.masks[key] = REFINE_SWAPS(weight, keep, gram, **options).cpu()
        masks = self.masks[key].to(weight.device)
        if not with_residual:
            return masks
        # what the product's refine hands to the least-squares update with its masks: (w * ~keep) G, in float32
        return masks, (weight.float() * ~masks) @ gram.float()


REFINE_SWAPS = pruning.refine_swaps


class Bench:
    def __init__(self, model: str, threads: int) -> None:
        torch.set_num_threads(threads)
        torch.manual_seed(0)
        self.name, self.spec = model, MODELS[model]
        self.loaded = load_model(self.spec["spec"], dtype=self.spec["dtype"], cache_dir=Path.home() / ".cache" / "hybridprune")
        self.model, self.adapter = self.loaded.model, self.loaded.adapter
        self.model.eval()
        self.layers = self.adapter.layers(self.model)
        self.dense = {(i, n): lin.weight.detach().clone() for i, layer in enumerate(self.layers)
                      for n, lin in self.adapter.linears(layer).items()}
        self._stats: dict[int, CalibrationStats] = {}
        self.memo = RefineMemo()
        pruning.refine_swaps = self.memo
        self._hessians: dict[int, CalibrationStats] = {}  # per calibration seed, like the statistics

    def _file(self, what: str, seed: int) -> Path:
        nsamples, seqlen = calibration_shape(self.spec)
        text = "" if CALIBRATION == "wiki-vital" else CALIBRATION.replace("+", "-") + "-"
        return CACHE / f"{self.name}-{text}{what}-{nsamples}x{seqlen}-s{seed}.safetensors"

    def calibration_windows(self, seed: int) -> torch.Tensor:
        ids = tokenize(load_text(CALIBRATION, "calibration"), self.loaded.tokenizer, CACHE)
        return sample_windows(ids, *calibration_shape(self.spec), seed)

    def stats(self, seed: int = 0) -> CalibrationStats:
        from safetensors.torch import load_file, save_file

        if seed not in self._stats:
            path = self._file("stats", seed)
            if path.exists():
                self._stats[seed] = CalibrationStats(load_file(str(path)))
            else:
                t = time.time()
                with torch.no_grad():
                    stats = collect_statistics(self.model, self.adapter, self.calibration_windows(seed),
                                               CollectionOptions(topics=TOPICS, q_active=Q_ACTIVE, seed=seed))
                log(f"[{self.name}] calibration seed {seed}: {time.time() - t:.0f}s")
                path.parent.mkdir(parents=True, exist_ok=True)
                save_file({k: v.contiguous() for k, v in stats.tensors.items()}, str(path))
                self._stats[seed] = stats
        return self._stats[seed]

    def hessians(self, seed: int = 0) -> CalibrationStats:
        from safetensors.torch import load_file, save_file

        if seed not in self._hessians:
            path = self._file("hessians", seed)
            if path.exists():
                self._hessians[seed] = CalibrationStats(load_file(str(path)))
            else:
                t = time.time()
                with torch.no_grad():
                    h = collect_statistics(self.model, self.adapter, self.calibration_windows(seed),
                                           CollectionOptions(topics=TOPICS, q_active=Q_ACTIVE, seed=seed), hessians=True)
                log(f"[{self.name}] second-order statistics: {time.time() - t:.0f}s")
                save_file({k: v.contiguous() for k, v in h.tensors.items()}, str(path))
                self._hessians[seed] = h
        return self._hessians[seed]

    def eval_ids(self, domain: str, half: str) -> torch.Tensor:
        from safetensors.torch import load_file, save_file

        path = CACHE / f"tokens-{self.name}-{domain}-{half}-{fingerprint(domain)}.safetensors"
        if path.exists():
            ids = load_file(str(path))["ids"]
        else:
            text = domain_texts(domain)[0 if half == "validation" else 1]
            # only the start is evaluated: tokenize a generous prefix
            need_chars = self.spec["windows"] * self.spec["seqlen"] * 12
            ids = encode_text(text[: max(need_chars, 200_000)], self.loaded.tokenizer)
            path.parent.mkdir(parents=True, exist_ok=True)
            save_file({"ids": ids}, str(path))
        return eval_windows(ids, self.spec["seqlen"], self.spec["windows"])

    @torch.no_grad()
    def restore(self) -> None:
        for (i, n), w in self.dense.items():
            self.adapter.linears(self.layers[i])[n].weight.copy_(w)

    @torch.no_grad()
    def apply(self, config: PruneConfig | None, seed: int) -> None:
        self.restore()
        if config is None:
            return
        if config.sequential:  # one pass: each layer pruned from the pruned earlier layers' outputs, as the product does
            collect_statistics(self.model, self.adapter, self.calibration_windows(seed),
                               CollectionOptions(topics=TOPICS, q_active=Q_ACTIVE, seed=seed),
                               after_layer=self._sequential(config, seed), hessians=config.needs_second_order,
                               dense_targets=config.dense_targets)
            return
        stats = self.stats(seed)
        hessians = self.hessians(seed) if config.needs_second_order else None
        plans = plan_layers(self.model, self.adapter, stats, config)
        scoring = neuron_scoring(config)
        # the masks' own knobs: without --update neither the step, the solver (--update-mask) nor the update's Gram
        # weight changes them
        masks_of = PruneConfig(**{**config.to_dict(), "update": False, "update_shrink": 1.0, "update_mask": "fixed",
                                  "gram_offdiag": config.refine_weight, "refine_offdiag": None}).digest
        for index, layer in enumerate(self.layers):
            if index in plans:
                self.memo.layer((masks_of, seed, index))
                prune_layer(layer, index, self.adapter, stats, plans[index], scoring, hessians, config.update_shrink)

    def _sequential(self, config: PruneConfig, seed: int):
        prune_now = sequential_pruner(self.loaded, config)

        def after(index: int, layer, collected: CalibrationStats) -> None:
            self.memo.layer((config.digest, seed, index))  # its refines see inputs of its own: nothing shared
            prune_now(index, layer, collected)

        return after

    def ppl(self, domain: str, half: str) -> float:
        with torch.no_grad():
            return perplexity(self.model, self.eval_ids(domain, half), batch_size=self.spec["batch"]).ppl


def log(message: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {message}", flush=True)


def digest(config: PruneConfig | None) -> str:
    return "dense" if config is None else config.digest


def commit() -> str:
    """The short hash of the checked-out commit, recorded with every row."""
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()


def load_rows() -> list[dict]:
    if not RESULTS.exists():
        return []
    return [json.loads(line) for line in RESULTS.read_text().splitlines() if line.strip()]


def run(model: str, names: list[str], half: str, domains: list[str], seeds: list[int], threads: int,
        rerun: bool = False) -> None:
    """Measure each configuration on each domain half not yet measured (with `rerun`, measure again: the new rows come
    later in the file, and the latest row of a digest wins, so the tables follow the code as it is now). `half` may
    name both halves ("validation,test"): each configuration is then pruned once and evaluated on both."""
    known = configs()
    code = commit()  # the code a row was measured with (its settings' digest does not change with the code: --rerun)
    unknown = [n for n in names if n != "dense" and n not in known]
    if unknown:
        raise SystemExit(f"unknown configurations: {unknown}")
    halves = half.split(",")
    bench: Bench | None = None
    for seed in seeds:
        for name in names:
            config = None if name == "dense" else resolved(known[name], model)
            rows = load_rows()
            have = {(r["model"], r["digest"], r["seed"], r["domain"], r["half"], r["windows"]) for r in rows
                    if calibration_of(r) == CALIBRATION or r["config"] == "dense"}
            dseed = 0 if config is None else seed
            todo = [(h, d) for h in halves for d in domains if (rerun and config is not None)
                    or (model, digest(config), dseed, d, h, MODELS[model]["windows"]) not in have]
            if not todo:
                continue
            bench = bench or Bench(model, threads)
            t = time.time()
            bench.apply(config, dseed)
            prune_s = time.time() - t
            for h, domain in todo:
                t = time.time()
                ppl = bench.ppl(domain, h)
                row = {"model": model, "config": name, "digest": digest(config), "seed": dseed, "domain": domain,
                       "calibration": CALIBRATION,
                       "half": h, "windows": MODELS[model]["windows"], "seqlen": MODELS[model]["seqlen"],
                       "ppl": round(ppl, 4), "domain_fingerprint": fingerprint(domain),
                       "prune_s": round(prune_s, 1), "eval_s": round(time.time() - t, 1),
                       "settings": None if config is None else config.to_dict(), "commit": code}
                if "calibration_seqlen" in MODELS[model]:
                    row["calibration_shape"] = list(calibration_shape(MODELS[model]))
                with RESULTS.open("a") as f:
                    f.write(json.dumps(row) + "\n")
                log(f"[{model}] {name:40s} seed {dseed} {domain:7s} {h:10s} ppl {ppl:9.3f}")


# ---------------------------------------------------------------- reporting

def table(rows: list[dict], model: str, half: str, seed: int = 0) -> dict[tuple[str, str], float]:
    """(config name, domain) -> ppl, for one model / half / seed; the latest row of a config digest wins.
    Rows count for every name whose configuration has their digest (measured as `balanced:off0.25`, a row is
    `balanced`'s too once the defaults make them the same); a row whose digest no name has any more is stale."""
    names_of: dict[str, list[str]] = {}
    for name, config in configs().items():
        names_of.setdefault(resolved(config, model).digest, []).append(name)
    out: dict[tuple[str, str], float] = {}
    for r in rows:
        if r["model"] != model or r["half"] != half or r["windows"] != MODELS[model]["windows"]:
            continue
        if r["config"] != "dense" and calibration_of(r) != CALIBRATION:
            continue
        if r["config"] == "dense" or r["seed"] == seed:
            for name in ["dense"] if r["config"] == "dense" else names_of.get(r["digest"], []):
                out[(name, r["domain"])] = r["ppl"]
    return out


def reference_of(name: str) -> str:
    """The Wanda row a configuration is compared with: Wanda at the same pattern or sparsity (`NAME@2:4...`,
    `NAME@60`), else Wanda at 50%."""
    point = re.search(r"@(2:4|4:8|60|70)(?![0-9])", name)
    return f"wanda@{point.group(1)}" if point else "wanda"


def ratios(t: dict, name: str, domains: list[str]) -> dict[str, float] | None:
    """Loss ratio vs Wanda (at the same pattern) per domain: (ppl - dense) / (ppl_wanda - dense)."""
    out = {}
    wanda = reference_of(name)
    for d in domains:
        if (name, d) not in t or ("dense", d) not in t or (wanda, d) not in t:
            return None
        out[d] = (t[(name, d)] - t[("dense", d)]) / (t[(wanda, d)] - t[("dense", d)])
    return out


def summary(rows: list[dict], names: list[str], half: str, models: list[str], domains: tuple[str, ...] = tuple(DOMAINS)) -> dict:
    result: dict = {}
    for model in models:
        t = table(rows, model, half)
        for name in names:
            r = ratios(t, name, domains)
            if r is None:
                continue
            result.setdefault(name, {})[model] = {
                "ppl": {d: t[(name, d)] for d in domains},
                "dense": {d: t[("dense", d)] for d in domains},
                "ratio": {d: round(v, 4) for d, v in r.items()},
                "mean": round(statistics.mean(r.values()), 4),
                "worst": round(max(r.values()), 4),
                "worst_domain": max(r, key=r.get),
            }
    for per_model in result.values():
        allr = [v for m in per_model.values() for v in m["ratio"].values()]
        per_model["_all"] = {"mean": round(statistics.mean(allr), 4), "worst": round(max(allr), 4),
                             "models": sorted(k for k in per_model if not k.startswith("_"))}
    return result


def fmt_table(s: dict, names: list[str], models: list[str], domains: tuple[str, ...] = tuple(DOMAINS)) -> str:
    lines = []
    for model in models:
        present = [n for n in names if n in s and model in s[n]]
        if not present:
            continue
        lines += [f"**{model}** (perplexity per domain; ratio = loss vs Wanda's loss)", "",
                  "| config | " + " | ".join(domains) + " | mean ratio | worst ratio |",
                  "|---|" + "---|" * (len(domains) + 2)]
        first = s[present[0]][model]
        lines.append("| dense | " + " | ".join(f"{first['dense'][d]:.2f}" for d in domains) + " | - | - |")
        for n in present:
            m = s[n][model]
            cells = " | ".join(f"{m['ppl'][d]:.2f} ({m['ratio'][d]:.2f})" for d in domains)
            lines.append(f"| {n} | {cells} | {m['mean']:.3f} | {m['worst']:.3f} ({m['worst_domain']}) |")
        lines.append("")
    return "\n".join(lines)


HEADLINE = ["wanda", "wanda+update:obs", "wanda+update", "wanda+update:off0.5", "wanda+qk0.1", "balanced@87425c2", "quality@87425c2", "balanced:refine0",
            "balanced:off0.5", "quality:off0.5", "balanced:owl0", "quality:owl0", "balanced", "quality:obs", "quality", "joint", "conservative", "fast",
            "wanda@2:4", "wanda+update@2:4:obs", "wanda+update@2:4", "balanced@2:4:off0.5", "balanced@2:4", "quality@2:4:obs",
            "quality@2:4:refine-off0.5", "quality@2:4", "joint@2:4:refine-off0.5", "joint@2:4", "wanda@4:8", "quality@4:8:obs",
            "quality@4:8:refine-off0.5", "quality@4:8", "joint@4:8:refine-off0.5", "joint@4:8", "wanda@60", "quality@60:obs", "quality@60:owl0", "balanced@60", "quality@60", "joint@60",
            "wanda@70", "quality@70:obs", "quality@70:owl0", "balanced@70", "quality@70", "joint@70"]


def report() -> None:
    rows = load_rows()
    models = [m for m in MODELS if any(r["model"] == m for r in rows)]
    out = {"calibration": CALIBRATION, "protocol": {m: MODELS[m] for m in models}, "domains": {d: fingerprint(d) for d in DOMAINS},
           "test": summary(rows, HEADLINE, "test", models), "validation": {}}
    names_val = sorted({r["config"] for r in rows if r["half"] == "validation" and r["config"] != "dense"
                        and calibration_of(r) == CALIBRATION})
    out["validation"] = summary(rows, names_val, "validation", models)
    DOCS.mkdir(exist_ok=True)
    (DOCS / "validation.json").write_text(json.dumps(out, indent=1) + "\n")
    md = (ROOT / "benchmarks" / "validation_template.md").read_text()
    goals = goal_lines(out["test"], models)
    md = md.replace("{{TEST_TABLE}}", fmt_table(out["test"], HEADLINE, models))
    md = md.replace("{{HEADLINE}}", headline(out["test"], HEADLINE, models))
    md = md.replace("{{GOALS}}", goals)
    md = md.replace("{{SEEDS}}", seed_lines(rows, SEEDED, models))
    md = md.replace("{{CALIBRATION}}", CALIBRATION)
    choices = ROOT / "benchmarks" / "validation_choices.md"
    md = md.replace("{{CHOICES}}", choices.read_text().strip() if choices.exists() else "(not written yet)")
    md = md.replace("{{VALIDATION_TABLE}}", fmt_table(out["validation"], names_val, models))
    md = md.replace("{{DOMAINS}}", "\n".join(f"| `{d}` | {len(domain_texts(d)[0]):,} | {len(domain_texts(d)[1]):,} | `{fingerprint(d)}` |" for d in DOMAINS))
    (DOCS / "validation.md").write_text(md)
    log("wrote docs/validation.md and docs/validation.json")


# off0.5: the presets before 84ecbf2; balanced:owl0: balanced before its layer spread (2026-12-06)
SEEDED = ["wanda", "balanced:owl0", "quality:obs", "balanced:off0.5", "quality:off0.5"]


def seed_lines(rows: list[dict], names: list[str], models: list[str], half: str = "test") -> str:
    """Per model and configuration, over the calibration seeds measured (each against the same seed's Wanda):
    the mean ratio's mean +- standard deviation, and the worst ratio of any seed."""
    lines = ["| model | config | seeds | mean ratio (mean +- std over seeds) | worst ratio (max over seeds) |",
             "|---|---|---|---|---|"]
    for model in models:
        seeds = sorted({r["seed"] for r in rows if r["model"] == model and r["half"] == half and calibration_of(r) == CALIBRATION})
        for name in names:
            means, worsts, used = [], [], []
            for seed in seeds:
                r = ratios(table(rows, model, half, seed), name, list(DOMAINS))
                if r is not None:
                    means.append(statistics.mean(r.values()))
                    worsts.append(max(r.values()))
                    used.append(seed)
            if len(used) < 2:
                continue
            lines.append(f"| {model} | {name} | {', '.join(map(str, used))} | {statistics.mean(means):.3f} +- "
                         f"{statistics.stdev(means):.3f} | {max(worsts):.3f} |")
    return "\n".join(lines) if len(lines) > 2 else "(fewer than two seeds measured)"


def headline(s: dict, names: list[str], models: list[str]) -> str:
    lines = ["| config | " + " | ".join(f"{m} mean | {m} worst" for m in models) + " | all mean | all worst |",
             "|---|" + "---|---|" * len(models) + "---|---|"]
    for n in names:
        if n not in s:
            continue
        cells = []
        for m in models:
            cells += [f"{s[n][m]['mean']:.3f}", f"{s[n][m]['worst']:.3f}"] if m in s[n] else ["-", "-"]
        a = s[n]["_all"]
        lines.append(f"| {n} | " + " | ".join(cells) + f" | {a['mean']:.3f} | {a['worst']:.3f} |")
    return "\n".join(lines)


def goal_lines(s: dict, models: list[str]) -> str:
    out = []
    for m in models:
        for name, limit in (("balanced", 0.85), ("quality", 0.70)):
            if name not in s or m not in s[name]:
                out.append(f"- {m}: `{name}`: **not measured** (test halves)")
            if name in s and m in s[name]:
                worst = s[name][m]["worst"]
                out.append(f"- {m}: `{name}` worst ratio {worst:.3f} vs goal <= {limit}: "
                           f"**{'met' if worst <= limit else 'MISSED'}** ({s[name][m]['worst_domain']})")
        for point in ("2:4", "70"):  # the best preset at 2:4 and at 70% <= 0.6x Wanda's loss on every domain
            measured = [(s[n][m]["worst"], n) for n in (f"{p}@{point}" for p in ("balanced", "quality", "joint"))
                        if n in s and m in s[n]]
            if measured:
                worst, name = min(measured)
                out.append(f"- {m}: best preset at {point}{'' if ':' in point else '%'} (`{name}`) worst ratio {worst:.3f} "
                           f"vs goal <= 0.6: **{'met' if worst <= 0.6 else 'MISSED'}** ({s[name][m]['worst_domain']})")
        if "quality" in s and "wanda+update" in s and m in s["quality"] and m in s["wanda+update"]:
            q, w = s["quality"][m]["ppl"], s["wanda+update"][m]["ppl"]
            below = [d for d in q if q[d] < w[d]]
            out.append(f"- {m}: `quality` below Wanda+update on {len(below)}/{len(q)} domains: "
                       f"**{'met' if len(below) == len(q) else 'MISSED'}**"
                       + ("" if len(below) == len(q) else f" (not on {', '.join(d for d in q if d not in below)})"))
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", nargs="?", default="all", choices=("all", "run", "report"))
    parser.add_argument("--model", default="smollm2", choices=tuple(MODELS))
    parser.add_argument("--half", default="test", choices=("validation", "test", "validation,test"),
                        help="validation,test: each configuration pruned once, evaluated on both halves")
    parser.add_argument("--configs", default="dense," + ",".join(HEADLINE))
    parser.add_argument("--domains", default=",".join(DOMAINS))
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--windows", type=int, help="evaluation windows per domain half (default: the model's protocol; "
                        "rows are kept per window count)")
    parser.add_argument("--rerun", action="store_true", help="measure the configurations again even where rows exist "
                        "(after a change of the code, not of the settings; the latest row wins)")
    parser.add_argument("--calibration", default=CALIBRATION, help="calibration text (a --data spec), default %(default)s")
    args = parser.parse_args()
    globals()["CALIBRATION"] = args.calibration
    seeds = [int(s) for s in args.seeds.split(",")]
    if args.windows:
        MODELS[args.model]["windows"] = args.windows
    if args.command == "run":
        run(args.model, args.configs.split(","), args.half, args.domains.split(","), seeds, args.threads, args.rerun)
    elif args.command == "report":
        report()
    else:
        for model in MODELS:
            run(model, ["dense", *HEADLINE], "test", list(DOMAINS), [0], args.threads)
        report()


if __name__ == "__main__":
    main()
