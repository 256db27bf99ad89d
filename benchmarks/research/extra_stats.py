"""Extra per-neuron reduced sums (dense model, same 32 x 512 calibration windows).

For each layer's MLP, with g = gate_proj(x), u = up_proj(x), a = silu(g) * u:
  gate_sens_sq[i] = sum_t (silu'(g_ti) * u_ti)^2   (how much a_i moves per unit of gate pre-activation)
  up_sens_sq[i]   = sum_t silu(g_ti)^2              (how much a_i moves per unit of up pre-activation)
These are O(intermediate) per layer, sums over tokens, so they merge like the other statistics.
"""

from __future__ import annotations

import torch
from safetensors.torch import save_file

from common import CACHE, Harness
from hybridprune.data import load_text, sample_windows, tokenize

OUT = CACHE / "research_extra_32x512_s0.safetensors"


def main() -> None:
    h = Harness()
    ids = tokenize(load_text("wiki-vital", "calibration"), h.loaded.tokenizer, CACHE)
    windows = sample_windows(ids, 32, 512, 0)
    sums: dict[str, torch.Tensor] = {}
    captured: dict[int, torch.Tensor] = {}
    handles = []
    for l, layer in enumerate(h.layers):
        mlp = h.adapter.mlp(layer)

        def gate_hook(_m, _a, out, l=l):
            captured[l] = out.detach()

        def up_hook(_m, _a, u, l=l):
            g = captured.pop(l).double()
            u = u.detach().double()
            sig = torch.sigmoid(g)
            dsilu = sig * (1 + g * (1 - sig))
            for name, v in (("gate_sens_sq", (dsilu * u) ** 2), ("up_sens_sq", (g * sig) ** 2)):
                key = f"layer.{l}.{name}"
                s = v.reshape(-1, v.shape[-1]).sum(0)
                sums[key] = sums[key] + s if key in sums else s

        handles.append(mlp.gate_proj.register_forward_hook(gate_hook))
        handles.append(mlp.up_proj.register_forward_hook(up_hook))
    base = h.adapter.base_model(h.model)
    with torch.no_grad():
        for start in range(0, 32, 4):
            base(input_ids=windows[start:start + 4], use_cache=False)
    for hd in handles:
        hd.remove()
    save_file(sums, str(OUT))
    print("saved", OUT, len(sums))


if __name__ == "__main__":
    main()
