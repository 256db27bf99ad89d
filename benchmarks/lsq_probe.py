"""How far the OBS sweep on a fixed mask is from the mask's least-squares optimum, on real cached Grams.

    .venv/bin/python benchmarks/lsq_probe.py [GRAM_WEIGHT]     # SmolLM2 layers 15 and 3, Wanda masks at 50%

Reads the second-order entry validate.py caches (HYBRIDPRUNE_VALIDATE_CACHE, default /tmp/hpcache/validate;
`python benchmarks/validate.py run --configs quality` writes it). Prints each group's layer error relative to the
mask alone: the sweep (methods/reconstruct.py `reconstruct_with_factor`), conjugate gradients after 5-100 steps
(float32 products, no early stop) and the product's `least_squares` (bfloat16 products where fast, early stop).
One thread; the figures in docs/results.md ("The least-squares update") came from it (weights 0.25, 0.5, 1).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from hybridprune.calibration.second_order import damped_gram
from hybridprune.masks import _keep_all_but_lowest
from hybridprune.methods.admm import objective
from hybridprune.methods.reconstruct import inverse_factor, least_squares, reconstruct_with_factor, resolve_on_support
from hybridprune.methods.refine import shrink_offdiagonal
from hybridprune.models import load_model

CACHE = Path(os.environ.get("HYBRIDPRUNE_VALIDATE_CACHE", "/tmp/hpcache/validate"))
CASES = [(15, "mlp_in", ["gate_proj", "up_proj"]), (15, "down_in", ["down_proj"]),
         (15, "attn_in", ["q_proj", "k_proj", "v_proj"]), (15, "o_in", ["o_proj"]), (3, "down_in", ["down_proj"])]


def main() -> None:
    torch.set_num_threads(1)
    weight_offdiag = float(sys.argv[1]) if len(sys.argv) > 1 else 0.25
    grams = load_file(str(CACHE / "smollm2-wiki-vital-code-hessians-32x512-s0.safetensors"))
    model = load_model(None, dtype="float32").model
    for layer, group, names in CASES:
        gram, dead = damped_gram(grams[f"layer.{layer}.{group}.gram_diag"], grams[f"layer.{layer}.{group}.gram_corr"])
        gram = shrink_offdiagonal(gram, weight_offdiag)
        block = model.model.layers[layer]
        modules = {n: getattr(block.self_attn if n.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else block.mlp, n)
                   for n in names}
        weight = torch.cat([modules[n].weight.detach().float() for n in names])
        keep = _keep_all_but_lowest(weight.abs() * gram.diagonal().sqrt(), torch.full((weight.shape[0],), weight.shape[1] // 2))
        scale = gram.diagonal().sqrt()
        unit = (gram / scale[None] / scale[:, None]).float()
        start = weight * scale
        masked = objective(start, start * keep, unit).sum().item()
        t = time.time()
        swept = reconstruct_with_factor(weight, keep, inverse_factor(gram.double()), dead)
        line = (f"L{layer} {group} {tuple(weight.shape)} a={weight_offdiag}: sweep "
                f"{objective(start, swept * scale, unit).sum().item() / masked:.4f} ({time.time() - t:.2f}s)")
        for steps in (5, 10, 25, 50, 100):
            t = time.time()
            solved = resolve_on_support(unit, start @ unit, keep, start * keep, steps=steps, tolerance=0)
            line += f" | CG{steps} {objective(start, solved, unit).sum().item() / masked:.4f} ({time.time() - t:.2f}s)"
        t = time.time()
        product = least_squares(weight, keep, gram) * scale
        line += f" | least_squares {objective(start, product, unit).sum().item() / masked:.4f} ({time.time() - t:.2f}s)"
        print(line, flush=True)


if __name__ == "__main__":
    main()
