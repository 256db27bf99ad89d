"""`hybridprune prune`: masks from cached statistics at one or several sparsities, applied and saved."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any

import typer

from hybridprune import ui
from hybridprune.cache import StatsCache
from hybridprune.calibration.session import HESSIAN_MODE, CalibrationResult, calibrated_statistics
from hybridprune.cli.common import (
    BatchOpt,
    CacheDirOpt,
    DeviceOpt,
    DtypeOpt,
    ForceOpt,
    JsonOpt,
    ModelOpt,
    QuietOpt,
    SeedOpt,
    TextFieldOpt,
    TrustOpt,
    DataOpt,
    IdfExpOpt,
    MinTokensOpt,
    MlpMethodOpt,
    NsamplesOpt,
    PresetOpt,
    PresetsFileOpt,
    QActiveOpt,
    SeqlenOpt,
    TfExpOpt,
    TfidfModeOpt,
    TfKindOpt,
    TopicRateOpt,
    TopicsOpt,
    OffloadOpt,
    calibration_request,
    choose_streaming,
    configure_torch,
    handle_errors,
    setup_output,
)
from hybridprune.config import PruneConfig
from hybridprune.errors import UserError
from hybridprune.fsutil import atomic_folder, cache_root, ensure_writable_dir
from hybridprune.models import load_model
from hybridprune.presets import DEFAULT_PRESET, Preset, get_preset, resolve
from hybridprune.prune import check_output_folder, prune_model, prune_streaming, save_pruned, sequential_pruner, write_extras
from hybridprune.data import eval_windows, load_text, tokenize
from hybridprune.evaluate import perplexity
from hybridprune.plotting import plot_sweep
from hybridprune.sparsity import SparsityReport, sparsity_report

OptStr = str | None
OptFloat = float | None


def parse_sparsities(text: str) -> list[float]:
    """'0.5' or a sweep '0.3,0.5,0.7'."""
    try:
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise UserError(f"--sparsity must be a number or a comma list such as 0.3,0.5,0.7, got '{text}'") from None
    if not values:
        raise UserError("--sparsity is empty: give a number such as 0.5")
    for value in values:
        if not 0.0 <= value < 1.0:
            raise UserError(f"--sparsity must be in [0, 1), got {value:g}")
    return values


def output_path(out: Path, config: PruneConfig, sweep: bool) -> Path:
    if not sweep:
        return out
    pattern = config.pattern.replace(":", "of")
    return out / f"{config.prune_method}-{pattern}-s{config.sparsity:g}"


def mode_banner(config: PruneConfig, preset: Preset | None) -> list[str]:
    return [
        f"Attention: {config.attention_label()}" + ("  (magnitude × activation)" if config.attention_label() == "Wanda" else ""),
        f"MLP:       {config.mlp_label()}",
        f"Pattern:   {config.pattern}" + (f"   layers: last {config.pruning_last}" if config.pruning_last else "")
        + (f"   first {config.preserve_first:.0%} of layers kept dense" if config.preserve_first else ""),
        f"Preset:    {preset.name if preset else 'none'}" + ("   calibration: sequential (pruned inputs)" if config.sequential else ""),
    ]


@handle_errors
def prune(
    model: ModelOpt = None,
    preset: PresetOpt = None,
    presets_file: PresetsFileOpt = None,
    prune_method: Annotated[OptStr, typer.Option("--prune-method", help="hybrid | wanda | magnitude | neuronrank.")] = None,
    hybrid_mlp_method: MlpMethodOpt = None,
    nr_tfidf_mode: TfidfModeOpt = None,
    sparsity: Annotated[OptStr, typer.Option("--sparsity", "--sparsity-ratio", help="Target, or a sweep: 0.3,0.5,0.7 (default: the preset's, else 0.5).")] = None,
    pattern: Annotated[OptStr, typer.Option("--pattern", help="unstructured | N:M (2:4, 4:8) | structured.")] = None,
    attention_method: Annotated[OptStr, typer.Option("--attention-method", help="With structured: wanda | none.")] = None,
    pruning_last: Annotated[int | None, typer.Option("--pruning-last", help="Prune only the last N decoder layers.")] = None,
    preserve_first: Annotated[OptFloat, typer.Option("--preserve-first", help="Keep this fraction of early layers dense.")] = None,
    weight_exp: Annotated[OptFloat, typer.Option("--weight-exp", help="Exponent on |W| in the metric.")] = None,
    tf_exp: TfExpOpt = None,
    idf_exp: IdfExpOpt = None,
    tf_kind: TfKindOpt = None,
    nr_min_tokens: MinTokensOpt = None,
    nr_topic_rate: TopicRateOpt = None,
    layer_spread: Annotated[OptFloat, typer.Option("--layer-spread", help="Non-uniform sparsity across layers (OWL outliers).")] = None,
    qk_shift: Annotated[OptFloat, typer.Option("--qk-shift", help="q/k pruned at target+shift, v/o at target-shift.")] = None,
    sequential: Annotated[bool | None, typer.Option("--sequential/--dense-stats", help="Original Wanda: inputs from pruned earlier layers.")] = None,
    update: Annotated[bool | None, typer.Option("--update/--no-update", help="Update kept weights to compensate, from second-order statistics (collected once, then cached).")] = None,
    out: Annotated[Path | None, typer.Option("--out", help="Save the pruned model here (a sweep: one subfolder per sparsity).")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a non-empty --out (atomically).")] = False,
    evaluate: Annotated[bool, typer.Option("--eval", help="Perplexity of each result (and dense) on the test split; a sweep also plots.")] = False,
    eval_windows: Annotated[int, typer.Option("--eval-windows", help="Test windows for --eval.")] = 64,
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
    reporter = setup_output(json_output, quiet)
    configure_torch()
    chosen = get_preset(preset or DEFAULT_PRESET, presets_file)
    explicit = dict(
        prune_method=prune_method, hybrid_mlp_method=hybrid_mlp_method, nr_tfidf_mode=nr_tfidf_mode, pattern=pattern,
        attention_method=attention_method, pruning_last=pruning_last, preserve_first=preserve_first,
        weight_exp=weight_exp, tf_exp=tf_exp, idf_exp=idf_exp, tf_kind=tf_kind, nr_min_tokens=nr_min_tokens,
        nr_topic_rate=nr_topic_rate, layer_spread=layer_spread, qk_shift=qk_shift, sequential=sequential, update=update,
    )
    if pruning_last is not None and pruning_last < 1:
        raise UserError(f"--pruning-last must be a number of layers >= 1, got {pruning_last}")
    targets = parse_sparsities(sparsity) if sparsity is not None else [None]  # None: the preset's sparsity, else 0.5
    configs = [resolve({**explicit, "sparsity": value}, chosen).validate() for value in targets]
    request = calibration_request(
        chosen, dict(nsamples=nsamples, seqlen=seqlen, topics=topics, q_active=q_active, data=data),
        text_field, seed, batch_size,
    )
    request.validate()
    if eval_windows <= 0:
        raise UserError(f"--eval-windows must be >= 1, got {eval_windows}")
    root = ensure_writable_dir(cache_root(cache_dir), "cache folder")
    streaming = choose_streaming(offload, model, dtype, device, root, reporter)
    if streaming and out is None:
        raise UserError("with --offload the model is pruned and written layer by layer: pass --out FOLDER")
    if streaming and evaluate:
        raise UserError("--eval needs the whole model in memory, which --offload avoids: run `hybridprune eval --model OUT` on the saved folder")
    load = lambda: load_model(  # noqa: E731
        model, dtype=dtype, device=device, cache_dir=root, trust_remote_code=trust_remote_code, streaming=streaming
    )
    loaded = load()
    request = request.for_model(loaded.model)
    sweep = len(configs) > 1
    if out is not None:
        out = check_output_folder(out, loaded.folder, overwrite)
    for config in configs:
        config.validate(loaded.num_layers)
    reporter.phase(f"{configs[0].prune_method.upper()} PRUNING MODE", mode_banner(configs[0], chosen))
    cache = StatsCache(root)
    results, dense_stats, second_order = [], None, None
    for number, config in enumerate(configs):
        started = time.perf_counter()
        if number:
            loaded = load()  # a fresh dense model for each sweep point
        dense_width = getattr(loaded.model.config, loaded.adapter.intermediate_size_key)
        hessians, replay = None, True
        if config.sequential:
            calibration = calibrated_statistics(
                loaded, request, cache, reporter, force=force,
                mode=f"sequential:{config.digest}", after_layer=sequential_pruner(loaded, config),
            )
            replay = calibration.reused or streaming  # the cached sequential statistics replay the same masks
        else:
            if dense_stats is None:
                dense_stats = calibrated_statistics(loaded, request, cache, reporter, force=force)
            calibration = dense_stats
            if config.update:
                if second_order is None:
                    second_order = calibrated_statistics(loaded, request, cache, reporter, force=force, mode=HESSIAN_MODE)
                hessians = second_order.stats
        if streaming:
            target = output_path(out, config, sweep)
            with atomic_folder(target, replace=overwrite or sweep) as staging:
                report = prune_streaming(loaded, calibration.stats, config, reporter, staging, hessians)[1]
                record = run_record(config, chosen.name, calibration, report, loaded.source, dense_width, second_order)
                write_extras(loaded, staging, record)
        else:
            if replay:
                prune_model(loaded, calibration.stats, config, reporter, hessians)
            report = sparsity_report(loaded.model, loaded.adapter, dense_intermediate_size=dense_width)
            record = run_record(config, chosen.name, calibration, report, loaded.source, dense_width, second_order)
        if not json_output and not quiet:
            ui.console.print(summary_table(config, report))
            if config.layer_spread or config.qk_shift or config.pruning_last or config.preserve_first:
                ui.console.print(ui.table("Achieved sparsity per layer (non-uniform allocation)",
                                          report.layer_columns(), report.layer_rows()))
        if evaluate:
            record["ppl"] = test_perplexity(loaded, request.data, text_field, request.seqlen, eval_windows, root, reporter)
        if out is not None:
            target = output_path(out, config, sweep)
            if not streaming:
                save_pruned(loaded, target, overwrite=overwrite or sweep, metadata=record)
            record["out"] = str(target)
            reporter.note(f"[green]✓[/] saved {target}")
        record["seconds"] = round(time.perf_counter() - started, 2)
        results.append(record)
    document: dict[str, Any] = {"runs": results}
    if evaluate:
        dense = load()
        document["dense_ppl"] = test_perplexity(dense, request.data, text_field, request.seqlen, eval_windows, root, reporter)
        show_sweep(results, document["dense_ppl"], out, json_output or quiet, reporter)
    if json_output:
        ui.emit_json(document)


def run_record(
    config: PruneConfig,
    preset: str,
    calibration: CalibrationResult,
    report: SparsityReport,
    source: str,
    dense_width: int,
    second_order: CalibrationResult | None,
) -> dict[str, Any]:
    """What one pruning run did: saved as hybridprune.json and printed by --json."""
    update = {"key": second_order.key.digest, "reused": second_order.reused} if config.update and second_order else None
    return {
        "method": config.prune_method if config.prune_method != "hybrid" else f"hybrid ({config.mlp_label()})",
        "sparsity": config.sparsity,
        "pattern": config.pattern,
        "config": config.to_dict(),
        "preset": preset,
        "statistics_key": calibration.key.digest,
        "statistics_reused": calibration.reused,
        "calibration": calibration.key.fields(),
        "achieved": report.to_dict(),
        "source_model": source,
        "dense_intermediate_size": dense_width,
        **({"second_order_statistics": update} if update else {}),
    }


def summary_table(config: PruneConfig, report: SparsityReport):
    """The seed card's summary: attention, MLP and total, pruned / total weights and sparsity."""
    attention, mlp, total = report.kind("attention"), report.kind("mlp"), report.total
    rows = [
        [f"Attention ({config.attention_label()})", f"{ui.human_count(attention.zeros)}/{ui.human_count(attention.total)}", f"{attention.sparsity:.2%}"],
        [f"MLP ({config.mlp_label()})", f"{ui.human_count(mlp.zeros)}/{ui.human_count(mlp.total)}", f"{mlp.sparsity:.2%}"],
        ["TOTAL", f"{ui.human_count(total.zeros)}/{ui.human_count(total.total)}", f"{total.sparsity:.2%}"],
    ]
    return ui.table(f"📊 {config.prune_method.upper()} PRUNING SUMMARY  (target {config.sparsity:.0%}, {config.pattern})",
                    ["part", "pruned / total weights", "sparsity"], rows)


def test_perplexity(loaded, data: str, text_field: str | None, seqlen: int, windows: int, root: Path, reporter) -> float:
    """Perplexity on the test split (BENCHMARK.md protocol) of the model in memory."""
    source = load_text(data, split="test", text_field=text_field)
    ids = tokenize(source, loaded.tokenizer, cache_dir=root / "tokens")
    return perplexity(loaded.model, eval_windows(ids, seqlen, windows), batch_size=1, reporter=reporter).ppl


def show_sweep(results: list[dict[str, Any]], dense_ppl: float, out: Path | None, machine_output: bool, reporter) -> None:
    """Sparsity vs perplexity table, and the plot next to the outputs (or in the working folder)."""
    rows = [{"method": r["method"], "sparsity": r["achieved"]["total"]["sparsity"], "ppl": r["ppl"]} for r in results]
    if not machine_output:
        ui.console.print(ui.table("Perplexity (test split)", ["method", "pattern", "sparsity", "ppl", "Δ vs dense"],
                                  [["dense", "-", "0%", f"{dense_ppl:.2f}", "-"]]
                                  + [[r["method"], r["pattern"], f"{r['achieved']['total']['sparsity']:.1%}", f"{r['ppl']:.2f}",
                                      f"{r['ppl'] - dense_ppl:+.2f}"] for r in results]))
    if len(results) > 1:
        plot = (out if out is not None else Path.cwd()) / "sweep.png"
        plot_sweep(rows, dense_ppl, plot, title="Perplexity vs sparsity")
        reporter.note(f"[green]✓[/] plot written to {plot}")
