"""What every command shares: option declarations, error handling, model loading."""

from __future__ import annotations

import functools
import os
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from hybridprune import ui
from hybridprune.calibration.session import CalibrationRequest
from hybridprune.errors import UserError
from hybridprune.presets import Preset

F = TypeVar("F", bound=Callable[..., Any])

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
    str | None, typer.Option("--data", help="wiki-vital (default) | a .txt/.jsonl/.parquet file | a hub dataset (online).")
]
TextFieldOpt = Annotated[str | None, typer.Option("--text-field", help="Field holding the text in .jsonl/.parquet files.")]
NsamplesOpt = Annotated[int | None, typer.Option("--nsamples", help="Calibration windows (default 32).")]
SeqlenOpt = Annotated[int | None, typer.Option("--seqlen", help="Tokens per calibration window (default 512, capped by the model).")]
SeedOpt = Annotated[int, typer.Option("--seed", help="Seed of the window sampling and topic clustering.")]
TopicsOpt = Annotated[
    int | None, typer.Option("--topics", "--nr-tfidf-k", help="Topics (k-means clusters) for NeuronRank topic mode (default 128).")
]
QActiveOpt = Annotated[
    float | None, typer.Option("--q-active", "--nr-q-active", help="Quantile of |activation| above which a neuron is active (default 0.9).")
]
PresetOpt = Annotated[str | None, typer.Option("--preset", help="balanced (default) | quality | fast | conservative | a user preset.")]
PresetsFileOpt = Annotated[Path | None, typer.Option("--presets", help="An extra presets TOML file.")]
MlpMethodOpt = Annotated[str | None, typer.Option("--hybrid-mlp-method", help="neuronrank_tfidf | neuronrank_old.")]
TfidfModeOpt = Annotated[str | None, typer.Option("--nr-tfidf-mode", help="doc | topic.")]
TfExpOpt = Annotated[float | None, typer.Option("--tf-exp", help="Exponent on NeuronRank TF (default 1).")]
IdfExpOpt = Annotated[float | None, typer.Option("--idf-exp", help="Exponent on NeuronRank IDF (default 0.25).")]
TfKindOpt = Annotated[str | None, typer.Option("--tf-kind", help="out_rms (rms(a)*||down col||, default) | rms | mean_abs.")]
MinTokensOpt = Annotated[int | None, typer.Option("--nr-min-tokens", help="Doc mode: active tokens for a window to count (default 1).")]
TopicRateOpt = Annotated[float | None, typer.Option("--nr-topic-rate", help="Topic mode: activity rate for a topic to count (default 0.05).")]
BatchOpt = Annotated[int, typer.Option("--batch-size", help="Windows per forward batch (memory vs speed; not in the key).")]
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


def choose_streaming(
    offload: bool | None, model: str | None, dtype: str, device: str, root: Path, reporter: Any, layerwise: bool = False
) -> bool | None:
    """--offload / --no-offload as given. Unset, a `layerwise` job (one that never needs the whole model,
    such as calibration) streams whenever the checkpoint allows it (None: load_model decides); any other
    streams when the weights do not fit in free memory (said in one line)."""
    if offload is not None:
        return offload
    if layerwise:
        return None
    from hybridprune.models.loading import model_folder, resolve_device, resolve_dtype
    from hybridprune.models.streaming import should_stream

    stream, reason = should_stream(model_folder(model, root), resolve_dtype(dtype), resolve_device(device))
    if stream:
        reporter.note(reason)
    return stream


def calibration_request(
    preset: Preset | None, explicit: dict[str, Any], text_field: str | None, seed: int, batch_size: int
) -> CalibrationRequest:
    """Calibration inputs: explicit flag (not None) > preset > CalibrationRequest's default."""
    values = {**(preset.calibration if preset else {}), **{k: v for k, v in explicit.items() if v is not None}}
    return CalibrationRequest(text_field=text_field, seed=seed, batch_size=batch_size, **values)


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


def setup_output(json_output: bool, quiet: bool) -> ui.RichReporter:
    ui.set_json_mode(json_output)
    return ui.RichReporter(quiet=quiet)


def configure_torch() -> None:
    """Process-wide settings for the heavy commands."""
    import torch

    threads = os.environ.get("HYBRIDPRUNE_THREADS")
    if threads:
        torch.set_num_threads(int(threads))
