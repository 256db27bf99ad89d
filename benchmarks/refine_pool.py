"""The refine's candidate pool: how much of the exact search's error reduction it keeps, and its time.

    .venv/bin/python benchmarks/refine_pool.py real      # real layers of both models, cached Grams
    .venv/bin/python benchmarks/refine_pool.py shapes [REV]   # random matrices at Llama-3.1-8B's shapes, time
    .venv/bin/python benchmarks/refine_pool.py batches   # real layers: as many swaps in fewer, larger steps
    .venv/bin/python benchmarks/refine_pool.py peak [REV]   # peak memory of one 16384 x 4096 chunk's refine
    .venv/bin/python benchmarks/refine_pool.py products  # float32 against bfloat16 matrix products on this CPU
    .venv/bin/python benchmarks/refine_pool.py candidates  # real layers: fewer moves per side paired exactly
    .venv/bin/python benchmarks/refine_pool.py nm        # real layers at 2:4: is the N:M refine at its optimum?

The refine's search scores every weight of a row only every `REFRESH` steps and keeps a pool of each side's moves:
the best of each of `POOL` blocks of columns; the steps between score the pool alone, with the current residual (every
accepted swap still lowers the error by its exact amount). `REFRESH` = 1 is the exact search of every step.

`real`: Wanda masks at 50% and 70% on two layers of SmolLM2 and of Qwen2.5-Coder-1.5B (the second-order entries
validate.py caches, HYBRIDPRUNE_VALIDATE_CACHE, default /tmp/hpcache/validate), Gram shrunk to 0.25 off the diagonal, 50 steps of 4 swaps (the product's settings): the
refined error / unrefined error under each setting, and the time. `shapes`: 50 steps on a 16384 x 4096 chunk of
the 8B gate/up matrix and on its 4096 x 14336 down_proj, 2 threads, the time of each setting (and of the refine at
git revision REV, when given: the code before a change). `batches`: `real`'s cases under the product's pool with
about as many swaps in fewer, larger steps (STEPS), the refined error / unrefined error of each. `peak`: the
process's peak RSS (/proc VmHWM, reset before) above its start while one 16384 x 4096 chunk refines 50 steps, in
[rows, columns] float32 buffers (at revision REV when given). The first residual from G in bfloat16 (measured at
e733f68 with a `precision` mode and a bfloat16 `peak`, not adopted: docs/results.md) is no longer in the refine.
`nm`: SmolLM2's cases at 2:4 under the Gram weighted 0.5 (its default at 32 x 512): Wanda's 2:4 masks refined as the
product does (50 steps of up to REFINE_BATCH_NM swaps) and with 200 steps, then searched further by exact moves of whole groups (each
group's best of its six 2:4 patterns given the rest of the row, the best group per row and step, until none lowers
the error): each one's error / Wanda's, and the exact search alone from Wanda's masks.
`products`: seconds and GFLOPS of a [2048, 4096] x [4096, 4096] product in float32 and bfloat16, 1 and 2 threads.
"""

from __future__ import annotations  # noqa: I001  (hybridprune.env goes before torch)

import itertools
import os
import sys
import time
from pathlib import Path

import hybridprune.env  # noqa: F401  (the product's environment, torch's huge-page allocation included)
import torch
from safetensors import safe_open

from hybridprune.calibration.second_order import damped_gram
from hybridprune.masks import _keep_all_but_lowest, mask_n_m
from hybridprune.methods import refine
from hybridprune.methods.refine import reconstruction_error, shrink_offdiagonal
from hybridprune.models import load_model
from hybridprune.pruning import REFINE_BATCH_NM

CACHE = Path(os.environ.get("HYBRIDPRUNE_VALIDATE_CACHE", "/tmp/hpcache/validate"))
MODELS = {"smollm2": (None, "smollm2-wiki-vital-code-hessians-32x512-s0.safetensors", (3, 15)),
          "qwen": ("/work/models/qwen-coder-1.5b", "qwen-wiki-vital-code-hessians-16x256-s0.safetensors", (4, 20))}
GROUPS = {"attn_in": ("self_attn", ["q_proj", "k_proj", "v_proj"]), "o_in": ("self_attn", ["o_proj"]),
          "mlp_in": ("mlp", ["gate_proj", "up_proj"]), "down_in": ("mlp", ["down_proj"])}
# (REFRESH, POOL): (1, 16) is the exact search (16 candidates); the product's is refine.REFRESH, refine.POOL
SETTINGS = [(1, 16), (4, 128), (4, 64), (8, 128)]


STEPS = [(50, 4), (25, 8), (34, 6)]  # (steps, swaps per step) of about the same number of swaps; (50, 4) the product's


CANDIDATES = [16, 12, 8]  # `candidates`: the moves of each side paired exactly per row and step (16 the product's)


def run(weight, keep, gram, refresh, pool, threads, steps=50, batch=4, candidates=16):
    refine.REFRESH, refine.POOL = refresh, pool
    torch.set_num_threads(threads)
    started = time.perf_counter()
    refined = refine.refine_swaps(weight, keep, gram, steps=steps, batch=batch, candidates=candidates)
    return refined, time.perf_counter() - started


def real_groups():
    """(model, layer, input group, its stacked float32 weight, its damped Gram) of every case in MODELS, from the cache
    validate.py makes (a model without its entry there is skipped, with a line saying so)."""
    for name, (spec, file, layers) in MODELS.items():
        if not (CACHE / file).exists():
            print(f"{name}: no cached second-order entry at {CACHE / file} (benchmarks/validate.py makes it)", flush=True)
            continue
        model = load_model(spec, dtype="float32").model
        with safe_open(str(CACHE / file), "pt") as grams:
            for layer in layers:
                block = model.model.layers[layer]
                for group, (part, names) in GROUPS.items():
                    gram, _ = damped_gram(grams.get_tensor(f"layer.{layer}.{group}.gram_diag"),
                                          grams.get_tensor(f"layer.{layer}.{group}.gram_corr"))
                    yield name, layer, group, torch.cat([getattr(getattr(block, part), n).weight.detach().float()
                                                         for n in names]), gram


def real(batches: bool = False, candidates: bool = False) -> None:
    """Each setting's refined error / unrefined error on real layers (`batches`: the product's pool, STEPS;
    `candidates`: the product's pool and steps, CANDIDATES paired per side)."""
    pool = (refine.REFRESH, refine.POOL)
    if candidates:
        settings = [(*pool, 50, 4, count) for count in CANDIDATES]
    elif batches:
        settings = [(*pool, steps, batch, 16) for steps, batch in STEPS]
    else:
        settings = [(*s, 50, 4, 16) for s in SETTINGS]
    for name, layer, group, weight, gram in real_groups():
        gram = shrink_offdiagonal(gram, 0.25).float()
        for sparsity in (0.5, 0.7):
            pruned = torch.full((weight.shape[0],), int(weight.shape[1] * sparsity))
            keep = _keep_all_but_lowest(weight.abs() * gram.diagonal().sqrt(), pruned)
            before = float(reconstruction_error(weight, keep, gram).sum())
            line, exact = f"{name} L{layer} {group} {tuple(weight.shape)} {sparsity:.0%}:", None
            for refresh, size, steps, batch, count in settings:
                refined, seconds = run(weight, keep, gram, refresh, size, 1, steps, batch, count)
                after = float(reconstruction_error(weight, refined, gram).sum())
                exact = exact if exact is not None else refined
                label = f"C{count}" if candidates else f"S{steps}/B{batch}" if batches else f"R{refresh}/P{size}"
                line += (f" | {label} {after / before:.5f} {seconds:.1f}s"
                         f" ({int((refined != exact).sum())} differ)")
            print(line, flush=True)


def products() -> None:
    for threads in (1, 2):
        torch.set_num_threads(threads)
        for dtype in (torch.float32, torch.bfloat16):
            a, b = torch.randn(2048, 4096).to(dtype), torch.randn(4096, 4096).to(dtype)
            out = torch.empty(2048, 4096, dtype=dtype)
            torch.matmul(a, b, out=out)
            runs = []
            for _ in range(3):
                started = time.perf_counter()
                torch.matmul(a, b, out=out)
                runs.append(time.perf_counter() - started)
            seconds = sorted(runs)[1]
            print(f"{threads} threads, {dtype}: {seconds:.3f} s, {2 * 2048 * 4096 * 4096 / seconds / 1e9:.0f} GFLOPS", flush=True)


def refine_at(rev: str | None):
    """methods/refine.py at git revision `rev` (the working tree's when None)."""
    if not rev:
        return refine
    sys.path.insert(0, str(Path(__file__).parent))
    from common import module_at

    return module_at(rev, "hybridprune/methods/refine.py")


def random_layer(rows: int, columns: int):
    """Weights, their Wanda masks at 50% and a Gram shrunk to 0.25 of random inputs (2048 tokens) at one shape."""
    x = torch.randn(columns, 2048)
    gram = shrink_offdiagonal(x @ x.T / 2048 + 0.01 * torch.eye(columns), 0.25)
    weight = torch.randn(rows, columns)
    keep = _keep_all_but_lowest(weight.abs() * gram.diagonal().sqrt(), torch.full((rows,), columns // 2))
    return weight, keep, gram


def shapes(rev: str | None = None) -> None:
    before = refine_at(rev) if rev else None
    torch.manual_seed(0)
    for rows, columns in ((16384, 4096), (4096, 14336)):
        weight, keep, gram = random_layer(rows, columns)
        before_error = float(reconstruction_error(weight, keep, gram).sum())
        line = f"{rows} x {columns}:"
        if before is not None:
            torch.set_num_threads(2)
            started = time.perf_counter()
            refined = before.refine_swaps(weight, keep, gram, steps=50, batch=4)
            line += (f" | {rev} {time.perf_counter() - started:.1f}s error "
                     f"{float(reconstruction_error(weight, refined, gram).sum()) / before_error:.5f}")
        for refresh, pool in SETTINGS:
            refined, seconds = run(weight, keep, gram, refresh, pool, 2)
            line += f" | R{refresh}/P{pool} {seconds:.1f}s error {float(reconstruction_error(weight, refined, gram).sum()) / before_error:.5f}"
        print(line, flush=True)


def peak(rev: str | None = None) -> None:
    module = refine_at(rev)
    torch.manual_seed(0)
    torch.set_num_threads(2)
    rows, columns = 16384, 4096
    weight, keep, gram = random_layer(rows, columns)
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM back to the current RSS
    start = _status("VmRSS")
    module.refine_swaps(weight, keep, gram, steps=50, batch=4)
    above = _status("VmHWM") - start
    print(f"{rev or 'working tree'}: peak {above / 1e9:.2f} GB above the start = {above / (rows * columns * 4):.1f} "
          f"float32 [{rows}, {columns}] buffers", flush=True)


PATTERNS_2_4 = [[i in kept for i in range(4)] for kept in itertools.combinations(range(4), 2)]  # the six 2:4 groups


def exact_groups(weight, keep, gram, steps: int = 2000):
    """Exact moves of whole 2:4 groups: per row and step, the group and pattern (of six) that lowers the row's error
    (w - w*keep)^T G (w - w*keep) most, until no group's pattern lowers it (float64; a diagnosis, not the product)."""
    patterns = torch.tensor(PATTERNS_2_4)
    w, g, keep = weight.double(), gram.double(), keep.clone()
    rows, groups = w.shape[0], w.shape[1] // 4
    pruned = w * ~keep
    residual = pruned @ g
    blocks = torch.stack([g[4 * k:4 * k + 4, 4 * k:4 * k + 4] for k in range(groups)])  # [groups, 4, 4]
    options = w.view(rows, groups, 1, 4) * (~patterns).double()  # each pattern's pruned part [rows, groups, 6, 4]
    moves = step = 0
    while step < steps:
        step += 1
        change = options - pruned.view(rows, groups, 1, 4)
        delta = (2 * (change * residual.view(rows, groups, 1, 4)).sum(-1)
                 + torch.einsum("rgpi,gij,rgpj->rgp", change, blocks, change))
        best, index = delta.view(rows, -1).min(1)
        moving = (best < -1e-12 * (pruned * residual).sum(1).abs().clamp_min(1e-30)).nonzero().squeeze(1)
        if not len(moving):
            break
        group, pattern = index[moving] // 6, index[moving] % 6
        d = change[moving, group, pattern]
        columns = group.unsqueeze(1) * 4 + torch.arange(4)
        pruned[moving.unsqueeze(1), columns] += d
        residual[moving] += torch.einsum("ki,kin->kn", d, g[columns])
        keep.view(rows, groups, 4)[moving, group] = patterns[pattern]
        moves += len(moving)
    return keep, step, moves


def nm() -> None:
    """`nm`: how far the product's 2:4 refine is from the optimum of exact whole-group moves (SmolLM2's cases)."""
    torch.set_num_threads(1)
    for name, layer, group, weight, gram in real_groups():
        if name != "smollm2":
            continue
        gram = shrink_offdiagonal(gram, 0.5).float()
        keep = mask_n_m(weight.abs() * gram.diagonal().sqrt(), 2, 4)
        before = float(reconstruction_error(weight, keep, gram).sum())

        def ratio(mask, weight=weight, gram=gram, before=before):
            return float(reconstruction_error(weight, mask, gram).sum()) / before

        refined = refine.refine_swaps(weight, keep, gram, steps=50, nm=(2, 4), batch=REFINE_BATCH_NM)
        longer = refine.refine_swaps(weight, keep, gram, steps=200, nm=(2, 4), batch=REFINE_BATCH_NM)
        further, steps, moves = exact_groups(weight, refined, gram)
        alone, alone_steps, _ = exact_groups(weight, keep, gram)
        print(f"smollm2 L{layer} {group} {tuple(weight.shape)} 2:4: refine 50 {ratio(refined):.5f} | refine 200 "
              f"{ratio(longer):.5f} | + exact group moves {ratio(further):.5f} ({moves} moves in {steps} steps) | "
              f"exact group moves from Wanda {ratio(alone):.5f} ({alone_steps} steps)", flush=True)


def _status(key: str) -> int:
    line = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith(key))
    return int(line.split()[1]) * 1024


if __name__ == "__main__":
    if sys.argv[1] == "peak":
        peak(sys.argv[2] if len(sys.argv) > 2 else None)
    elif sys.argv[1] == "products":
        products()
    elif sys.argv[1] == "nm":
        nm()
    elif sys.argv[1] == "shapes":
        shapes(sys.argv[2] if len(sys.argv) > 2 else None)
    else:
        real(batches=sys.argv[1] == "batches", candidates=sys.argv[1] == "candidates")
