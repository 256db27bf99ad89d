"""`evaluate`: perplexity, sparsity, latency and zero-shot tasks of one model, a model and its baseline, or
several folders (options: hybridprune/options.py EVALUATE)."""

from __future__ import annotations

import gc
from pathlib import Path
from typing import Any

from hybridprune.api.common import as_path, cache_folder, configure_torch
from hybridprune.api.results import EvalResult, Evaluation
from hybridprune.config import window_length
from hybridprune.errors import UserError
from hybridprune.options import EVALUATE, Options, api_options
from hybridprune.reporting import Reporter, SilentReporter

DENSE_BELOW = 0.01
"""A folder without hybridprune.json whose measured sparsity is below this is called dense."""
LATENCY_RUNS = 5
DECODE_TOKENS = 128


@api_options(EVALUATE, reporter=None, show_task_progress=False)
def evaluate(o: Options, *, reporter: Reporter | None = None, show_task_progress: bool = False) -> EvalResult:
    """Perplexity on the benchmark protocol and achieved sparsity of `model`, optionally against a
    `baseline` (deltas), or of several folders (`compare`, plotted against sparsity).

    `windows`: a count, or None / "all" for every complete window of the split. `seqlen` None:
    512, capped by each model's context.
    """
    from hybridprune.data import load_text
    from hybridprune.evaluation import prepare_tasks

    reporter = reporter or SilentReporter()
    configure_torch()
    window_count = parse_windows(o.windows)
    if o.seqlen is not None and o.seqlen < 2:
        raise UserError(f"--seqlen must be at least 2 tokens (one predicted), got {o.seqlen}")
    if o.batch_size <= 0:
        raise UserError(f"--batch-size must be >= 1, got {o.batch_size}")
    if o.limit is not None and o.limit <= 0:
        raise UserError(f"--limit must be a positive number of documents, got {o.limit}")
    names = [name.strip() for name in (o.tasks.split(",") if isinstance(o.tasks, str) else o.tasks or []) if name.strip()]
    if (o.include_path or o.limit) and not names:
        raise UserError("--include-path and --limit only apply to --tasks: name the tasks to run")
    compare = list(o.compare or [])
    if o.plot is not None and not compare:
        raise UserError("--plot needs --compare FOLDER ...: it draws perplexity against sparsity across folders")
    suite = prepare_tasks(names, as_path(o.include_path)) if names else None
    root = cache_folder(o.cache_dir)
    source = load_text(o.data, o.split, o.text_field)
    if compare:
        plan = [*([("compare", o.model)] if o.model else []), *(("compare", spec) for spec in compare)]
    else:
        plan = [("model", o.model)]
    if o.baseline is not None:
        plan.append(("baseline", o.baseline))
    evaluations = []
    for role, spec in plan:
        evaluations.append(_evaluate_one(
            spec, role, source, o.seqlen, window_count, o.batch_size, o.latency, suite, o.limit, o.dtype, o.device, root,
            o.trust_remote_code, reporter, show_task_progress,
        ))
    first = evaluations[0]
    protocol = {"data": source.name, "split": source.split, "seqlen": first.seqlen, "windows": first.windows, "batch_size": o.batch_size}
    result = EvalResult(protocol, evaluations, compare=bool(compare))
    if compare:
        from hybridprune.plotting import plot_sweep

        points = [{"method": e.method, "sparsity": e.sparsity.total.sparsity, "ppl": e.result.ppl}
                  for e in evaluations if e.method != "dense" and e.role != "baseline"]
        title = f"Perplexity vs sparsity: {source.name} ({source.split} split), {first.windows} x {first.seqlen} tokens"
        result.plot = plot_sweep(points, result.dense_ppl, as_path(o.plot) or Path("hybridprune-compare.png"), title)
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
    from hybridprune.saving import read_metadata
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
