"""Masks of Llama-3.1-8B's gate_proj shape: a matrix pruned as one group (NeuronRank's gate/up), rows of many
counts (the bounded rows after it) and plain rows, timed against masks.py at a git revision, the masks compared.

    .venv/bin/python benchmarks/masks_matrix.py REV     # e.g. 18924c7, before the sample's bracket

Random metric [14336, 4096] (uniform times a per-row scale, float32: it ties by the thousand as one group), row
sparsities 0.5 +- 0.05; 2 threads; three rounds, each the revision's then the working tree's.
"""

from __future__ import annotations  # noqa: I001  (hybridprune.env goes before torch)

import sys
import time

import hybridprune.env  # noqa: F401  (the product's environment, torch's huge-page allocation included)
import torch

from common import module_at
from hybridprune import masks


def main(rev: str) -> None:
    before = module_at(rev, "hybridprune/masks.py")
    torch.set_num_threads(2)
    torch.manual_seed(0)
    metric = torch.rand(14336, 4096) * torch.rand(14336, 1)
    rates = 0.5 + (torch.rand(14336, dtype=torch.float64) - 0.5) * 0.1
    cases = {"matrix as one group": lambda m: m.mask_unstructured(metric, 0.5, group="matrix"),
             "rows of many counts": lambda m: m.mask_rows(metric, rates),
             "rows of one count": lambda m: m.mask_unstructured(metric, 0.5)}
    results: dict[tuple[str, str], torch.Tensor] = {}
    for _ in range(3):
        for label, module in ((rev, before), ("working tree", masks)):
            line = []
            for case, run in cases.items():
                started = time.perf_counter()
                results[(label, case)] = run(module)
                line.append(f"{case} {time.perf_counter() - started:.2f} s")
            print(f"{label}: " + " | ".join(line), flush=True)
    same = all(torch.equal(results[(rev, case)], results[("working tree", case)]) for case in cases)
    print("the same masks" if same else "THE MASKS DIFFER")


if __name__ == "__main__":
    main(sys.argv[1])
