"""Mask recipes for the research sweep: a config dict -> keep-masks for every decoder Linear.

Config keys (all optional):
  target        overall sparsity of the decoder Linears (0.5)
  attn_metric   "wanda" | "magnitude" | "ria"          (q/k/v/o, per-row groups)
  mlp           "wanda" | "magnitude" | "ria" | "neuron"  (gate/up/down)
  xexp          exponent on ||X_j|| in the Wanda metric (1.0 = Wanda)
  attn_share    attention sparsity minus MLP sparsity, params-weighted so each layer keeps its target
  layer         None | {"score": "owl", "M": 5, "spread": 0.05}   (per-layer targets, exact total)
  neuron        {"score": "tf"|"tfidf"|"out"|"out_idf", "tf": "rms"|"mean_abs", "tf_exp": 1,
                 "idf": "doc"|"topic"|"old", "idf_exp": 1, "min_rate": 0.1,
                 "gu": "alloc"|"matrix"|"row", "spread": 0.1, "sexp": 1.0,
                 "down": "row"|"row_s"|"col", "down_exp": 1.0}
  pattern       "unstructured" | "2:4" | "4:8"
"""

from __future__ import annotations

import torch
from torch import Tensor

from hybridprune.masks import allocate_sparsity, mask_n_m, mask_rows, mask_unstructured
from hybridprune.methods import idf_doc, idf_old, idf_topic, neuron_scores, term_frequency

from common import ATTN, GROUP_OF, MLP


def channel_norm(stats, layer: int, name: str) -> Tensor:
    return stats.sumsq(layer, GROUP_OF[name]).to(torch.float64).sqrt().float()


def weight_metric(kind: str, w: Tensor, norm: Tensor, xexp: float = 1.0) -> Tensor:
    a = w.abs().float()
    if kind == "magnitude":
        return a
    if kind == "wanda":
        return a * norm.pow(xexp)
    if kind == "ria":  # Zhang et al. 2024: relative importance x ||X||^0.5
        rel = a / a.sum(dim=0, keepdim=True).clamp_min(1e-12) + a / a.sum(dim=1, keepdim=True).clamp_min(1e-12)
        return rel * norm.pow(0.5 * xexp)
    raise ValueError(kind)


def neuron_score(stats, layer: int, dense_down: Tensor, cfg: dict) -> Tensor:
    ns = stats.neuron_stats(layer)
    kind = cfg.get("score", "tf")
    if kind == "sens":
        return sens_score(layer, "up_proj", dense_down, cfg)
    tf = term_frequency(ns, cfg.get("tf", "rms"))
    s = tf.pow(cfg.get("tf_exp", 1.0))
    if kind in ("tfidf", "out_idf"):
        mode = cfg.get("idf", "doc")
        if mode == "doc":
            idf = idf_doc(ns, cfg.get("min_tokens", 1))
        elif mode == "topic":
            idf = idf_topic(ns, cfg.get("min_rate", 0.1))
        else:
            idf = idf_old(ns)
        s = s * idf.pow(cfg.get("idf_exp", 1.0))
    if kind in ("out", "out_idf"):
        s = s * dense_down.double().norm(dim=0).pow(cfg.get("col_exp", 1.0))
    return s


_EXTRA = {}


def sens_score(layer: int, name: str, down: Tensor, cfg: dict) -> Tensor:
    """Output sensitivity of neuron i's gate or up pre-activation: rms(da_i/dpre_i) * ||down[:, i]||."""
    if not _EXTRA:
        from safetensors.torch import load_file
        from extra_stats import OUT
        _EXTRA.update(load_file(str(OUT)))
    key = "gate_sens_sq" if name == "gate_proj" else "up_sens_sq"
    if cfg.get("sens_same"):  # one score for both: the up sensitivity
        key = "up_sens_sq"
    sens = _EXTRA[f"layer.{layer}.{key}"].sqrt()
    return sens * down.double().norm(dim=0).pow(cfg.get("col_exp", 1.0))


def layer_targets(h, cfg: dict) -> Tensor:
    """Per-layer sparsity targets (float64 [L]); all layers have the same size."""
    L, target = len(h.layers), cfg.get("target", 0.5)
    lc = cfg.get("layer")
    if not lc:
        return torch.full((L,), target, dtype=torch.float64)
    imp = []
    for l in range(L):
        if lc["score"] == "owl":
            count, outliers = 0, 0
            for n in ATTN + MLP:
                m = weight_metric("wanda", h.dense[(l, n)], channel_norm(h.stats, l, n))
                outliers += int((m > lc.get("M", 5) * m.mean()).sum())
                count += m.numel()
            imp.append(outliers / count)
        elif lc["score"] == "depth":  # later layers pruned more
            imp.append(-l)
        else:
            raise ValueError(lc["score"])
    sizes = torch.full((L,), sum(h.dense[(0, n)].numel() for n in ATTN + MLP), dtype=torch.long)
    return allocate_sparsity(torch.tensor(imp, dtype=torch.float64), sizes, target, lc["spread"])


def build_masks(h, cfg: dict) -> dict[tuple[int, str], Tensor]:
    masks: dict[tuple[int, str], Tensor] = {}
    pattern = cfg.get("pattern", "unstructured")
    xexp = cfg.get("xexp", 1.0)
    targets = layer_targets(h, cfg)
    n_attn = sum(h.dense[(0, n)].numel() for n in ATTN)
    n_mlp = sum(h.dense[(0, n)].numel() for n in MLP)
    for l in range(len(h.layers)):
        t = float(targets[l])
        share = cfg.get("attn_share", 0.0)
        # attention gets t + d_a, mlp t + d_m with n_attn*d_a + n_mlp*d_m = 0 and d_a - d_m = share
        d_a = share * n_mlp / (n_attn + n_mlp)
        d_m = d_a - share
        s_attn, s_mlp = t + d_a, t + d_m
        # per-matrix offsets within a module kind, re-centred so each kind keeps its total
        shift = dict(cfg.get("kind_shift", {}))
        for names in (ATTN, MLP):
            sizes = {n: h.dense[(l, n)].numel() for n in names}
            mean = sum(shift.get(n, 0.0) * sizes[n] for n in names) / sum(sizes.values())
            for n in names:
                shift[n] = shift.get(n, 0.0) - mean
        for n in ATTN:
            m = weight_metric(cfg.get("attn_metric", "wanda"), h.dense[(l, n)], channel_norm(h.stats, l, n), xexp)
            if n == "v_proj" and cfg.get("v_out") and pattern == "unstructured":
                # v row r feeds o_proj column r: scale by ||o[:, r]||^v_out, compare across the matrix
                col = h.dense[(l, "o_proj")].norm(dim=0)
                # GQA: query head h = kv * reps + r reads kv head kv, so v row (kv, d) feeds o columns (kv, r, d)
                reps = col.shape[0] // m.shape[0]
                if reps > 1:
                    heads_kv, dh = m.shape[0] // 64, 64
                    col = col.view(heads_kv, reps, dh).pow(2).sum(1).sqrt().reshape(-1)
                m = m * col.pow(cfg["v_out"]).unsqueeze(1)
                masks[(l, n)] = mask_unstructured(m, s_attn + shift[n], "matrix")
                continue
            masks[(l, n)] = _mask(m, s_attn + shift[n], pattern)
        mlp = cfg.get("mlp", "wanda")
        if mlp != "neuron":
            for n in MLP:
                m = weight_metric(mlp, h.dense[(l, n)], channel_norm(h.stats, l, n), xexp)
                masks[(l, n)] = _mask(m, s_mlp + shift[n], pattern)
            continue
        nc = cfg["neuron"]
        down = h.dense[(l, "down_proj")]
        s = neuron_score(h.stats, l, down, nc)
        base = cfg.get("mlp_base", "wanda")
        gu_mode = nc.get("gu", "alloc")
        per_neuron = None
        if gu_mode == "alloc":
            sizes = torch.full(s.shape, 1, dtype=torch.long)
            per_neuron = allocate_sparsity(s, sizes, s_mlp, nc.get("spread", 0.1))
        for n in ("gate_proj", "up_proj"):
            if nc.get("score") == "sens":  # per-matrix neuron sensitivity from the extra sums
                s = sens_score(l, n, down, nc)
                if gu_mode == "alloc":
                    per_neuron = allocate_sparsity(s, torch.ones(s.shape, dtype=torch.long), s_mlp, nc.get("spread", 0.1))
            m = weight_metric(base, h.dense[(l, n)], channel_norm(h.stats, l, n), xexp)
            if pattern != "unstructured":
                masks[(l, n)] = _mask(m, s_mlp + shift[n], pattern)
            elif gu_mode == "alloc":
                masks[(l, n)] = mask_rows(m, per_neuron.float())
            elif gu_mode == "matrix":
                m = m * s.float().pow(nc.get("sexp", 1.0)).unsqueeze(1)
                masks[(l, n)] = mask_unstructured(m, s_mlp + shift[n], "matrix")
            else:
                masks[(l, n)] = mask_unstructured(m, s_mlp + shift[n], "row")
        m = weight_metric(base, down, channel_norm(h.stats, l, "down_proj"), xexp)
        dmode = nc.get("down", "row")
        if dmode == "row_s":
            m = m * s.float().pow(nc.get("down_exp", 1.0)).unsqueeze(0)
            masks[(l, "down_proj")] = _mask(m, s_mlp + shift["down_proj"], pattern)
        elif dmode == "col" and pattern == "unstructured":
            if per_neuron is None:
                per_neuron = allocate_sparsity(s, torch.ones(s.shape, dtype=torch.long), s_mlp, nc.get("spread", 0.1))
            masks[(l, "down_proj")] = mask_rows(m.T.contiguous(), per_neuron.float()).T
        else:
            masks[(l, "down_proj")] = _mask(m, s_mlp + shift["down_proj"], pattern)
    return masks


def _mask(metric: Tensor, sparsity: float, pattern: str) -> Tensor:
    if pattern == "unstructured":
        return mask_unstructured(metric, sparsity, "row")
    n, m = (int(v) for v in pattern.split(":"))
    return mask_n_m(metric, n, m)


def structured_masks(h, cfg: dict, fraction: float) -> dict[tuple[int, str], Tensor]:
    """Remove whole MLP neurons (gate/up rows + down columns) with the lowest score; attention dense."""
    from hybridprune.masks import neuron_keep_mask

    masks = {}
    for l in range(len(h.layers)):
        down = h.dense[(l, "down_proj")]
        keep = neuron_keep_mask(neuron_score(h.stats, l, down, cfg).float(), fraction)
        masks[(l, "gate_proj")] = keep.unsqueeze(1).expand_as(h.dense[(l, "gate_proj")]).clone()
        masks[(l, "up_proj")] = keep.unsqueeze(1).expand_as(h.dense[(l, "up_proj")]).clone()
        masks[(l, "down_proj")] = keep.unsqueeze(0).expand_as(down).clone()
    return masks
