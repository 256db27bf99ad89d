"""The layer-wise calibration is exact: proof on tiny random models of every supported family.

(a) `run_layerwise` reproduces the model's own forward, layer by layer, with batches that
    do not divide the number of windows;
(b) every stored sum equals the same sum computed directly from activations captured with
    plain forward hooks during one ordinary forward of the whole model;
(c) statistics of disjoint shards of the windows, merged with `CalibrationStats.add_`, equal
    the statistics of all windows, given the same activity threshold tau and topic centroids.

The tiny families with sliding windows use a window (8) shorter than the sequences (24) and
alternate sliding and full attention layers, so a layer run with another layer's mask or
rotary embeddings would show.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest
import torch
from torch import Tensor

from helpers import TINY_FAMILIES, TRAINING_TEXT
from hybridprune.calibration import collect as collect_mod
from hybridprune.calibration.collect import CollectionOptions, collect_statistics
from hybridprune.calibration.runner import run_layerwise
from hybridprune.calibration.stats import COUNT_ENTRIES, INPUT_GROUPS, CalibrationStats, LayerAccumulator
from hybridprune.data import encode_text, sample_windows
from hybridprune.models import LoadedModel, load_model

NUM_WINDOWS, SEQLEN, BATCH = 5, 24, 2  # batches of 2, 2 and 1 windows
SPLIT = 2  # shards: windows [0, 2) and [2, 5), on the same batch boundaries as the whole run
OPTIONS = CollectionOptions(topics=4, q_active=0.9, seed=0)
CPU = torch.device("cpu")
PER_LAYER_ENTRIES = (
    *(f"{group}.sumsq" for group in INPUT_GROUPS),
    "nr.abs_sum",
    "nr.tau",
    "nr.active_tokens",
    "nr.window_active",
    "nr.window_tokens",
    "nr.topic_active",
    "nr.topic_tokens",
    "block.cos_sum",
    "block.delta_sumsq",
    "block.input_sumsq",
)
WINDOW_ENTRIES = ("nr.window_active", "nr.window_tokens")  # one row per window: shards concatenate


class RecordingAccumulator(LayerAccumulator):
    """A LayerAccumulator that remembers its fitted tau and centroids (for the shard runs)."""

    fitted: dict[int, tuple[float, Tensor]] = {}

    def finish(self) -> dict[str, Tensor]:
        RecordingAccumulator.fitted[self.layer] = (self.tau, self.centroids.clone())
        return super().finish()


class PresetAccumulator(LayerAccumulator):
    """A LayerAccumulator that starts from given tau and centroids instead of fitting them."""

    preset: dict[int, tuple[float, Tensor]] = {}

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.tau, centroids = PresetAccumulator.preset[self.layer]
        self.centroids = centroids.clone()


@dataclass
class FamilyRun:
    family: str
    loaded: LoadedModel
    windows: Tensor
    stats: CalibrationStats
    fitted: dict[int, tuple[float, Tensor]]
    inputs: dict[tuple[int, str], Tensor]  # (layer, Linear name) -> its input in the plain forward [N, T, d]
    layer_outputs: list[Tensor]  # each decoder layer's output in the plain forward
    hidden_states: tuple[Tensor, ...]  # HF's output_hidden_states of the plain forward

    @property
    def num_layers(self) -> int:
        return self.loaded.num_layers


def plain_forward(loaded: LoadedModel, windows: Tensor) -> tuple[dict, list[Tensor], tuple[Tensor, ...]]:
    """One ordinary forward of all windows at once, with plain hooks on every Linear and layer."""
    inputs: dict[tuple[int, str], Tensor] = {}
    outputs: list[Tensor] = []
    handles = []
    for index, layer in enumerate(loaded.adapter.layers(loaded.model)):
        for name, linear in loaded.adapter.linears(layer).items():
            handles.append(
                linear.register_forward_pre_hook(
                    lambda _m, args, key=(index, name): inputs.__setitem__(key, args[0].detach().clone())
                )
            )
        handles.append(
            layer.register_forward_hook(
                lambda _m, _args, out: outputs.append((out[0] if isinstance(out, tuple) else out).detach().clone())
            )
        )
    try:
        with torch.no_grad():
            result = loaded.model(input_ids=windows, output_hidden_states=True, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return inputs, outputs, result.hidden_states


@pytest.fixture(scope="module", params=TINY_FAMILIES)
def run(request, tiny_model_factory, tiny_cache_dir) -> FamilyRun:
    loaded = load_model(str(tiny_model_factory(request.param)), cache_dir=tiny_cache_dir)
    windows = sample_windows(encode_text(TRAINING_TEXT, loaded.tokenizer), NUM_WINDOWS, SEQLEN, seed=0)
    RecordingAccumulator.fitted = {}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(collect_mod, "LayerAccumulator", RecordingAccumulator)
        stats = collect_statistics(loaded.model, loaded.adapter, windows, OPTIONS, batch_size=BATCH, device=CPU)
    fitted = dict(RecordingAccumulator.fitted)
    # the calibration left nothing behind: no hooks, the layers' own forward methods
    for layer in loaded.adapter.layers(loaded.model):
        assert "forward" not in layer.__dict__
        assert not layer._forward_pre_hooks and not layer._forward_hooks
        assert all(not linear._forward_pre_hooks for linear in loaded.adapter.linears(layer).values())
    inputs, layer_outputs, hidden_states = plain_forward(loaded, windows)
    return FamilyRun(request.param, loaded, windows, stats, fitted, inputs, layer_outputs, hidden_states)


def close(actual: Tensor, expected: Tensor) -> None:
    torch.testing.assert_close(actual.double(), expected.double(), rtol=1e-5, atol=1e-6)


# --- (a) the layer-wise runner is the model's own forward ---------------------------------


def test_layerwise_outputs_equal_the_model_forward(run: FamilyRun):
    model, adapter = run.loaded.model, run.loaded.adapter
    layer_inputs: dict[int, Tensor] = {}
    batches_seen: list[tuple[int, int]] = []

    def observe(index: int, layer: torch.nn.Module):
        chunks: list[Tensor] = []
        handle = layer.register_forward_pre_hook(lambda _m, args: chunks.append(args[0].detach().clone()))

        def remove() -> None:
            handle.remove()
            layer_inputs[index] = torch.cat(chunks)

        return remove

    outputs = run_layerwise(
        model,
        adapter,
        run.windows,
        batch_size=BATCH,
        device=CPU,
        observe=observe,
        on_batch=lambda layer, batch: batches_seen.append((layer, batch)),
    )
    assert [o.shape[0] for o in outputs] == [2, 2, 1]
    assert batches_seen == [(layer, batch) for layer in range(run.num_layers) for batch in range(3)]
    final = torch.cat(outputs)
    assert final.shape == (NUM_WINDOWS, SEQLEN, model.config.hidden_size)

    # HF's hidden_states: the embeddings, each layer's output, but the last entry after the final norm
    assert len(run.hidden_states) == run.num_layers + 1
    close(final, run.layer_outputs[-1])
    close(adapter.base_model(model).norm(final), run.hidden_states[-1])
    assert not torch.allclose(run.hidden_states[-1], run.layer_outputs[-1])  # the norm is really there
    # every layer saw the input the plain forward gave it (embedding scaling, previous layers)
    for index in range(run.num_layers):
        close(layer_inputs[index], run.hidden_states[index])


def test_sliding_window_layers_really_differ(run: FamilyRun):
    """Guard for test (a): with a sliding window the tiny models depend on the mask, so a runner
    that used another layer's (or a full) mask could not pass."""
    config = run.loaded.model.config
    if getattr(config, "sliding_window", None) is None or run.family == "qwen2" and not config.use_sliding_window:
        pytest.skip("no sliding window in this family")
    from transformers import AutoModelForCausalLM

    full = AutoModelForCausalLM.from_pretrained(run.loaded.folder, sliding_window=4 * SEQLEN).eval()
    with torch.no_grad():
        other = full(input_ids=run.windows, output_hidden_states=True, use_cache=False).hidden_states
    assert not torch.allclose(other[-1], run.hidden_states[-1], rtol=1e-3, atol=1e-4)


# --- (b) every stored sum is the direct computation -----------------------------------------


def test_statistics_layout(run: FamilyRun):
    expected = {"tokens"} | {f"layer.{i}.{e}" for i in range(run.num_layers) for e in PER_LAYER_ENTRIES}
    assert set(run.stats.tensors) == expected
    for name, tensor in run.stats.tensors.items():
        is_count = name.endswith(tuple("." + entry for entry in COUNT_ENTRIES))
        assert tensor.dtype == (torch.int32 if is_count else torch.float64), name
    assert run.stats.tokens == NUM_WINDOWS * SEQLEN and run.stats.num_layers == run.num_layers


def test_wanda_sums_equal_direct_computation(run: FamilyRun):
    for layer in range(run.num_layers):
        x = {name: run.inputs[(layer, name)] for name in run.loaded.adapter.attention_names + run.loaded.adapter.mlp_names}
        # one statistic stands for the Linears that share an input
        assert torch.equal(x["q_proj"], x["k_proj"]) and torch.equal(x["q_proj"], x["v_proj"])
        assert torch.equal(x["gate_proj"], x["up_proj"])
        for group, name in zip(INPUT_GROUPS, ("q_proj", "o_proj", "gate_proj", "down_proj")):
            direct = x[name].double().pow(2).sum(dim=(0, 1))
            assert run.stats.sumsq(layer, group).shape == direct.shape
            close(run.stats.sumsq(layer, group), direct)


def activity_bounds(a: Tensor, tau: float) -> tuple[Tensor, Tensor]:
    """|a| > tau counted with tau nudged up and down by a rounding margin: [tokens..., I] bools.

    The runner's batches and the plain forward's single batch may round differently in the
    last bit; a count is right when it lies between the two.
    """
    margin = 1e-5 * abs(tau) + 1e-9
    magnitude = a.abs().double()
    return magnitude > tau + margin, magnitude > tau - margin


def test_neuronrank_sums_equal_direct_computation(run: FamilyRun):
    tokens = NUM_WINDOWS * SEQLEN
    for layer in range(run.num_layers):
        a = run.inputs[(layer, "down_proj")]  # [N, T, I]: act(gate) * up
        neurons = a.shape[-1]
        ns = run.stats.neuron_stats(layer)
        tau = run.stats.tau(layer)
        assert tau == run.fitted[layer][0]

        close(ns.abs_sum, a.double().abs().sum(dim=(0, 1)))
        close(ns.sq_sum, a.double().pow(2).sum(dim=(0, 1)))

        # tau is the q_active quantile of |a| (estimated on the first batch, 2 of the 5 windows)
        magnitude = a.abs().double().flatten()
        assert 0 < tau and torch.quantile(magnitude, 0.75) <= tau <= torch.quantile(magnitude, 0.99)

        strict, loose = activity_bounds(a, tau)
        ambiguous = int((strict != loose).sum())
        assert ambiguous <= 0.001 * a.numel()
        low, high = strict.double().sum(1), loose.double().sum(1)  # per window [N, I]
        assert ns.window_active.shape == (NUM_WINDOWS, neurons)
        assert torch.all(low <= ns.window_active) and torch.all(ns.window_active <= high)
        if ambiguous == 0:
            assert torch.equal(ns.window_active, low)
        assert torch.all(low.sum(0) <= ns.active_tokens) and torch.all(ns.active_tokens <= high.sum(0))
        assert torch.equal(ns.window_active.sum(0), ns.active_tokens)
        assert torch.equal(ns.window_tokens, torch.full((NUM_WINDOWS,), float(SEQLEN), dtype=torch.float64))
        fraction = float(ns.active_tokens.sum()) / (tokens * neurons)
        assert 0.02 < fraction < 0.3  # about 1 - q_active

        # topics: every token in exactly one topic, every active token in its token's topic
        assert ns.topic_tokens.shape == (OPTIONS.topics,) and ns.topic_active.shape == (OPTIONS.topics, neurons)
        assert float(ns.topic_tokens.sum()) == tokens
        assert torch.all(ns.topic_tokens >= 0) and torch.equal(ns.topic_tokens, ns.topic_tokens.round())
        assert torch.equal(ns.topic_active.sum(0), ns.active_tokens)
        assert torch.all(ns.topic_active <= ns.topic_tokens[:, None])
        assert torch.all(ns.topic_active[ns.topic_tokens == 0] == 0)


def test_accumulator_sums_the_same_from_bfloat16_inputs_as_from_their_float32_values():
    """The float32 scratch buffers of a bfloat16 run (copies, abs and the threshold test in place) give the
    sums of the same values given as float32, bit for bit, and leave the model's activations untouched."""
    generator = torch.Generator().manual_seed(0)
    batches = [(torch.randn(2, 16, 24, generator=generator).to(torch.bfloat16),
                torch.randn(2, 16, 40, generator=generator).to(torch.bfloat16),
                torch.randn(2, 16, 24, generator=generator).to(torch.bfloat16)) for _ in range(3)]
    results = []
    for dtype in (torch.bfloat16, torch.float32):
        accumulator = LayerAccumulator(layer=0, num_windows=6, topics=4, q_active=0.7, seed=0)
        for x, a, y in batches:
            x, a, y = x.to(dtype), a.to(dtype), y.to(dtype)
            kept = (x.clone(), a.clone(), y.clone())
            accumulator.add_sumsq("attn_in", x)
            accumulator.observe_mlp_input(x)
            accumulator.observe_neurons(a)
            accumulator.observe_block(x, y)
            assert all(torch.equal(t, k) for t, k in zip((x, a, y), kept))
        results.append(accumulator.finish())
    bf16, f32 = results
    assert bf16.keys() == f32.keys()
    assert all(torch.equal(bf16[name], f32[name]) for name in bf16), [n for n in bf16 if not torch.equal(bf16[n], f32[n])]
    a = torch.cat([batch[1] for batch in batches]).double().reshape(-1, 40)
    close(f32["layer.0.down_in.sumsq"], a.pow(2).sum(0))
    close(f32["layer.0.nr.abs_sum"], a.abs().sum(0))
    assert torch.equal(f32["layer.0.nr.topic_active"].sum(0), f32["layer.0.nr.active_tokens"])
    assert int(f32["layer.0.nr.topic_tokens"].sum()) == a.shape[0]


# --- (c) disjoint shards add up ---------------------------------------------------------------


def collect_shards(run: FamilyRun, accumulator: type[LayerAccumulator]) -> tuple[CalibrationStats, CalibrationStats]:
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(collect_mod, "LayerAccumulator", accumulator)
        return tuple(  # type: ignore[return-value]
            collect_statistics(run.loaded.model, run.loaded.adapter, part, OPTIONS, batch_size=BATCH, device=CPU)
            for part in (run.windows[:SPLIT], run.windows[SPLIT:])
        )


def test_shards_with_the_same_tau_and_topics_add_up_to_the_whole(run: FamilyRun):
    PresetAccumulator.preset = run.fitted
    first, second = collect_shards(run, PresetAccumulator)
    assert first.tokens == SPLIT * SEQLEN and second.tokens == (NUM_WINDOWS - SPLIT) * SEQLEN
    merged = first.add_(second)
    assert set(merged.tensors) == set(run.stats.tensors)
    for name, whole in run.stats.tensors.items():
        part = merged.tensors[name]
        assert part.shape == whole.shape, name
        if name.endswith(tuple("." + entry for entry in (*COUNT_ENTRIES, "nr.tau"))) or name == "tokens":
            assert torch.equal(part, whole), name  # counts (and the shared tau) are exact
        else:
            torch.testing.assert_close(part, whole, rtol=1e-9, atol=1e-9, msg=name)


def test_independent_shards_add_up_in_every_threshold_free_entry(run: FamilyRun):
    """Shards collected independently fit their own tau and topics; whatever does not depend on
    them (Wanda's squared norms, sum |a|, token counts) still adds up exactly."""
    first, second = collect_shards(run, LayerAccumulator)
    merged = first.add_(second)
    assert merged.tokens == run.stats.tokens
    for layer in range(run.num_layers):
        names = [f"layer.{layer}.{group}.sumsq" for group in INPUT_GROUPS] + [f"layer.{layer}.nr.abs_sum"]
        for name in names:
            torch.testing.assert_close(merged.tensors[name], run.stats.tensors[name], rtol=1e-9, atol=1e-9, msg=name)
        name = f"layer.{layer}.nr.window_tokens"
        assert torch.equal(merged.tensors[name], run.stats.tensors[name])
        assert float(merged.tensors[f"layer.{layer}.nr.topic_tokens"].sum()) == run.stats.tokens


def test_add_refuses_a_different_layout(run: FamilyRun):
    whole = CalibrationStats({name: t.clone() for name, t in run.stats.tensors.items()})
    fewer_layers = CalibrationStats({name: t for name, t in whole.tensors.items() if not name.startswith("layer.1.")})
    with pytest.raises(ValueError, match="different layouts"):
        whole.add_(fewer_layers)


def _heap_free_bytes() -> int | None:
    """glibc's free bytes inside the heap (mallinfo2 fordblks), None where there is no mallinfo2."""
    import ctypes

    from hybridprune.calibration.runner import _libc

    libc = _libc()
    if libc is None or not hasattr(libc, "mallinfo2"):
        return None

    class MallInfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in
                    ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

    libc.mallinfo2.restype = MallInfo2
    return int(libc.mallinfo2().fordblks)


def test_kept_freed_memory_keeps_a_large_freed_block_in_the_heap_only_inside(monkeypatch):
    """Inside kept_freed_memory a freed 64 MB tensor stays in glibc's heap for the next batch; outside (and with
    HYBRIDPRUNE_MALLOC=system) glibc's defaults map and unmap it, so nothing of it stays."""
    from hybridprune.calibration.runner import kept_freed_memory, return_freed_memory

    if _heap_free_bytes() is None:
        pytest.skip("glibc's mallinfo2 is needed to see the heap")
    size = 64 * 2**20

    def kept_after_free() -> int:
        return_freed_memory()
        before = _heap_free_bytes()
        block = torch.empty(size // 4, dtype=torch.float32)
        block.fill_(1.0)
        del block
        return _heap_free_bytes() - before

    with kept_freed_memory():
        assert kept_after_free() >= size
    assert kept_after_free() < size  # glibc's mmap again afterwards (its threshold is at most 32 MB)
    monkeypatch.setenv("HYBRIDPRUNE_MALLOC", "system")
    with kept_freed_memory():
        assert kept_after_free() < size
    return_freed_memory()
