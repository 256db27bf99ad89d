# ruff: noqa: E402, E701, E702  (a measurement script kept as it was run for the README figures)
"""Usage: PYTHONPATH=. python benchmarks/structured_speedup.py 1.5

Planner on the embedded SmolLM2 (target 1.5x prefill) vs neurons-only at the same estimated latency; validation ppl 8x512."""
import json
import os
import sys

import torch

torch.set_num_threads(2)
import copy

from hybridprune.calibration.stats import CalibrationStats
from hybridprune.config import PruneConfig
from hybridprune.data import eval_windows, load_text, sample_windows, tokenize
from hybridprune.evaluation import perplexity
from hybridprune.latency import measure_latency, paired_prefill_ratios
from hybridprune.models import load_model
from hybridprune.planner import apply_plan, flop_costs, layer_costs, neuron_rank_scores, plan_speedup, probe_scales
from hybridprune.pruning import neuron_scoring

target = float(sys.argv[1]) if len(sys.argv) > 1 else 1.5
loaded = load_model(None)
model, adapter = loaded.model, loaded.adapter
cal = sample_windows(tokenize(load_text("wiki-vital", "calibration"), loaded.tokenizer), 32, 512, seed=0)
val = eval_windows(tokenize(load_text("wiki-vital", "validation"), loaded.tokenizer), 512, 8)
STATS = os.environ.get("STATS", "/tmp/hybridprune-structured-stats.pt")
if os.path.exists(STATS):
    stats = CalibrationStats(torch.load(STATS))
else:  # 32 x 512 calibration windows, collection defaults (the block-influence sums included)
    from hybridprune.calibration.collect import CollectionOptions, collect_statistics
    with torch.no_grad():
        stats = collect_statistics(model, adapter, cal, CollectionOptions(), batch_size=4)
    torch.save(stats.tensors, STATS)
dense_ppl = perplexity(model, val).ppl
dense_s = paired_prefill_ratios(model, {"same": model}, 512, runs=3, statistic="min")[0]
costs = flop_costs(model, adapter, dense_s, 512)
scores = neuron_rank_scores(model, adapter, stats, neuron_scoring(PruneConfig()))
est = layer_costs(model, adapter, stats, scores)
scales = probe_scales(model, adapter, stats, scores, est, cal[:4])
print("scales", scales, flush=True)
rows = {}
for name, kinds in (("mix", ("neurons", "heads", "layers")), ("neurons-only", ("neurons",)), ("layers-only", ("layers",))):
    plan = plan_speedup(costs, est, target, kinds=kinds, scales=scales)
    m = copy.deepcopy(model); apply_plan(m, adapter, stats, plan, scores)
    rows[name] = dict(model=m, plan=plan, ppl=perplexity(m, val).ppl)
    print(name, "neurons", plan.neurons, "heads/group", plan.heads_per_group, "drop", plan.drop, "est", round(plan.estimated_ratio, 3), "ppl", rows[name]["ppl"], flush=True)
base, ratios = paired_prefill_ratios(model, {k: v["model"] for k, v in rows.items()}, 512, runs=7, statistic="min")
print("measured prefill ratio (min of 7 paired runs)", ratios, "dense", base, flush=True)
_, med = paired_prefill_ratios(model, {k: v["model"] for k, v in rows.items()}, 512, runs=3, statistic="median")
print("median-of-ratios", med, flush=True)
lat = measure_latency({"dense": model, **{k: v["model"] for k, v in rows.items()}}, seqlen=512, new_tokens=128, runs=3)
print("decode tok/s", {k: round(v.decode_tokens_per_second, 1) for k, v in lat.items()}, flush=True)
print("SUMMARY", json.dumps(dict(target=target, dense_ppl=dense_ppl, **{k + "_ppl": v["ppl"] for k, v in rows.items()},
      loss_ratio_mix_vs_neurons=(rows["mix"]["ppl"] - dense_ppl) / (rows["neurons-only"]["ppl"] - dense_ppl),
      measured=ratios)))
