# ruff: noqa: E402, I001  (a measurement script kept as it was run)
"""Swap refinement on Qwen2.5-1.5B-sized matrices (down_proj 1536 x 8960, gate 8960 x 1536; random weights, Gram of
2048 random tokens, shrunk 0.25; 50 steps, batch 4, the product's settings), one thread: time against an earlier
revision's refine_swaps, mask entries that differ, and the refined error of both.

Usage: PYTHONPATH=. python benchmarks/research/refine_qwen_size.py [REV]   (default HEAD)
"""
import importlib.util, subprocess, sys, tempfile, time
import torch
torch.set_num_threads(1)
from hybridprune.masks import mask_unstructured
from hybridprune.methods.obs import reconstruction_error, refine_swaps, shrink_offdiagonal

rev = sys.argv[1] if len(sys.argv) > 1 else "HEAD"
source = subprocess.run(["git", "show", f"{rev}:hybridprune/methods/obs.py"], check=True, capture_output=True, text=True).stdout
path = tempfile.NamedTemporaryFile("w", suffix=".py", delete=False)
path.write(source); path.close()
spec = importlib.util.spec_from_file_location("obs_old", path.name)
old = importlib.util.module_from_spec(spec); spec.loader.exec_module(old)
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
