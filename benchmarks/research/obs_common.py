"""Harness for the in-sweep OBS research (issue 12): the research Harness plus the second-order sums.

Grams H = sum_t x_t x_t^T per input group of the dense model (the same 32 x 512 calibration windows),
saved once to /tmp/obs (float64), and the factors the product caches (methods/reconstruct.py).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).parent))
import common  # noqa: E402

common.CACHE = Path("/tmp/obs/hpcache")
common.STATS_FILE = common.CACHE / "research_stats_dense_32x512_s0.safetensors"
common.RESULTS = Path(__file__).with_name("obs_results.jsonl")
from common import GROUP_OF, Harness  # noqa: E402

from hybridprune.calibration.runner import run_layerwise  # noqa: E402
from hybridprune.data import load_text, sample_windows, tokenize  # noqa: E402
from hybridprune.methods.reconstruct import inverse_hessian_factor  # noqa: E402

GRAMS = Path("/tmp/obs/grams_32x512_s0.safetensors")
GROUPS = ("attn_in", "o_in", "mlp_in", "down_in")


class ObsHarness(Harness):
    def __init__(self) -> None:
        common.CACHE.mkdir(parents=True, exist_ok=True)
        super().__init__()
        self.grams = self._grams()
        self._factors: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}

    def _grams(self) -> dict[str, torch.Tensor]:
        if GRAMS.exists():
            return load_file(str(GRAMS))
        ids = tokenize(load_text("wiki-vital", "calibration"), self.loaded.tokenizer, common.CACHE)
        windows = sample_windows(ids, 32, 512, 0)
        grams: dict[str, torch.Tensor] = {}
        firsts = {"q_proj": "attn_in", "o_proj": "o_in", "gate_proj": "mlp_in", "down_proj": "down_in"}

        def observe(index, layer):
            lin = self.adapter.linears(layer)

            def tap(group, x):
                flat = x.detach().reshape(-1, x.shape[-1]).float()
                key = f"{index}.{group}"
                p = (flat.T @ flat).double()
                grams[key] = grams[key] + p if key in grams else p

            hs = [lin[n].register_forward_pre_hook(lambda _m, a, g=g: tap(g, a[0])) for n, g in firsts.items()]
            return lambda: [h.remove() for h in hs]

        t = time.time()
        run_layerwise(self.model, self.adapter, windows, batch_size=4, device=torch.device("cpu"), observe=observe)
        print(f"grams {time.time() - t:.1f}s", flush=True)
        save_file(grams, str(GRAMS))
        return grams

    def gram(self, layer: int, name_or_group: str) -> torch.Tensor:
        group = GROUP_OF.get(name_or_group, name_or_group)
        return self.grams[f"{layer}.{group}"]

    def factor(self, layer: int, name_or_group: str) -> tuple[torch.Tensor, torch.Tensor]:
        group = GROUP_OF.get(name_or_group, name_or_group)
        if (layer, group) not in self._factors:
            self._factors[(layer, group)] = inverse_hessian_factor(self.gram(layer, group))
        return self._factors[(layer, group)]


def domain_ids(h: ObsHarness, domain: str, half: str) -> torch.Tensor:
    """Token ids of an out-of-domain half (benchmarks/domains.py of the quality branch, copied to /tmp/obs)."""
    sys.path.insert(0, "/tmp/obs")
    import domains  # noqa: PLC0415

    from hybridprune.data.tokens import encode_text

    key = f"{domain}:{half}"
    if key not in h._ids:
        validation, test = domains.domain_texts(domain)
        h._ids[key] = encode_text(validation if half == "validation" else test, h.loaded.tokenizer)
    return h._ids[key]


@torch.no_grad()
def domain_ppl(h: ObsHarness, domain: str, half: str, windows: int = 16, batch: int = 4) -> float:
    import math

    from hybridprune.data import eval_windows

    ids = eval_windows(domain_ids(h, domain, half), 512, windows)
    nll, count = 0.0, 0
    for start in range(0, ids.shape[0], batch):
        x = ids[start:start + batch]
        logits = h.model(input_ids=x, use_cache=False).logits[:, :-1].float()
        nll += float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum"))
        count += x[:, 1:].numel()
    return math.exp(nll / count)
