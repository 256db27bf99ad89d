"""One step of `--refine` at the Llama-3.1-8B gate/up shape (16384 rows of a stacked gate/up chunk, 4096 inputs,
4 swaps per row): each kernel of the step with a fresh [rows, columns] result (the code before 2026-12-06) against
the same kernel writing into memory kept across steps (methods/refine.py now). On this VM a fresh 268 MB result is
page-faulted in at every step, which costs more than the arithmetic.

    .venv/bin/python benchmarks/refine_step.py [--rows 16384] [--columns 4096] [--threads 2]

Prints the median of 5 runs per kernel and the largest difference between the two ways (0 where bit for bit).
The residual update before 2d43f06 (the rows of G gathered per row, then a batched product) took 0.32 s against
0.09 s for the CSR product at Qwen's down_proj shape (1536 x 8960, one thread).
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch

from hybridprune.methods.refine import _add_rows_of_g


def median_seconds(run, repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=16384)
    parser.add_argument("--columns", type=int, default=4096)
    parser.add_argument("--swaps", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows, n, swaps = args.rows, args.columns, args.swaps
    g = torch.randn(n, n)
    w = torch.randn(rows, n)
    residual = torch.randn(rows, n)
    base = torch.randn(rows, n)
    twice_w = 2 * w
    buffer = torch.empty_like(w)
    revive, prune = torch.randint(0, n, (rows, swaps)), torch.randint(0, n, (rows, swaps))
    used = torch.ones(rows, swaps, dtype=torch.bool)
    r = torch.arange(rows)

    def csr_then_index_add() -> torch.Tensor:  # the code before: a fresh [rows, columns] change, then added
        idx = torch.cat([revive, prune], 1)
        values = torch.cat([-torch.gather(w, 1, revive), torch.gather(w, 1, prune)], 1)
        crow = torch.arange(0, rows * 2 * swaps + 1, 2 * swaps)
        change = torch.sparse_csr_tensor(crow, idx.reshape(-1), values.reshape(-1), size=(rows, n)) @ g
        return change

    out_fresh = torch.addcmul(base, twice_w, residual)
    out_kept = torch.addcmul(base, twice_w, residual, out=buffer)
    print(f"shape {rows} x {n}, {args.threads} threads")
    print(f"addcmul, fresh result     {median_seconds(lambda: torch.addcmul(base, twice_w, residual)):.3f} s")
    print(f"addcmul, kept buffer      {median_seconds(lambda: torch.addcmul(base, twice_w, residual, out=buffer)):.3f} s"
          f"  (difference {(out_fresh - out_kept).abs().max():.1e})")
    print(f"topk 16 smallest          {median_seconds(lambda: torch.topk(out_kept, 16, dim=1, largest=False)):.3f} s")
    print(f"topk 16 largest           {median_seconds(lambda: torch.topk(out_kept, 16, dim=1)):.3f} s")
    reference = residual + csr_then_index_add()
    print(f"CSR @ G, fresh change     {median_seconds(csr_then_index_add):.3f} s (+ index_add_ "
          f"{median_seconds(lambda: residual.clone().index_add_(0, r, reference)) - median_seconds(residual.clone):.3f} s)")
    target = residual.clone()
    _add_rows_of_g(target, g, w, r, revive, prune, used)
    print(f"CSR addmm_ into residual  {median_seconds(lambda: _add_rows_of_g(residual, g, w, r, revive, prune, used)):.3f} s"
          f"  (difference {(target - reference).abs().max():.1e})")


if __name__ == "__main__":
    main()
