"""Which MLP neurons to remove: NeuronRank's choice against Wanda-sp's, FLAP's and the product's energy score, at
equal removed neurons (issue 22, item 3: where does the NeuronRank score add something?).

    python benchmarks/neuron_choice.py run --model smollm2 --half test [--fractions 0.1,0.2,0.3] [--scores ...]
    python benchmarks/neuron_choice.py run --model smollm2 --half test --compensate   # + least-squares down_proj
    python benchmarks/neuron_choice.py report     # docs/neuron_choice.md from benchmarks/neuron_choice.jsonl

The same harness as benchmarks/validate.py (its Bench: one load per model, the cached calibration of the
validation protocol, the five domain halves, the same perplexity), and the same protocol: every layer loses the
same number of neurons (round(fraction x I)), nothing else is pruned (attention and the other weights stay
dense), so the only difference between two rows is which neurons each score removed. A neuron is removed by
zeroing its down_proj column (its output is then exactly zero, as when the MLP is shrunk); with --compensate the
remaining columns take the least-squares optimum on the calibration Gram, its off-diagonal weighted as the product
weighs it for structured removal (reconstruct.keep_columns on config.GRAM_OFFDIAG's Gram: what `--pattern
structured --update` does).

Scores of neuron i of a layer (higher = kept):
  neuronrank  the product's NeuronRank score with `balanced`'s knobs: what `hybridprune prune --pattern structured`
              ranks neurons by under the hybrid method. Its IDF exponent is 0 (chosen on the validation halves), so
              the score is its TF alone, rms(a_i) ||down[:, i]||: the same ranking as `energy`
  idf0.25     the same with IDF exponent 0.25 (the default before), document IDF
  idf1        the same with IDF exponent 1: TF x IDF, the seed card's NeuronRank
  old1        NeuronRank OLD (token-level activity counts as IDF) with IDF exponent 1. (The `fast` preset's OLD has
              the default exponent 0, so it too ranks by TF alone: the same neurons as `neuronrank`)
  energy      ||a_i|| ||down[:, i]||: the product's score under `--prune-method wanda` (structured.neuron_energy's
              ranking); measured once to show it removes the very neurons `neuronrank` removes (not run by default)
  wanda-sp    sum over the neuron's weights of |W| ||x|| (gate row, up row, down column): Wanda's structured
              variant as FLAP's paper defines it (An et al., AAAI 2024)
  flap        the sample variance of a_i over the calibration tokens times ||down[:, i]||^2: FLAP's fluctuation
              metric (without its bias compensation and its search over layers: equal counts here)
  obs         the compensated error itself (structured OBS, as ZipLM / SlimGPT choose columns): neurons removed
              greedily, each step the ones whose removal adds the least sum_r W_ri^2 / [G^-1]_ii with the kept
              columns re-solved (G the Gram the compensation uses); only meaningful with --compensate. Slow in this
              form at Qwen's width (a float64 downdate of the 8960 x 8960 inverse per block: more than 30 minutes
              for its 28 layers on 2 cores), so run on SmolLM2 only
  random      uniform at random (seed 0): the floor
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import validate as V  # noqa: E402
from domains import DOMAINS  # noqa: E402

from hybridprune.config import GRAM_OFFDIAG  # noqa: E402
from hybridprune.methods.hybrid import score_neurons  # noqa: E402
from hybridprune.methods.reconstruct import keep_columns  # noqa: E402
from hybridprune.methods.refine import shrink_offdiagonal  # noqa: E402
from hybridprune.models.adapters import DOWN_IN, MLP_IN  # noqa: E402
from hybridprune.pruning import neuron_scoring  # noqa: E402
from hybridprune.structured import neuron_energy  # noqa: E402

RESULTS = ROOT / "benchmarks" / "neuron_choice.jsonl"
DOC = ROOT / "docs" / "neuron_choice.md"
SCORES = ("neuronrank", "idf0.25", "idf1", "old1", "energy", "wanda-sp", "flap", "obs", "random")
# energy: the ranking of neuronrank (measured, see the docstring); obs: with --compensate
DEFAULT_SCORES = tuple(s for s in SCORES if s not in ("energy", "obs"))
OBS_ORDER: dict[tuple[str, int], torch.Tensor] = {}  # (model, layer) -> down_proj columns in their greedy removal order
KNOBS = {"neuronrank": ("balanced", {}), "idf0.25": ("balanced", {"idf_exp": 0.25}), "idf1": ("balanced", {"idf_exp": 1.0}),
         "old1": ("fast", {"idf_exp": 1.0})}
REFERENCE = "flap"  # the strongest published peer measured here (Wanda-sp is worse than random on Qwen): ratios are against it


def down_input_sums(bench: V.Bench) -> dict[int, torch.Tensor]:
    """Per layer, the sum over the calibration tokens of down_proj's input a (for FLAP's variance; the cached
    statistics hold sum a^2 and sum |a|, not sum a). One forward pass over the same windows, cached on disk."""
    from safetensors.torch import load_file, save_file

    path = bench._file("down-sum", 0)
    if path.exists():
        return {int(k): v for k, v in load_file(str(path)).items()}
    sums: dict[int, torch.Tensor] = {}
    hooks = []
    for index, layer in enumerate(bench.layers):
        down = getattr(bench.adapter.mlp(layer), bench.adapter.mlp_output)

        def hook(_module, inputs, index=index):
            x = inputs[0].detach().double().reshape(-1, inputs[0].shape[-1])
            sums[index] = sums.get(index, 0) + x.sum(0)

        hooks.append(down.register_forward_pre_hook(hook))
    windows = bench.calibration_windows(0)
    try:
        with torch.no_grad():
            for start in range(0, windows.shape[0], bench.spec["batch"]):
                bench.model(windows[start : start + bench.spec["batch"]])
    finally:
        for h in hooks:
            h.remove()
    save_file({str(k): v.contiguous() for k, v in sums.items()}, str(path))
    return sums


def neuron_scores(bench: V.Bench, kind: str, index: int, sums: dict[int, torch.Tensor] | None) -> torch.Tensor:
    stats = bench.stats(0)
    gate, up, down = (bench.dense[(index, name)].double() for name in bench.adapter.mlp_names)
    down_sumsq = stats.sumsq(index, DOWN_IN).double()
    column = down.norm(dim=0)
    if kind in KNOBS:
        name, knobs = KNOBS[kind]
        scoring = neuron_scoring(V.preset(name, **knobs))
        return score_neurons(stats.neuron_stats(index), scoring, bench.dense[(index, bench.adapter.mlp_output)])
    if kind == "energy":  # the product's own score under --prune-method wanda (its square: the same ranking)
        return neuron_energy(down, down_sumsq)
    if kind == "wanda-sp":
        x = stats.sumsq(index, MLP_IN).double().sqrt()
        return (gate.abs() * x).sum(1) + (up.abs() * x).sum(1) + (down.abs() * down_sumsq.sqrt()).sum(0)
    if kind == "flap":
        tokens = stats.tokens
        mean = sums[index] / tokens
        variance = (down_sumsq - tokens * mean * mean) / (tokens - 1)
        return variance.clamp_min(0) * column**2
    if kind == "obs":
        key = (bench.name, index)
        if key not in OBS_ORDER:
            gram = shrink_offdiagonal(bench.hessians(0).gram(index, DOWN_IN)[0], GRAM_OFFDIAG["structured"])
            OBS_ORDER[key] = obs_order(down, gram, round(MOST_REMOVED[0] * down.shape[1]))
        order = OBS_ORDER[key]
        score = torch.full((down.shape[1],), float(down.shape[1]), dtype=torch.float64)
        score[order] = torch.arange(len(order), dtype=torch.float64)  # removed first = lowest
        return score
    if kind == "random":
        return torch.rand(down.shape[1], generator=torch.Generator().manual_seed(index), dtype=torch.float64)
    raise ValueError(kind)


MOST_REMOVED = [0.0]  # the largest fraction of this run: the greedy order is computed once, up to it


def obs_order(weight: torch.Tensor, gram: torch.Tensor, count: int) -> torch.Tensor:
    """The first `count` input columns of `weight` [out, in] in greedy structured-OBS order: each step removes the
    columns (block of ~n/256, ZipLM-style) of least error sum_r W_ri^2 / [G^-1]_ii, then updates the kept columns
    to the least-squares optimum, W -= W[:, Q] (G^-1_QQ)^-1 G^-1[Q, :], and G^-1 alike (float64)."""
    w = weight.double().clone()
    hinv = torch.cholesky_inverse(torch.linalg.cholesky(gram.double()))
    n = w.shape[1]
    keep = torch.ones(n, dtype=torch.bool)
    order: list[int] = []
    block = max(1, n // 256)
    while len(order) < count:
        d = torch.where(keep, hinv.diagonal(), torch.ones(n, dtype=torch.float64))
        error = (w * w).sum(0) / d
        error[~keep] = torch.inf
        q = torch.topk(error, min(block, count - len(order)), largest=False).indices
        solve = torch.linalg.solve(hinv[q][:, q], hinv[q])  # (G^-1_QQ)^-1 G^-1[Q, :]
        w -= w[:, q] @ solve
        hinv -= hinv[:, q] @ solve
        w[:, q] = 0
        keep[q] = False
        order += q.tolist()
    return torch.tensor(order, dtype=torch.long)


@torch.no_grad()
def apply(bench: V.Bench, kind: str, fraction: float, compensate: bool, sums) -> None:
    bench.restore()
    for index, layer in enumerate(bench.layers):
        score = neuron_scores(bench, kind, index, sums)
        count = round(fraction * score.numel())
        keep = torch.ones(score.numel(), dtype=torch.bool)
        keep[torch.topk(score, count, largest=False).indices] = False
        down = getattr(bench.adapter.mlp(layer), bench.adapter.mlp_output)
        if compensate:
            gram = shrink_offdiagonal(bench.hessians(0).gram(index, DOWN_IN)[0], GRAM_OFFDIAG["structured"])
            down.weight.copy_(keep_columns(down.weight, keep, gram).to(down.weight.dtype))
        else:
            down.weight.mul_(keep.to(down.weight.dtype))


def load_rows() -> list[dict]:
    if not RESULTS.exists():
        return []
    return [json.loads(line) for line in RESULTS.read_text().splitlines() if line.strip()]


def run(model: str, half: str, fractions: list[float], kinds: list[str], compensate: bool, threads: int) -> None:
    MOST_REMOVED[0] = max(fractions)
    bench = V.Bench(model, threads)
    code = V.commit()  # once: every row of this run names the same code
    windows = V.MODELS[model]["windows"]
    sums = down_input_sums(bench) if "flap" in kinds else None
    have = {(r["model"], r["half"], r["score"], r["fraction"], r["compensate"], r["domain"], r["windows"]) for r in load_rows()}
    points = [("dense", 0.0)] + [(k, f) for f in fractions for k in kinds]
    for kind, fraction in points:
        todo = [d for d in DOMAINS if (model, half, kind, fraction, compensate and kind != "dense", d, windows) not in have]
        if not todo:
            continue
        started = time.time()
        if kind == "dense":
            bench.restore()
        else:
            apply(bench, kind, fraction, compensate, sums)
        prune_s = time.time() - started
        for domain in todo:
            ppl = bench.ppl(domain, half)
            row = {"model": model, "half": half, "score": kind, "fraction": fraction, "compensate": compensate and kind != "dense",
                   "domain": domain, "windows": windows, "ppl": round(ppl, 4), "prune_s": round(prune_s, 1),
                   "calibration": V.CALIBRATION, "commit": code}
            with RESULTS.open("a") as f:
                f.write(json.dumps(row) + "\n")
            V.log(f"[{model}] {kind:10s} {fraction:.2f}{' +lsq' if row['compensate'] else ''} {domain:7s} {half} ppl {ppl:9.3f}")


def ratios(rows: list[dict], model: str, half: str, compensate: bool) -> dict:
    """{(fraction, score): {domain: loss / reference loss}} and {(fraction, score): {domain: ppl}}."""
    ppl: dict[tuple, float] = {}
    for r in rows:
        if r["model"] == model and r["half"] == half and (r["compensate"] == compensate or r["score"] == "dense"):
            ppl[(r["fraction"], r["score"], r["domain"])] = r["ppl"]
    out, raw = {}, {}
    fractions = sorted({f for f, s, _ in ppl if s != "dense"})
    for f in fractions:
        for s in SCORES:
            if not all((f, s, d) in ppl for d in DOMAINS):
                continue
            raw[(f, s)] = {d: ppl[(f, s, d)] for d in DOMAINS}
            if all((f, REFERENCE, d) in ppl and (0.0, "dense", d) in ppl for d in DOMAINS):
                out[(f, s)] = {d: (ppl[(f, s, d)] - ppl[(0.0, "dense", d)]) / (ppl[(f, REFERENCE, d)] - ppl[(0.0, "dense", d)])
                               for d in DOMAINS}
    return {"ratio": out, "ppl": raw, "dense": {d: ppl.get((0.0, "dense", d)) for d in DOMAINS}}


def report() -> None:
    rows = load_rows()
    lines = [
        "# Which neurons to remove: NeuronRank against Wanda-sp, FLAP and the energy score",
        "",
        "Generated by `python benchmarks/neuron_choice.py report` from benchmarks/neuron_choice.jsonl (every row names its",
        "commit). Measured by `python benchmarks/neuron_choice.py run --model MODEL --half HALF` (and `--compensate`):",
        "every layer loses the same number of MLP neurons, chosen by each score; nothing else is pruned. Loss ratio = (ppl -",
        f"dense) / ({REFERENCE}'s ppl - dense) per domain, at the same fraction; lower is better. The scores and the",
        "protocol: the module docstring of benchmarks/neuron_choice.py.",
        "",
    ]
    for model in ("smollm2", "qwen"):
        for half in ("validation", "test"):
            for compensate in (False, True):
                r = ratios(rows, model, half, compensate)
                if not r["ratio"]:
                    continue
                dense = " / ".join(f"{r['dense'][d]:.2f}" for d in DOMAINS)
                lines += [f"## {model}, {half} halves, {'down_proj compensated (least squares)' if compensate else 'no compensation'}",
                          "", f"Dense ppl ({' / '.join(DOMAINS)}): {dense}.", "",
                          "| removed | score | ppl per domain | loss vs " + REFERENCE + " per domain | mean | worst |",
                          "|---|---|---|---|---|---|"]
                for (f, s), ratio in sorted(r["ratio"].items(), key=lambda kv: (kv[0][0], SCORES.index(kv[0][1]))):
                    values = [ratio[d] for d in DOMAINS]
                    worst = max(DOMAINS, key=lambda d: ratio[d])
                    ppls = " / ".join(f"{r['ppl'][(f, s)][d]:.2f}" for d in DOMAINS)
                    lines.append(f"| {f:.0%} | {s} | {ppls} | "
                                 f"{' / '.join(f'{v:.3f}' for v in values)} | {sum(values) / len(values):.3f} | "
                                 f"{ratio[worst]:.3f} ({worst}) |")
                lines.append("")
    DOC.write_text("\n".join(lines))
    print(f"wrote {DOC}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run")
    r.add_argument("--model", choices=sorted(V.MODELS), required=True)
    r.add_argument("--half", choices=("validation", "test"), required=True)
    r.add_argument("--fractions", default="0.1,0.2,0.3")
    r.add_argument("--scores", default=",".join(DEFAULT_SCORES))
    r.add_argument("--compensate", action="store_true")
    r.add_argument("--threads", type=int, default=2)
    sub.add_parser("report")
    args = parser.parse_args()
    if args.command == "report":
        report()
        return
    kinds = [k for k in args.scores.split(",") if k]
    if unknown := [k for k in kinds if k not in SCORES]:
        raise SystemExit(f"unknown scores {unknown}: choose from {', '.join(SCORES)}")
    run(args.model, args.half, [float(f) for f in args.fractions.split(",")], kinds, args.compensate, args.threads)


if __name__ == "__main__":
    main()
