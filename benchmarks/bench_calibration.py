"""Calibration cost vs a plain forward pass over the same windows, and calibration peak memory.

Targets (issue 2): calibration of 32 x 512 windows <= 1.3x a plain forward pass (with the LM
head, as a user would run the model) and peak RSS < 2x the model's weight bytes. Both ways of
calibrating are measured: layers streamed from the checkpoint (the default of `calibrate`) and the
whole model in memory (`--no-offload`, also what `prune` does on a cache miss).

    .venv/bin/python benchmarks/bench_calibration.py [--repeats 3] [--nsamples 32]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from common import median, run_cli


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=512)
    args = parser.parse_args()
    torch.set_num_threads(2)

    from hybridprune.calibration.collect import CollectionOptions, collect_statistics
    from hybridprune.data import load_text, sample_windows, tokenize
    from hybridprune.models import load_model

    loaded = load_model(None)
    streamed = load_model(None, streaming=True)
    ids = tokenize(load_text("wiki-vital", "calibration"), loaded.tokenizer)
    windows = sample_windows(ids, args.nsamples, args.seqlen, 0)
    seconds: dict[str, list[float]] = {"forward": [], "streamed": [], "in memory": []}
    for _ in range(args.repeats):  # interleaved, so machine noise hits all alike
        started = time.perf_counter()
        with torch.no_grad():
            for start in range(0, len(windows), 4):
                loaded.model(windows[start : start + 4])
        seconds["forward"].append(time.perf_counter() - started)
        for name, model in (("streamed", streamed), ("in memory", loaded)):
            started = time.perf_counter()
            collect_statistics(model.model, model.adapter, windows, CollectionOptions(), batch_size=4, store=model.stream)
            seconds[name].append(time.perf_counter() - started)
    weight_bytes = sum(p.numel() * p.element_size() for p in loaded.model.parameters())
    del loaded, streamed

    peaks = {}
    for name, flag in (("streamed", "--offload"), ("in memory", "--no-offload")):
        with tempfile.TemporaryDirectory() as cache:
            from hybridprune.models.loading import embedded_folder

            Path(cache, "models").symlink_to(embedded_folder().parent)  # reuse the converted model
            _, _, peaks[name] = run_cli(["calibrate", "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen), flag], Path(cache))

    forward = median(seconds["forward"])
    print(f"windows: {args.nsamples} x {args.seqlen}, repeats: {args.repeats}, threads: 2, weights {weight_bytes / 1e6:.0f} MB")
    print(f"plain forward (with LM head): median {forward:.1f}s  {[round(t, 1) for t in seconds['forward']]}")
    for name in ("streamed", "in memory"):
        runs = seconds[name]
        print(f"calibration, {name}: median {median(runs):.1f}s {[round(t, 1) for t in runs]}, "
              f"{median(runs) / forward:.2f}x the forward (target <= 1.3x); peak RSS of `hybridprune calibrate` "
              f"{peaks[name] / 1e6:.0f} MB = {peaks[name] / weight_bytes:.2f}x the weights (target < 2x)")


if __name__ == "__main__":
    main()
