"""Latency of a model: prefill (batch 1 x seqlen forward) and decode (greedy tokens/s with the KV cache).

Machines are shared and noisy, so every number is a median of several timed runs after warm-up,
and comparisons (`measure_latency` with several models) interleave the models run by run so that
a burst of load elsewhere hits all of them alike; ratios taken inside one call are what to publish.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hybridprune.errors import UserError


def parameter_count(model: nn.Module) -> int:
    """Parameters, each shared tensor (a tied LM head) once."""
    return sum(p.numel() for p in model.parameters())


def folder_size(folder: Path) -> int:
    """Bytes of every file under `folder` (what a copy of the model costs on disk)."""
    return sum(path.stat().st_size for path in Path(folder).rglob("*") if path.is_file())


@dataclass
class LatencyResult:
    """Medians over `runs`; decode excludes the prompt's prefill."""

    prefill_seconds: float  # one forward over batch 1 x seqlen, no cache
    prefill_tokens_per_second: float
    decode_tokens_per_second: float | None  # greedy, batch 1, KV cache, after a prompt of `prompt_tokens`
    decode_ms_per_token: float | None
    seqlen: int
    new_tokens: int
    prompt_tokens: int
    runs: int
    parameters: int
    folder_bytes: int | None = None
    prefill_all: list[float] = field(default_factory=list)
    decode_all: list[float] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _ids(model: nn.Module, length: int, seed: int = 0) -> torch.Tensor:
    vocab = model.get_input_embeddings().num_embeddings
    return torch.randint(0, vocab, (1, length), generator=torch.Generator().manual_seed(seed)).to(_device(model))


@torch.inference_mode()
def time_prefill(model: nn.Module, seqlen: int = 512) -> float:
    """Seconds of one batch-1 forward over `seqlen` tokens (no cache), logits included."""
    ids = _ids(model, seqlen)
    device = _device(model)
    _sync(device)
    start = time.perf_counter()
    model(input_ids=ids, use_cache=False)
    _sync(device)
    return time.perf_counter() - start


@torch.inference_mode()
def time_decode(model: nn.Module, new_tokens: int = 128, prompt_tokens: int = 16) -> float:
    """Seconds to generate `new_tokens` greedily one at a time with the KV cache (prompt prefill excluded).

    A plain loop (argmax, feed back, reuse past_key_values) rather than generate(): no stopping
    criteria, no EOS, exactly `new_tokens` steps, the same work for every model.
    """
    if new_tokens <= 0:
        raise UserError(f"decode needs at least one new token, got {new_tokens}")
    device = _device(model)
    ids = _ids(model, prompt_tokens, seed=1)
    out = model(input_ids=ids, use_cache=True)
    past = _cache_of(out)
    token = out.logits[:, -1:].argmax(-1)
    _sync(device)
    start = time.perf_counter()
    for _ in range(new_tokens):
        out = model(input_ids=token, use_cache=True, **{_CACHE_ARGUMENT: past})
        past = _cache_of(out)
        token = out.logits[:, -1:].argmax(-1)
    _sync(device)
    return time.perf_counter() - start


def _cache_argument() -> str:
    """transformers >= 5.2x names the KV cache `cache` (past_key_values is deprecated); older 5.x `past_key_values`."""
    import inspect

    from transformers import LlamaForCausalLM

    return "cache" if "cache" in inspect.signature(LlamaForCausalLM.forward).parameters else "past_key_values"


_CACHE_ARGUMENT = _cache_argument()


def _cache_of(output: Any) -> Any:
    cache = getattr(output, "cache", None)
    return cache if cache is not None else getattr(output, "past_key_values", None)



def measure_latency(
    models: dict[str, nn.Module],
    seqlen: int = 512,
    new_tokens: int = 128,
    prompt_tokens: int = 16,
    runs: int = 5,
    warmup: int = 1,
    decode: bool = True,
    folders: dict[str, Path | None] | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, LatencyResult]:
    """Prefill and decode latency of each model, interleaved run by run (medians of `runs` after `warmup`).

    Backs `eval --latency` (one model, or the model and its --compare baseline: then read the ratios
    from the same call). `folders` adds each model's folder size on disk.
    """
    if runs <= 0 or seqlen <= 0:
        raise UserError(f"latency needs at least one run of at least one token (got {runs} x {seqlen})")
    prefill: dict[str, list[float]] = {name: [] for name in models}
    decoded: dict[str, list[float]] = {name: [] for name in models}
    for step in range(warmup + runs):
        for name, model in models.items():
            if progress:
                progress(f"{name}: run {step + 1}/{warmup + runs}")
            seconds = time_prefill(model, seqlen)
            if step >= warmup:
                prefill[name].append(seconds)
        if decode:
            for name, model in models.items():
                seconds = time_decode(model, new_tokens, prompt_tokens)
                if step >= warmup:
                    decoded[name].append(seconds)
    results = {}
    for name, model in models.items():
        median_prefill = statistics.median(prefill[name])
        median_decode = statistics.median(decoded[name]) if decode else None
        folder = (folders or {}).get(name)
        results[name] = LatencyResult(
            prefill_seconds=median_prefill,
            prefill_tokens_per_second=seqlen / median_prefill,
            decode_tokens_per_second=new_tokens / median_decode if median_decode else None,
            decode_ms_per_token=1000 * median_decode / new_tokens if median_decode else None,
            seqlen=seqlen,
            new_tokens=new_tokens,
            prompt_tokens=prompt_tokens,
            runs=runs,
            parameters=parameter_count(model),
            folder_bytes=folder_size(folder) if folder is not None else None,
            prefill_all=prefill[name],
            decode_all=decoded[name],
        )
    return results


def paired_prefill_ratios(
    baseline: nn.Module, models: dict[str, nn.Module], seqlen: int = 512, runs: int = 5, warmup: int = 1,
    statistic: str = "median",
) -> tuple[float, dict[str, float]]:
    """(baseline prefill seconds, {name: its time relative to the baseline's}).

    Each run times the baseline and every model back to back. `statistic` "median": median baseline
    time and median of the per-run ratios (a burst of load mostly cancels within a run); "min": the
    ratio of the fastest runs (the least disturbed ones: best on a heavily shared machine).
    """
    base_times: list[float] = []
    ratios: dict[str, list[float]] = {name: [] for name in models}
    for step in range(warmup + runs):
        for name, model in models.items():
            base = time_prefill(baseline, seqlen)
            seconds = time_prefill(model, seqlen)
            if step >= warmup:
                base_times.append(base)
                ratios[name].append(seconds / base)
    if statistic == "min":
        fastest = min(base_times)
        return fastest, {name: min(r * b for r, b in zip(values, base_times)) / fastest for name, values in ratios.items()}
    return statistics.median(base_times), {name: statistics.median(values) for name, values in ratios.items()}


def latency_ratios(results: dict[str, LatencyResult], baseline: str) -> dict[str, dict[str, float]]:
    """Each model relative to `baseline`: prefill time ratio (lower is faster), decode speed-up, size ratio."""
    base = results[baseline]
    ratios = {}
    for name, result in results.items():
        entry = {"prefill_time_ratio": result.prefill_seconds / base.prefill_seconds}
        if result.decode_tokens_per_second and base.decode_tokens_per_second:
            entry["decode_speedup"] = result.decode_tokens_per_second / base.decode_tokens_per_second
        if result.folder_bytes and base.folder_bytes:
            entry["size_ratio"] = result.folder_bytes / base.folder_bytes
        ratios[name] = entry
    return ratios
