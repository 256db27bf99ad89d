"""Structured MLP pruning speed-up and the cost of the evaluation pass.

Also: how long masks for all decoder matrices take from cached statistics (issue 3).
Targets: structured 50% MLP forward latency (batch 1 x 512) <= 0.8x dense, measured side by side
(issue 3); the perplexity pass <= 1.1x a plain forward pass over the same windows (issue 4).

    .venv/bin/python benchmarks/bench_latency.py [--runs 7]
"""

from __future__ import annotations

import argparse
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--windows", type=int, default=16)
    args = parser.parse_args()
    torch.set_num_threads(2)

    from hybridprune.cache import StatsCache
    from hybridprune.calibration.session import CalibrationRequest, calibrated_statistics
    from hybridprune.config import PruneConfig
    from hybridprune.data import eval_windows, load_text, tokenize
    from hybridprune.evaluation import latency, perplexity
    from hybridprune.fsutil import cache_root
    from hybridprune.models import load_model
    from hybridprune.passes import prune_model
    from hybridprune.reporting import SilentReporter

    dense = load_model(None)
    stats = calibrated_statistics(dense, CalibrationRequest(), StatsCache(cache_root()), SilentReporter()).stats
    timings = []
    for _ in range(3):
        unstructured = load_model(None)
        started = time.perf_counter()
        prune_model(unstructured, stats, PruneConfig().validate(), SilentReporter())
        timings.append(time.perf_counter() - started)
    del unstructured
    print(f"masks + apply for all 210 decoder matrices from cached statistics (balanced, 50%): "
          f"median {sorted(timings)[1]:.2f}s of {[round(t, 2) for t in timings]}")
    pruned = load_model(None)
    prune_model(pruned, stats, PruneConfig(pattern="structured", sparsity=0.5, attention_method="none").validate(), SilentReporter())
    dense_times, pruned_times = [], []
    for _ in range(3):  # alternate, so load on the machine hits both alike
        dense_times.append(latency(dense.model, 512, runs=args.runs))
        pruned_times.append(latency(pruned.model, 512, runs=args.runs))
    d, p = sorted(dense_times)[1], sorted(pruned_times)[1]
    print(f"latency batch 1 x 512, median of {args.runs} runs, median of 3 rounds: dense {d * 1000:.0f} ms, "
          f"structured 50% MLP neurons (attention dense) {p * 1000:.0f} ms, ratio {p / d:.2f} (target <= 0.8)")

    windows = eval_windows(tokenize(load_text("wiki-vital", "test"), dense.tokenizer), 512, args.windows)
    plain, scored = [], []
    for _ in range(3):
        started = time.perf_counter()
        with torch.no_grad():
            for window in windows:
                dense.model(window.unsqueeze(0))
        plain.append(time.perf_counter() - started)
        scored.append(perplexity(dense.model, windows, 1, SilentReporter()).seconds)
    print(f"{args.windows} test windows: plain forward {sorted(plain)[1]:.1f}s, perplexity pass {sorted(scored)[1]:.1f}s, "
          f"ratio {sorted(scored)[1] / sorted(plain)[1]:.2f} (target <= 1.1)")


if __name__ == "__main__":
    main()
