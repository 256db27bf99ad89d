"""Research: shrink the calibration Gram toward its diagonal before swap refinement.

G_a = diag(G) + a * (G - diag(G)). a = 1 is the product's refine; a = 0 makes the objective separable per
weight, whose optimum per row is Wanda's mask (refine then does nothing). Ledoit-Wolf-style shrinkage:
the off-diagonal correlations are what is specific to the calibration text.

Usage (repo root): PYTHONPATH=. python benchmarks/gram_shrink.py CONFIG ALPHA [ALPHA ...]
Rows go to benchmarks/gram_shrink.jsonl (validation halves of benchmarks/domains.py, SmolLM2).
"""
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import validate  # noqa: E402

import hybridprune.pruning as pruning  # noqa: E402
from hybridprune.methods.obs import gram_from_factor  # noqa: E402

OUT = Path(__file__).with_name("gram_shrink.jsonl")


def main() -> None:
    name, alphas = sys.argv[1], [float(a) for a in sys.argv[2:]]
    half = "validation"
    bench = validate.Bench("smollm2", 2)
    config = validate.configs()[name]
    for alpha in alphas:
        def shrunk(factor, alpha=alpha):
            g = gram_from_factor(factor)
            d = torch.diag_embed(g.diagonal())
            return d + alpha * (g - d)
        pruning.gram_from_factor = shrunk
        t = time.time()
        bench.apply(config, 0)
        prune_s = time.time() - t
        for domain in validate.DOMAINS:
            ppl = bench.ppl(domain, half)
            row = dict(config=name, alpha=alpha, domain=domain, half=half, ppl=round(ppl, 4), prune_s=round(prune_s, 1))
            with OUT.open("a") as f:
                f.write(json.dumps(row) + "\n")
            print(row, flush=True)


if __name__ == "__main__":
    main()
