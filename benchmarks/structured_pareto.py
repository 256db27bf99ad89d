"""Perplexity against measured prefill latency for the structured options on the embedded SmolLM2.

For each kind of removal (the planner's mix of neurons, heads and layers; neurons only; layers only;
heads only) and each prefill speed-up target, the planner (`hybridprune.planner.plan_speedup`, FLOP
costs, loss scales probed once) chooses what to remove; the pruned copy is then measured: validation
perplexity (wiki-vital, 8 x 512) and prefill time (batch 1 x 512) relative to the dense model, as the
median of paired runs (dense and pruned back to back). Writes docs/structured_pareto.{json,md,png};
the Pareto front is over all measured points.

    .venv/bin/python benchmarks/structured_pareto.py [--targets 1.15,1.3,1.5,1.75,2.0] [--runs 5]

No `--update` compensation (it would lower every kind's perplexity; README's 87425c2 rows show by how much).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hybridprune.calibration.collect import CollectionOptions, collect_statistics  # noqa: E402
from hybridprune.config import PruneConfig  # noqa: E402
from hybridprune.data import eval_windows, load_text, sample_windows, tokenize  # noqa: E402
from hybridprune.errors import UserError  # noqa: E402
from hybridprune.evaluation import perplexity  # noqa: E402
from hybridprune.latency import paired_prefill_ratios  # noqa: E402
from hybridprune.models import load_model  # noqa: E402
from hybridprune.planner import apply_plan, flop_costs, layer_costs, neuron_rank_scores, plan_speedup, probe_scales  # noqa: E402
from hybridprune.pruning import neuron_scoring  # noqa: E402

KINDS = {"mix": ("neurons", "heads", "layers"), "neurons only": ("neurons",), "layers only": ("layers",), "heads only": ("heads",)}
DOCS = ROOT / "docs"


def pareto(points: list[dict]) -> list[dict]:
    """The points no other point beats on both latency and perplexity, by latency."""
    front, best = [], float("inf")
    for point in sorted(points, key=lambda p: (p["prefill_ratio"], p["ppl"])):
        if point["ppl"] < best:
            front.append(point)
            best = point["ppl"]
    return front


def plot(points: list[dict], front: list[dict], dense_ppl: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.5), dpi=120)
    for kind in KINDS:
        mine = sorted((p for p in points if p["kind"] == kind), key=lambda p: p["prefill_ratio"])
        if mine:
            axes.plot([p["prefill_ratio"] for p in mine], [p["ppl"] for p in mine], marker="o", linestyle=":", label=kind)
    axes.plot([p["prefill_ratio"] for p in front], [p["ppl"] for p in front], color="black", linewidth=1.5,
              label="Pareto front (all points)")
    axes.axhline(dense_ppl, color="grey", linestyle="--", linewidth=1, label=f"dense ({dense_ppl:.2f})")
    axes.set_yscale("log")
    axes.set_xlabel("measured prefill time / dense (batch 1 x 512, median of paired runs)")
    axes.set_ylabel("validation perplexity (wiki-vital, 8 x 512)")
    axes.set_title("Structured pruning on SmolLM2-135M: quality against measured speed")
    axes.invert_xaxis()  # faster to the right
    axes.grid(True, which="both", alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--targets", default="1.15,1.3,1.5,1.75,2.0")
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    targets = [float(t) for t in args.targets.split(",")]
    started = time.time()
    loaded = load_model(None)
    model, adapter = loaded.model, loaded.adapter
    calibration = sample_windows(tokenize(load_text("wiki-vital", "calibration"), loaded.tokenizer), 32, 512, seed=0)
    validation = eval_windows(tokenize(load_text("wiki-vital", "validation"), loaded.tokenizer), 512, 8)
    with torch.no_grad():
        stats = collect_statistics(model, adapter, calibration, CollectionOptions(), batch_size=4)
    dense_ppl = perplexity(model, validation).ppl
    dense_seconds = paired_prefill_ratios(model, {"same": model}, 512, runs=3)[0]
    costs = flop_costs(model, adapter, dense_seconds, 512)
    scores = neuron_rank_scores(model, adapter, stats, neuron_scoring(PruneConfig()))
    estimates = layer_costs(model, adapter, stats, scores)
    scales = probe_scales(model, adapter, stats, scores, estimates, calibration[:4])
    points, skipped = [], []
    for kind, kinds in KINDS.items():
        for target in targets:
            try:
                plan = plan_speedup(costs, estimates, target, kinds=kinds, scales=scales)
            except UserError as err:
                print(f"{kind} {target}: {err}", flush=True)
                skipped.append(f"{kind} at {target:g}x: {err}")
                continue
            pruned = copy.deepcopy(model)
            apply_plan(pruned, adapter, stats, plan, scores)
            ppl = perplexity(pruned, validation).ppl
            _, ratio = paired_prefill_ratios(model, {"pruned": pruned}, 512, runs=args.runs)
            points.append({"kind": kind, "target": target, "neurons_removed": plan.neurons,
                           "heads_removed_per_group": plan.heads_per_group, "layers_dropped": list(plan.drop),
                           "estimated_ratio": round(plan.estimated_ratio, 4), "prefill_ratio": round(ratio["pruned"], 4),
                           "ppl": round(ppl, 3)})
            print(json.dumps(points[-1]), flush=True)
            del pruned
    front = pareto(points)
    for point in points:
        point["pareto"] = point in front
    DOCS.mkdir(exist_ok=True)
    summary = {"model": "SmolLM2-135M-Instruct (embedded), float32", "threads": torch.get_num_threads(),
               "dense_ppl": round(dense_ppl, 3), "dense_prefill_seconds": round(dense_seconds, 4), "runs": args.runs,
               "scales": scales, "points": points, "skipped": skipped, "seconds": round(time.time() - started, 1)}
    (DOCS / "structured_pareto.json").write_text(json.dumps(summary, indent=1) + "\n")
    plot(points, front, dense_ppl, DOCS / "structured_pareto.png")
    lines = ["# Structured pruning: perplexity against measured prefill latency", "",
             f"`.venv/bin/python benchmarks/structured_pareto.py --targets {args.targets} --runs {args.runs}` "
             f"({summary['seconds']:.0f} s, {summary['threads']} threads). Dense: validation perplexity {dense_ppl:.2f}, "
             f"prefill {dense_seconds * 1000:.0f} ms. No `--update` compensation. The front is over all points.", "",
             "![perplexity vs latency](structured_pareto.png)", "",
             "| kind | target | removed | estimated | measured prefill | val ppl | on the front |",
             "|---|---|---|---|---|---|---|"]
    for p in points:
        removed = f"{p['neurons_removed']} neurons/layer, {p['heads_removed_per_group']} heads/group, {len(p['layers_dropped'])} layers"
        lines.append(f"| {p['kind']} | {p['target']:g}x | {removed} | {p['estimated_ratio']:.3f}x | {p['prefill_ratio']:.3f}x | "
                     f"{p['ppl']:.1f} | {'yes' if p['pareto'] else ''} |")
    lines += ["", "Not reachable: " + ("; ".join(skipped) if skipped else "none") + "."]
    (DOCS / "structured_pareto.md").write_text("\n".join(lines) + "\n")
    print(f"wrote docs/structured_pareto.md, .json, .png in {summary['seconds']:.0f} s", flush=True)


if __name__ == "__main__":
    main()
