"""`prune`: masks at one sparsity or a sweep, applied and saved (options: hybridprune/options.py PRUNE)."""

from __future__ import annotations

import copy
import gc
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hybridprune.api.common import as_path, cache_folder, calibration_request, choose_streaming, configure_torch
from hybridprune.api.results import PruneResult, PruneRun
from hybridprune.config import PRUNE_FIELDS, SECOND_ORDER_MODES, CalibrationRequest, PruneConfig, window_length
from hybridprune.errors import UserError
from hybridprune.options import PRUNE, Options, api_options
from hybridprune.presets import DEFAULT_PRESET, NO_PRESET, Preset, get_preset, resolve, yielded
from hybridprune.reporting import Reporter, SilentReporter

if TYPE_CHECKING:
    from hybridprune.calibration.session import CalibrationResult
    from hybridprune.models.loading import LoadedModel


def parse_sparsities(value: float | str | Sequence[float] | None) -> list[float | None]:
    """0.5, '0.5', a sweep '0.3,0.5,0.7' or [0.3, 0.5]; None: the preset's sparsity (else the default)."""
    if value is None:
        return [None]
    if isinstance(value, str):
        try:
            values = [float(part) for part in value.split(",") if part.strip()]
        except ValueError:
            raise UserError(f"--sparsity must be a number or a comma list such as 0.3,0.5,0.7, got '{value}'") from None
    elif isinstance(value, (int, float)):
        values = [float(value)]
    else:
        values = [float(part) for part in value]
    if not values:
        raise UserError("--sparsity is empty: give a number such as 0.5")
    for number in values:
        if not 0.0 <= number < 1.0:
            raise UserError(f"--sparsity must be in [0, 1), got {number:g}")
    return list(values)


@api_options(PRUNE, reporter=None, on_run=None)
def prune(o: Options, *, reporter: Reporter | None = None, on_run: Callable[[PruneRun], None] | None = None) -> PruneResult:
    """Prune at one sparsity or a sweep, from cached statistics (calibrating once on a miss).

    `out` saves each result (a sweep: one subfolder per point); `evaluate` adds test perplexity
    (and the dense model's; a sweep also plots). `on_run` is called after each point, so a
    caller can show results while a sweep goes on.
    """
    # the PruneConfig knobs and calibration inputs, by the same names (None = from the preset, else the default)
    explicit = {name: value for name, value in vars(o).items() if name in PRUNE_FIELDS and name != "sparsity"}
    from hybridprune.cache import StatsCache
    from hybridprune.calibration.session import HESSIAN_MODE, calibrated_statistics, calibration_windows
    from hybridprune.export import compress_folder
    from hybridprune.fsutil import atomic_folder
    from hybridprune.masks import parse_pattern
    from hybridprune.models import load_model
    from hybridprune.passes import prune_model, prune_recompute, prune_streaming, sequential_pruner
    from hybridprune.saving import SAVE_FORMATS, check_output_folder, run_record, save_pruned, write_extras
    from hybridprune.sparsity import sparsity_report

    reporter = reporter or SilentReporter()
    configure_torch()
    if o.preset is None and o.prune_method is not None:  # the method as named, not the default preset's extras
        chosen = Preset(NO_PRESET, {}, "--prune-method without --preset")
    else:
        chosen = get_preset(o.preset or DEFAULT_PRESET, as_path(o.presets_file))
    if o.pruning_last is not None and o.pruning_last < 1:
        raise UserError(f"--pruning-last must be a number of layers >= 1, got {o.pruning_last}")
    configs = [resolve({**explicit, "sparsity": value}, chosen).validate() for value in parse_sparsities(o.sparsity)]
    if chosen.name == NO_PRESET:  # after validation: a method that does not exist gets only its error
        reporter.note(f"--prune-method {o.prune_method} without --preset: the method's own defaults (no preset's q/k shift, "
                      "refine or update; add --preset NAME for those)")
    for line in dict.fromkeys(line for config in configs for line in yielded(explicit, chosen, config)):
        reporter.note(line)
    request = calibration_request(chosen, vars(o))
    if o.eval_windows <= 0:
        raise UserError(f"--eval-windows must be >= 1, got {o.eval_windows}")
    if o.save_format not in SAVE_FORMATS:
        raise UserError(f"unknown --save-format '{o.save_format}': use {' or '.join(SAVE_FORMATS)}")
    if o.save_format != "dense" and o.out is None:
        raise UserError(f"--save-format {o.save_format} is how --out is written: pass --out FOLDER")
    root = cache_folder(o.cache_dir)
    out_path = as_path(o.out)
    if o.save_format == "compressed":
        reporter.note("a compressed folder loads only in hybridprune (eval, --model); other loaders refuse it: "
                      "`hybridprune decompress FOLDER --out DENSE` makes a plain copy")
    if o.second_order not in SECOND_ORDER_MODES:
        raise UserError(f"unknown --second-order '{o.second_order}': use {' or '.join(SECOND_ORDER_MODES)}")
    recompute = o.second_order == "recompute"
    if recompute and any(c.needs_second_order and (c.heads_sparsity or c.drop_layers or c.target_speedup
                                                   or parse_pattern(c.pattern).kind == "structured") for c in configs):
        raise UserError("--second-order recompute serves refine and --update of masks; structured removal with --update "
                        "reads the cached entry: drop --second-order recompute")
    streaming = choose_streaming(o.offload, o.model, o.dtype, o.device, root, reporter)
    if streaming and out_path is None:
        raise UserError("with --offload the model is pruned and written layer by layer: pass --out FOLDER")
    if streaming and o.evaluate:
        raise UserError("--eval needs the whole model in memory, which --offload avoids: run `hybridprune eval --model OUT` on the saved folder")
    if streaming and any(c.heads_sparsity or c.drop_layers or c.target_speedup for c in configs):
        raise UserError("--heads-sparsity, --drop-layers and --target-speedup reshape the whole model in memory: drop --offload")

    def load(stream: bool | None = streaming) -> LoadedModel:
        return load_model(o.model, dtype=o.dtype, device=o.device, cache_dir=root, trust_remote_code=o.trust_remote_code, streaming=stream)

    cache = StatsCache(root)
    dense_stats: CalibrationResult | None = None
    second_order: CalibrationResult | None = None
    pre_calibrate = not streaming and not all(config.sequential for config in configs)
    # Statistics come first, from a model streamed layer by layer where the checkpoint allows it: a cache
    # miss then costs what `calibrate` costs in memory, not the whole model plus activations.
    loaded = load(None) if pre_calibrate and o.offload is None else load()
    for config in configs:
        config.validate(loaded.num_layers)
    if out_path is not None:
        out_path = check_output_folder(out_path, loaded.folder, o.overwrite)
    if pre_calibrate:
        needs_second_order = not recompute and any(config.needs_second_order and not config.sequential for config in configs)
        # one forward pass for both entries when both are missing
        dense_stats = calibrated_statistics(loaded, request, cache, reporter, force=o.force, with_second_order=needs_second_order)
        if needs_second_order:
            second_order = dense_stats.second_order or calibrated_statistics(
                loaded, request, cache, reporter, force=o.force, mode=HESSIAN_MODE)
        if loaded.stream is not None:  # it streamed: now the whole o.model, to prune in memory
            del loaded
            gc.collect()
            loaded = load()
    request = request.for_model(loaded.model)
    sweep = len(configs) > 1
    reporter.phase(f"{configs[0].prune_method.upper()} PRUNING MODE", mode_banner(configs[0], chosen))
    result = PruneResult([], chosen)
    noted = {""}  # notes already shown ('' is no note)
    tokens: int | None = None  # the calibration's tokens, counted once: the Gram's default weight follows them
    for number, config in enumerate(configs):
        started = time.perf_counter()
        if number:
            loaded = load()  # a fresh dense o.model for each sweep point
        dense_width = getattr(loaded.model.config, loaded.adapter.intermediate_size_key)
        if config.needs_second_order:
            if tokens is None:
                tokens = (dense_stats.stats.tokens if dense_stats is not None
                          else calibration_windows(loaded, request, root)[0].numel())
            config = config.for_calibration(tokens, dense_width)
        hessians, replay = None, True
        if config.sequential:
            calibration = calibrated_statistics(
                loaded, request, cache, reporter, force=o.force,
                mode=f"sequential:{config.digest}", after_layer=sequential_pruner(loaded, config),
                second_order=config.needs_second_order, dense_targets=config.dense_targets,
            )
            replay = calibration.reused or bool(streaming)  # the cached sequential statistics replay the same masks
            if config.needs_second_order:  # the pass's own second-order sums (pruned inputs), in the same entry
                hessians = calibration.stats
        else:
            if dense_stats is None:  # streamed: both entries in one pass when both are missing
                dense_stats = calibrated_statistics(loaded, request, cache, reporter, force=o.force,
                                                    with_second_order=config.needs_second_order and not recompute)
                second_order = second_order or dense_stats.second_order
            calibration = dense_stats
            if config.needs_second_order and recompute:
                windows = calibration_windows(loaded, request, root)[0]
                if (note := config.gram_note(windows.numel(), dense_width)) not in noted:
                    noted.add(note)
                    reporter.note(note)
            elif config.needs_second_order:
                if second_order is None:
                    second_order = calibrated_statistics(loaded, request, cache, reporter, force=o.force, mode=HESSIAN_MODE)
                hessians = second_order.stats
        if hessians is not None and (note := config.gram_note(hessians.tokens, dense_width)) not in noted:
            noted.add(note)  # once per run, not once per sweep point
            reporter.note(note)
        target = output_path(out_path, config, sweep) if out_path is not None else None
        if streaming:
            assert target is not None
            with atomic_folder(target, replace=o.overwrite or sweep) as staging:
                if config.needs_second_order and recompute and not config.sequential:
                    report = prune_recompute(loaded, calibration.stats, config, reporter, windows, batch_size=request.batch_size,
                                             folder=staging)[1]
                else:
                    report = prune_streaming(loaded, calibration.stats, config, reporter, staging, hessians)[1]
                record = run_record(config, chosen.name, calibration, report, loaded.source, dense_width, second_order)
                record["save_format"] = o.save_format
                if config.needs_second_order and recompute:
                    record["second_order_statistics"] = "recomputed in the pruning pass"
                write_extras(loaded, staging, record)
                if SAVE_FORMATS[o.save_format]:
                    compress_folder(staging, None, SAVE_FORMATS[o.save_format])
        else:
            dense_config = copy.deepcopy(loaded.model.config)
            if config.needs_second_order and recompute and not config.sequential:
                prune_recompute(loaded, calibration.stats, config, reporter, windows, batch_size=request.batch_size)
            elif replay:
                prune_model(loaded, calibration.stats, config, reporter, hessians)
            structure = _structured_step(loaded, calibration.stats, config, hessians, request, root, reporter, dense_config)
            report = sparsity_report(loaded.model, loaded.adapter, dense_intermediate_size=dense_width)
            record = run_record(config, chosen.name, calibration, report, loaded.source, dense_width, second_order)
            if config.needs_second_order and recompute:
                record["second_order_statistics"] = "recomputed in the pruning pass"
            if structure is not None:
                record["structure"] = structure
        run = PruneRun(config, chosen.name, calibration.key.digest, calibration.reused, report, record)
        if o.evaluate:
            run.ppl = heldout_perplexity(loaded, request, o.eval_windows, root, reporter)
        if target is not None:
            if not streaming:
                record["save_format"] = o.save_format
                save_pruned(loaded, target, overwrite=o.overwrite or sweep, metadata=record, compress=SAVE_FORMATS[o.save_format])
            run.out = target
            reporter.note(f"[green]✓[/] saved {target}")
        run.seconds = time.perf_counter() - started
        result.runs.append(run)
        if on_run is not None:
            on_run(run)
    result.model = None if streaming else loaded
    if o.evaluate:
        result.dense_ppl = heldout_perplexity(load(), request, o.eval_windows, root, reporter)
        if sweep:
            from hybridprune.plotting import plot_sweep

            result.plot = (out_path if out_path is not None else Path.cwd()) / "sweep.png"
            rows = [{"method": r.record["method"], "sparsity": r.report.total.sparsity, "ppl": r.ppl} for r in result.runs]
            plot_sweep(rows, result.dense_ppl, result.plot, title="Perplexity vs sparsity")
            reporter.note(f"[green]✓[/] plot written to {result.plot}")
    return result


def _structured_step(
    loaded: LoadedModel, stats: Any, config: PruneConfig, hessians: Any, request: CalibrationRequest, root: Path, reporter: Reporter,
    dense_config: Any,
) -> dict[str, Any] | None:
    """Heads, layers or the --target-speedup plan (planner.apply_structured), with the user told what was removed."""
    if not (config.heads_sparsity or config.drop_layers or config.target_speedup):
        return None
    from hybridprune.calibration.session import calibration_windows
    from hybridprune.planner import apply_structured

    probe = calibration_windows(loaded, request, root)[0][:4] if config.target_speedup else None
    with reporter.progress("structured removal" + (f": planning {config.target_speedup:g}x" if config.target_speedup else ""), 1) as advance:
        summary = apply_structured(loaded, stats, config, hessians, probe_windows=probe, seqlen=window_length(request.seqlen, loaded.model),
                                   dense_config=dense_config)
        advance(1)
    assert summary is not None
    before, after = summary["layers"], summary["heads"]
    reporter.note(
        f"structured: layers {before[0]} -> {before[1]}, query heads {after[0]} -> {after[1]}, MLP width "
        f"{summary['intermediate_size'][0]} -> {summary['intermediate_size'][1]}: {summary['removed_share']:.1%} of the decoder weights removed"
        + (f"; measured prefill {summary['speedup_plan']['measured_ratio']:.2f}x dense" if "speedup_plan" in summary else "")
    )
    return summary


def output_path(out: Path, config: PruneConfig, sweep: bool) -> Path:
    """`out` itself, or one subfolder per sweep point."""
    if not sweep:
        return out
    pattern = config.pattern.replace(":", "of")
    return out / f"{config.prune_method}-{pattern}-s{config.sparsity:g}"


def mode_banner(config: PruneConfig, preset: Preset | None) -> list[str]:
    """The seed card's mode panel: what prunes attention and MLPs, the pattern and the preset."""
    return [
        f"Attention: {config.attention_label()}" + ("  (magnitude × activation)" if config.attention_label() == "Wanda" else ""),
        f"MLP:       {config.mlp_label()}",
        f"Pattern:   {config.pattern}" + (f"   layers: last {config.pruning_last}" if config.pruning_last else "")
        + (f"   first {config.preserve_first:.0%} of layers kept dense" if config.preserve_first else "")
        + (f"   layer spread: target +- {config.layer_spread:g} (OWL)" if config.layer_spread else ""),
        f"Preset:    {preset.name if preset else 'none'}" + ("   calibration: sequential (pruned inputs" + (", dense targets)" if config.dense_targets else ")")
                                                         if config.sequential else ""),
    ]


def heldout_perplexity(loaded: LoadedModel, request: CalibrationRequest, windows: int, root: Path, reporter: Reporter) -> float:
    """Perplexity on the test split of the calibration text (BENCHMARK.md protocol) of the model in memory."""
    from hybridprune.data import eval_windows, load_text, tokenize
    from hybridprune.evaluation import perplexity

    source = load_text(request.data, split="test", text_field=request.text_field)
    ids = tokenize(source, loaded.tokenizer, cache_dir=root / "tokens")
    seqlen = window_length(request.seqlen, loaded.model)
    return perplexity(loaded.model, eval_windows(ids, seqlen, windows), batch_size=1, reporter=reporter).ppl
