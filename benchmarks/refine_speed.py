# ruff: noqa: E401, E402, E702, I001  (a measurement script kept as it was run)
"""Swap refinement cost and error by steps and swaps per step, on SmolLM2 layer 10 (validate.py caches, wiki-vital+code).

Usage: PYTHONPATH=. python benchmarks/refine_speed.py
"""
import sys, time, torch
sys.path.insert(0, "benchmarks")
torch.set_num_threads(1)
from safetensors.torch import load_file
from hybridprune.calibration.stats import CalibrationStats
from hybridprune.models import load_model
from hybridprune.methods.obs import gram_from_factor, shrink_offdiagonal, refine_swaps, reconstruction_error
from hybridprune.masks import mask_unstructured
h = CalibrationStats(load_file("/tmp/hpcache/validate/smollm2-wiki-vital-code-hessians-32x512-s0.safetensors"))
s = CalibrationStats(load_file("/tmp/hpcache/validate/smollm2-wiki-vital-code-stats-32x512-s0.safetensors"))
loaded = load_model(None)
layer = loaded.adapter.layers(loaded.model)[10]
lin = loaded.adapter.linears(layer)
for name in ("gate_proj", "down_proj", "q_proj"):
    group = loaded.adapter.input_group(name)
    w = lin[name].weight.detach()
    g = shrink_offdiagonal(gram_from_factor(h.inverse_factor(10, group)[0]), 0.5)
    keep = mask_unstructured(w.abs() * s.sumsq(10, group).sqrt().to(w.dtype), 0.5)
    e0 = float(reconstruction_error(w, keep, g).sum())
    for steps, batch in ((25, 1), (50, 1), (100, 1), (100, 4), (100, 8), (25, 8)):
        t = time.time(); k = refine_swaps(w, keep, g.to(w.dtype), steps=steps, batch=batch); dt = time.time() - t
        print(name, steps, batch, f"{dt:.2f}s", f"err {float(reconstruction_error(w, k, g).sum())/e0:.4f}", flush=True)
