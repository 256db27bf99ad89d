"""`hybridprune eval`: perplexity and achieved sparsity of one model, a model and its baseline, or many folders."""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.markup import escape

from hybridprune import api, ui
from hybridprune.cli.common import JsonOpt, QuietOpt, cli_options, handle_errors
from hybridprune.cli.output import Output
from hybridprune.errors import UserError
from hybridprune.options import EVALUATE


@handle_errors
@cli_options(EVALUATE)
def eval_command(
    folders: Annotated[list[str] | None, typer.Argument(help="More folders to compare (with --compare).", show_default=False)] = None,
    per_layer: Annotated[bool, typer.Option("--per-layer", help="Show the sparsity of every layer and module.")] = False,
    json_output: JsonOpt = False,
    quiet: QuietOpt = False,
    **options: Any,
) -> None:
    """Perplexity on the benchmark protocol and achieved sparsity; optionally a baseline, a comparison, zero-shot tasks."""
    output = Output(json_output, quiet, unit="tokens")
    if folders and not options["compare"]:
        raise UserError(
            f"unexpected argument '{folders[0]}': use --model FOLDER to evaluate one model, or --compare FOLDER ... to compare several"
        )
    options["compare"] = [*(options["compare"] or []), *(folders or [])]
    result = api.evaluate(**options, reporter=output.reporter, show_task_progress=not quiet)
    output.result(result.to_dict(), lambda: (show_compare if result.compare else show_single)(output, result, per_layer))


def _title(result: api.EvalResult) -> str:
    p = result.protocol
    return escape(f"{p['data']} ({p['split']} split), {p['windows']} x {p['seqlen']} tokens")


def _metrics(e: api.Evaluation) -> dict[str, str]:
    report = e.sparsity
    rows = {
        "perplexity": f"{e.result.ppl:.3f}",
        "NLL / token (nats)": f"{e.result.nll:.4f}",
        "sparsity: attention": ui.percent(report.kind("attention").sparsity),
        "sparsity: MLP": ui.percent(report.kind("mlp").sparsity),
        "sparsity: total": ui.percent(report.total.sparsity),
        "parameters": ui.human_count(e.parameters),
        "folder size": f"{e.size_bytes / 1e6:.1f} MB",
        "eval throughput": f"{e.result.tokens_per_second:,.0f} tok/s",
    }
    if e.latency_s is not None:
        rows["prefill latency (1 x seqlen)"] = f"{e.latency_s * 1000:.1f} ms"
    if e.decode_tokens_per_second is not None:
        rows["decode (batch 1, greedy)"] = f"{e.decode_tokens_per_second:.1f} tok/s"
    return rows


def _deltas(delta: dict) -> dict[str, str]:
    """The same row names as _metrics, so rows are joined by name, never by position."""
    rows = {
        "perplexity": f"{delta['ppl']:+.3f} ({100 * delta['ppl_relative']:+.1f}%)",
        "NLL / token (nats)": f"{delta['nll']:+.4f}",
        "sparsity: attention": f"{100 * delta['sparsity_attention']:+.2f} pt",
        "sparsity: MLP": f"{100 * delta['sparsity_mlp']:+.2f} pt",
        "sparsity: total": f"{100 * delta['sparsity']:+.2f} pt",
        "parameters": ui.human_count(delta["parameters"]),
        "folder size": f"{delta['size_bytes'] / 1e6:+.1f} MB",
        "eval throughput": f"x{delta['throughput_ratio']:.2f}",
    }
    if delta["speedup"] is not None:
        rows["prefill latency (1 x seqlen)"] = f"speedup x{delta['speedup']:.2f}"
    if delta["decode_speedup"] is not None:
        rows["decode (batch 1, greedy)"] = f"speedup x{delta['decode_speedup']:.2f}"
    return rows


def show_single(output: Output, result: api.EvalResult, per_layer: bool) -> None:
    model, base = result.model, result.baseline
    shown = escape(model.label)
    if base is None:
        output.show(ui.table(f"Perplexity of {shown} on {_title(result)}", ["metric", "value"], list(map(list, _metrics(model).items()))))
    else:
        mine, theirs, delta = _metrics(model), _metrics(base), _deltas(result.delta() or {})
        rows = [[name, mine[name], theirs.get(name, "-"), delta.get(name, "-")] for name in mine]
        output.show(ui.table(f"{shown} vs baseline {escape(base.label)} on {_title(result)}", ["metric", "model", "baseline", "delta"], rows))
    show_sparsity(output, model, per_layer)
    show_tasks(output, result.evaluations)


def show_sparsity(output: Output, evaluation: api.Evaluation, per_layer: bool) -> None:
    report, shown = evaluation.sparsity, escape(evaluation.label)
    output.show(ui.table(f"Sparsity of {shown}", ["part", "zeros", "weights", "sparsity"], report.kind_rows()))
    if per_layer:
        output.show(ui.table(f"Sparsity per layer of {shown} (% zeros)", report.layer_columns(), report.layer_rows()))


def show_tasks(output: Output, evaluations: list[api.Evaluation]) -> None:
    if evaluations[0].tasks is None:
        return
    keys = [(task, metric) for task, metrics in evaluations[0].tasks.items() for metric in metrics]
    rows = [
        [f"{task} {metric}", *(f"{e.tasks[task][metric]:.4f}" if e.tasks and metric in e.tasks.get(task, {}) else "-" for e in evaluations)]
        for task, metric in keys
    ]
    output.show(ui.table("Zero-shot tasks", ["task metric", *(escape(e.label) for e in evaluations)], rows))


def show_compare(output: Output, result: api.EvalResult, per_layer: bool) -> None:
    dense = result.dense_ppl
    timed = any(e.latency_s is not None for e in result.evaluations)
    columns = ["folder", "method", "target", "sparsity", "attention", "MLP", "ppl", "vs dense", "size",
               *(["prefill", "decode"] if timed else [])]
    rows = []
    for e in result.evaluations:
        row = [
            escape(e.label) + (" (baseline)" if e.role == "baseline" else ""),
            escape(e.method),
            "-" if e.target_sparsity is None else ui.percent(e.target_sparsity),
            ui.percent(e.sparsity.total.sparsity),
            ui.percent(e.sparsity.kind("attention").sparsity),
            ui.percent(e.sparsity.kind("mlp").sparsity),
            f"{e.result.ppl:.3f}",
            "-" if dense is None else f"{e.result.ppl - dense:+.3f}",
            f"{e.size_bytes / 1e6:.1f} MB",
        ]
        if timed:
            row.append("-" if e.latency_s is None else f"{e.latency_s * 1000:.1f} ms")
            row.append("-" if e.decode_tokens_per_second is None else f"{e.decode_tokens_per_second:.1f} tok/s")
        rows.append(row)
    output.show(ui.table(f"Comparison on {_title(result)}", columns, rows))
    if per_layer:
        for e in result.evaluations:
            show_sparsity(output, e, per_layer=True)
    show_tasks(output, result.evaluations)
    output.show(f"plot written to [bold]{result.plot}[/]")
