"""Is float16 storage of the second-order entry's correlations lossless for pruning? Masks and perplexity.

    python benchmarks/second_order_storage.py --model smollm2 --half validation
    python benchmarks/second_order_storage.py --model qwen --half validation --configs balanced,quality
    python benchmarks/second_order_storage.py --model smollm2-bf16 --compare products --configs balanced,quality

`--compare products` asks the same of the collection: a bfloat16 model's Gram multiplied in bfloat16 (the
product, calibration/second_order.py GramAccumulator) against the inputs upcast to float32 first (the
reference), both stored as float16 correlations; `smollm2-bf16` is the SmolLM2 protocol in bfloat16.

Collects the second-order entry twice from the same calibration windows (validate.py's protocol for the
model): correlations stored in float32 (the reference: as exact as the float32 accumulation) and in
float16 (the product's storage, calibration/second_order.py). Prunes the model with each configuration
from each, with the product's own pruning code, and reports the fraction of mask entries that differ and
the perplexity on the five domains' given half. Writes docs/second_order_storage.json (rows appended per
model) and prints the table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from domains import DOMAINS  # noqa: E402
from validate import MODELS, Bench, configs, log  # noqa: E402

import hybridprune.pruning as pruning  # noqa: E402
from hybridprune.calibration import second_order  # noqa: E402
from hybridprune.calibration.collect import CollectionOptions, collect_statistics  # noqa: E402
from hybridprune.methods.refine import refine_swaps  # noqa: E402

OUT = ROOT / "docs" / "second_order_storage.json"


MODELS["smollm2-bf16"] = {**MODELS["smollm2"], "dtype": "bfloat16"}
COMPARISONS = {  # reference first: (name, correlation storage, bfloat16 products)
    "storage": (("float32", torch.float32, True), ("float16", torch.float16, True)),
    "products": (("float32 products", torch.float16, False), ("bfloat16 products", torch.float16, True)),
}


def second_order_entry(h: Bench, dtype: torch.dtype, bfloat16_products: bool):
    second_order.CORRELATION_DTYPE, second_order.BFLOAT16_PRODUCTS = dtype, bfloat16_products
    try:
        with torch.no_grad():
            return collect_statistics(h.model, h.adapter, h.calibration_windows(0), CollectionOptions(), hessians=True)
    finally:
        second_order.CORRELATION_DTYPE, second_order.BFLOAT16_PRODUCTS = torch.float16, True


def stored_bytes(entry) -> int:
    return sum(t.numel() * t.element_size() for name, t in entry.tensors.items() if name.startswith("layer."))


@torch.no_grad()
def pruned(h: Bench, config, hessians) -> tuple[dict, float]:
    h.restore()
    stats = h.stats(0)
    plans = pruning.plan_layers(h.model, h.adapter, stats, config)
    scoring = pruning.neuron_scoring(config)
    started = time.perf_counter()
    for index, layer in enumerate(h.layers):
        if index in plans:
            pruning.prune_layer(layer, index, h.adapter, stats, plans[index], scoring, hessians, config.update_shrink)
    seconds = time.perf_counter() - started
    masks = {(i, n): lin.weight != 0 for i, layer in enumerate(h.layers) for n, lin in h.adapter.linears(layer).items()}
    return masks, seconds


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--half", default="validation")
    parser.add_argument("--configs", default="balanced,quality,balanced@2:4,quality@2:4")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--compare", choices=sorted(COMPARISONS), default="storage")
    args = parser.parse_args()
    h = Bench(args.model, args.threads)
    pruning.refine_swaps = refine_swaps  # no memo: each storage must refine on its own Gram
    h.stats(0)
    entries = {}
    (reference, _, _), (candidate, _, _) = COMPARISONS[args.compare]
    for name, dtype, products in COMPARISONS[args.compare]:
        started = time.perf_counter()
        entries[name] = second_order_entry(h, dtype, products)
        log(f"[{args.model}] second-order entry, {name}: {stored_bytes(entries[name]) / 1e6:.1f} MB, "
            f"{time.perf_counter() - started:.0f}s")
    known = configs()
    rows = []
    for config_name in args.configs.split(","):
        config = known[config_name]
        masks, ppl = {}, {}
        for name, entry in entries.items():
            masks[name], seconds = pruned(h, config, entry)
            ppl[name] = {domain: h.ppl(domain, args.half) for domain in DOMAINS}
            log(f"[{args.model}] {config_name} from {name}: pruned in {seconds:.0f}s, ppl {ppl[name]}")
        total = sum(m.numel() for m in masks[reference].values())
        differ = sum(int((masks[reference][k] != masks[candidate][k]).sum()) for k in masks[reference])
        change = {d: ppl[candidate][d] / ppl[reference][d] - 1 for d in DOMAINS}
        row = {
            "model": args.model, "half": args.half, "config": config_name, "digest": config.digest,
            "mask_entries": total, "mask_entries_differing": differ, "mask_fraction_differing": differ / total,
            "ppl_relative_change": change, "max_abs_ppl_change": max(abs(v) for v in change.values()),
            "windows": h.spec["windows"], "seqlen": h.spec["seqlen"], "date": time.strftime("%Y-%m-%d"),
        }
        if args.compare != "storage":
            row["compare"] = args.compare
        for name in (reference, candidate):
            key = name.replace(" ", "_")
            row[f"ppl_{key}"], row[f"bytes_{key}"] = ppl[name], stored_bytes(entries[name])
        rows.append(row)
        log(f"[{args.model}] {config_name}: {differ} of {total} mask entries differ ({differ / total:.2e}), "
            f"largest perplexity change {row['max_abs_ppl_change']:.3%}")
        previous = json.loads(OUT.read_text()) if OUT.exists() else []
        kept = [r for r in previous if (r["model"], r["half"], r["config"], r.get("compare", "storage"))
                != (args.model, args.half, config_name, args.compare)]
        OUT.write_text(json.dumps(kept + [row], indent=1) + "\n")


if __name__ == "__main__":
    main()
