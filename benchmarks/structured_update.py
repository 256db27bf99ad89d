"""Structured removal's compensation: the OBS sweep against the exact least squares of the kept columns.

Whole MLP neurons (down_proj's input columns) or query heads (o_proj's input columns) are removed with one
column mask for every row. The OBS sweep (`reconstruct_with_factor`, what structured removal used up to
2026-12-06) compensates a removed column only on the columns after it; `keep_columns` solves the kept
columns' least-squares optimum exactly (one k x k Cholesky). Both are run here on the same removals, with
the damped calibration Gram as cached (off-diagonal 1: what `--heads-sparsity` / `--target-speedup` use) and
shrunk to 0.5 (what `--pattern structured --update` uses), and scored on the five domains of
benchmarks/validate.py (validation halves to choose, test halves to report), against no compensation.

    .venv/bin/python benchmarks/structured_update.py --model smollm2 --half validation
    .venv/bin/python benchmarks/structured_update.py --model smollm2 --half test

Removal is simulated in place (the removed columns zeroed, the model keeps its shapes): the same function as
the shrunk model `prune` writes. Neuron choice: the product's NeuronRank scores (`planner.neuron_rank_scores`);
heads: `structured.head_scores`. Rows go to benchmarks/structured_update.jsonl; `report` prints the table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from validate import DOMAINS, MODELS, Bench, load_rows  # noqa: E402

from hybridprune.config import PruneConfig  # noqa: E402
from hybridprune.methods.reconstruct import inverse_factor, keep_columns, reconstruct_with_factor  # noqa: E402
from hybridprune.methods.refine import shrink_offdiagonal  # noqa: E402
from hybridprune.models.adapters import DOWN_IN, O_IN  # noqa: E402
from hybridprune.planner import neuron_rank_scores  # noqa: E402
from hybridprune.pruning import neuron_scoring  # noqa: E402
from hybridprune.structured import attention_shape, head_keep, head_scores  # noqa: E402

RESULTS = ROOT / "benchmarks" / "structured_update.jsonl"
REMOVALS = {"neurons25": ("neurons", 0.25), "neurons50": ("neurons", 0.5), "heads33": ("heads", 1 / 3)}
VARIANTS = ("none", "sweep@1", "exact@1", "sweep@0.5", "exact@0.5")


def column_masks(bench: Bench, kind: str, share: float) -> dict[int, torch.Tensor]:
    """Per layer, the kept input columns of down_proj (neurons) or o_proj (heads)."""
    masks = {}
    if kind == "neurons":
        scores = neuron_rank_scores(bench.model, bench.adapter, bench.stats(0), neuron_scoring(PruneConfig()))
        for index, score in scores.items():
            keep = torch.zeros(len(score), dtype=torch.bool)
            keep[score.topk(len(score) - round(share * len(score))).indices] = True
            masks[index] = keep
        return masks
    shape = attention_shape(bench.model.config)
    count = round(share * shape.group)
    for index, layer in enumerate(bench.layers):
        o_proj = getattr(bench.adapter.attention(layer), bench.adapter.attention_output)
        query, _ = head_keep(head_scores(o_proj.weight, bench.stats(0).sumsq(index, O_IN), shape), shape, "query", count)
        keep = torch.zeros(o_proj.in_features, dtype=torch.bool)
        keep[(query.unsqueeze(1) * shape.head_dim + torch.arange(shape.head_dim)).flatten()] = True
        masks[index] = keep
    return masks


@torch.no_grad()
def apply(bench: Bench, kind: str, masks: dict[int, torch.Tensor], variant: str) -> float:
    """Zero the removed columns, compensated as `variant` says; returns the compensation's seconds."""
    bench.restore()
    group, name = (DOWN_IN, bench.adapter.mlp_output) if kind == "neurons" else (O_IN, bench.adapter.attention_output)
    seconds = 0.0
    for index, layer in enumerate(bench.layers):
        linear = bench.adapter.linears(layer)[name]
        keep = masks[index]
        if variant == "none":
            linear.weight.mul_(keep.to(linear.weight.dtype))
            continue
        how, offdiag = variant.split("@")
        gram, dead = bench.hessians(0).gram(index, group)
        gram = shrink_offdiagonal(gram, float(offdiag))
        t = time.perf_counter()
        if how == "sweep":
            columns = keep.unsqueeze(0).expand_as(linear.weight)
            updated = reconstruct_with_factor(linear.weight, columns, inverse_factor(gram), dead)
        else:
            updated = keep_columns(linear.weight, keep, gram)
        seconds += time.perf_counter() - t
        linear.weight.copy_(updated)
    return seconds


def run(model: str, half: str, removals: list[str], variants: list[str], threads: int) -> None:
    rows = [json.loads(line) for line in RESULTS.read_text().splitlines()] if RESULTS.exists() else []
    have = {(r["model"], r["half"], r["removal"], r["variant"], r["domain"]) for r in rows}
    bench = Bench(model, threads)
    for removal in removals:
        kind, share = REMOVALS[removal]
        masks = None
        for variant in variants:
            todo = [d for d in DOMAINS if (model, half, removal, variant, d) not in have]
            if not todo:
                continue
            masks = masks or column_masks(bench, kind, share)
            seconds = apply(bench, kind, masks, variant)
            for domain in todo:
                ppl = bench.ppl(domain, half)
                row = {"model": model, "half": half, "removal": removal, "variant": variant, "domain": domain,
                       "ppl": round(ppl, 4), "compensation_s": round(seconds, 2), "windows": MODELS[model]["windows"]}
                with RESULTS.open("a") as f:
                    f.write(json.dumps(row) + "\n")
                print(f"{model} {half} {removal} {variant:10s} {domain:7s} ppl {ppl:9.3f} ({seconds:.1f} s)", flush=True)
    bench.restore()


def report() -> None:
    """Perplexities and the loss ratio (ppl - dense) / (uncompensated ppl - dense): dense from validate.py's rows."""
    rows = [json.loads(line) for line in RESULTS.read_text().splitlines()]
    dense = {(r["model"], r["half"], r["domain"], r["windows"]): r["ppl"] for r in load_rows() if r["config"] == "dense"}
    key = sorted({(r["model"], r["half"], r["removal"]) for r in rows})
    print("| model | half | removal | compensation | " + " | ".join(DOMAINS) + " | mean loss vs none | worst |")
    print("|---|---|---|---|" + "---|" * (len(DOMAINS) + 2))
    for model, half, removal in key:
        table = {(r["variant"], r["domain"]): r["ppl"] for r in rows if (r["model"], r["half"], r["removal"]) == (model, half, removal)}
        base = {d: dense.get((model, half, d, MODELS[model]["windows"])) for d in DOMAINS}
        for variant in VARIANTS:
            if not all((variant, d) in table for d in DOMAINS):
                continue
            ratios = [(table[(variant, d)] - base[d]) / (table[("none", d)] - base[d]) for d in DOMAINS
                      if ("none", d) in table and base[d] is not None]
            ratio = f"{statistics.mean(ratios):.3f} | {max(ratios):.3f}" if len(ratios) == len(DOMAINS) else "- | -"
            cells = " | ".join(f"{table[(variant, d)]:.2f}" for d in DOMAINS)
            print(f"| {model} | {half} | {removal} | {variant} | {cells} | {ratio} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", nargs="?", default="run", choices=("run", "report"))
    parser.add_argument("--model", default="smollm2", choices=tuple(MODELS))
    parser.add_argument("--half", default="validation", choices=("validation", "test"))
    parser.add_argument("--removals", default=",".join(REMOVALS))
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if args.command == "report":
        report()
        return
    run(args.model, args.half, args.removals.split(","), args.variants.split(","), args.threads)


if __name__ == "__main__":
    main()
