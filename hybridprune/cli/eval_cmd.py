"""`hybridprune eval`: perplexity and achieved sparsity of one model, a model and its baseline, or many folders."""

from __future__ import annotations

import gc
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape

from hybridprune import ui
from hybridprune.cli.common import (
    BatchOpt,
    CacheDirOpt,
    DataOpt,
    DeviceOpt,
    DtypeOpt,
    JsonOpt,
    ModelOpt,
    QuietOpt,
    TextFieldOpt,
    TrustOpt,
    configure_torch,
    handle_errors,
)
from hybridprune.data import TextSource, eval_windows, load_text, tokenize
from hybridprune.errors import UserError
from hybridprune.evaluate import (
    PerplexityResult,
    TaskSuite,
    check_vocabulary,
    folder_size,
    latency,
    parameter_count,
    perplexity,
    prepare_tasks,
    zero_shot,
)
from hybridprune.fsutil import cache_root, ensure_writable_dir
from hybridprune.models import LoadedModel, load_model
from hybridprune.plotting import plot_sweep
from hybridprune.reporting import Reporter
from hybridprune.sparsity import SparsityReport, percent, sparsity_report

METADATA_FILE = "hybridprune.json"
DEFAULT_PLOT = Path("hybridprune-compare.png")
LATENCY_RUNS = 5
DENSE_BELOW = 0.01
"""A folder without hybridprune.json whose measured sparsity is below this is called dense."""


@dataclass
class Evaluation:
    """Everything measured on one model; the model itself is released once this exists."""

    role: str  # model | baseline | compare
    label: str  # what the user typed (or "embedded")
    folder: Path
    method: str  # from hybridprune.json, else "dense" or "unknown"
    target_sparsity: float | None
    windows: int
    result: PerplexityResult
    sparsity: SparsityReport
    parameters: int
    size_bytes: int
    latency_s: float | None
    tasks: dict[str, dict[str, float]] | None

    @property
    def shown(self) -> str:
        """The label for Rich output, where a '[' in a path would otherwise read as markup."""
        return escape(self.label)

    def to_dict(self) -> dict[str, Any]:
        return {
            "role": self.role,
            "source": self.label,
            "folder": str(self.folder),
            "method": self.method,
            "target_sparsity": self.target_sparsity,
            "windows": self.windows,
            "perplexity": self.result.to_dict(),
            "sparsity": self.sparsity.to_dict(),
            "parameters": self.parameters,
            "size_bytes": self.size_bytes,
            "latency_s": self.latency_s,
            "tasks": self.tasks,
        }


@dataclass(frozen=True)
class EvalSettings:
    """What every model in one run is measured with, so the figures are comparable."""

    source: TextSource
    seqlen: int
    windows: int | None
    batch_size: int
    measure_latency: bool
    suite: TaskSuite | None
    task_limit: int | None
    dtype: str
    device: str
    cache_dir: Path
    trust_remote_code: bool
    show_progress: bool


def parse_windows(text: str) -> int | None:
    """'all' -> None (every complete window), else a positive count."""
    if text.strip().lower() == "all":
        return None
    try:
        count = int(text)
    except ValueError:
        raise UserError(f"--windows must be a positive number or 'all', got '{text}'") from None
    if count <= 0:
        raise UserError(f"--windows must be a positive number or 'all', got {count}")
    return count


def read_metadata(folder: Path, reporter: Reporter) -> dict[str, Any]:
    """The folder's hybridprune.json (written by `prune`), or {} for any other model."""
    path = folder / METADATA_FILE
    if not path.is_file():
        return {}
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        reporter.note(f"[yellow]warning:[/] ignoring unreadable {path} ({err})")
        return {}
    return document if isinstance(document, dict) else {}


def evaluate_model(spec: str | None, role: str, settings: EvalSettings, reporter: Reporter) -> Evaluation:
    loaded = load_model(
        spec, dtype=settings.dtype, device=settings.device, cache_dir=settings.cache_dir, trust_remote_code=settings.trust_remote_code
    )
    max_positions = getattr(loaded.model.config, "max_position_embeddings", None)
    if max_positions and settings.seqlen > max_positions:
        raise UserError(f"--seqlen {settings.seqlen} exceeds the model's max_position_embeddings ({max_positions})")
    ids = tokenize(settings.source, loaded.tokenizer, cache_dir=settings.cache_dir / "tokens")
    windows = eval_windows(ids, settings.seqlen, settings.windows)
    check_vocabulary(loaded.model, loaded.tokenizer, windows)
    metadata = read_metadata(loaded.folder, reporter)
    sparsity = _sparsity(loaded, metadata)
    method = str(metadata.get("method") or ("dense" if sparsity.total.sparsity < DENSE_BELOW else "unknown"))
    target = metadata.get("sparsity")
    reporter.phase(
        escape(f"Evaluating {loaded.source}"),
        [
            escape(f"folder     {loaded.folder}"),
            escape(f"method     {method}" + (f" (target sparsity {target})" if target is not None else "")),
            escape(f"text       {settings.source.name} ({settings.source.split} split), {len(windows)} x {settings.seqlen} tokens"),
            f"sparsity   {sparsity.summary()}",
        ],
    )
    result = perplexity(loaded.model, windows, settings.batch_size, reporter)
    seconds = None
    if settings.measure_latency:
        reporter.note(f"latency: median of {LATENCY_RUNS} forwards of 1 x {settings.seqlen} tokens")
        seconds = latency(loaded.model, settings.seqlen, runs=LATENCY_RUNS)
    tasks = None
    if settings.suite is not None:
        reporter.phase("Zero-shot tasks (lm-evaluation-harness)", [", ".join(settings.suite.names)])
        tasks = zero_shot(
            loaded.model,
            loaded.tokenizer,
            settings.suite,
            batch_size=settings.batch_size,
            limit=settings.task_limit,
            show_progress=settings.show_progress,
        )
    evaluation = Evaluation(
        role=role,
        label=loaded.source,
        folder=loaded.folder,
        method=method,
        target_sparsity=float(target) if isinstance(target, (int, float)) else None,
        windows=len(windows),
        result=result,
        sparsity=sparsity,
        parameters=parameter_count(loaded.model),
        size_bytes=folder_size(loaded.folder),
        latency_s=seconds,
        tasks=tasks,
    )
    del loaded
    gc.collect()  # the next model of a comparison should not have to share memory with this one
    return evaluation


def _sparsity(loaded: LoadedModel, metadata: dict[str, Any]) -> SparsityReport:
    """Structurally pruned folders record their dense MLP width, so removed neurons count as zeros."""
    dense_width = metadata.get("dense_intermediate_size")
    return sparsity_report(loaded.model, loaded.adapter, dense_width if isinstance(dense_width, int) else None)


@handle_errors
def eval_command(
    folders: Annotated[
        list[str] | None, typer.Argument(help="More folders to compare (with --compare).", show_default=False)
    ] = None,
    model: ModelOpt = None,
    data: DataOpt = "wiki-vital",
    split: Annotated[str, typer.Option("--split", help="calibration | validation | test | all.")] = "test",
    text_field: TextFieldOpt = None,
    seqlen: Annotated[int, typer.Option("--seqlen", help="Tokens per eval window.")] = 512,
    windows: Annotated[str, typer.Option("--windows", help="Eval windows from the start of the split: N or 'all'.")] = "64",
    batch_size: BatchOpt = 4,
    baseline: Annotated[
        str | None, typer.Option("--baseline", help="Also evaluate this model (folder, hub id or 'embedded') and show deltas.")
    ] = None,
    compare: Annotated[
        list[str] | None,
        typer.Option("--compare", help="Folders to compare (repeatable, or list them after it); plots ppl vs sparsity."),
    ] = None,
    plot: Annotated[Path | None, typer.Option("--plot", help=f"Where --compare writes its plot (default {DEFAULT_PLOT}).")] = None,
    measure_latency: Annotated[bool, typer.Option("--latency", help="Also time a batch-1 forward of --seqlen tokens.")] = False,
    per_layer: Annotated[bool, typer.Option("--per-layer", help="Show the sparsity of every layer and module.")] = False,
    tasks: Annotated[
        str | None, typer.Option("--tasks", help="Zero-shot lm-eval tasks, comma-separated (hellaswag,arc_easy).")
    ] = None,
    include_path: Annotated[
        Path | None, typer.Option("--include-path", help="A folder of your own lm-eval task YAML files.")
    ] = None,
    task_limit: Annotated[
        int | None, typer.Option("--limit", help="Only the first N documents of each task (a quick look, not a result).")
    ] = None,
    dtype: DtypeOpt = "float32",
    device: DeviceOpt = "cpu",
    cache_dir: CacheDirOpt = None,
    trust_remote_code: TrustOpt = False,
    json_output: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Perplexity on the benchmark protocol and achieved sparsity; optionally a baseline, a comparison, zero-shot tasks."""
    ui.set_json_mode(json_output)
    reporter = ui.RichReporter(quiet=quiet, unit="tokens")
    configure_torch()
    compare_specs = [*(compare or []), *(folders or [])]
    if folders and not compare:
        raise UserError(
            f"unexpected argument '{folders[0]}': use --model FOLDER to evaluate one model, or --compare FOLDER ... to compare several"
        )
    if plot is not None and not compare_specs:
        raise UserError("--plot needs --compare FOLDER ...: it draws perplexity against sparsity across folders")
    window_count = parse_windows(windows)
    if seqlen < 2:
        raise UserError(f"--seqlen must be at least 2 tokens (one predicted), got {seqlen}")
    if batch_size <= 0:
        raise UserError(f"--batch-size must be >= 1, got {batch_size}")
    if task_limit is not None and task_limit <= 0:
        raise UserError(f"--limit must be a positive number of documents, got {task_limit}")
    if (include_path or task_limit) and not tasks:
        raise UserError("--include-path and --limit only apply to --tasks: name the tasks to run")
    suite = prepare_tasks([name.strip() for name in tasks.split(",") if name.strip()], include_path) if tasks else None
    root = ensure_writable_dir(cache_root(cache_dir), "cache folder")
    settings = EvalSettings(
        source=load_text(data, split, text_field),
        seqlen=seqlen,
        windows=window_count,
        batch_size=batch_size,
        measure_latency=measure_latency,
        suite=suite,
        task_limit=task_limit,
        dtype=dtype,
        device=device,
        cache_dir=root,
        trust_remote_code=trust_remote_code,
        show_progress=not quiet,
    )
    if compare_specs:
        plan = [*([("compare", model)] if model else []), *(("compare", spec) for spec in compare_specs)]
    else:
        plan = [("model", model)]
    if baseline is not None:
        plan.append(("baseline", baseline))
    evaluations = [evaluate_model(spec, role, settings, reporter) for role, spec in plan]
    protocol = {
        "data": settings.source.name,
        "split": settings.source.split,
        "seqlen": seqlen,
        "windows": evaluations[0].windows,
        "batch_size": batch_size,
    }
    if compare_specs:
        _finish_compare(evaluations, protocol, plot or DEFAULT_PLOT, json_output, per_layer)
    else:
        _finish_single(evaluations, protocol, json_output, per_layer)


# --- output -------------------------------------------------------------------------------


def _title(protocol: dict[str, Any]) -> str:
    return escape(f"{protocol['data']} ({protocol['split']} split), {protocol['windows']} x {protocol['seqlen']} tokens")


def _finish_single(evaluations: list[Evaluation], protocol: dict[str, Any], json_output: bool, per_layer: bool) -> None:
    model, *rest = evaluations
    base = rest[0] if rest else None
    if json_output:
        document: dict[str, Any] = {"protocol": protocol, "model": model.to_dict()}
        if base is not None:
            document["baseline"] = base.to_dict()
            document["delta"] = {
                "ppl": model.result.ppl - base.result.ppl,
                "nll": model.result.nll - base.result.nll,
                "sparsity": model.sparsity.total.sparsity - base.sparsity.total.sparsity,
                "parameters": model.parameters - base.parameters,
                "latency_s": None if model.latency_s is None else model.latency_s - (base.latency_s or 0.0),
            }
        ui.emit_json(document)
        return
    if base is None:
        ui.console.print(ui.table(f"Perplexity of {model.shown} on {_title(protocol)}", ["metric", "value"], _metric_rows(model)))
    else:
        rows = [[name, value, other, delta] for (name, value), (_, other), delta in zip(_metric_rows(model), _metric_rows(base), _deltas(model, base))]
        ui.console.print(ui.table(f"{model.shown} vs baseline {base.shown} on {_title(protocol)}", ["metric", "model", "baseline", "delta"], rows))
    _print_sparsity(model, per_layer)
    _print_tasks(evaluations)


def _metric_rows(evaluation: Evaluation) -> list[list[str]]:
    result, report = evaluation.result, evaluation.sparsity
    rows = [
        ["perplexity", f"{result.ppl:.3f}"],
        ["NLL / token (nats)", f"{result.nll:.4f}"],
        ["sparsity: attention", percent(report.kind("attention").sparsity)],
        ["sparsity: MLP", percent(report.kind("mlp").sparsity)],
        ["sparsity: total", percent(report.total.sparsity)],
        ["parameters", ui.human_count(evaluation.parameters)],
        ["folder size", f"{evaluation.size_bytes / 1e6:.1f} MB"],
        ["eval throughput", f"{result.tokens_per_second:,.0f} tok/s"],
    ]
    if evaluation.latency_s is not None:
        rows.append(["latency (1 x seqlen)", f"{evaluation.latency_s * 1000:.1f} ms"])
    return rows


def _deltas(model: Evaluation, base: Evaluation) -> list[str]:
    ppl_change = model.result.ppl - base.result.ppl
    deltas = [
        f"{ppl_change:+.3f} ({100 * ppl_change / base.result.ppl:+.1f}%)",
        f"{model.result.nll - base.result.nll:+.4f}",
        *(
            f"{100 * (model.sparsity.kind(kind).sparsity - base.sparsity.kind(kind).sparsity):+.2f} pt"
            for kind in ("attention", "mlp")
        ),
        f"{100 * (model.sparsity.total.sparsity - base.sparsity.total.sparsity):+.2f} pt",
        ui.human_count(model.parameters - base.parameters),
        f"{(model.size_bytes - base.size_bytes) / 1e6:+.1f} MB",
        f"x{model.result.tokens_per_second / base.result.tokens_per_second:.2f}",
    ]
    if model.latency_s is not None and base.latency_s:
        deltas.append(f"speedup x{base.latency_s / model.latency_s:.2f}")
    return deltas


def _print_sparsity(evaluation: Evaluation, per_layer: bool) -> None:
    report = evaluation.sparsity
    ui.console.print(ui.table(f"Sparsity of {evaluation.shown}", ["part", "zeros", "weights", "sparsity"], report.kind_rows()))
    if per_layer:
        ui.console.print(ui.table(f"Sparsity per layer of {evaluation.shown} (% zeros)", report.layer_columns(), report.layer_rows()))


def _print_tasks(evaluations: list[Evaluation]) -> None:
    if evaluations[0].tasks is None:
        return
    keys = [(task, metric) for task, metrics in evaluations[0].tasks.items() for metric in metrics]
    rows = [
        [f"{task} {metric}", *(f"{e.tasks[task][metric]:.4f}" if e.tasks and metric in e.tasks.get(task, {}) else "-" for e in evaluations)]
        for task, metric in keys
    ]
    ui.console.print(ui.table("Zero-shot tasks", ["task metric", *(e.shown for e in evaluations)], rows))


def _finish_compare(
    evaluations: list[Evaluation], protocol: dict[str, Any], plot_path: Path, json_output: bool, per_layer: bool
) -> None:
    references = [e for e in evaluations if e.role == "baseline"] or [e for e in evaluations if e.method == "dense"]
    dense_ppl = references[0].result.ppl if references else None
    points = [
        {"method": e.method, "sparsity": e.sparsity.total.sparsity, "ppl": e.result.ppl}
        for e in evaluations
        if e.method != "dense" and e.role != "baseline"
    ]
    written = plot_sweep(points, dense_ppl, plot_path, f"Perplexity vs sparsity: {_title(protocol)}")
    if json_output:
        ui.emit_json(
            {"protocol": protocol, "entries": [e.to_dict() for e in evaluations], "dense_ppl": dense_ppl, "plot": str(written)}
        )
        return
    columns = ["folder", "method", "target", "sparsity", "attention", "MLP", "ppl", "vs dense"]
    if any(e.latency_s is not None for e in evaluations):
        columns.append("latency")
    rows = []
    for e in evaluations:
        row = [
            e.shown + (" (baseline)" if e.role == "baseline" else ""),
            escape(e.method),
            "-" if e.target_sparsity is None else percent(e.target_sparsity),
            percent(e.sparsity.total.sparsity),
            percent(e.sparsity.kind("attention").sparsity),
            percent(e.sparsity.kind("mlp").sparsity),
            f"{e.result.ppl:.3f}",
            "-" if dense_ppl is None else f"{e.result.ppl - dense_ppl:+.3f}",
        ]
        if "latency" in columns:
            row.append("-" if e.latency_s is None else f"{e.latency_s * 1000:.1f} ms")
        rows.append(row)
    ui.console.print(ui.table(f"Comparison on {_title(protocol)}", columns, rows))
    if per_layer:
        for e in evaluations:
            _print_sparsity(e, per_layer=True)
    _print_tasks(evaluations)
    ui.console.print(f"plot written to [bold]{written}[/]")
