"""How many conjugate-gradient steps the least-squares update takes, and what stopping earlier would leave.

    python benchmarks/lsq_steps.py [SHAPE [RANK]]   # SHAPE from benchmarks/scale.py (default llama8b), RANK the
                                                    # preconditioner's eigen-directions (default the product's; 0: the diagonal)
    python benchmarks/lsq_steps.py real         # real layers: the steps under each preconditioner
    python benchmarks/lsq_steps.py dots         # the steps' per-row dot products: vecdot against row_dots

SHAPE: builds scale.py's random-initialised layer of the published shape (bfloat16), collects its statistics from
8 x 512 random tokens, and runs `quality`'s `prune_layer` on it with `resolve_on_support` traced: per solve (one
chunk of rows), the steps the product's stopping rule took and their seconds, then (untimed) the share of the
converged objective decrease reached after 1, 2, 3, 4, 6, 8, 12 and 25 steps without early stop. (Before
2026-12-07's spectral preconditioner this printed one step fewer than were taken.)

real: the cached second-order entries of SmolLM2 and Qwen2.5-Coder-1.5B that validate.py makes (refine_pool.py's
layers and groups, the first 1024 rows of each group), Wanda masks at 50% under the 0.25-shrunk Gram (the update's
for unstructured) and at 2:4 under the 0.5-shrunk one (N:M's); per preconditioner (the diagonal alone, and with the
Gram's 8, 16 or 32 largest eigen-directions, `gram_spectrum`) the steps the product's stopping rule takes, in float32,
and the share of the converged decrease (60 steps, rank 32, no early stop) it reaches; the spectrum's seconds.

dots: milliseconds per call (the best of three medians of five) of the per-row dot products of two float32 [rows, n]
matrices at the 8B update's shapes, torch.linalg.vecdot, (a * b).sum(1) and `reconstruct.row_dots` (a batched
matrix product), 2 threads.
"""

from __future__ import annotations

import os

os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")  # as the product's CLI sets it (hybridprune/env.py)

import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import scale  # noqa: E402
import torch  # noqa: E402

import hybridprune.methods.reconstruct as reconstruct  # noqa: E402
from hybridprune.calibration.collect import CollectionOptions, collect_statistics  # noqa: E402
from hybridprune.models.adapters import adapter_for  # noqa: E402
from hybridprune.presets import get_preset, resolve  # noqa: E402
from hybridprune.pruning import neuron_scoring, plan_layers, prune_layer  # noqa: E402

TRACE_STEPS = (1, 2, 3, 4, 6, 8, 12, 25)


def main() -> None:
    torch.set_num_threads(2)
    shape = scale.SHAPES[sys.argv[1] if len(sys.argv) > 1 else "llama8b"]
    if len(sys.argv) > 2:
        reconstruct.SPECTRAL_RANK = int(sys.argv[2])
    model = scale.build_model(shape, 512)
    adapter = adapter_for("llama")
    layer = adapter.layers(model)[0]
    windows = torch.randint(0, scale.VOCAB_BUILT, (8, 512), generator=torch.Generator().manual_seed(0))
    stats = collect_statistics(model, adapter, windows, CollectionOptions(), batch_size=4)
    hessians = collect_statistics(model, adapter, windows, CollectionOptions(), batch_size=4, hessians=True,
                                  first_order=False)
    solve = reconstruct.resolve_on_support

    def traced(gram, target, keep, start, steps=reconstruct.CG_STEPS, tolerance=reconstruct.CG_TOLERANCE, settle=0.0,
               products=None, preconditioner=None):
        dot, calls = torch.linalg.vecdot, [0]

        def counting(*args, **kwargs):
            calls[0] += 1
            return dot(*args, **kwargs)

        torch.linalg.vecdot = counting  # two per solve, two per step
        started = time.perf_counter()
        try:
            result = solve(gram, target, keep, start, steps, tolerance, settle, products, preconditioner)
        finally:
            torch.linalg.vecdot = dot
        seconds = time.perf_counter() - started

        reached = [_decrease(solve(gram, target, keep, start, k, 0.0, 0.0, products, preconditioner), target, keep, gram) for k in TRACE_STEPS]
        shares = " ".join(f"{k}:{value / reached[-1]:.4f}" for k, value in zip(TRACE_STEPS, reached))
        print(f"{tuple(target.shape)}: {(calls[0] - 1) // 2} steps, {seconds:.2f} s | share of the 25-step decrease "
              f"after k steps: {shares}", flush=True)
        return result

    reconstruct.resolve_on_support = traced
    config = resolve({}, get_preset("quality"))
    plan = plan_layers(model, adapter, stats, config)[0]
    with torch.no_grad():
        prune_layer(layer, 0, adapter, stats, plan, neuron_scoring(config), hessians, config.update_shrink)


RANKS = (0, 8, 16, 32)  # `real`: the preconditioners compared (0: the diagonal alone)


def _decrease(change, target, keep, gram) -> float:
    """What `change` takes off the layer error: 2 c.b - c G c, summed over rows."""
    dot = torch.linalg.vecdot
    return float(2 * dot(change, target * keep, dim=1).sum() - dot(change, change @ gram, dim=1).sum())


def _solve(gram, target, keep, rank, count=reconstruct.CG_STEPS, tolerance=reconstruct.CG_TOLERANCE,
           settle=reconstruct.CG_SETTLE):
    """(the change, the steps taken, the spectrum's seconds) of the product's solve under `rank` (0: the diagonal)."""
    started = time.perf_counter()
    spectrum = reconstruct.gram_spectrum(gram, rank) if rank else None
    seconds = time.perf_counter() - started
    preconditioner = spectrum if spectrum is not None else 1.0 / gram.diagonal()
    dot, calls = torch.linalg.vecdot, [0]

    def counting(*args, **kwargs):
        calls[0] += 1
        return dot(*args, **kwargs)

    torch.linalg.vecdot = counting  # one per solve, two per step (from zero)
    try:
        change = reconstruct.resolve_on_support(gram, target, keep, None, count, tolerance, settle, None, preconditioner)
    finally:
        torch.linalg.vecdot = dot
    return change, (calls[0] - 1) // 2, seconds


def real() -> None:
    import refine_pool

    from hybridprune.masks import mask_n_m, mask_unstructured
    from hybridprune.methods.refine import shrink_offdiagonal

    torch.set_num_threads(2)
    steps: dict[int, list[int]] = {rank: [] for rank in RANKS}
    for name, layer, group, weight, gram in refine_pool.real_groups():
        rows = weight[:1024]
        for offdiag, pattern in ((0.25, "50%"), (0.5, "2:4")):
            shrunk = shrink_offdiagonal(gram, offdiag)
            metric = rows.abs() * shrunk.diagonal().sqrt()
            keep = mask_unstructured(metric, 0.5) if pattern == "50%" else mask_n_m(metric, 2, 4)
            target = (rows * ~keep) @ shrunk
            converged = _decrease(_solve(shrunk, target, keep, 32, 60, 0.0, 0.0)[0], target, keep, shrunk)
            line = f"{name} L{layer} {group:8s} {pattern} {tuple(rows.shape)}:"
            for rank in RANKS:
                change, taken, seconds = _solve(shrunk, target, keep, rank)
                steps[rank].append(taken)
                share = _decrease(change, target, keep, shrunk) / converged
                line += f" | {'diagonal' if rank == 0 else f'rank {rank}'} {taken} steps {share:.5f}"
                line += f" ({seconds:.2f} s)" if rank else ""
            print(line, flush=True)
    print("steps in all: " + ", ".join(f"{'diagonal' if rank == 0 else f'rank {rank}'} {sum(v)}" for rank, v in steps.items()))


def dots() -> None:
    torch.set_num_threads(2)
    ways = {"vecdot": lambda a, b: torch.linalg.vecdot(a, b, dim=1), "mul-sum": lambda a, b: (a * b).sum(1),
            "row_dots": reconstruct.row_dots}
    for rows, width in ((16384, 4096), (4096, 14336), (6144, 4096)):
        a, b = torch.randn(rows, width), torch.randn(rows, width)
        best = {name: float("inf") for name in ways}
        for _ in range(3):  # interleaved, so that a slower moment of the machine falls on every way alike
            for name, way in ways.items():
                way(a, b)
                times = []
                for _ in range(5):
                    start = time.perf_counter()
                    way(a, b)
                    times.append(time.perf_counter() - start)
                best[name] = min(best[name], sorted(times)[2])
        print(f"{rows} x {width}: " + ", ".join(f"{name} {1000 * seconds:.1f} ms" for name, seconds in best.items()))


if __name__ == "__main__":
    if sys.argv[1:] == ["dots"]:
        dots()
    elif sys.argv[1:] == ["real"]:
        real()
    else:
        main()
