"""`hybridprune prune`: masks from cached statistics at one or several sparsities, applied and saved."""

from __future__ import annotations

from typing import Any

from hybridprune import api, ui
from hybridprune.cli.common import JsonOpt, QuietOpt, cli_options, handle_errors
from hybridprune.cli.output import Output
from hybridprune.options import PRUNE


@handle_errors
@cli_options(PRUNE)
def prune(json_output: JsonOpt = False, quiet: QuietOpt = False, **options: Any) -> None:
    """Prune with Wanda (attention) + NeuronRank (MLP) from cached statistics; sweeps reuse one calibration."""
    run_prune(Output(json_output, quiet), **options)


@handle_errors
def run_prune(output: Output, **options: Any) -> api.PruneResult:
    """api.prune with the summary tables shown as each point finishes (also the wizard's way to run, so
    its errors and Ctrl-C end the same way as the command's)."""
    result = api.prune(**options, reporter=output.reporter, on_run=lambda run: show_run(output, run))
    output.result(result.to_dict(), lambda: show_sweep(output, result))
    return result


def show_run(output: Output, run: api.PruneRun) -> None:
    config = run.config
    output.show(summary_table(run))
    if config.layer_spread or config.qk_shift or config.pruning_last or config.preserve_first:
        output.show(ui.table("Achieved sparsity per layer (non-uniform allocation)", run.report.layer_columns(), run.report.layer_rows()))


def summary_table(run: api.PruneRun) -> Any:
    """The seed card's summary: attention, MLP and total, pruned / total weights and sparsity."""
    config, report = run.config, run.report
    attention, mlp, total = report.kind("attention"), report.kind("mlp"), report.total
    rows = [
        [f"Attention ({config.attention_label()})", f"{ui.human_count(attention.zeros)}/{ui.human_count(attention.total)}", f"{attention.sparsity:.2%}"],
        [f"MLP ({config.mlp_label()})", f"{ui.human_count(mlp.zeros)}/{ui.human_count(mlp.total)}", f"{mlp.sparsity:.2%}"],
        ["TOTAL", f"{ui.human_count(total.zeros)}/{ui.human_count(total.total)}", f"{total.sparsity:.2%}"],
    ]
    return ui.table(f"📊 {config.prune_method.upper()} PRUNING SUMMARY  (target {config.sparsity:.0%}, {config.pattern})",
                    ["part", "pruned / total weights", "sparsity"], rows)


def show_sweep(output: Output, result: api.PruneResult) -> None:
    """Sparsity vs perplexity (with --eval)."""
    if result.dense_ppl is None:
        return
    dense = result.dense_ppl
    rows = [["dense", "-", "0%", f"{dense:.2f}", "-"]] + [
        [run.record["method"], run.config.pattern, f"{run.report.total.sparsity:.1%}", f"{run.ppl:.2f}", f"{run.ppl - dense:+.2f}"]
        for run in result.runs if run.ppl is not None
    ]
    output.show(ui.table("Perplexity (test split)", ["method", "pattern", "sparsity", "ppl", "Δ vs dense"], rows))
