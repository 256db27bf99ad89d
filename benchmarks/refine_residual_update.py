"""The residual update of `--refine` on Qwen's down_proj shape (1536 rows, 8960 inputs, 4 swaps per row):
the rows of G gathered per row then a batched product (the code before 2d43f06) against one CSR x dense product
(methods/obs._rows_of_g_combined). One thread, G row-major.

    .venv/bin/python benchmarks/refine_residual_update.py
Measured at 2d43f06 (2026-12-01), quiet machine: gather + bmm 0.322 s, CSR 0.086 s per step; max difference 3.8e-6.
"""

import time
import warnings

import torch

from hybridprune.methods.obs import _rows_of_g_combined

warnings.filterwarnings("ignore")
torch.set_num_threads(1)
rows, n, swaps = 1536, 8960, 4
g = torch.randn(n, n)
w = torch.randn(rows, n)
revive, prune = torch.randint(0, n, (rows, swaps)), torch.randint(0, n, (rows, swaps))
used = torch.ones(rows, swaps, dtype=torch.bool)
r = torch.arange(rows)


def gathered() -> torch.Tensor:
    idx = torch.cat([revive, prune], 1)
    coef = torch.cat([-torch.gather(w, 1, revive), torch.gather(w, 1, prune)], 1)
    return torch.bmm(coef.unsqueeze(1), g.index_select(0, idx.reshape(-1)).reshape(rows, 2 * swaps, n)).squeeze(1)


reference = gathered()
for name, run in (("gather + bmm", gathered), ("CSR x dense", lambda: _rows_of_g_combined(g, w, r, revive, prune, used))):
    started = time.perf_counter()
    for _ in range(3):
        out = run()
    print(f"{name:14s} {(time.perf_counter() - started) / 3:.3f} s per step, max difference {(out - reference).abs().max():.1e}")
