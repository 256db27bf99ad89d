"""What every command shares: option declarations (help built from the defaults in config.py and the
method registry) and error handling. Nothing here imports torch."""

from __future__ import annotations

import functools
import os
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from hybridprune import ui
from hybridprune.config import DEFAULT_CALIBRATION_DATA, DEFAULT_DATA, DEFAULT_SEQLEN, default_of
from hybridprune.errors import UserError
from hybridprune.methods import registry

F = TypeVar("F", bound=Callable[..., Any])
OptStr = str | None
OptFloat = float | None
OptInt = int | None


def _default(name: str) -> str:
    return f"default {default_of(name)}"


ModelOpt = Annotated[
    str | None,
    typer.Option("--model", help="Model folder, hub id (with HYBRIDPRUNE_ONLINE=1), or nothing for the embedded SmolLM2-135M."),
]
DtypeOpt = Annotated[str, typer.Option("--dtype", help="float32 | bfloat16 | float16 (statistics stay float64).")]
DeviceOpt = Annotated[str, typer.Option("--device", help="cpu | cuda[:N].")]
CacheDirOpt = Annotated[
    Path | None, typer.Option("--cache-dir", help="Cache folder (default: $HYBRIDPRUNE_CACHE or ~/.cache/hybridprune).")
]
TrustOpt = Annotated[bool, typer.Option("--trust-remote-code", help="Allow a model folder's own Python code to run.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout (human output goes to stderr).")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No panels or progress bars.")]
# Calibration inputs default to None so a preset can set them: explicit flag > preset > default.
DataOpt = Annotated[
    str | None, typer.Option("--data", help=f"Calibration text (default {DEFAULT_CALIBRATION_DATA}): wiki-vital | wiki-vital+code "
                             "| a .txt/.jsonl/.parquet file | a hub dataset (online).")
]
EvalDataOpt = Annotated[
    str, typer.Option("--data", help=f"Evaluation text (its --split): {DEFAULT_DATA} (default) | wiki-vital+code | a .txt/.jsonl/.parquet "
                      "file | a hub dataset (online).")
]
TextFieldOpt = Annotated[str | None, typer.Option("--text-field", help="Field holding the text in .jsonl/.parquet files.")]
NsamplesOpt = Annotated[int | None, typer.Option("--nsamples", help=f"Calibration windows ({_default('nsamples')}).")]
SeqlenOpt = Annotated[
    int | None, typer.Option("--seqlen", help=f"Tokens per calibration window (default {DEFAULT_SEQLEN}, capped by the model).")
]
SeedOpt = Annotated[int, typer.Option("--seed", help="Seed of the window sampling and topic clustering.")]
TopicsOpt = Annotated[
    int | None, typer.Option("--topics", "--nr-tfidf-k", help=f"Topics (k-means clusters) for NeuronRank topic mode ({_default('topics')}).")
]
QActiveOpt = Annotated[
    float | None,
    typer.Option("--q-active", "--nr-q-active", help=f"Quantile of |activation| above which a neuron is active ({_default('q_active')})."),
]
PresetOpt = Annotated[str | None, typer.Option("--preset", help="balanced (default) | quality | fast | conservative | a user preset.")]
PresetsFileOpt = Annotated[Path | None, typer.Option("--presets", help="An extra presets TOML file.")]
MlpMethodOpt = Annotated[
    str | None, typer.Option("--hybrid-mlp-method", help=f"{registry.choices(registry.MLP_SCORINGS)} ({_default('hybrid_mlp_method')}).")
]
TfidfModeOpt = Annotated[
    str | None, typer.Option("--nr-tfidf-mode", help=f"{registry.choices(registry.TFIDF_MODES)} ({_default('nr_tfidf_mode')}).")
]
TfExpOpt = Annotated[float | None, typer.Option("--tf-exp", help=f"Exponent on NeuronRank TF ({_default('tf_exp')}).")]
IdfExpOpt = Annotated[float | None, typer.Option("--idf-exp", help=f"Exponent on NeuronRank IDF ({_default('idf_exp')}).")]
TfKindOpt = Annotated[
    str | None,
    typer.Option("--tf-kind", help="; ".join(f"{name}: {text}" for name, text in registry.TF_KINDS.items()) + f" ({_default('tf_kind')})."),
]
MinTokensOpt = Annotated[
    int | None, typer.Option("--nr-min-tokens", help=f"Doc mode: active tokens for a window to count ({_default('nr_min_tokens')}).")
]
TopicRateOpt = Annotated[
    float | None, typer.Option("--nr-topic-rate", help=f"Topic mode: activity rate for a topic to count ({_default('nr_topic_rate')}).")
]
DocRateOpt = Annotated[
    float | None,
    typer.Option("--nr-doc-rate", help=f"Doc mode: share of a window's tokens a neuron must be active on for the window to count ({_default('nr_doc_rate')}).")
]
RowBoundOpt = Annotated[
    float | None,
    typer.Option("--nr-row-bound", help=f"gate/up: each neuron's row sparsity stays within target +- this (1 = unbounded; {_default('nr_row_bound')}).")
]
BatchOpt = Annotated[int, typer.Option("--batch-size", help="Windows per forward batch (memory vs speed; never changes the statistics).")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Recompute even when a cached entry exists.")]
OffloadOpt = Annotated[
    bool | None,
    typer.Option("--offload/--no-offload", help="Load one decoder layer at a time (default: only when the model does not fit)."),
]
CalibrateOffloadOpt = Annotated[
    bool | None,
    typer.Option(
        "--offload/--no-offload",
        help="Load one decoder layer at a time (default: whenever the checkpoint is safetensors; same speed, a third of the memory).",
    ),
]


def handle_errors(command: F) -> F:
    """One clear line and a non-zero exit for user errors; a traceback only with HYBRIDPRUNE_DEBUG=1."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except UserError as err:
            if os.environ.get("HYBRIDPRUNE_DEBUG") == "1":
                traceback.print_exc()
            ui.print_error(str(err))
            raise typer.Exit(err.exit_code) from None
        except KeyboardInterrupt:
            ui.print_error("interrupted: nothing was written (partial results are discarded)")
            raise typer.Exit(130) from None
        except typer.Exit:
            raise
        except Exception as err:  # a bug of ours: say so in one line, keep the traceback behind the flag
            if os.environ.get("HYBRIDPRUNE_DEBUG") == "1":
                raise
            ui.print_error(f"internal error: {type(err).__name__}: {err} (rerun with HYBRIDPRUNE_DEBUG=1 for the traceback)")
            raise typer.Exit(1) from None

    return wrapper  # type: ignore[return-value]
