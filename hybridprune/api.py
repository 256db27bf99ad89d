"""The Python API: `calibrate`, `score`, `prune`, `evaluate`, the one pipeline of the tool.

The commands (hybridprune/cli), the wizard and the benchmarks all call these functions; a
notebook or a script can too:

    import hybridprune
    result = hybridprune.prune(sparsity=0.5, nr_tfidf_mode="topic", out="pruned/")
    print(result.runs[0].report.total.sparsity, result.runs[0].out)
    scores = hybridprune.evaluate(model="pruned/", baseline="embedded", windows=16)

Keywords are the commands' long option names with underscores (`--nr-tfidf-mode` is
`nr_tfidf_mode`); `--presets` is `presets_file`, `--eval` is `evaluate`, `--latency` is
`latency`. Every keyword left at None takes the preset's value, else the default in
config.py. Progress goes to `reporter` (silent by default); results come back as dataclasses.
Mistakes the user can fix raise hybridprune.errors.UserError with a one-line message.

Heavy modules (torch, transformers) are imported inside the functions, so importing this
module (and `hybridprune --help`) stays light.
"""

from __future__ import annotations

import copy
import dataclasses
import gc
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hybridprune.config import (
    CALIBRATION_FIELDS,
    DEFAULT_DATA,
    DEFAULT_EVAL_WINDOWS,
    PRUNE_FIELDS,
    CalibrationRequest,
    PruneConfig,
    window_length,
)
from hybridprune.errors import UserError
from hybridprune.presets import DEFAULT_PRESET, Preset, get_preset, resolve, yielded
from hybridprune.reporting import Reporter, SilentReporter

if TYPE_CHECKING:
    from hybridprune.calibration.session import CalibrationResult
    from hybridprune.evaluation import PerplexityResult
    from hybridprune.models.loading import LoadedModel
    from hybridprune.sparsity import SparsityReport

PathLike = str | os.PathLike[str]
DENSE_BELOW = 0.01
"""A folder without hybridprune.json whose measured sparsity is below this is called dense."""
LATENCY_RUNS = 5
DECODE_TOKENS = 128


# --- results ----------------------------------------------------------------------------------


@dataclass
class CalibrateResult:
    """One calibration entry in the cache (and the second-order entry with `hessians`)."""

    key: str
    reused: bool
    entry: Path
    bytes: int
    tokens: int
    layers: int
    seconds: float
    inputs: dict[str, Any]
    shard: str | None = None
    full_key: str | None = None
    shard_count: int | None = None
    hessians: dict[str, Any] | None = None
    leader: bool = True  # False on the non-zero ranks of torchrun, which print nothing

    def to_dict(self) -> dict[str, Any]:
        document = {
            "key": self.key, "reused": self.reused, "entry": str(self.entry), "bytes": self.bytes, "tokens": self.tokens,
            "layers": self.layers, "seconds": round(self.seconds, 2), "inputs": self.inputs,
        }
        if self.shard is not None:
            document.update(shard=self.shard, full_key=self.full_key)
        if self.hessians is not None:
            document["hessians"] = self.hessians
        return document


@dataclass
class ScoreResult:
    """Per-layer NeuronRank score summaries, and where the scores were cached."""

    statistics_key: str
    scoring: dict[str, Any]
    scores_file: Path
    sparsity: float
    layers: list[dict[str, Any]]

    def to_dict(self) -> dict[str, Any]:
        return {"statistics_key": self.statistics_key, "scoring": self.scoring, "scores_file": str(self.scores_file),
                "layers": self.layers}


@dataclass
class PruneRun:
    """One pruned model (one point of a sweep)."""

    config: PruneConfig
    preset: str
    statistics_key: str
    statistics_reused: bool
    report: SparsityReport
    record: dict[str, Any]  # what hybridprune.json holds
    out: Path | None = None
    ppl: float | None = None
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**self.record, **({"ppl": self.ppl} if self.ppl is not None else {}),
                **({"out": str(self.out)} if self.out is not None else {}), "seconds": round(self.seconds, 2)}


@dataclass
class PruneResult:
    runs: list[PruneRun]
    preset: Preset | None
    dense_ppl: float | None = None
    plot: Path | None = None
    model: LoadedModel | None = None  # the last pruned model, in memory (None when it was streamed to disk)

    def to_dict(self) -> dict[str, Any]:
        document: dict[str, Any] = {"runs": [run.to_dict() for run in self.runs]}
        if self.dense_ppl is not None:
            document["dense_ppl"] = self.dense_ppl
        return document


@dataclass
class Evaluation:
    """Everything measured on one model; the model itself is released once this exists."""

    role: str  # model | baseline | compare
    label: str  # what the user gave (or "embedded")
    folder: Path
    method: str  # from hybridprune.json, else "dense" or "unknown"
    target_sparsity: float | None
    windows: int
    seqlen: int
    result: PerplexityResult
    sparsity: SparsityReport
    parameters: int
    size_bytes: int
    latency_s: float | None  # prefill: median seconds of a batch-1 forward over seqlen tokens
    tasks: dict[str, dict[str, float]] | None
    decode_tokens_per_second: float | None = None  # greedy, batch 1, KV cache, 128 new tokens

    def to_dict(self) -> dict[str, Any]:
        return {
            "decode_tokens_per_second": self.decode_tokens_per_second,
            "role": self.role, "source": self.label, "folder": str(self.folder), "method": self.method,
            "target_sparsity": self.target_sparsity, "windows": self.windows, "seqlen": self.seqlen,
            "perplexity": self.result.to_dict(), "sparsity": self.sparsity.to_dict(), "parameters": self.parameters,
            "size_bytes": self.size_bytes, "latency_s": self.latency_s, "tasks": self.tasks,
        }


@dataclass
class EvalResult:
    protocol: dict[str, Any]
    evaluations: list[Evaluation]
    compare: bool
    plot: Path | None = None

    @property
    def model(self) -> Evaluation:
        return self.evaluations[0]

    @property
    def baseline(self) -> Evaluation | None:
        return next((e for e in self.evaluations if e.role == "baseline"), None)

    @property
    def dense_ppl(self) -> float | None:
        references = [e for e in self.evaluations if e.role == "baseline"] or [e for e in self.evaluations if e.method == "dense"]
        return references[0].result.ppl if references else None

    def delta(self) -> dict[str, Any] | None:
        """Model minus baseline, by name (never by position)."""
        base = self.baseline
        if base is None or self.compare:
            return None
        model = self.model
        return {
            "ppl": model.result.ppl - base.result.ppl,
            "ppl_relative": (model.result.ppl - base.result.ppl) / base.result.ppl,
            "nll": model.result.nll - base.result.nll,
            **{f"sparsity_{kind}": model.sparsity.kind(kind).sparsity - base.sparsity.kind(kind).sparsity for kind in ("attention", "mlp")},
            "sparsity": model.sparsity.total.sparsity - base.sparsity.total.sparsity,
            "parameters": model.parameters - base.parameters,
            "size_bytes": model.size_bytes - base.size_bytes,
            "throughput_ratio": model.result.tokens_per_second / base.result.tokens_per_second,
            "latency_s": None if model.latency_s is None or base.latency_s is None else model.latency_s - base.latency_s,
            "speedup": None if not model.latency_s or not base.latency_s else base.latency_s / model.latency_s,
            "decode_speedup": None if not model.decode_tokens_per_second or not base.decode_tokens_per_second
            else model.decode_tokens_per_second / base.decode_tokens_per_second,
        }

    def to_dict(self) -> dict[str, Any]:
        if self.compare:
            return {"protocol": self.protocol, "entries": [e.to_dict() for e in self.evaluations], "dense_ppl": self.dense_ppl,
                    "plot": str(self.plot) if self.plot else None}
        document: dict[str, Any] = {"protocol": self.protocol, "model": self.model.to_dict()}
        if self.baseline is not None:
            document["baseline"] = self.baseline.to_dict()
            document["delta"] = self.delta()
        return document


# --- shared steps -----------------------------------------------------------------------------


def configure_torch() -> None:
    """Process-wide settings for the heavy work (HYBRIDPRUNE_THREADS caps the CPU threads)."""
    import torch

    threads = os.environ.get("HYBRIDPRUNE_THREADS")
    if threads:
        torch.set_num_threads(int(threads))


def _root(cache_dir: PathLike | None) -> Path:
    from hybridprune.fsutil import cache_root, ensure_writable_dir

    return ensure_writable_dir(cache_root(cache_dir), "cache folder")


def calibration_request(preset: Preset | None, arguments: dict[str, Any]) -> CalibrationRequest:
    """Calibration inputs from a command's keyword arguments (its `locals()`, read by the
    CalibrationRequest field names): explicit value (not None) > preset > CalibrationRequest's default."""
    explicit = {name: value for name, value in arguments.items() if name in CALIBRATION_FIELDS and value is not None}
    return CalibrationRequest(**{**(preset.calibration if preset else {}), **explicit}).validate()


def choose_streaming(
    offload: bool | None, model: str | None, dtype: str, device: str, root: Path, reporter: Reporter, layerwise: bool = False
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


# --- calibrate --------------------------------------------------------------------------------


def calibrate(
    *,
    model: str | None = None,
    data: str | None = None,
    text_field: str | None = None,
    nsamples: int | None = None,
    seqlen: int | None = None,
    seed: int = 0,
    topics: int | None = None,
    q_active: float | None = None,
    batch_size: int = 4,
    dtype: str = "float32",
    device: str = "cpu",
    cache_dir: PathLike | None = None,
    force: bool = False,
    trust_remote_code: bool = False,
    shard: str | None = None,
    hessians: bool = False,
    offload: bool | None = None,
    reporter: Reporter | None = None,
) -> CalibrateResult:
    """Collect the Wanda and NeuronRank statistics once (cached); `hessians` adds the second-order entry.

    Under torchrun the processes split the windows and rank 0 writes the one entry.
    """
    arguments = dict(locals())  # the calibration inputs by their CalibrationRequest names
    from hybridprune.cache import StatsCache
    from hybridprune.calibration.distributed import World
    from hybridprune.calibration.session import HESSIAN_MODE, calibrated_statistics
    from hybridprune.calibration.shards import ShardSpec
    from hybridprune.models import load_model

    reporter = reporter or SilentReporter()
    configure_torch()
    part = ShardSpec.parse(shard) if shard is not None else None
    with World.joined(device) as world:
        if world is not None and part is not None:
            raise UserError("--shard and torchrun both split the windows: use one of them")
        request = calibration_request(None, arguments)
        root = _root(cache_dir)
        on = str(world.device) if world is not None and world.device.type == "cuda" else device  # one GPU per rank
        streaming = choose_streaming(offload, model, dtype, on, root, reporter, layerwise=True)
        loaded = load_model(model, dtype=dtype, device=on, cache_dir=root, trust_remote_code=trust_remote_code, streaming=streaming)
        cache = StatsCache(root)
        result = calibrated_statistics(loaded, request, cache, reporter, force=force, shard=part, world=world,
                                       with_second_order=hessians)
        second = None
        if hessians:
            second = result.second_order or calibrated_statistics(loaded, request, cache, reporter, force=force, mode=HESSIAN_MODE)
    return CalibrateResult(
        key=result.key.digest,
        reused=result.reused,
        entry=result.entry,
        bytes=_entry_bytes(result.entry),
        tokens=result.stats.tokens,
        layers=result.stats.num_layers,
        seconds=result.seconds,
        inputs=result.key.fields(),
        shard=str(part) if part is not None else None,
        full_key=result.key.full().digest if part is not None else None,
        shard_count=part.count if part is not None else None,
        hessians={"key": second.key.digest, "reused": second.reused, "entry": str(second.entry), "bytes": _entry_bytes(second.entry)}
        if second is not None else None,
        leader=world is None or world.leader,
    )


def _entry_bytes(entry: Path) -> int:
    return sum(path.stat().st_size for path in entry.iterdir()) if entry.is_dir() else 0


# --- score ------------------------------------------------------------------------------------


def score(
    *,
    model: str | None = None,
    preset: str | None = None,
    presets_file: PathLike | None = None,
    hybrid_mlp_method: str | None = None,
    nr_tfidf_mode: str | None = None,
    tf_exp: float | None = None,
    idf_exp: float | None = None,
    tf_kind: str | None = None,
    nr_min_tokens: int | None = None,
    nr_topic_rate: float | None = None,
    nr_doc_rate: float | None = None,
    sparsity: float = 0.5,
    data: str | None = None,
    text_field: str | None = None,
    nsamples: int | None = None,
    seqlen: int | None = None,
    seed: int = 0,
    topics: int | None = None,
    q_active: float | None = None,
    batch_size: int = 4,
    dtype: str = "float32",
    device: str = "cpu",
    cache_dir: PathLike | None = None,
    force: bool = False,
    trust_remote_code: bool = False,
    reporter: Reporter | None = None,
) -> ScoreResult:
    """Per-neuron NeuronRank scores from cached statistics (calibrating first on a miss), cached too."""
    arguments = dict(locals())  # the NeuronRank knobs and calibration inputs by their field names
    from hybridprune.cache import StatsCache
    from hybridprune.calibration.session import calibrated_statistics
    from hybridprune.models import load_model
    from hybridprune.pruning import neuron_scoring
    from hybridprune.scores import compute_scores, save_scores, scores_path, structured_share

    reporter = reporter or SilentReporter()
    configure_torch()
    if not 0.0 <= sparsity < 1.0:
        raise UserError(f"--sparsity must be in [0, 1), got {sparsity:g}")
    chosen = get_preset(preset or DEFAULT_PRESET, _path(presets_file))
    config = resolve({name: value for name, value in arguments.items() if name in PRUNE_FIELDS}, chosen).validate()
    request = calibration_request(chosen, arguments)
    root = _root(cache_dir)
    loaded = load_model(model, dtype=dtype, device=device, cache_dir=root, trust_remote_code=trust_remote_code)
    calibration = calibrated_statistics(loaded, request, StatsCache(root), reporter, force=force)
    scoring = neuron_scoring(config)
    layers = compute_scores(calibration.stats, scoring, loaded)
    path = scores_path(root, calibration.key.digest, scoring)
    save_scores(path, layers)
    rows = []
    for entry, share in zip(layers, structured_share(layers, sparsity)):
        quantiles = entry.scores.quantile(entry.scores.new_tensor([0.1, 0.5, 0.9])).tolist()
        rows.append({
            "layer": entry.layer,
            "tau": calibration.stats.tau(entry.layer),
            "score_p10": quantiles[0], "score_median": quantiles[1], "score_p90": quantiles[2],
            "spread_p90_p10": quantiles[2] / max(quantiles[0], 1e-30),
            "idf_min": float(entry.idf.min()), "idf_max": float(entry.idf.max()),
            "structured_removed_share": share,
        })
    return ScoreResult(calibration.key.digest, dataclasses.asdict(scoring), path, sparsity, rows)


def _path(value: PathLike | None) -> Path | None:
    return Path(value).expanduser() if value is not None else None


# --- prune ------------------------------------------------------------------------------------


def prune(
    *,
    model: str | None = None,
    preset: str | None = None,
    presets_file: PathLike | None = None,
    prune_method: str | None = None,
    hybrid_mlp_method: str | None = None,
    nr_tfidf_mode: str | None = None,
    sparsity: float | str | Sequence[float] | None = None,
    pattern: str | None = None,
    attention_method: str | None = None,
    pruning_last: int | None = None,
    preserve_first: float | None = None,
    weight_exp: float | None = None,
    tf_exp: float | None = None,
    idf_exp: float | None = None,
    tf_kind: str | None = None,
    nr_min_tokens: int | None = None,
    nr_topic_rate: float | None = None,
    nr_doc_rate: float | None = None,
    nr_row_bound: float | None = None,
    layer_spread: float | None = None,
    qk_shift: float | None = None,
    sequential: bool | None = None,
    update: bool | None = None,
    update_shrink: float | None = None,
    update_mask: str | None = None,
    nm_order: str | None = None,
    refine: int | None = None,
    gram_offdiag: float | None = None,
    heads_sparsity: float | None = None,
    drop_layers: int | None = None,
    target_speedup: float | None = None,
    out: PathLike | None = None,
    overwrite: bool = False,
    save_format: str = "dense",
    evaluate: bool = False,
    eval_windows: int = DEFAULT_EVAL_WINDOWS,
    data: str | None = None,
    text_field: str | None = None,
    nsamples: int | None = None,
    seqlen: int | None = None,
    seed: int = 0,
    topics: int | None = None,
    q_active: float | None = None,
    batch_size: int = 4,
    dtype: str = "float32",
    device: str = "cpu",
    cache_dir: PathLike | None = None,
    force: bool = False,
    trust_remote_code: bool = False,
    offload: bool | None = None,
    reporter: Reporter | None = None,
    on_run: Callable[[PruneRun], None] | None = None,
) -> PruneResult:
    """Prune at one sparsity or a sweep, from cached statistics (calibrating once on a miss).

    `out` saves each result (a sweep: one subfolder per point); `evaluate` adds test perplexity
    (and the dense model's; a sweep also plots). `on_run` is called after each point, so a
    caller can show results while a sweep goes on.
    """
    # the PruneConfig knobs and calibration inputs, by the same names (None = from the preset, else the default)
    arguments = dict(locals())
    explicit = {name: value for name, value in arguments.items() if name in PRUNE_FIELDS and name != "sparsity"}
    from hybridprune.cache import StatsCache
    from hybridprune.calibration.session import HESSIAN_MODE, calibrated_statistics
    from hybridprune.export import compress_folder
    from hybridprune.fsutil import atomic_folder
    from hybridprune.models import load_model
    from hybridprune.pruning import (
        SAVE_FORMATS,
        check_output_folder,
        prune_model,
        prune_streaming,
        run_record,
        save_pruned,
        sequential_pruner,
        write_extras,
    )
    from hybridprune.sparsity import sparsity_report

    reporter = reporter or SilentReporter()
    configure_torch()
    chosen = get_preset(preset or DEFAULT_PRESET, _path(presets_file))
    if pruning_last is not None and pruning_last < 1:
        raise UserError(f"--pruning-last must be a number of layers >= 1, got {pruning_last}")
    configs = [resolve({**explicit, "sparsity": value}, chosen).validate() for value in parse_sparsities(sparsity)]
    for line in dict.fromkeys(line for config in configs for line in yielded(explicit, chosen, config)):
        reporter.note(line)
    request = calibration_request(chosen, arguments)
    if eval_windows <= 0:
        raise UserError(f"--eval-windows must be >= 1, got {eval_windows}")
    if save_format not in SAVE_FORMATS:
        raise UserError(f"unknown --save-format '{save_format}': use {' or '.join(SAVE_FORMATS)}")
    if save_format != "dense" and out is None:
        raise UserError(f"--save-format {save_format} is how --out is written: pass --out FOLDER")
    root = _root(cache_dir)
    out_path = _path(out)
    if save_format == "compressed":
        reporter.note("compressed folders load in hybridprune (eval) and vLLM; transformers 5.x cannot decompress them "
                      "itself: `hybridprune decompress FOLDER --out DENSE` makes a plain copy")
    streaming = choose_streaming(offload, model, dtype, device, root, reporter)
    if streaming and out_path is None:
        raise UserError("with --offload the model is pruned and written layer by layer: pass --out FOLDER")
    if streaming and evaluate:
        raise UserError("--eval needs the whole model in memory, which --offload avoids: run `hybridprune eval --model OUT` on the saved folder")
    if streaming and any(c.heads_sparsity or c.drop_layers or c.target_speedup for c in configs):
        raise UserError("--heads-sparsity, --drop-layers and --target-speedup reshape the whole model in memory: drop --offload")

    def load(stream: bool | None = streaming) -> LoadedModel:
        return load_model(model, dtype=dtype, device=device, cache_dir=root, trust_remote_code=trust_remote_code, streaming=stream)

    cache = StatsCache(root)
    dense_stats: CalibrationResult | None = None
    second_order: CalibrationResult | None = None
    pre_calibrate = not streaming and not all(config.sequential for config in configs)
    # Statistics come first, from a model streamed layer by layer where the checkpoint allows it: a cache
    # miss then costs what `calibrate` costs in memory, not the whole model plus activations.
    loaded = load(None) if pre_calibrate and offload is None else load()
    for config in configs:
        config.validate(loaded.num_layers)
    if out_path is not None:
        out_path = check_output_folder(out_path, loaded.folder, overwrite)
    if pre_calibrate:
        needs_second_order = any(config.needs_second_order and not config.sequential for config in configs)
        # one forward pass for both entries when both are missing
        dense_stats = calibrated_statistics(loaded, request, cache, reporter, force=force, with_second_order=needs_second_order)
        if needs_second_order:
            second_order = dense_stats.second_order or calibrated_statistics(
                loaded, request, cache, reporter, force=force, mode=HESSIAN_MODE)
        if loaded.stream is not None:  # it streamed: now the whole model, to prune in memory
            del loaded
            gc.collect()
            loaded = load()
    request = request.for_model(loaded.model)
    sweep = len(configs) > 1
    reporter.phase(f"{configs[0].prune_method.upper()} PRUNING MODE", mode_banner(configs[0], chosen))
    result = PruneResult([], chosen)
    noted = {""}  # notes already shown ('' is no note)
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
                second_order=config.needs_second_order,
            )
            replay = calibration.reused or bool(streaming)  # the cached sequential statistics replay the same masks
            if config.needs_second_order:  # the pass's own second-order sums (pruned inputs), in the same entry
                hessians = calibration.stats
        else:
            if dense_stats is None:
                dense_stats = calibrated_statistics(loaded, request, cache, reporter, force=force)
            calibration = dense_stats
            if config.needs_second_order:
                if second_order is None:
                    second_order = calibrated_statistics(loaded, request, cache, reporter, force=force, mode=HESSIAN_MODE)
                hessians = second_order.stats
        if hessians is not None and (note := config.gram_note(hessians.tokens, dense_width)) not in noted:
            noted.add(note)  # once per run, not once per sweep point
            reporter.note(note)
        target = output_path(out_path, config, sweep) if out_path is not None else None
        if streaming:
            assert target is not None
            with atomic_folder(target, replace=overwrite or sweep) as staging:
                report = prune_streaming(loaded, calibration.stats, config, reporter, staging, hessians)[1]
                record = run_record(config, chosen.name, calibration, report, loaded.source, dense_width, second_order)
                record["save_format"] = save_format
                write_extras(loaded, staging, record)
                if SAVE_FORMATS[save_format]:
                    compress_folder(staging, None, SAVE_FORMATS[save_format])
        else:
            dense_config = copy.deepcopy(loaded.model.config)
            if replay:
                prune_model(loaded, calibration.stats, config, reporter, hessians)
            structure = _structured_step(loaded, calibration.stats, config, hessians, request, root, reporter, dense_config)
            report = sparsity_report(loaded.model, loaded.adapter, dense_intermediate_size=dense_width)
            record = run_record(config, chosen.name, calibration, report, loaded.source, dense_width, second_order)
            if structure is not None:
                record["structure"] = structure
        run = PruneRun(config, chosen.name, calibration.key.digest, calibration.reused, report, record)
        if evaluate:
            run.ppl = heldout_perplexity(loaded, request, eval_windows, root, reporter)
        if target is not None:
            if not streaming:
                record["save_format"] = save_format
                save_pruned(loaded, target, overwrite=overwrite or sweep, metadata=record, compress=SAVE_FORMATS[save_format])
            run.out = target
            reporter.note(f"[green]✓[/] saved {target}")
        run.seconds = time.perf_counter() - started
        result.runs.append(run)
        if on_run is not None:
            on_run(run)
    result.model = None if streaming else loaded
    if evaluate:
        result.dense_ppl = heldout_perplexity(load(), request, eval_windows, root, reporter)
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
        + (f"   first {config.preserve_first:.0%} of layers kept dense" if config.preserve_first else ""),
        f"Preset:    {preset.name if preset else 'none'}" + ("   calibration: sequential (pruned inputs)" if config.sequential else ""),
    ]


def heldout_perplexity(loaded: LoadedModel, request: CalibrationRequest, windows: int, root: Path, reporter: Reporter) -> float:
    """Perplexity on the test split of the calibration text (BENCHMARK.md protocol) of the model in memory."""
    from hybridprune.data import eval_windows, load_text, tokenize
    from hybridprune.evaluation import perplexity

    source = load_text(request.data, split="test", text_field=request.text_field)
    ids = tokenize(source, loaded.tokenizer, cache_dir=root / "tokens")
    seqlen = window_length(request.seqlen, loaded.model)
    return perplexity(loaded.model, eval_windows(ids, seqlen, windows), batch_size=1, reporter=reporter).ppl


# --- evaluate ---------------------------------------------------------------------------------


def evaluate(
    model: str | None = None,
    *,
    compare: Sequence[str] | None = None,
    baseline: str | None = None,
    data: str = DEFAULT_DATA,
    split: str = "test",
    text_field: str | None = None,
    seqlen: int | None = None,
    windows: int | str | None = DEFAULT_EVAL_WINDOWS,
    batch_size: int = 4,
    plot: PathLike | None = None,
    latency: bool = False,
    tasks: str | Sequence[str] | None = None,
    include_path: PathLike | None = None,
    limit: int | None = None,
    dtype: str = "float32",
    device: str = "cpu",
    cache_dir: PathLike | None = None,
    trust_remote_code: bool = False,
    reporter: Reporter | None = None,
    show_task_progress: bool = False,
) -> EvalResult:
    """Perplexity on the benchmark protocol and achieved sparsity of `model`, optionally against a
    `baseline` (deltas), or of several folders (`compare`, plotted against sparsity).

    `windows`: a count, or None / "all" for every complete window of the split. `seqlen` None:
    512, capped by each model's context.
    """
    from hybridprune.data import load_text
    from hybridprune.evaluation import prepare_tasks

    reporter = reporter or SilentReporter()
    configure_torch()
    window_count = parse_windows(windows)
    if seqlen is not None and seqlen < 2:
        raise UserError(f"--seqlen must be at least 2 tokens (one predicted), got {seqlen}")
    if batch_size <= 0:
        raise UserError(f"--batch-size must be >= 1, got {batch_size}")
    if limit is not None and limit <= 0:
        raise UserError(f"--limit must be a positive number of documents, got {limit}")
    names = [name.strip() for name in (tasks.split(",") if isinstance(tasks, str) else tasks or []) if name.strip()]
    if (include_path or limit) and not names:
        raise UserError("--include-path and --limit only apply to --tasks: name the tasks to run")
    compare = list(compare or [])
    if plot is not None and not compare:
        raise UserError("--plot needs --compare FOLDER ...: it draws perplexity against sparsity across folders")
    suite = prepare_tasks(names, _path(include_path)) if names else None
    root = _root(cache_dir)
    source = load_text(data, split, text_field)
    if compare:
        plan = [*([("compare", model)] if model else []), *(("compare", spec) for spec in compare)]
    else:
        plan = [("model", model)]
    if baseline is not None:
        plan.append(("baseline", baseline))
    evaluations = []
    for role, spec in plan:
        evaluations.append(_evaluate_one(
            spec, role, source, seqlen, window_count, batch_size, latency, suite, limit, dtype, device, root,
            trust_remote_code, reporter, show_task_progress,
        ))
    first = evaluations[0]
    protocol = {"data": source.name, "split": source.split, "seqlen": first.seqlen, "windows": first.windows, "batch_size": batch_size}
    result = EvalResult(protocol, evaluations, compare=bool(compare))
    if compare:
        from hybridprune.plotting import plot_sweep

        points = [{"method": e.method, "sparsity": e.sparsity.total.sparsity, "ppl": e.result.ppl}
                  for e in evaluations if e.method != "dense" and e.role != "baseline"]
        title = f"Perplexity vs sparsity: {source.name} ({source.split} split), {first.windows} x {first.seqlen} tokens"
        result.plot = plot_sweep(points, result.dense_ppl, _path(plot) or Path("hybridprune-compare.png"), title)
    return result


def parse_windows(value: int | str | None) -> int | None:
    """'all' or None -> None (every complete window), else a positive count."""
    if value is None or (isinstance(value, str) and value.strip().lower() == "all"):
        return None
    try:
        count = int(value)
    except ValueError:
        raise UserError(f"--windows must be a positive number or 'all', got '{value}'") from None
    if count <= 0:
        raise UserError(f"--windows must be a positive number or 'all', got {count}")
    return count


def _evaluate_one(
    spec: str | None, role: str, source: Any, seqlen: int | None, window_count: int | None, batch_size: int,
    measure_latency: bool, suite: Any, task_limit: int | None, dtype: str, device: str, root: Path,
    trust_remote_code: bool, reporter: Reporter, show_task_progress: bool,
) -> Evaluation:
    from rich.markup import escape

    from hybridprune.data import eval_windows, tokenize
    from hybridprune.evaluation import check_vocabulary, perplexity, zero_shot
    from hybridprune.latency import folder_size, parameter_count
    from hybridprune.latency import measure_latency as time_latency
    from hybridprune.models import load_model
    from hybridprune.pruning import read_metadata
    from hybridprune.sparsity import sparsity_report

    loaded = load_model(spec, dtype=dtype, device=device, cache_dir=root, trust_remote_code=trust_remote_code)
    length = window_length(seqlen, loaded.model)
    ids = tokenize(source, loaded.tokenizer, cache_dir=root / "tokens")
    windows = eval_windows(ids, length, window_count)
    check_vocabulary(loaded.model, loaded.tokenizer, windows)
    metadata = read_metadata(loaded.folder, reporter)
    dense_width = metadata.get("dense_intermediate_size")  # structurally pruned: removed neurons count as zeros
    sparsity = sparsity_report(loaded.model, loaded.adapter, dense_width if isinstance(dense_width, int) else None)
    method = str(metadata.get("method") or ("dense" if sparsity.total.sparsity < DENSE_BELOW else "unknown"))
    target = metadata.get("sparsity")
    reporter.phase(
        escape(f"Evaluating {loaded.source}"),
        [
            escape(f"folder     {loaded.folder}"),
            escape(f"method     {method}" + (f" (target sparsity {target})" if target is not None else "")),
            escape(f"text       {source.name} ({source.split} split), {len(windows)} x {length} tokens"),
            f"sparsity   {sparsity.summary()}",
        ],
    )
    result = perplexity(loaded.model, windows, batch_size, reporter)
    seconds = decode = None
    if measure_latency:
        reporter.note(f"latency: medians of {LATENCY_RUNS} prefills of 1 x {length} tokens and of {DECODE_TOKENS} greedy decoded tokens")
        timed = time_latency({"model": loaded.model}, seqlen=length, new_tokens=DECODE_TOKENS, runs=LATENCY_RUNS)["model"]
        seconds, decode = timed.prefill_seconds, timed.decode_tokens_per_second
    tasks = None
    if suite is not None:
        reporter.phase("Zero-shot tasks (lm-evaluation-harness)", [", ".join(suite.names)])
        tasks = zero_shot(loaded.model, loaded.tokenizer, suite, batch_size=batch_size, limit=task_limit, show_progress=show_task_progress)
    evaluation = Evaluation(
        role=role, label=loaded.source, folder=loaded.folder, method=method,
        target_sparsity=float(target) if isinstance(target, (int, float)) else None,
        windows=len(windows), seqlen=length, result=result, sparsity=sparsity, parameters=parameter_count(loaded.model),
        size_bytes=folder_size(loaded.folder), latency_s=seconds, tasks=tasks, decode_tokens_per_second=decode,
    )
    del loaded
    gc.collect()  # the next model of a comparison should not have to share memory with this one
    return evaluation


# --- decompress -------------------------------------------------------------------------------


def decompress(folder: PathLike, out: PathLike, *, overwrite: bool = False) -> int:
    """A `--save-format compressed` folder rewritten as plain safetensors (bytes written), atomically.

    transformers 5.x needs compressed-tensors >= 0.15, which dropped the sparse bitmask decompressors,
    so it cannot read such a folder itself; hybridprune's loader and vLLM can, and this makes a copy that
    anything loads.
    """
    from hybridprune.export import compression_format, decompress_folder
    from hybridprune.fsutil import atomic_folder
    from hybridprune.pruning import check_output_folder

    source = Path(folder).expanduser()
    if not source.is_dir() or compression_format(source) is None:
        raise UserError(f"'{source}' is not a compressed model folder (written with `prune --save-format compressed`)")
    target = check_output_folder(Path(out), source, overwrite)
    with atomic_folder(target, replace=overwrite) as staging:
        return decompress_folder(source, staging)
