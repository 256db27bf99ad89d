"""What a wizard run will cost, before anything is loaded: a model's size from its config.json and the
calibration time on this machine (the wizard shows both next to its choices)."""

from __future__ import annotations

import functools
import json
import time
from pathlib import Path
from typing import Any

from hybridprune.config import DEFAULT_SEQLEN

SEQLEN = DEFAULT_SEQLEN

# The embedded SmolLM2-135M-Instruct's shape (BENCHMARK.md), so its size is known before it is unpacked.
EMBEDDED_CONFIG = {
    "hidden_size": 576, "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
    "intermediate_size": 1536, "vocab_size": 49152, "tie_word_embeddings": True,
}
EMBEDDED_UNPACK_SECONDS = 20.0  # converting the GGUF once (BENCHMARK.md: about 18 s)
# what collecting the second-order statistics in the same pass adds, in calibration passes (0.64 / 0.60 measured,
# benchmarks/calibrate_one_pass.sh); alone, with the first-order entry cached, they cost 1.3-1.4 passes
SECOND_ORDER_PASSES = 0.6

# BENCHMARK.md: 32 x 512 calibration windows take about 20 s on SmolLM2-135M (134.5M parameters,
# 2 FLOP per parameter and token) on 2 cores; the fallback when no throughput can be measured.
BENCHMARK_FLOPS = 32 * 512 * 2 * 134.5e6 / 20.0  # about 2.2e11 FLOP/s


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return value if isinstance(value, dict) else None


def embedded_ready(cache_dir: str | None) -> bool:
    from hybridprune.fsutil import cache_root
    from hybridprune.models.loading import EMBEDDED_NAME

    return (cache_root(cache_dir) / "models" / EMBEDDED_NAME / "config.json").is_file()


def embedded_config(cache_dir: str | None) -> dict[str, Any]:
    from hybridprune.fsutil import cache_root
    from hybridprune.models.loading import EMBEDDED_NAME

    return read_json(cache_root(cache_dir) / "models" / EMBEDDED_NAME / "config.json") or EMBEDDED_CONFIG


def hub_config(hub_id: str) -> dict[str, Any] | None:
    """The hub model's config.json (a few KB), for its size; None when it cannot be fetched."""
    try:
        from huggingface_hub import hf_hub_download

        return read_json(Path(hf_hub_download(hub_id, "config.json")))
    except Exception:  # noqa: BLE001 - only the estimate is lost
        return None


def parameter_count(config: dict[str, Any] | None) -> int | None:
    """Parameters of a decoder-only transformer from its config alone (no weights read)."""
    if not config:
        return None
    config = config.get("text_config", config) if "hidden_size" not in config else config
    try:
        hidden = int(config["hidden_size"])
        layers = int(config["num_hidden_layers"])
        intermediate = int(config["intermediate_size"])
        vocab = int(config["vocab_size"])
        heads = int(config.get("num_attention_heads") or 1)
        kv_heads = int(config.get("num_key_value_heads") or heads)
        head_dim = int(config.get("head_dim") or hidden // heads)
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        return None
    attention = 2 * hidden * heads * head_dim + 2 * hidden * kv_heads * head_dim
    mlp = 3 * hidden * intermediate
    embeddings = vocab * hidden * (1 if config.get("tie_word_embeddings", True) else 2)
    return layers * (attention + mlp) + embeddings


@functools.lru_cache(maxsize=1)
def machine_flops() -> float:
    """FLOP/s this machine gives right now: float32 matmuls of a decoder MLP's shape for about 0.2 s.

    A forward pass of a small decoder runs close to matmul speed on CPUs (BENCHMARK.md: 32 x 512
    windows of SmolLM2-135M in about 20 s on 2 idle cores, about 2.2e11 FLOP/s), so this measures
    the load of a shared machine too. Falls back to the benchmark's figure if torch is missing.
    """
    try:
        import torch

        left, right = torch.randn(1024, 576), torch.randn(576, 1536)
        left @ right  # warm-up
        started, rounds = time.perf_counter(), 0
        while rounds < 2 or time.perf_counter() - started < 0.2:
            left @ right
            rounds += 1
        return 2.0 * 1024 * 576 * 1536 * rounds / (time.perf_counter() - started)
    except Exception:  # noqa: BLE001 - only the estimate is at stake
        return BENCHMARK_FLOPS


def pass_seconds(parameters: int | None, windows: int, seqlen: int = SEQLEN) -> float:
    """Seconds of one forward pass over `windows` x `seqlen` tokens: tokens x 2 x parameters / throughput."""
    if not parameters:
        return 0.0
    return windows * seqlen * 2.0 * parameters / machine_flops()


def calibration_estimate(parameters: int | None, windows: int, seqlen: int, second_order: bool) -> str:
    """The calibration's cost in words; a preset that refines or updates also collects the second-order
    statistics once, in the same pass: SECOND_ORDER_PASSES calibration passes more."""
    if not parameters:
        return "time unknown"
    seconds = pass_seconds(parameters, windows, seqlen)
    if not second_order:
        return estimate_text(seconds)
    return (f"{estimate_text(seconds * (1 + SECOND_ORDER_PASSES))} "
            "(with the second-order statistics this preset's refine / update needs)")


def estimate_text(seconds: float) -> str:
    """An estimate as words: "a few seconds", "about 20 s", "about 2 min 40 s"."""
    return "a few seconds" if seconds < 5 else f"about {format_seconds(seconds)}"


def format_seconds(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        minutes, rest = divmod(round(seconds), 60)
        return f"{minutes} min" + (f" {rest:02d} s" if rest and minutes < 10 else "")
    return f"{seconds / 3600:.1f} h"


def format_count(parameters: int | None) -> str:
    if not parameters:
        return "size unknown"
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if parameters >= size:
            return f"{parameters / size:.1f}{unit} parameters"
    return f"{parameters} parameters"
