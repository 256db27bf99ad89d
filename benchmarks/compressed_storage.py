# ruff: noqa: E402, E701, E702  (a measurement script kept as it was run for the README figures)
"""Usage: PYTHONPATH=. python benchmarks/compressed_storage.py

Sizes, load times and logits of compressed vs dense-format folders, embedded SmolLM2, 50% per-row magnitude."""
import json
import shutil
import statistics
import time
from pathlib import Path

import torch

torch.set_num_threads(2)
import os

from hybridprune.evaluation import folder_size
from hybridprune.export import save_compressed
from hybridprune.models import load_model

root = Path(os.environ.get("OUT", "/tmp/hybridprune-export-bench"))
def prune(model, pattern):
    with torch.no_grad():
        for n, w in model.named_parameters():
            if not n.endswith("proj.weight"): continue
            if pattern == "2:4":
                b = w.abs().float().reshape(-1, 4)
                keep = torch.zeros_like(b, dtype=torch.bool).scatter_(1, b.topk(2, dim=1).indices, True)
                w.mul_(keep.reshape(w.shape))
            else:
                k = w.shape[1] // 2
                idx = w.abs().float().topk(k, dim=1, largest=False).indices
                w.scatter_(1, idx, 0)
ids = torch.randint(0, 49152, (1, 128), generator=torch.Generator().manual_seed(0))
rows = []
for dtype, pattern in [("float32", "unstructured"), ("bfloat16", "unstructured"), ("float32", "2:4")]:
    loaded = load_model(None, dtype=dtype)
    prune(loaded.model, pattern)
    tag = f"{dtype}-{pattern.replace(':','')}"
    dense, comp = root / f"dense-{tag}", root / f"comp-{tag}"
    for f in (dense, comp): shutil.rmtree(f, ignore_errors=True)
    loaded.model.save_pretrained(dense); loaded.tokenizer.save_pretrained(dense)
    t = time.perf_counter(); res = save_compressed(loaded.model, comp, tokenizer=loaded.tokenizer); save_s = time.perf_counter() - t
    with torch.no_grad(): ref = loaded.model(ids).logits.float()
    del loaded
    times = {"dense": [], "comp": []}
    for rep in range(3):
        for kind, folder in (("dense", dense), ("comp", comp)):
            t = time.perf_counter(); m = load_model(str(folder), dtype=dtype).model; times[kind].append(time.perf_counter() - t)
            if rep == 0:
                with torch.no_grad(): diff = (m(ids).logits.float() - ref).abs().max().item()
                if kind == "comp": comp_diff = diff
            del m
    row = dict(case=tag, format=res.format, dense_MB=folder_size(dense)/1e6, comp_MB=folder_size(comp)/1e6,
               folder_ratio=folder_size(comp)/folder_size(dense), weights_ratio=res.ratio,
               load_dense_s=statistics.median(times["dense"]), load_comp_s=statistics.median(times["comp"]),
               load_ratio=statistics.median(times["comp"])/statistics.median(times["dense"]), compress_s=save_s,
               logits_maxdiff=comp_diff)
    print(json.dumps(row), flush=True); rows.append(row)
