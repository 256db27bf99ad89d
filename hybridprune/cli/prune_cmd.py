"""`hybridprune prune`: masks from cached statistics at one or several sparsities, applied and saved."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from hybridprune import api, ui
from hybridprune.cli.common import (
    BatchOpt,
    CacheDirOpt,
    DataOpt,
    DeviceOpt,
    DocRateOpt,
    DtypeOpt,
    ForceOpt,
    IdfExpOpt,
    JsonOpt,
    MinTokensOpt,
    MlpMethodOpt,
    ModelOpt,
    NsamplesOpt,
    OffloadOpt,
    OptFloat,
    OptStr,
    PresetOpt,
    PresetsFileOpt,
    QActiveOpt,
    QuietOpt,
    RowBoundOpt,
    SeedOpt,
    SeqlenOpt,
    TextFieldOpt,
    TfExpOpt,
    TfidfModeOpt,
    TfKindOpt,
    TopicRateOpt,
    TopicsOpt,
    TrustOpt,
    handle_errors,
)
from hybridprune.cli.output import Output
from hybridprune.config import DEFAULT_EVAL_WINDOWS, GRAM_OFFDIAG, NM_ORDERS, UPDATE_MASKS, default_of
from hybridprune.methods import registry


@handle_errors
def prune(
    model: ModelOpt = None,
    preset: PresetOpt = None,
    presets_file: PresetsFileOpt = None,
    prune_method: Annotated[OptStr, typer.Option("--prune-method", help=f"{registry.choices(registry.METHODS)}.")] = None,
    hybrid_mlp_method: MlpMethodOpt = None,
    nr_tfidf_mode: TfidfModeOpt = None,
    sparsity: Annotated[
        OptStr,
        typer.Option("--sparsity", "--sparsity-ratio", help=f"Target, or a sweep: 0.3,0.5,0.7 (default: the preset's, else {default_of('sparsity')})."),
    ] = None,
    pattern: Annotated[OptStr, typer.Option("--pattern", help="unstructured | N:M (2:4, 4:8) | structured.")] = None,
    attention_method: Annotated[
        OptStr, typer.Option("--attention-method", help=f"With structured: {registry.choices(registry.STRUCTURED_ATTENTION)}.")
    ] = None,
    pruning_last: Annotated[int | None, typer.Option("--pruning-last", help="Prune only the last N decoder layers.")] = None,
    preserve_first: Annotated[OptFloat, typer.Option("--preserve-first", help="Keep this fraction of early layers dense.")] = None,
    weight_exp: Annotated[OptFloat, typer.Option("--weight-exp", help=f"Exponent on |W| in the metric (default {default_of('weight_exp')}).")] = None,
    tf_exp: TfExpOpt = None,
    idf_exp: IdfExpOpt = None,
    tf_kind: TfKindOpt = None,
    nr_min_tokens: MinTokensOpt = None,
    nr_topic_rate: TopicRateOpt = None,
    nr_doc_rate: DocRateOpt = None,
    nr_row_bound: RowBoundOpt = None,
    layer_spread: Annotated[OptFloat, typer.Option("--layer-spread", help="Non-uniform sparsity across layers (OWL outliers).")] = None,
    qk_shift: Annotated[OptFloat, typer.Option("--qk-shift", help="q/k pruned at target+shift, v/o at target-shift.")] = None,
    sequential: Annotated[
        bool | None, typer.Option("--sequential/--dense-stats", help="Original Wanda: inputs from pruned earlier layers.")
    ] = None,
    update: Annotated[
        bool | None,
        typer.Option("--update/--no-update", help="Update kept weights to compensate, from second-order statistics (collected once, then cached)."),
    ] = None,
    update_shrink: Annotated[
        OptFloat, typer.Option("--update-shrink", help="With --update: how far the kept weights move toward the OBS update "
                               f"(1 = the full update, 0 = none; default {default_of('update_shrink')}, chosen across domains).")
    ] = None,
    update_mask: Annotated[
        OptStr, typer.Option("--update-mask", help=f"With --update: {'; '.join(f'{k}: {v}' for k, v in UPDATE_MASKS.items())} "
                             f"(default {default_of('update_mask')}).")
    ] = None,
    nm_order: Annotated[
        OptStr, typer.Option("--nm-order", help=f"N:M hybrid: {'; '.join(f'{k}: {v}' for k, v in NM_ORDERS.items())} "
                             f"(default {default_of('nm_order')}; the saved model is the permuted one, the same function).")
    ] = None,
    refine: Annotated[
        int | None, typer.Option("--refine", help="Improve the masks by up to N weight swaps per row that lower the layer's output "
                                 "error on the calibration inputs (second-order entry; minutes on CPU; with --update add --update-mask fixed).")
    ] = None,
    gram_offdiag: Annotated[
        OptFloat, typer.Option("--gram-offdiag", help="With --refine / --update: weight of the calibration Gram's off-diagonal "
                               "(1 = X^T X as calibrated, 0 = its diagonal only, Wanda's objective; default "
                               f"{GRAM_OFFDIAG['unstructured']}, {GRAM_OFFDIAG['nm']} under N:M). Below 1 the fit depends less "
                               "on the calibration text.")
    ] = None,
    heads_sparsity: Annotated[
        OptFloat, typer.Option("--heads-sparsity", help="With --pattern structured: remove this share of the query heads in every layer.")
    ] = None,
    drop_layers: Annotated[
        int | None, typer.Option("--drop-layers", help="With --pattern structured: remove this many whole decoder layers (lowest block influence).")
    ] = None,
    target_speedup: Annotated[
        OptFloat, typer.Option("--target-speedup", help="With --pattern structured --sparsity 0: plan neurons, heads and layers for "
                               "this prefill speed-up, measured on this machine.")
    ] = None,
    out: Annotated[Path | None, typer.Option("--out", help="Save the pruned model here (a sweep: one subfolder per sparsity).")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a non-empty --out (atomically).")] = False,
    save_format: Annotated[
        str,
        typer.Option("--save-format", help="dense (plain safetensors) | compressed (compressed-tensors sparse bitmask: about 0.6x "
                     "the size at 50%; read back by hybridprune and vLLM, see README)."),
    ] = "dense",
    evaluate: Annotated[bool, typer.Option("--eval", help="Perplexity of each result (and dense) on the test split; a sweep also plots.")] = False,
    eval_windows: Annotated[int, typer.Option("--eval-windows", help="Test windows for --eval.")] = DEFAULT_EVAL_WINDOWS,
    data: DataOpt = None,
    text_field: TextFieldOpt = None,
    nsamples: NsamplesOpt = None,
    seqlen: SeqlenOpt = None,
    seed: SeedOpt = 0,
    topics: TopicsOpt = None,
    q_active: QActiveOpt = None,
    batch_size: BatchOpt = 4,
    dtype: DtypeOpt = "float32",
    device: DeviceOpt = "cpu",
    cache_dir: CacheDirOpt = None,
    force: ForceOpt = False,
    trust_remote_code: TrustOpt = False,
    offload: OffloadOpt = None,
    json_output: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Prune with Wanda (attention) + NeuronRank (MLP) from cached statistics; sweeps reuse one calibration."""
    options = {name: value for name, value in locals().items() if name not in ("json_output", "quiet")}
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
