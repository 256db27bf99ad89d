"""Run named variants of the product's prune_layer from cached statistics (issue 12 research).

python obs_run.py NAME [NAME ...] [--split validation] [--windows 16]
Each variant restores the dense weights, prunes all 30 layers with hybridprune.pruning.prune_layer
(dense statistics + the second-order entry built from the same 32 x 512 calibration windows), and
evaluates perplexity; rows go to obs_results.jsonl.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from obs_common import GROUPS, ObsHarness, common

from hybridprune.calibration.stats import CalibrationStats, pack_upper
from hybridprune.methods.hybrid import LayerPlan, NeuronScoring
from hybridprune.methods.reconstruct import inverse_hessian_factor
from hybridprune.pruning import prune_layer

HESSIANS = Path("/tmp/obs/hessian_entry_32x512_s0.safetensors")
TOPIC = NeuronScoring(mode="topic", tf_kind="out_rms", tf_exp=1.0, idf_exp=0.25, min_tokens=1, topic_rate=0.05, doc_rate=0.0)
DOC = NeuronScoring(mode="doc", tf_kind="out_rms", tf_exp=1.0, idf_exp=0.25, min_tokens=1, topic_rate=0.05, doc_rate=0.0)

H = dict(attention_method="wanda", mlp_method="neuronrank", attention_sparsity=0.5, mlp_sparsity=0.5)
W = dict(attention_method="wanda", mlp_method="wanda", attention_sparsity=0.5, mlp_sparsity=0.5)
Q = dict(H, qk_shift=0.1)
VARIANTS: dict[str, dict] = {
    "wanda": dict(W),
    "wanda24": dict(W, pattern="2:4"),
    "hybrid_qk": dict(Q),
    "wanda_upd_fixed": dict(W, update=True, update_mask="fixed"),
    "wanda_upd_sweep_row": dict(W, update=True, sweep_group="row"),
    "wanda_upd_sweep_matrix": dict(W, update=True, sweep_group="matrix"),
    "quality_fixed": dict(Q, update=True, update_mask="fixed"),
    "quality_sweep_row": dict(Q, update=True, sweep_group="row"),
    "quality_sweep_matrix": dict(Q, update=True, sweep_group="matrix"),
    "hybrid_sweep_row": dict(H, update=True, sweep_group="row"),
    "hybrid24": dict(H, pattern="2:4"),
    "hybrid24_spread": dict(H, pattern="2:4", nm_order="spread"),
    "hybrid24_upd_fixed": dict(H, pattern="2:4", update=True, update_mask="fixed"),
    "hybrid24_upd_sweep": dict(H, pattern="2:4", update=True, nm_order="none"),
    "hybrid24_upd_sweep_spread": dict(H, pattern="2:4", update=True, nm_order="spread"),
    "hybrid24_upd_fixed_spread": dict(H, pattern="2:4", update=True, update_mask="fixed", nm_order="spread"),
    "wanda24_upd_sweep": dict(W, pattern="2:4", update=True),
    "hybrid_qk_refine50": dict(Q, refine=50),
    "hybrid_qk_refine200": dict(Q, refine=200),
    "hybrid_refine200": dict(H, refine=200),
    "wanda_refine200": dict(W, refine=200),
    "hybrid24_refine100": dict(H, pattern="2:4", refine=100),
    "hybrid24_spread_refine100": dict(H, pattern="2:4", nm_order="spread", refine=100),
    "hybrid24_spread_refine100b8": dict(H, pattern="2:4", nm_order="spread", refine=100),  # after REFINE_BATCH_NM = 8
}
VARIANTS["quality_refine200_fixed"] = dict(Q, refine=200, update=True, update_mask="fixed")
for shift in (0.05, 0.15, 0.2):
    VARIANTS[f"quality_sweep_matrix_qk{int(shift * 100)}"] = dict(H, qk_shift=shift, update=True, sweep_group="matrix")
VARIANTS["hybrid24_upd_sweep_matrix_spread"] = dict(H, pattern="2:4", update=True, nm_order="spread", sweep_group="matrix")
VARIANTS["hybrid24_spread_refine100_upd_fixed"] = dict(H, pattern="2:4", nm_order="spread", refine=100, update=True, update_mask="fixed")
VARIANTS["wanda_upd_sweep"] = dict(W, update=True)
for steps in (400, 1000):
    VARIANTS[f"hybrid_qk_refine{steps}"] = dict(Q, refine=steps)


def hessian_entry(h: ObsHarness) -> CalibrationStats:
    if HESSIANS.exists():
        return CalibrationStats(load_file(str(HESSIANS)))
    tensors = {"tokens": torch.tensor(32.0 * 512, dtype=torch.float64)}
    for layer in range(len(h.layers)):
        for group in GROUPS:
            factor, dead = inverse_hessian_factor(h.gram(layer, group))
            tensors[f"layer.{layer}.{group}.inverse_factor"] = pack_upper(factor)
            tensors[f"layer.{layer}.{group}.dead"] = dead
    save_file(tensors, str(HESSIANS))
    return CalibrationStats(tensors)


def sparsity(h: ObsHarness) -> dict[str, float]:
    zeros = {"attn": 0, "mlp": 0}
    total = {"attn": 0, "mlp": 0}
    for layer in h.layers:
        for name, linear in h.adapter.linears(layer).items():
            kind = "attn" if name in common.ATTN else "mlp"
            zeros[kind] += int((linear.weight == 0).sum())
            total[kind] += linear.weight.numel()
    return {k: zeros[k] / total[k] for k in zeros} | {"total": sum(zeros.values()) / sum(total.values())}


def run(h: ObsHarness, hessians: CalibrationStats, name: str, split: str, windows: int, scoring=TOPIC) -> dict:
    cfg = VARIANTS[name]
    plan = LayerPlan(**cfg)
    h.restore()
    started, cpu = time.perf_counter(), time.process_time()
    with torch.no_grad():
        for index, layer in enumerate(h.layers):
            prune_layer(layer, index, h.adapter, h.stats, plan, scoring, hessians)
    seconds = time.perf_counter() - started
    cpu = time.process_time() - cpu  # CPU seconds: what a dedicated core would take (the machine is shared)
    sp = sparsity(h)
    for one in split.split(","):  # "validation,test" or "validation:16,test:64"
        one, _, count = one.partition(":")
        count = int(count) if count else windows
        ppl = h.ppl(one, count)
        common.record(name, one, count, ppl, sp, {"prune_s": round(seconds, 1), "prune_cpu_s": round(cpu, 1), "cfg": cfg})
    return {"ppl": ppl, "prune_s": seconds}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("names", nargs="+")
    p.add_argument("--split", default="validation")
    p.add_argument("--windows", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--domains", nargs="*", default=None, help="out-of-domain names: evaluate these instead of wiki-vital")
    args = p.parse_args()
    h = ObsHarness()
    torch.set_num_threads(args.threads)
    hessians = hessian_entry(h)
    if args.domains:
        from obs_common import domain_ppl

        for name in args.names:
            h.restore()
            if name != "dense":
                plan = LayerPlan(**VARIANTS[name])
                with torch.no_grad():
                    for index, layer in enumerate(h.layers):
                        prune_layer(layer, index, h.adapter, h.stats, plan, TOPIC, hessians)
            for domain in args.domains:
                for one in args.split.split(","):
                    ppl = domain_ppl(h, domain, one, args.windows)
                    common.record(name, f"{domain}:{one}", args.windows, ppl, sparsity(h), {"cfg": VARIANTS.get(name, {})})
        return
    for name in args.names:
        if name == "dense":
            h.restore()
            for one in args.split.split(","):
                common.record("dense", one, args.windows, h.ppl(one, args.windows), sparsity(h))
            continue
        run(h, hessians, name, args.split, args.windows)


if __name__ == "__main__":
    main()
