"""Shared harness for the MLP-pruning research scripts (not part of the package).

Loads the embedded SmolLM2 once, computes (or reloads) the dense calibration statistics
(32 x 512 windows of the calibration split, seed 0, topics 128, q_active 0.9), keeps a
copy of the dense weights, and evaluates perplexity exactly per BENCHMARK.md
(non-overlapping 512-token windows from the start of a split, exp of the mean NLL).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from hybridprune.calibration.collect import CollectionOptions, collect_statistics
from hybridprune.calibration.stats import CalibrationStats
from hybridprune.data import eval_windows, load_text, sample_windows, tokenize
from hybridprune.models import load_model

CACHE = Path("/tmp/hpcache")
STATS_FILE = CACHE / "research_stats_dense_32x512_s0.safetensors"
RESULTS = Path(__file__).with_name("results.jsonl")
ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
GROUP_OF = {"q_proj": "attn_in", "k_proj": "attn_in", "v_proj": "attn_in", "o_proj": "o_in",
            "gate_proj": "mlp_in", "up_proj": "mlp_in", "down_proj": "down_in"}


class Harness:
    def __init__(self) -> None:
        torch.set_num_threads(2)
        torch.manual_seed(0)
        self.loaded = load_model(None, cache_dir=CACHE)
        self.model, self.adapter = self.loaded.model, self.loaded.adapter
        self.layers = self.adapter.layers(self.model)
        # dense weights per (layer, name), kept to restore between trials
        self.dense = {(l, n): lin.weight.detach().clone()
                      for l, layer in enumerate(self.layers)
                      for n, lin in self.adapter.linears(layer).items()}
        self.stats = self._stats()
        self._ids: dict[str, torch.Tensor] = {}

    def _stats(self) -> CalibrationStats:
        if STATS_FILE.exists():
            return CalibrationStats(load_file(str(STATS_FILE)))
        ids = tokenize(load_text("wiki-vital", "calibration"), self.loaded.tokenizer, CACHE)
        windows = sample_windows(ids, 32, 512, 0)
        t = time.time()
        stats = collect_statistics(self.model, self.adapter, windows, CollectionOptions(topics=128, q_active=0.9, seed=0))
        print(f"calibration {time.time() - t:.1f}s")
        save_file({k: v.contiguous() for k, v in stats.tensors.items()}, str(STATS_FILE))
        return stats

    def split_ids(self, split: str) -> torch.Tensor:
        if split not in self._ids:
            self._ids[split] = tokenize(load_text("wiki-vital", split), self.loaded.tokenizer, CACHE)
        return self._ids[split]

    def restore(self) -> None:
        with torch.no_grad():
            for (l, n), w in self.dense.items():
                self.adapter.linears(self.layers[l])[n].weight.copy_(w)

    def apply(self, masks: dict[tuple[int, str], torch.Tensor]) -> dict[str, float]:
        """Set weights = dense * mask; returns achieved sparsity (attention, mlp, total)."""
        pruned = {"attn": 0, "mlp": 0}
        total = {"attn": 0, "mlp": 0}
        with torch.no_grad():
            for (l, n), w in self.dense.items():
                kind = "attn" if n in ATTN else "mlp"
                total[kind] += w.numel()
                mask = masks.get((l, n))
                lin = self.adapter.linears(self.layers[l])[n]
                if mask is None:
                    lin.weight.copy_(w)
                else:
                    lin.weight.copy_(w * mask)
                    pruned[kind] += int((~mask).sum())
        return {"attn": pruned["attn"] / total["attn"], "mlp": pruned["mlp"] / total["mlp"],
                "total": (pruned["attn"] + pruned["mlp"]) / (total["attn"] + total["mlp"])}

    @torch.no_grad()
    def ppl(self, split: str = "validation", windows: int = 16, batch: int = 4) -> float:
        ids = eval_windows(self.split_ids(split), 512, windows)
        nll, count = 0.0, 0
        for start in range(0, ids.shape[0], batch):
            x = ids[start:start + batch]
            logits = self.model(input_ids=x, use_cache=False).logits[:, :-1].float()
            loss = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum")
            nll += float(loss)
            count += x[:, 1:].numel()
        return math.exp(nll / count)


def record(name: str, split: str, windows: int, ppl: float, sparsity: dict, extra: dict | None = None) -> None:
    row = {"name": name, "split": split, "windows": windows, "ppl": round(ppl, 4),
           "sparsity": {k: round(v, 5) for k, v in sparsity.items()}, **(extra or {})}
    with RESULTS.open("a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps(row), flush=True)


def module_at(rev: str, path: str = "hybridprune/methods/obs.py"):
    """The module at `path` as it was at git revision `rev`, imported under its own name (for A/B timings)."""
    import importlib.util
    import subprocess
    import tempfile

    source = subprocess.run(["git", "show", f"{rev}:{path}"], check=True, capture_output=True, text=True).stdout
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as file:
        file.write(source)
    spec = importlib.util.spec_from_file_location(f"{Path(path).stem}_at_{rev}", file.name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
