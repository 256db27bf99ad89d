# ruff: noqa: E401, E402, E702, I001  (a measurement script kept as it was run)
"""Swap refinement against an earlier revision's: time and masks on real SmolLM2 layers (3, 15, 25; all 7
projections; gram_offdiag 0.5; the product's batches: 4 unstructured, 8 at 2:4), one thread.

Usage: PYTHONPATH=. python benchmarks/refine_search_state.py [REV] (default 8e4dcd4: before 00e600a)
Measured at 00e600a, 2026-12-01 (2 cores shared with a Qwen run, one thread here): unstructured 4.97 s -> 4.24 s, 0 of 10.6M mask
entries differ; 2:4 7.55 s -> 6.21 s, 10 of 10.6M differ (float ties: the pairs are summed in another order).
Measured at b25c2a5, 2026-12-01 (`... refine_search_state.py 31239c7`, three jobs on the 2 cores): the N:M search keeping its swap
constants, 2:4 10.63 s -> 7.60 s (0.71x), 0 of 10.6M entries differ; unstructured unchanged (6.99 / 7.32 s).
"""
import sys, time
import torch
from common import module_at
torch.set_num_threads(1)
from safetensors.torch import load_file
from hybridprune.calibration.stats import CalibrationStats
from hybridprune.masks import mask_n_m, mask_unstructured
from hybridprune.methods.obs import gram_from_factor, reconstruction_error, refine_swaps, shrink_offdiagonal
from hybridprune.models import load_model

rev = sys.argv[1] if len(sys.argv) > 1 else "8e4dcd4"
old = module_at(rev)
h = CalibrationStats(load_file("/tmp/hpcache/validate/smollm2-wiki-vital-code-hessians-32x512-s0.safetensors"))
s = CalibrationStats(load_file("/tmp/hpcache/validate/smollm2-wiki-vital-code-stats-32x512-s0.safetensors"))
loaded = load_model(None)
for nm in (None, (2, 4)):
    batch = 8 if nm else 4
    totals = {"old": 0.0, "new": 0.0, "differ": 0, "entries": 0}
    for li in (3, 15, 25):
        linears = loaded.adapter.linears(loaded.adapter.layers(loaded.model)[li])
        for name, linear in linears.items():
            group = loaded.adapter.input_group(name)
            w = linear.weight.detach()
            g = shrink_offdiagonal(gram_from_factor(h.inverse_factor(li, group)[0]), 0.5).to(w.dtype)
            metric = w.abs() * s.sumsq(li, group).sqrt().to(w.dtype)
            keep = mask_unstructured(metric, 0.5) if nm is None else mask_n_m(metric, *nm)
            t = time.time(); before = old.refine_swaps(w, keep, g, steps=50, nm=nm, batch=batch); totals["old"] += time.time() - t
            t = time.time(); after = refine_swaps(w, keep, g, steps=50, nm=nm, batch=batch); totals["new"] += time.time() - t
            totals["differ"] += int((before != after).sum()); totals["entries"] += after.numel()
            assert float(reconstruction_error(w, after, g).sum()) <= float(reconstruction_error(w, keep, g).sum())
    print("2:4" if nm else "unstructured", f"{rev} {totals['old']:.2f}s  now {totals['new']:.2f}s",
          f"masks differ in {totals['differ']} of {totals['entries']} entries", flush=True)
