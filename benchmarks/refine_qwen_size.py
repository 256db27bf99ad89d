# ruff: noqa: E401, E402, E702, I001  (a measurement script kept as it was run)
"""Swap refinement on Qwen2.5-1.5B-sized matrices (down_proj 1536 x 8960, gate 8960 x 1536; random weights, Gram of
2048 random tokens, shrunk 0.25; 50 steps, batch 4, the product's settings), one thread: time against an earlier
revision's refine_swaps, mask entries that differ, and the refined error of both.

Usage: PYTHONPATH=. python benchmarks/refine_qwen_size.py [REV]   (default HEAD)
Measured at 42b96cd, 2026-12-01 (one thread, the other core busy with a Qwen run), residual in float32 and no recomputation within 50
steps against dcd202b (float64 residual recomputed every 25 steps): 1536 x 8960 18.80 s -> 13.94 s (0.74x), 242 of
13.8M mask entries differ, refined error / unrefined 0.9196823 -> 0.9196827; 8960 x 1536 5.11 s -> 4.63 s (0.91x),
4 entries differ, 0.9815264 both.
"""
import sys, time
import torch
from common import module_at
torch.set_num_threads(1)
from hybridprune.masks import mask_unstructured
from hybridprune.methods.refine import reconstruction_error, refine_swaps, shrink_offdiagonal

rev = sys.argv[1] if len(sys.argv) > 1 else "HEAD"
try:  # the refine moved from methods/obs.py to methods/refine.py on 2026-12-06
    old = module_at(rev, "hybridprune/methods/refine.py")
except Exception:
    old = module_at(rev, "hybridprune/methods/obs.py")
torch.manual_seed(0)
for rows, columns in ((1536, 8960), (8960, 1536)):
    x = torch.randn(columns, 2048)
    g = shrink_offdiagonal((x @ x.T / 2048 + 0.01 * torch.eye(columns)).double(), 0.25)
    w = torch.randn(rows, columns)
    keep = mask_unstructured(w.abs() * g.diagonal().float().sqrt(), 0.5)
    t = time.time(); before = old.refine_swaps(w, keep, g, steps=50, batch=4); t_old = time.time() - t
    t = time.time(); after = refine_swaps(w, keep, g, steps=50, batch=4); t_new = time.time() - t
    e0, e1, e2 = (float(reconstruction_error(w, k, g).sum()) for k in (keep, before, after))
    print(f"{rows} x {columns}: {rev} {t_old:.2f}s  now {t_new:.2f}s ({t_new / t_old:.2f}x)  masks differ in",
          f"{int((before != after).sum())} of {after.numel()}; refined error / unrefined {rev} {e1 / e0:.7f} now {e2 / e0:.7f}",
          flush=True)
