"""Every option of the commands and the Python API, declared once.

An `Opt` is one option: its keyword (the API's and the Typer parameter's name), its flag spellings
(the first is the one shown; the rest are the seed card's aliases), its type, its default (from
config.py: None means "the preset's value, else the built-in default") and its help. A `Command`
is the ordered list of a command's options. From one Command come both

- the Typer signature of the command (hybridprune/cli/common.py: `cli_options`), and
- the keyword handling of the API function (`api_options` below: unknown keywords refused as
  Python refuses them, missing ones filled with their defaults, the signature shown by help()).

To add an option: declare one `Opt` below, put it in the Command(s) that take it, and read it from
the `Options` the API function receives. Nothing here imports torch, typer or rich.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, TypeVar

from hybridprune.config import (
    DEFAULT_CALIBRATION_DATA,
    DEFAULT_DATA,
    DEFAULT_DEVICE,
    DEFAULT_DTYPE,
    DEFAULT_EVAL_WINDOWS,
    DEFAULT_SAVE_FORMAT,
    DEFAULT_SECOND_ORDER,
    DEFAULT_SEQLEN,
    GRAM_OFFDIAG,
    GRAM_TOKENS_PER_INPUT,
    NM_ORDERS,
    REFINE_OFFDIAG,
    RICH_GRAM_OFFDIAG,
    SECOND_ORDER_MODES,
    UPDATE_MASKS,
    default_of,
)
from hybridprune.methods import registry

F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True)
class Opt:
    name: str
    flags: tuple[str, ...]  # "--offload/--no-offload" declares a boolean pair
    type: Any
    default: Any = None
    help: str = ""
    api_type: Any = None  # what the API also accepts, when wider than the command line's type (for help() only)


def _default(name: str) -> str:
    return f"default {default_of(name)}"


def opt(name: str, *flags: str, type: Any = None, default: Any = None, help: str = "", api_type: Any = None) -> Opt:
    """An option whose flag is --NAME with dashes unless `flags` are given; type str | None unless given."""
    return Opt(name, flags or ("--" + name.replace("_", "-"),), str | None if type is None else type, default, help, api_type)


# --- what every command that loads a model takes -------------------------------------------------

MODEL = opt("model", help="Model folder, hub id (with HYBRIDPRUNE_ONLINE=1), or nothing for the embedded SmolLM2-135M.")
DTYPE = opt("dtype", type=str, default=DEFAULT_DTYPE, help="float32 | bfloat16 | float16 (statistics stay float64).")
DEVICE = opt("device", type=str, default=DEFAULT_DEVICE, help="auto (CUDA when available, else CPU) | cpu | cuda[:N].")
CACHE_DIR = opt("cache_dir", type=Path | None, help="Cache folder (default: $HYBRIDPRUNE_CACHE or ~/.cache/hybridprune).",
                api_type=str | Path | None)
TRUST = opt("trust_remote_code", type=bool, default=False, help="Allow a model folder's own Python code to run.")
BATCH = opt("batch_size", type=int, default=default_of("batch_size"),
            help="Windows per forward batch (memory vs speed; never changes the statistics).")
FORCE = opt("force", type=bool, default=False, help="Recompute even when a cached entry exists.")
TEXT_FIELD = opt("text_field", help="Field holding the text in .jsonl/.parquet files.")

# --- calibration inputs (None: the preset's, else CalibrationRequest's default) -----------------

CALIBRATION = (
    opt("data", help=f"Calibration text (default {DEFAULT_CALIBRATION_DATA}): wiki-vital | wiki-vital+code "
        "| a .txt/.jsonl/.parquet file | a hub dataset (online)."),
    TEXT_FIELD,
    opt("nsamples", type=int | None, help=f"Calibration windows ({_default('nsamples')})."),
    opt("seqlen", type=int | None, help=f"Tokens per calibration window (default {DEFAULT_SEQLEN}, capped by the model)."),
    opt("seed", type=int, default=default_of("seed"), help="Seed of the window sampling and topic clustering."),
    opt("topics", "--topics", "--nr-tfidf-k", type=int | None,
        help=f"Topics (k-means clusters) for NeuronRank topic mode ({_default('topics')})."),
    opt("q_active", "--q-active", "--nr-q-active", type=float | None,
        help=f"Quantile of |activation| above which a neuron is active ({_default('q_active')})."),
)
RUNTIME = (BATCH, DTYPE, DEVICE, CACHE_DIR, FORCE, TRUST)

# --- presets and the NeuronRank knobs (None: the preset's, else PruneConfig's default) ----------

PRESETS_FILE = opt("presets_file", "--presets", type=Path | None, help="An extra presets TOML file.", api_type=str | Path | None)
PRESETS = (opt("preset", help="balanced (default) | quality | fast | conservative | a user preset."), PRESETS_FILE)
MLP_METHOD = opt("hybrid_mlp_method", help=f"{registry.choices(registry.MLP_SCORINGS)} ({_default('hybrid_mlp_method')}).")
TFIDF_MODE = opt("nr_tfidf_mode", help=f"{registry.choices(registry.TFIDF_MODES)} ({_default('nr_tfidf_mode')}).")
SCORING = (
    opt("tf_exp", type=float | None, help=f"Exponent on NeuronRank TF ({_default('tf_exp')})."),
    opt("idf_exp", type=float | None, help=f"Exponent on NeuronRank IDF ({_default('idf_exp')})."),
    opt("tf_kind", help="; ".join(f"{name}: {text}" for name, text in registry.TF_KINDS.items()) + f" ({_default('tf_kind')})."),
    opt("nr_min_tokens", type=int | None, help=f"Doc mode: active tokens for a window to count ({_default('nr_min_tokens')})."),
    opt("nr_topic_rate", type=float | None, help=f"Topic mode: activity rate for a topic to count ({_default('nr_topic_rate')})."),
    opt("nr_doc_rate", type=float | None,
        help=f"Doc mode: share of a window's tokens a neuron must be active on for the window to count ({_default('nr_doc_rate')})."),
)

# --- prune ----------------------------------------------------------------------------------------

PRUNE_KNOBS = (
    opt("sparsity", "--sparsity", "--sparsity-ratio", api_type=float | str | list[float] | None,
        help=f"Target, or a sweep: 0.3,0.5,0.7 (default: the preset's, else {default_of('sparsity')})."),
    opt("pattern", help="unstructured | N:M (2:4, 4:8) | structured."),
    opt("attention_method", help=f"With structured: {registry.choices(registry.STRUCTURED_ATTENTION)}."),
    opt("pruning_last", type=int | None, help="Prune only the last N decoder layers."),
    opt("preserve_first", type=float | None, help="Keep this fraction of early layers dense."),
    opt("weight_exp", type=float | None, help=f"Exponent on |W| in the metric ({_default('weight_exp')})."),
    *SCORING,
    opt("nr_row_bound", type=float | None,
        help=f"gate/up: each neuron's row sparsity stays within target +- this (1 = unbounded; {_default('nr_row_bound')})."),
    opt("layer_spread", type=str | None, api_type=float | str | None,
        help="OWL's sparsity spread across layers (more outliers: denser), a number in [0, 0.5) or auto (by sparsity; "
             "balanced and quality). 0: every layer at the target."),
    opt("qk_shift", type=float | None, help="q/k pruned at target+shift, v/o at target-shift."),
    opt("sequential", "--sequential/--dense-stats", type=bool | None, help="Original Wanda: inputs from pruned earlier layers."),
    opt("dense_targets", "--dense-targets/--pruned-targets", type=bool | None,
        help="With --sequential: rescale o_proj / down_proj per input so their pruned inputs give the dense model's "
        "outputs (the dense model runs alongside in the pass)."),
    opt("update", "--update/--no-update", type=bool | None,
        help="Update kept weights to compensate, from second-order statistics (collected once, then cached)."),
    opt("update_shrink", type=float | None, help="With --update: how far the kept weights move toward the updated weights "
        f"(1 = the full update, 0 = none; {_default('update_shrink')}, chosen across domains)."),
    opt("update_mask", help=f"With --update: {'; '.join(f'{k}: {v}' for k, v in UPDATE_MASKS.items())} ({_default('update_mask')})."),
    opt("nm_order", help=f"N:M hybrid: {'; '.join(f'{k}: {v}' for k, v in NM_ORDERS.items())} "
        f"({_default('nm_order')}; the saved model is the permuted one, the same function)."),
    opt("refine", type=int | None, help="Improve the masks by up to N weight swaps per row that lower the layer's output "
        "error on the calibration inputs (second-order entry; minutes on CPU; not with --update-mask sweep)."),
    opt("gram_offdiag", type=float | None, help="With --update (and --refine, unless --refine-offdiag): weight of the "
        "calibration Gram's off-diagonal (1 = X^T X as calibrated, 0 = its diagonal only, Wanda's objective; default "
        f"{GRAM_OFFDIAG['unstructured']}, {GRAM_OFFDIAG['nm']} under N:M; {RICH_GRAM_OFFDIAG} for both this and --refine-offdiag "
        f"with {GRAM_TOKENS_PER_INPUT} or more calibration tokens per MLP input). Below 1 the fit depends less on the calibration text."),
    opt("refine_offdiag", type=float | None, help="With --refine: the off-diagonal's weight for choosing the masks alone "
        "(the update keeps --gram-offdiag's; default: --gram-offdiag's when given, else "
        f"{REFINE_OFFDIAG['unstructured']}, {REFINE_OFFDIAG['nm']} under N:M)."),
    opt("heads_sparsity", type=float | None, help="With --pattern structured: remove this share of the query heads in every layer."),
    opt("drop_layers", type=int | None,
        help="With --pattern structured: remove this many whole decoder layers (lowest block influence)."),
    opt("target_speedup", type=float | None, help="Plan neurons, heads and layers for this prefill speed-up, measured on this "
        "machine (implies --pattern structured --sparsity 0)."),
)
PRUNE_OUTPUT = (
    opt("out", type=Path | None, help="Save the pruned model here (a sweep: one subfolder per sparsity).", api_type=str | Path | None),
    opt("overwrite", type=bool, default=False, help="Replace a non-empty --out (atomically)."),
    opt("save_format", type=str, default=DEFAULT_SAVE_FORMAT, help="dense (plain safetensors) | compressed (sparse bitmask: "
        "about 0.6x the size at 50%; read back by hybridprune only, `hybridprune decompress` makes a plain copy)."),
    opt("evaluate", "--eval", type=bool, default=False, help="Perplexity of each result (and dense) on the test split; a sweep also plots."),
    opt("eval_windows", type=int, default=DEFAULT_EVAL_WINDOWS, help="Test windows for --eval."),
)
SECOND_ORDER = opt("second_order", type=str, default=DEFAULT_SECOND_ORDER,
                   help=f"{' | '.join(SECOND_ORDER_MODES)}: the x x^T that refine and --update need, stored once and reused "
                   "(about 1x a bfloat16 model's bytes at 8B, see README) or collected again in each prune, one layer at a "
                   "time, nothing stored (a forward pass more per run).")
OFFLOAD = opt("offload", "--offload/--no-offload", type=bool | None,
              help="Load one decoder layer at a time (default: only when the model does not fit).")


@dataclass(frozen=True)
class Command:
    """A command's options in the order --help shows them; `positional` may be passed positionally to the API."""

    options: tuple[Opt, ...]
    positional: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        names = [option.name for option in self.options]
        assert len(names) == len(set(names)), f"an option declared twice: {names}"

    @functools.cached_property
    def names(self) -> dict[str, Opt]:
        return {option.name: option for option in self.options}

    def bind(self, function: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Options:
        """The options of one call: positional ones by position, unknown keywords refused, defaults filled."""
        if len(args) > len(self.positional):
            raise TypeError(f"{function}() takes {len(self.positional)} positional arguments but {len(args)} were given")
        given = dict(zip(self.positional, args))
        for name, value in kwargs.items():
            if name not in self.names:
                raise TypeError(f"{function}() got an unexpected keyword argument '{name}'")
            if name in given:
                raise TypeError(f"{function}() got multiple values for argument '{name}'")
            given[name] = value
        return Options(**{option.name: given.get(option.name, option.default) for option in self.options})

    def signature(self, extra: list[inspect.Parameter]) -> inspect.Signature:
        """The API signature: positional options first, then every option and `extra` keyword-only."""
        kinds = {name: inspect.Parameter.POSITIONAL_OR_KEYWORD for name in self.positional}
        parameters = [inspect.Parameter(o.name, kinds.get(o.name, inspect.Parameter.KEYWORD_ONLY), default=o.default,
                                        annotation=o.api_type or o.type) for o in self.options]
        parameters.sort(key=lambda p: p.kind)
        return inspect.Signature([*parameters, *extra])


class Options(SimpleNamespace):
    """One call's options by name (attribute access); `vars(options)` is the dict."""


CALIBRATE = Command((
    MODEL, *CALIBRATION, *RUNTIME,
    opt("shard", help="Calibrate only shard i of N (i/N) into a partial entry; `hybridprune cache merge` joins the N shards."),
    opt("hessians", type=bool, default=False,
        help="Also collect the second-order statistics (x x^T per input) that --update and the quality preset use."),
    opt("offload", "--offload/--no-offload", type=bool | None, help="Load one decoder layer at a time (default: whenever the "
        "checkpoint is safetensors; same speed, a third of the memory)."),
))
SCORE = Command((
    MODEL, *PRESETS, MLP_METHOD, TFIDF_MODE, *SCORING,
    opt("sparsity", "--sparsity", "--sparsity-ratio", type=float, default=default_of("sparsity"),
        help="For the structured-removal column."),
    *CALIBRATION, *RUNTIME,
))
PRUNE = Command((
    MODEL, *PRESETS,
    opt("prune_method", help=f"{registry.choices(registry.METHODS)}."),
    MLP_METHOD, TFIDF_MODE, *PRUNE_KNOBS, *PRUNE_OUTPUT, *CALIBRATION, *RUNTIME, OFFLOAD, SECOND_ORDER,
))
EVALUATE = Command((
    MODEL,
    opt("compare", type=list[str] | None, help="Folders to compare (repeatable, or list them after it); plots ppl vs sparsity."),
    opt("baseline", help="Also evaluate this model (folder, hub id or 'embedded') and show deltas."),
    opt("data", type=str, default=DEFAULT_DATA, help=f"Evaluation text (its --split): {DEFAULT_DATA} (default) | wiki-vital+code "
        "| a .txt/.jsonl/.parquet file | a hub dataset (online)."),
    opt("split", type=str, default="test", help="calibration | validation | test | all."),
    TEXT_FIELD,
    opt("seqlen", type=int | None, help=f"Tokens per eval window (default {DEFAULT_SEQLEN}, capped by the model)."),
    opt("windows", type=str, default=str(DEFAULT_EVAL_WINDOWS), help="Eval windows from the start of the split: N or 'all'.",
        api_type=int | str | None),
    BATCH,
    opt("plot", type=Path | None, help="Where --compare writes its plot (default hybridprune-compare.png).", api_type=str | Path | None),
    opt("latency", type=bool, default=False,
        help="Also time prefill (batch 1 x --seqlen) and decode (tokens/s over 128 greedy tokens)."),
    opt("tasks", help="Zero-shot lm-eval tasks, comma-separated (hellaswag,arc_easy).", api_type=str | list[str] | None),
    opt("include_path", type=Path | None, help="A folder of your own lm-eval task YAML files.", api_type=str | Path | None),
    opt("limit", type=int | None, help="Only the first N documents of each task (a quick look, not a result)."),
    DTYPE, DEVICE, CACHE_DIR, TRUST,
), positional=("model",))


def api_options(command: Command, **extra: Any) -> Callable[[F], F]:
    """Make `function(options, **extra)` callable as `function(*positional, **options, **extra)`: the keywords
    are checked and completed by `command`, and help() shows them all. `extra` are the function's own keywords
    (a reporter, a callback) with their defaults."""

    def decorate(function: F) -> F:
        @functools.wraps(function)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            own = {name: kwargs.pop(name, default) for name, default in extra.items()}
            return function(command.bind(function.__name__, args, kwargs), **own)

        keyword = inspect.Parameter.KEYWORD_ONLY
        wrapper.__signature__ = command.signature([inspect.Parameter(name, keyword, default=default) for name, default in extra.items()])
        return wrapper  # type: ignore[return-value]

    return decorate
