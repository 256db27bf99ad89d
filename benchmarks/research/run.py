"""Run named configurations: python run.py SWEEP [--split validation] [--windows 16] [--only NAME ...]

Each configuration is pruned from the dense weights (restored between trials) with the cached
dense statistics, then evaluated; results are appended to results.jsonl.
"""

from __future__ import annotations

import argparse
import time

from common import Harness, record
from recipes import build_masks, structured_masks
import sweeps


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("sweep")
    p.add_argument("--split", default="validation")
    p.add_argument("--windows", type=int, default=16)
    p.add_argument("--only", nargs="*")
    args = p.parse_args()
    configs = getattr(sweeps, args.sweep)
    h = Harness()
    for name, cfg in configs:
        if args.only and name not in args.only:
            continue
        t = time.time()
        if cfg.get("structured"):
            masks = structured_masks(h, cfg["neuron"], cfg["structured"])
        elif cfg.get("dense"):
            masks = {}
        else:
            masks = build_masks(h, cfg)
        sp = h.apply(masks)
        tm = time.time() - t
        ppl = h.ppl(args.split, args.windows)
        record(name, args.split, args.windows, ppl, sp, {"mask_s": round(tm, 1), "eval_s": round(time.time() - t - tm, 1), "cfg": cfg})


if __name__ == "__main__":
    main()
