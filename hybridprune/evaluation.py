"""Measuring a model: perplexity on the benchmark protocol, latency, size, and zero-shot tasks.

Perplexity follows BENCHMARK.md exactly: each non-overlapping window is scored on its own
(tokens 1..L-1 predicted from their prefix inside the window), and PPL = exp(sum of token
NLL / number of predicted tokens). Logits exist for one batch at a time, never for all windows.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from hybridprune.errors import UserError
from hybridprune.latency import time_prefill
from hybridprune.reporting import Reporter, SilentReporter

LM_EVAL_INSTALL = "pip install 'hybridprune[lm-eval]'"


@dataclass(frozen=True)
class PerplexityResult:
    """`tokens` counts predicted tokens (W x (L-1)); `tokens_per_second` counts input tokens (W x L)."""

    ppl: float
    nll: float  # mean negative log-likelihood per predicted token, in nats
    tokens: int
    seconds: float
    tokens_per_second: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.inference_mode()
def perplexity(
    model: nn.Module, windows: torch.Tensor, batch_size: int = 4, reporter: Reporter | None = None
) -> PerplexityResult:
    """exp(mean token NLL) over `windows` [W, L], each window scored independently.

    The loss comes from the model's own logits (so final soft-capping and the like apply), one
    batch at a time, in float32 whatever the model dtype; the sum is accumulated in float64.
    """
    if windows.dim() != 2 or windows.shape[1] < 2:
        raise UserError(f"perplexity needs windows of at least 2 tokens, got shape {tuple(windows.shape)}")
    if batch_size <= 0:
        raise UserError(f"--batch-size must be >= 1, got {batch_size}")
    reporter = reporter or SilentReporter()
    device = model_device(model)
    count, length = windows.shape
    total_nll = 0.0
    start = time.perf_counter()
    with reporter.progress("perplexity", total=count * length) as advance:
        for first in range(0, count, batch_size):
            batch = windows[first : first + batch_size].to(device)
            logits = model(input_ids=batch, use_cache=False).logits
            # label t+1 at position t; the last position predicts nothing (-100 is ignored)
            labels = F.pad(batch[:, 1:], (0, 1), value=-100)
            loss = F.cross_entropy(
                logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=-100, reduction="sum"
            )
            total_nll += float(loss.double())
            del logits, loss
            advance(batch.numel())
    seconds = time.perf_counter() - start
    tokens = count * (length - 1)
    nll = total_nll / tokens
    return PerplexityResult(
        ppl=math.exp(nll), nll=nll, tokens=tokens, seconds=seconds, tokens_per_second=count * length / max(seconds, 1e-9)
    )


def latency(model: nn.Module, seqlen: int, runs: int = 5, warmup: int = 1) -> float:
    """Median seconds of one batch-1 forward over `seqlen` tokens, after `warmup` untimed runs
    (latency.time_prefill, the one prefill timer; latency.measure_latency adds decode)."""

    if runs <= 0 or seqlen <= 0:
        raise UserError(f"latency needs at least one run of at least one token (got {runs} x {seqlen})")
    timings = [time_prefill(model, seqlen) for _ in range(warmup + runs)]
    return statistics.median(timings[warmup:])


def check_vocabulary(model: nn.Module, tokenizer: Any, windows: torch.Tensor) -> None:
    """Refuse a tokenizer that does not belong to the model before it yields nonsense or an index error."""
    rows = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > rows:
        raise UserError(
            f"the tokenizer has {len(tokenizer)} tokens but the model's embedding only {rows} rows: "
            "the folder's tokenizer does not belong to its model"
        )
    highest = int(windows.max())
    if highest >= rows or int(windows.min()) < 0:
        raise UserError(
            f"the text encodes to token id {highest} but the model has {rows} embedding rows: "
            "the tokenizer does not belong to the model"
        )


# --- zero-shot tasks through lm-evaluation-harness ----------------------------------------


@dataclass
class TaskSuite:
    """Task names checked against the harness's registry (and --include-path), ready to run."""

    names: list[str]
    manager: Any  # lm_eval.tasks.TaskManager


def prepare_tasks(names: list[str], include_path: Path | None = None) -> TaskSuite:
    """Validate task names up front, so a typo fails before minutes of perplexity evaluation.

    When every name is defined under `include_path`, the harness's built-in registry (some
    fifteen thousand YAML files, seconds to index) is not scanned; local definitions take
    precedence over built-in ones either way.
    """
    if not names:
        raise UserError("--tasks is empty: give task names such as hellaswag,arc_easy")
    try:
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise UserError(f"--tasks needs lm-evaluation-harness: {LM_EVAL_INSTALL}") from None
    _quiet_harness_logs()
    if include_path is not None and not Path(include_path).is_dir():
        raise UserError(f"--include-path '{include_path}' is not a folder of task YAML files")
    manager = None
    if include_path is not None:
        local = TaskManager(include_path=str(include_path), include_defaults=False)
        if all(name in local.all_tasks for name in names):
            manager = local
    if manager is None:
        manager = TaskManager(include_path=str(include_path) if include_path else None)
    unknown = [name for name in names if name not in manager.all_tasks]
    if unknown:
        raise UserError(
            f"unknown task{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}: use lm-eval task names "
            "(`lm-eval ls tasks`), or --include-path for a folder of your own task YAML files"
        )
    return TaskSuite(names=list(names), manager=manager)


def zero_shot(
    model: nn.Module,
    tokenizer: Any,
    suite: TaskSuite,
    batch_size: int = 4,
    limit: int | None = None,
    show_progress: bool = True,
) -> dict[str, dict[str, float]]:
    """Run the harness's own task definitions on the model in memory: {task: {metric: value}}.

    Metrics are the harness's (acc, acc_norm, ...), with their standard errors as `<metric>_stderr`
    where it computed one. `limit` keeps the first N documents per task (a quick look only).
    """
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    harness_output = contextlib.nullcontext() if show_progress else contextlib.redirect_stderr(io.StringIO())
    with harness_output:
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        try:
            results = simple_evaluate(
                model=lm, tasks=suite.names, task_manager=suite.manager, limit=limit, log_samples=False, bootstrap_iters=1000
            )
        except Exception as err:  # dataset download, malformed YAML: the harness raises many types
            lines = str(err).strip().splitlines()
            raise UserError(
                f"lm-eval could not run {', '.join(suite.names)}: {lines[0] if lines else type(err).__name__}"
            ) from None
    return {task: _metrics(values) for task, values in results["results"].items()}


def _metrics(values: dict[str, Any]) -> dict[str, float]:
    """{"acc,none": 0.5, "acc_stderr,none": "N/A", "alias": ...} -> {"acc": 0.5}."""
    metrics = {}
    for key, value in values.items():
        metric, _, filter_name = key.partition(",")
        if not filter_name or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        name = metric if filter_name == "none" else f"{metric},{filter_name}"
        metrics[name] = float(value)
    return metrics


def _quiet_harness_logs() -> None:
    """The harness warns about passing a model object and the like; our output says what matters."""
    for name in ("lm_eval", "datasets"):
        logging.getLogger(name).setLevel(logging.ERROR)
