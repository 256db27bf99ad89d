"""The cost model: time and memory of every pruning phase per decoder layer, as the layer grows (issue 21, item 3).

    python benchmarks/scale.py run --shapes smollm2,qwen1.5b,llama8b,qwen14b,llama70b   # measure, then report
    python benchmarks/scale.py report                                                   # docs/scale.md + .png from .json
    python benchmarks/scale.py check                                                    # the SparseGPT anchor's self-check

Each shape (BENCHMARK.md, "Scale") is built as a random-initialised LlamaForCausalLM with 1 or 2 decoder layers
of the published width, a vocabulary of 512 (the embedding and LM head are accounted for separately, at the real
vocabulary), bfloat16 weights on the CPU (as `--dtype bfloat16 --device cpu` runs it). Every shape is measured in
a fresh subprocess (its own peak RSS), which appends one JSON line per phase to a partial file, so a time box
(--time-box) keeps what was measured before it. The phases go through the product's own functions:
  forward       run_layerwise without observers (the layer-wise pass that calibration runs, nothing collected)
  first_order   collect_statistics(hessians=False)
  second_order  collect_statistics(hessians=True, first_order=False): the second-order entry as the product
                builds it (today including its factorization at the end of each layer), at T and T/2 tokens
  wanda / hybrid / balanced / quality  prune_layer on layer 0 with the preset's plan (hybrid = balanced with
                refine 0, no second-order entry); refine = balanced - hybrid, update = quality - balanced
  outliers      pruning.layer_importance on layer 0: the outlier ratio that --layer-spread (balanced's and
                quality's 0.04) reads of every layer before pruning (with --offload: after loading it once more)
  sparsegpt     benchmarks/sparsegpt_anchor.py on the same layer: per input group one damped Cholesky-based
                inverse of X^T X (collected here with forward hooks, float32), then the column sweep of each Linear
The layer's weights are restored between the pruning phases (untimed).
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import io
import json
import math
import os
import platform
import pstats
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

GB = 1e9
PRODUCT_TOKENS = 32 * 512  # the product's default calibration (nsamples 32 x seqlen 512)
VOCAB_BUILT = 512
DOCS = ROOT / "docs"


@dataclass(frozen=True)
class Shape:
    key: str
    name: str
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    layers: int
    vocab: int
    family: str  # the published family; every shape is built as a LLaMA (see module doc)
    built_layers: int  # decoder layers built and run (per-layer figures divide the pass by it)

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def layer_parameters(self) -> int:
        kv = self.kv_heads * self.head_dim
        return 2 * self.hidden * self.hidden + 2 * kv * self.hidden + 3 * self.hidden * self.intermediate

    @property
    def widest_input(self) -> int:
        return max(self.hidden, self.intermediate)


SHAPES = {
    shape.key: shape
    for shape in (
        Shape("smollm2", "SmolLM2-135M", 576, 1536, 9, 3, 30, 49152, "llama", 2),
        Shape("qwen1.5b", "Qwen2.5-1.5B", 1536, 8960, 12, 2, 28, 151936, "qwen2", 2),
        Shape("llama8b", "Llama-3.1-8B", 4096, 14336, 32, 8, 32, 128256, "llama", 1),
        Shape("qwen14b", "Qwen2.5-14B", 5120, 13824, 40, 8, 48, 152064, "qwen2", 1),
        Shape("llama70b", "Llama-3.1-70B", 8192, 28672, 64, 8, 80, 128256, "llama", 1),
    )
}
PER_TOKEN = ("forward", "first_order", "second_order", "sparsegpt_gram")
PHASES = ("forward", "first_order", "second_order", "wanda", "hybrid", "refine", "balanced", "update", "quality", "joint",
          "sparsegpt", "outliers")
# the tables also show the measured hybrid + update, and the same with the least-squares update (--update-mask lsq)
TABLE_PHASES = (*PHASES[:7], "hybrid_update", "hybrid_lsq", *PHASES[7:])
PHASE_LABELS = {
    "forward": "plain forward (reference)",
    "first_order": "first-order calibration",
    "second_order": "second-order collection",
    "wanda": "Wanda masks",
    "hybrid": "hybrid masks",
    "refine": "refine (balanced - hybrid)",
    "balanced": "balanced (hybrid + refine)",
    "hybrid_update": "hybrid masks + OBS sweep update (refine 0)",
    "hybrid_lsq": "hybrid masks + least-squares update (refine 0)",
    "update": "update (least squares where measured)",
    "quality": "quality (balanced + update)",
    "joint": "joint (balanced + ADMM solve)",
    "sparsegpt": "SparseGPT (inverse + sweep)",
    "sparsegpt_gram": "SparseGPT's X^T X collection",
    "outliers": "layer spread: the layer's outlier ratio (OWL)",
}


# --- memory ---------------------------------------------------------------------------------------------


def _status(field: str) -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith(field + ":"))


def reset_peak() -> None:
    """Reset this process's VmHWM to its current RSS (Linux >= 4.0: clear_refs 5)."""
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")


def available() -> int:
    import psutil

    return psutil.virtual_memory().available


def scaled_estimate(document: dict[str, Any], shape: Shape, tokens: int, phases: tuple[str, ...], by: str = "width2") -> float:
    """Bytes that `phases` may need at `shape` beyond what the process holds when they start (the check runs in the
    child, whose layers are already resident): 1 GB plus the largest peak (above the phase's start) measured
    for them at the widest smaller shape in `document`, scaled by (widest input / its widest input)^2 for n x n buffers
    (`by` "width2") or by the ratio of parameters per layer for [rows, inputs] buffers ("params": refine's search
    state); 0 when no smaller shape has them."""
    best = None
    for entry in document.get("shapes", {}).values():
        other = Shape(**entry["shape"])
        peaks = [row["peak_rss_above_start"] for row in entry.get("rows", []) if row.get("phase") in phases]
        if peaks and other.widest_input <= shape.widest_input and (best is None or other.widest_input > best[0].widest_input):
            best = (other, max(peaks))
    if best is None:
        return 0.0
    ratio = ((shape.widest_input / best[0].widest_input) ** 2 if by == "width2"
             else shape.layer_parameters / best[0].layer_parameters)
    return 1.0 * GB + best[1] * ratio


def wait_for(need: float, what: str, minutes: float) -> bool:
    """True once `need` bytes are available (polled every 60 s for up to `minutes`), False if they never were."""
    deadline = time.monotonic() + 60 * minutes
    while available() < need:
        if time.monotonic() >= deadline:
            return False
        print(f"{what}: waiting for {need / GB:.1f} GB free ({available() / GB:.1f} GB now)", flush=True)
        time.sleep(60)
    return True


def memory_estimate(shape: Shape, tokens: int) -> dict[str, float]:
    """Bytes a shape's run may need: the fixed part (weights of the built layers + a restore copy + activations)
    and the second-order phases (n^2 float64 buffers of the widest input group: the Gram, its factor and their
    temporaries; 5 of them is what today's collection + quality prune of one 8B-shape layer peaked at)."""
    weights = 2 * shape.layer_parameters * (shape.built_layers + 1)
    activations = tokens * (2 * shape.hidden * 2 + 3 * shape.intermediate * 4 / 8)  # two bf16 copies + a batch's MLP
    fixed = weights + activations + 1.0 * GB
    return {"fixed": fixed, "second_order": fixed + 5 * 8 * shape.widest_input**2}


# --- the measured child ------------------------------------------------------------------------------------


COMMIT = ""  # the product's commit, set by the child (each row carries it: partial reruns mix commits)


class Recorder:
    """Times a phase (median of repeats, or once when it is long) with its peak RSS above the phase's start."""

    def __init__(self, partial: Path, repeats: int, long_phase: float, profile: tuple[str, ...] = ()) -> None:
        self.partial, self.repeats, self.long_phase, self.profile = partial, repeats, long_phase, profile

    def emit(self, row: dict[str, Any]) -> None:
        row = {**row, "commit": COMMIT, "at": time.strftime("%Y-%m-%d %H:%M:%S"), "load1": os.getloadavg()[0]}
        with self.partial.open("a") as handle:
            handle.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)

    def measure(self, phase: str, run: Callable[[], Any], before: Callable[[], None] | None = None, **extra: Any) -> Any:
        from hybridprune.calibration.runner import return_freed_memory

        seconds, cpu, peaks, result = [], [], [], None
        profiler = cProfile.Profile() if phase in self.profile else None
        for _ in range(self.repeats):
            if before is not None:
                before()
            result = None
            gc.collect()
            return_freed_memory()
            start_rss = _status("VmRSS")
            reset_peak()
            started, started_cpu = time.perf_counter(), time.process_time()
            if profiler is not None:
                profiler.enable()
            result = run()
            if profiler is not None:
                profiler.disable()
            seconds.append(time.perf_counter() - started)
            cpu.append(time.process_time() - started_cpu)
            peaks.append(_status("VmHWM") - start_rss)
            if seconds[-1] > self.long_phase:
                break
        ordered = sorted(seconds)
        row = {"phase": phase, "seconds": ordered[len(ordered) // 2], "runs": seconds, "cpu_seconds": cpu, "peak_rss_above_start": max(peaks),
               "rss_at_start": start_rss, **extra}
        self.emit(row)
        if profiler is not None:
            self.emit({"phase": f"{phase}_profile", "runs": len(seconds), "top": profile_top(profiler)})
        return result


def build_model(shape: Shape, seqlen: int):
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from hybridprune.models.loading import quiet_transformers

    quiet_transformers()
    config = LlamaConfig(
        vocab_size=VOCAB_BUILT, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
        num_hidden_layers=shape.built_layers, num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads,
        max_position_embeddings=max(seqlen, 2048), tie_word_embeddings=False, use_cache=False,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.eval()
    return model


def collect_grams(model, adapter, windows, batch_size: int) -> dict[str, Any]:
    """X^T X per input group of layer 0 (float32 sums, as SparseGPT's add_batch accumulates), via the product's pass."""
    from hybridprune.calibration.runner import run_layerwise

    grams: dict[str, Any] = {}

    def observe(index: int, layer):
        if index != 0:
            return lambda: None
        linears = adapter.linears(layer)

        def tap(group: str, x) -> None:
            flat = x.detach().reshape(-1, x.shape[-1]).float()
            if group in grams:
                grams[group].addmm_(flat.T, flat)
            else:
                grams[group] = flat.T @ flat

        handles = [linears[name].register_forward_pre_hook(lambda _m, args, group=group: tap(group, args[0]))
                   for name, group in adapter.group_readers().items()]
        return lambda: [handle.remove() for handle in handles]

    run_layerwise(model, adapter, windows, batch_size=batch_size, device=_cpu(), observe=observe)
    return grams


def _cpu():
    import torch

    return torch.device("cpu")


def layer_tensor_bytes(stats, index: int = 0) -> int:
    """Bytes of one layer's entries in the safetensors format the cache writes (header excluded)."""
    tensors = getattr(stats, "tensors", None)
    if tensors is None:
        return -1
    return sum(t.numel() * t.element_size() for name, t in tensors.items() if name.startswith(f"layer.{index}."))


def written_bytes(stats) -> int:
    """The size of the safetensors file of these statistics (what one cache entry's stats.safetensors holds)."""
    from safetensors.torch import save_file

    tensors = getattr(stats, "tensors", None)
    if tensors is None:
        return -1
    with tempfile.TemporaryDirectory(prefix="scale-bytes-") as folder:
        path = Path(folder) / "stats.safetensors"
        save_file({name: t.contiguous() for name, t in tensors.items()}, path)
        return path.stat().st_size


def lm_head_rate(hidden: int, threads: int) -> dict[str, float]:
    """Measured bfloat16 matmul rate of an LM-head-like product [512 tokens, hidden] x [hidden, 8192 vocab columns]."""
    import torch

    x = torch.randn(512, hidden, dtype=torch.bfloat16)
    w = torch.randn(8192, hidden, dtype=torch.bfloat16)
    torch.nn.functional.linear(x, w)
    runs = []
    for _ in range(3):
        started = time.perf_counter()
        torch.nn.functional.linear(x, w)
        runs.append(time.perf_counter() - started)
    seconds = sorted(runs)[1]
    return {"seconds": seconds, "flops": 2.0 * 512 * hidden * 8192, "flops_per_second": 2.0 * 512 * hidden * 8192 / seconds}


def profile_top(profiler: cProfile.Profile, limit: int = 40) -> dict[str, list[dict[str, Any]]]:
    """The functions with the most cumulative time and the most own time (torch's C functions show up there)."""
    stats = pstats.Stats(profiler, stream=io.StringIO())
    rows = []
    for (filename, line, function), (_calls, ncalls, tottime, cumtime, _callers) in stats.stats.items():  # type: ignore[attr-defined]
        where = f"{Path(filename).parent.name}/{Path(filename).name}:{line}" if filename != "~" else "builtin"
        rows.append({"function": f"{where}({function})", "calls": ncalls, "tottime": tottime, "cumtime": cumtime})
    by_cumulative = sorted(rows, key=lambda row: row["cumtime"], reverse=True)[:limit]
    by_own = sorted(rows, key=lambda row: row["tottime"], reverse=True)[:limit]
    return {"cumulative": by_cumulative, "own": by_own}


def measure_shape(args: argparse.Namespace) -> None:
    """The child: every phase of one shape, one JSON line each (appended to args.partial)."""
    import torch

    torch.set_num_threads(args.threads)
    from sparsegpt_anchor import prune_group

    from hybridprune.calibration.collect import CollectionOptions, collect_statistics
    from hybridprune.calibration.runner import run_layerwise
    from hybridprune.models.adapters import adapter_for
    from hybridprune.presets import get_preset, resolve
    from hybridprune.pruning import layer_importance, neuron_scoring, plan_layers, prune_layer

    global COMMIT
    COMMIT = commit()
    shape = SHAPES[args.shape]
    profiled = ("first_order", "wanda", "hybrid", "second_order", "balanced", "hybrid_update", "quality") if args.profile else ()
    recorder = Recorder(Path(args.partial), args.repeats, args.long_phase, profiled)
    tokens = args.nsamples * args.seqlen
    estimate = memory_estimate(shape, tokens)
    free = available()
    recorder.emit({"phase": "setup", "tokens": tokens, "nsamples": args.nsamples, "seqlen": args.seqlen, "available": free,
                   "estimate": estimate, "threads": torch.get_num_threads(), "shape": asdict(shape)})
    if free < estimate["fixed"]:
        recorder.emit({"phase": "refused", "reason": f"{shape.name}: {free / GB:.1f} GB available, the layers alone need "
                       f"about {estimate['fixed'] / GB:.1f} GB"})
        return
    started = time.perf_counter()
    model = build_model(shape, args.seqlen)
    adapter = adapter_for("llama")
    layer = adapter.layers(model)[0]
    original = {name: tensor.clone() for name, tensor in layer.state_dict().items()}
    generator = torch.Generator().manual_seed(0)
    windows = torch.randint(0, VOCAB_BUILT, (args.nsamples, args.seqlen), generator=generator)
    half = windows[: args.nsamples // 2]
    recorder.emit({"phase": "built", "seconds": time.perf_counter() - started, "rss": _status("VmRSS")})
    batch = args.batch_size
    per_layer = {"built_layers": shape.built_layers}
    wanted = set(args.phases.split(",")) if args.phases else None

    def want(phase: str) -> bool:
        return wanted is None or phase in wanted

    def restore() -> None:
        layer.load_state_dict(original)

    if want("forward"):
        for part, label in ((windows, "forward"), (half, "forward_half")):
            recorder.measure(label, lambda part=part: run_layerwise(model, adapter, part, batch_size=batch, device=_cpu()),
                             tokens=part.numel(), **per_layer)
    options = CollectionOptions()
    if want("first_order"):
        stats = recorder.measure("first_order", lambda: collect_statistics(model, adapter, windows, options, batch_size=batch),
                                 tokens=windows.numel(), **per_layer)
        recorder.measure("first_order_half", lambda: collect_statistics(model, adapter, half, options, batch_size=batch),
                         tokens=half.numel(), **per_layer)
    else:
        # the statistics every later phase needs, collected but not recorded: a partial rerun then leaves the
        # first-order row of the run that also measured the forward pass (their ratio stays within one run)
        stats = collect_statistics(model, adapter, windows, options, batch_size=batch)
    recorder.emit({"phase": "first_order_bytes", "layer_bytes": layer_tensor_bytes(stats), "file_bytes": written_bytes(stats),
                   "built_layers": shape.built_layers})

    def prune_with(preset: str, hessians, **override: Any) -> Callable[[], None]:
        config = resolve(override, get_preset(preset))
        plan = plan_layers(model, adapter, stats, config)[0]
        scoring = neuron_scoring(config)
        return lambda: prune_layer(layer, 0, adapter, stats, plan, scoring, hessians, config.update_shrink)

    with torch.no_grad():
        if want("wanda"):
            recorder.measure("wanda", prune_with("wanda", None), before=restore)
        if want("outliers"):
            recorder.measure("outliers", lambda: layer_importance(model, adapter, stats, range(1)))
        if want("hybrid"):
            recorder.measure("hybrid", prune_with("balanced", None, refine=0), before=restore)
        restore()
        # the order within a time box: the default preset's phases first, then the two with an n^3 factorization
        hessians = None
        if want("second_order") or want("balanced") or want("quality") or want("hybrid_update") or want("hybrid_lsq") or want("joint"):
            need = args.estimate_second_order or (memory_estimate(shape, tokens)["second_order"]
                                              - memory_estimate(shape, tokens)["fixed"] + 1.0 * GB)
            if not wait_for(need, f"{shape.name} second-order phases", args.wait_minutes):
                recorder.emit({"phase": "refused", "reason": f"{shape.name}: second-order phases need about "
                               f"{need / GB:.1f} GB, {available() / GB:.1f} GB available"})
            else:
                for part, label in ((half, "second_order_half"), (windows, "second_order")):
                    hessians = None
                    gc.collect()
                    hessians = recorder.measure(
                        label, lambda part=part: collect_statistics(model, adapter, part, options, batch_size=batch,
                                                                    hessians=True, first_order=False),
                        tokens=part.numel(), **per_layer)
                recorder.emit({"phase": "second_order_bytes", "layer_bytes": layer_tensor_bytes(hessians),
                               "file_bytes": written_bytes(hessians), "built_layers": shape.built_layers})
                need = args.estimate_refine
                if (want("balanced") or want("hybrid_update") or want("hybrid_lsq") or want("quality")) and not wait_for(
                        need, f"{shape.name} refine / update", args.wait_minutes):
                    recorder.emit({"phase": "refused", "reason": f"{shape.name}: balanced / quality need about "
                                   f"{need / GB:.1f} GB, {available() / GB:.1f} GB available"})
                    wanted = {"none"}  # nothing more of this shape needs less
                if want("balanced"):
                    recorder.measure("balanced", prune_with("balanced", hessians), before=restore)
                    restore()
                if want("hybrid_update"):  # the update alone: quality's masks without refine, then the OBS sweep
                    recorder.measure("hybrid_update", prune_with("quality", hessians, refine=0, update_mask="fixed"),
                                     before=restore)
                    restore()
                if want("hybrid_lsq"):  # the same masks, the kept weights at their least-squares optimum
                    recorder.measure("hybrid_lsq", prune_with("quality", hessians, refine=0, update_mask="lsq"), before=restore)
                    restore()
        need = args.estimate_sparsegpt
        if want("sparsegpt") and not wait_for(need, f"{shape.name} SparseGPT", args.wait_minutes):
            recorder.emit({"phase": "refused", "reason": f"{shape.name}: SparseGPT needs about {need / GB:.1f} GB, "
                           f"{available() / GB:.1f} GB available"})
        elif want("sparsegpt"):
            grams = recorder.measure("sparsegpt_gram", lambda: collect_grams(model, adapter, windows, batch), tokens=tokens,
                                     **per_layer)
            linears = adapter.linears(layer)

            def sparsegpt() -> dict[str, float]:
                inverse = sweep = 0.0
                for group in dict.fromkeys(adapter.input_group(name) for name in linears):
                    names = [name for name in linears if adapter.input_group(name) == group]
                    pruned, seconds_inverse, seconds_sweep = prune_group([linears[n].weight for n in names], grams[group])
                    inverse, sweep = inverse + seconds_inverse, sweep + seconds_sweep
                    for name, weight in zip(names, pruned):
                        assert int((weight == 0).sum()) >= weight.numel() // 2 - weight.shape[1] // 128 - 1
                        linears[name].weight.copy_(weight)
                    del pruned
                return {"inverse": inverse, "sweep": sweep}

            parts = recorder.measure("sparsegpt", sparsegpt, before=restore)
            recorder.emit({"phase": "sparsegpt_parts", **parts})
            del grams
            restore()
        if hessians is not None and want("quality"):
            recorder.measure("quality", prune_with("quality", hessians), before=restore)
            restore()
        if hessians is not None and want("joint"):
            recorder.measure("joint", prune_with("joint", hessians), before=restore)
    recorder.emit({"phase": "done", "seconds": time.perf_counter() - started})


# --- the parent: run shapes, collect, report ---------------------------------------------------------------


def machine() -> dict[str, Any]:
    import torch

    model = next((line.split(":", 1)[1].strip() for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout
                  .splitlines() if line.startswith("Model name")), platform.processor())
    flags = open("/proc/cpuinfo").read()
    return {"cpu": model, "cores": os.cpu_count(), "avx512": "avx512f" in flags, "amx_bf16": "amx_bf16" in flags,
            "torch": torch.__version__, "python": platform.python_version(), "memory_gb": _total_memory() / GB,
            "thp_alloc": os.environ.get("THP_MEM_ALLOC_ENABLE", "")}


def _total_memory() -> int:
    import psutil

    return psutil.virtual_memory().total


def commit() -> str:
    done = subprocess.run(["git", "-C", str(ROOT), "log", "-1", "--format=%h %s"], capture_output=True, text=True)
    return done.stdout.strip()[:100]


def run_shapes(args: argparse.Namespace) -> None:
    # the product's environment defaults for every shape's process, as the CLI has them (torch reads
    # THP_MEM_ALLOC_ENABLE, its huge-page allocation, once, at its first allocation): SparseGPT's phases run under it too
    import hybridprune.env  # noqa: F401

    path = Path(args.json)
    document = json.loads(path.read_text()) if path.exists() else {"shapes": {}}
    for key in args.shapes.split(","):
        shape = SHAPES[key]
        nsamples = args.big_nsamples if key == "llama70b" else args.nsamples
        tokens = nsamples * args.seqlen
        need = memory_estimate(shape, tokens)["fixed"]
        while available() < need + args.margin * GB and args.wait > 0:
            print(f"{shape.name}: waiting for {need / GB + args.margin:.1f} GB free ({available() / GB:.1f} GB now)", flush=True)
            time.sleep(60)
        with tempfile.NamedTemporaryFile(prefix=f"scale-{key}-", suffix=".jsonl", delete=False) as handle:
            partial = Path(handle.name)
        repeats = args.big_repeats if key == "llama70b" else args.repeats
        command = [sys.executable, __file__, "shape", key, "--nsamples", str(nsamples), "--seqlen", str(args.seqlen),
                   "--threads", str(args.threads), "--repeats", str(repeats), "--batch-size", str(args.batch_size),
                   "--long-phase", str(args.long_phase), "--partial", str(partial)]
        if args.phases:
            command += ["--phases", args.phases]
        for flag, phases, by in (("--estimate-sparsegpt", ("sparsegpt", "sparsegpt_gram"), "width2"),
                                 ("--estimate-second-order", ("second_order", "second_order_half"), "width2"),
                                 ("--estimate-refine", ("balanced", "hybrid_update", "quality"), "params")):
            given = args.estimate_refine_gb if flag == "--estimate-refine" else 0.0
            command += [flag, f"{given * GB if given else scaled_estimate(document, shape, tokens, phases, by):.0f}"]
        command += ["--wait-minutes", str(3 if key == "llama70b" else 20)]
        if args.profile and key in args.profile.split(","):
            command.append("--profile")
        box = args.time_box if key == "llama70b" or args.box_all else None
        print(f"== {shape.name}: {' '.join(command[1:])}" + (f" (time box {box:.0f} s)" if box else ""), flush=True)
        started = time.perf_counter()
        status = "ok"
        try:
            done = subprocess.run(command, timeout=box, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
            if done.returncode != 0:
                status = f"failed (exit {done.returncode})"
        except subprocess.TimeoutExpired:
            status = f"stopped at the time box of {box:.0f} s"
        rows = [json.loads(line) for line in partial.read_text().splitlines() if line.strip()]
        partial.unlink()
        previous = document["shapes"].get(key, {})
        if args.phases and previous:  # only what was asked for: the inputs of a listed phase (the second-order
            # statistics, the setup at this run's token count) keep the rows of the run that measured them
            listed = set(args.phases.split(","))
            recorded = listed | {"refused"} | {part for phase in listed for part in COMPANIONS.get(phase, ())}
            rows = [row for row in rows if row["phase"] in recorded]
        measured_phases = {row["phase"] for row in rows}
        running = next((p for p in ("forward", "first_order", "wanda", "hybrid", "second_order_half", "second_order",
                                    "balanced", "hybrid_update", "sparsegpt", "quality") if p not in measured_phases), None)
        if args.phases and previous:  # a partial rerun replaces only the phases it measured (and drops --drop)
            dropped = set(args.drop.split(",")) if args.drop else set()
            kept = [row for row in previous.get("rows", []) if row["phase"] not in measured_phases | dropped]
            rows = kept + rows
        if path.exists():  # another run may have written other shapes meanwhile: keep theirs, replace this one
            document = {**json.loads(path.read_text()), "shapes": {**json.loads(path.read_text())["shapes"]}}
        partial_run = bool(args.phases and previous.get("rows"))
        # the LM head's matmul rate belongs with the forward pass it completes: a partial rerun without it keeps the old
        lm_head = (previous["lm_head"] if partial_run and "lm_head" in previous and "forward" not in args.phases.split(",")
                   else lm_head_rate(shape.hidden, args.threads))
        document["shapes"][key] = {
            "shape": asdict(shape), "status": status, "wall_seconds": time.perf_counter() - started, "rows": rows,
            "unfinished_phase": running if status != "ok" else None, "lm_head": lm_head,
            "commands": [*(previous.get("commands") or [previous["command"]] if args.phases and previous.get("rows") else []),
                         " ".join(["python benchmarks/scale.py", *sys.argv[1:]])],
        }
        document["machine"] = machine()
        if not partial_run:  # the code the whole table was measured with; each row keeps its own commit
            document["commit"] = commit()
        document["threads"] = args.threads
        document["product_tokens"] = PRODUCT_TOKENS
        path.write_text(json.dumps(document, indent=1))
        print(f"== {shape.name}: {status} in {time.perf_counter() - started:.0f} s", flush=True)
    report(argparse.Namespace(json=args.json, out=args.out))


# --- the model built from the measurements ------------------------------------------------------------------


# the rows a listed phase brings with it (a partial rerun records those and nothing else)
COMPANIONS = {"forward": ("forward_half",), "first_order": ("first_order_half", "first_order_bytes"),
              "second_order": ("second_order_half", "second_order_bytes"), "sparsegpt": ("sparsegpt_parts",)}
UPDATE_DERIVED = (("refine", ("balanced", "hybrid")), ("update", ("hybrid_lsq", "hybrid")), ("update", ("hybrid_update", "hybrid")))


def phase_table(entry: dict[str, Any]) -> dict[str, Any]:
    """Per-layer seconds and peaks of one shape's rows, with the derived phases and the 16384-token extrapolation."""
    rows = {row["phase"]: row for row in entry["rows"]}
    built = entry["shape"]["built_layers"]
    tokens = rows["setup"]["tokens"]
    seconds: dict[str, float] = {}
    at_product: dict[str, float] = {}
    peaks: dict[str, float] = {}
    notes: dict[str, str] = {}
    for phase in ("forward", "first_order", "second_order", "sparsegpt_gram"):
        if phase not in rows:
            continue
        full = rows[phase]["seconds"] / built
        seconds[phase] = full
        peaks[phase] = rows[phase]["peak_rss_above_start"]
        half = rows.get(phase + "_half")
        if half is not None:
            # a + b * tokens through (T/2, T): b per token, a per layer (second order: the factorization; first
            # order: the fits of tau and the topic centroids); both clamped at 0 against timing noise
            slope = max(0.0, (full - half["seconds"] / built) / (tokens - half["tokens"]))
            constant = max(0.0, full - slope * tokens)
            at_product[phase] = constant + slope * PRODUCT_TOKENS
            notes[phase] = f"{constant:.2f} s per layer + {slope * 1e3:.3f} ms per token"
        else:
            at_product[phase] = full * PRODUCT_TOKENS / tokens
    for phase in ("wanda", "hybrid", "balanced", "hybrid_update", "hybrid_lsq", "quality", "joint", "sparsegpt", "outliers"):
        if phase in rows:
            seconds[phase] = at_product[phase] = rows[phase]["seconds"]
            peaks[phase] = rows[phase]["peak_rss_above_start"]
    # refine = balanced - hybrid masks; update = (hybrid masks + least-squares update) - hybrid masks where measured
    # so (quality's update since 2026-12-06), else the OBS sweep's, else quality - balanced; quality = balanced +
    # update where it was not measured itself
    for derived, (minuend, subtrahend) in UPDATE_DERIVED:
        if derived not in seconds and minuend in seconds and subtrahend in seconds:
            seconds[derived] = at_product[derived] = seconds[minuend] - seconds[subtrahend]
            notes[derived] = f"{minuend} - {subtrahend}"
    if "update" not in seconds and "quality" in seconds and "balanced" in seconds:
        seconds["update"] = at_product["update"] = seconds["quality"] - seconds["balanced"]
        notes["update"] = "quality - balanced"
    if "quality" not in seconds and "balanced" in seconds and "update" in seconds:
        seconds["quality"] = at_product["quality"] = seconds["balanced"] + seconds["update"]
        notes["quality"] = "balanced + update"
    cpu: dict[str, float] = {}
    for phase in ("forward", "first_order", "second_order", "wanda", "hybrid", "balanced", "hybrid_update", "hybrid_lsq",
                  "quality", "joint", "sparsegpt", "outliers"):
        if phase in rows and rows[phase].get("cpu_seconds"):
            ordered = sorted(rows[phase]["cpu_seconds"])
            cpu[phase] = ordered[len(ordered) // 2] / (built if phase in PER_TOKEN else 1)
    for derived, (minuend, subtrahend) in UPDATE_DERIVED:
        if derived not in cpu and minuend in cpu and subtrahend in cpu:
            cpu[derived] = cpu[minuend] - cpu[subtrahend]
    if "update" not in cpu and "quality" in cpu and "balanced" in cpu:
        cpu["update"] = cpu["quality"] - cpu["balanced"]
    if "quality" not in cpu and "balanced" in cpu and "update" in cpu:
        cpu["quality"] = cpu["balanced"] + cpu["update"]
    bytes_written = {order: rows[f"{order}_bytes"]["file_bytes"] / built for order in ("first_order", "second_order")
                     if f"{order}_bytes" in rows}
    return {"tokens": tokens, "seconds": seconds, "cpu": cpu, "at_product": at_product, "peaks": peaks, "notes": notes,
            "bytes": bytes_written, "parts": rows.get("sparsegpt_parts"), "rows": rows}


def whole_model(entry: dict[str, Any], table: dict[str, Any]) -> dict[str, float]:
    """Whole-model seconds at 16384 tokens: layers x per-layer (the product's pass runs the embedding lookup, not the
    LM head); the full forward adds the LM head at the real vocabulary from the measured matmul rate."""
    shape = entry["shape"]
    layers = shape["layers"]
    p = table["at_product"]
    out = {phase: layers * value for phase, value in p.items()}
    head = 2.0 * PRODUCT_TOKENS * shape["hidden"] * shape["vocab"] / entry["lm_head"]["flops_per_second"]
    out["lm_head"] = head
    if "forward" in p:
        out["forward_with_lm_head"] = out["forward"] + head
    spread = p.get("outliers", 0.0)  # the layer spread's outlier ratios (balanced and quality since 2026-12-06) where measured
    if all(k in p for k in ("first_order", "second_order", "balanced")):
        out["default_preset"] = layers * (p["first_order"] + p["second_order"] + p["balanced"] + spread)
    if all(k in p for k in ("first_order", "second_order", "quality")):
        out["quality_preset"] = layers * (p["first_order"] + p["second_order"] + p["quality"] + spread)
    if "sparsegpt" in p and "sparsegpt_gram" in p:
        out["sparsegpt_pipeline"] = layers * (p["sparsegpt"] + p["sparsegpt_gram"])
    return out


def slopes(document: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Least-squares slope of log(seconds per layer at 16384 tokens) against log(parameters per layer), per phase."""
    result = {}
    for phase in PHASES:
        points = []
        for entry in document["shapes"].values():
            table = phase_table(entry)
            value = table["at_product"].get(phase)
            if value is not None and value > 0:
                points.append((math.log(_shape(entry).layer_parameters), math.log(value)))
        if len(points) >= 2:
            (x1, y1), (x2, y2) = sorted(points)[-2:]
            top = (y2 - y1) / (x2 - x1)
            mx = sum(x for x, _ in points) / len(points)
            my = sum(y for _, y in points) / len(points)
            sxx = sum((x - mx) ** 2 for x, _ in points)
            slope = sum((x - mx) * (y - my) for x, y in points) / sxx
            result[phase] = {"slope": slope, "points": len(points), "top_slope": top}
    return result


def _shape(entry: dict[str, Any]) -> Shape:
    return Shape(**entry["shape"])


def report(args: argparse.Namespace) -> None:
    document = json.loads(Path(args.json).read_text())
    out = Path(args.out)
    order = [key for key in SHAPES if key in document["shapes"]]
    tables = {key: phase_table(document["shapes"][key]) for key in order}
    fitted = slopes(document)
    plot(document, order, tables, fitted, out.with_suffix(".png"))
    out.write_text(markdown(document, order, tables, fitted, out.with_suffix(".png").name))
    derived = {key: {"per_layer": {k: v for k, v in t.items() if k != "rows"},
                     "whole_model": whole_model(document["shapes"][key], t)} for key, t in tables.items()}
    document["derived"] = {"shapes": derived, "slopes": fitted}
    Path(args.json).write_text(json.dumps(document, indent=1))
    print(f"wrote {out} and {out.with_suffix('.png')}")


def plot(document, order, tables, fitted, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(8.5, 6))
    for phase in PHASES:
        xs, ys = [], []
        for key in order:
            value = tables[key]["at_product"].get(phase)
            if value is not None and value > 0:
                xs.append(_shape(document["shapes"][key]).layer_parameters)
                ys.append(value)
        if not xs:
            continue
        slope = fitted.get(phase, {}).get("slope")
        label = PHASE_LABELS[phase] + (f"  (slope {slope:.2f})" if slope is not None else "")
        style = "--" if phase in ("sparsegpt", "forward") else "-"
        axis.plot(xs, ys, style, marker="o", label=label, linewidth=2.2 if phase in ("sparsegpt", "forward") else 1.3)
    for key in order:
        shape = _shape(document["shapes"][key])
        axis.annotate(shape.name, (shape.layer_parameters, axis.get_ylim()[0]), rotation=90, fontsize=7, va="bottom",
                      ha="right", alpha=0.6)
    axis.set_xscale("log")
    axis.set_yscale("log")
    axis.set_xlabel("parameters per decoder layer")
    axis.set_ylabel(f"seconds per layer ({PRODUCT_TOKENS} calibration tokens; {document.get('threads')} CPU threads)")
    axis.set_title("hybridprune phases per decoder layer vs layer size (log-log)")
    axis.grid(True, which="both", alpha=0.3)
    axis.legend(fontsize=7.5, loc="upper left")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def _s(value: float | None) -> str:
    if value is None:
        return "-"
    if value >= 3600:
        return f"{value / 3600:.1f} h"
    if value >= 100:
        return f"{value / 60:.1f} min"
    return f"{value:.2f} s" if value < 10 else f"{value:.0f} s"


def _x(value: float | None) -> str:
    return "-" if value is None else (f"{value:.2f}x" if value < 10 else f"{value:.0f}x")


def _b(value: float | None) -> str:
    if value is None or value < 0:
        return "-"
    return f"{value / GB:.2f} GB" if value >= 0.1 * GB else f"{value / 1e6:.1f} MB"


def markdown(document, order, tables, fitted, png: str) -> str:
    m = document["machine"]
    lines = [
        "# Scale: the cost of each pruning phase per decoder layer, from SmolLM2-135M to Llama-3.1-70B",
        "",
        "Measured by `benchmarks/scale.py` (issue 21, item 3). Regenerate the tables and the plot from "
        "`docs/scale.json` with `python benchmarks/scale.py report`.",
        "",
        "Commands of the recorded runs (as stored in scale.json; a later run with --phases replaced the rows of the phases it lists):",
        "",
        *sorted({f"    {command}" for key in order
                 for command in document["shapes"][key].get("commands") or [document["shapes"][key]["command"]]}),
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores (AVX-512 {'yes' if m['avx512'] else 'no'}, AMX-bf16 "
        f"{'yes' if m['amx_bf16'] else 'no'}), {m['memory_gb']:.0f} GB RAM, torch {m['torch']}, "
        f"{document['threads']} threads, Python {m['python']}. Code: `{document.get('commit', '?')}`. "
        "The machine was shared with other jobs during the runs: ratios within one shape's run (same process, "
        "same minutes) are what count; absolute seconds can be off by the other jobs' load.",
        "",
        "How: each shape is a random-initialised `LlamaForCausalLM` with the published widths (Qwen2.5 shapes are "
        "built as LLaMA: their q/k/v biases do not change the cost), 2 decoder layers for SmolLM2 and Qwen2.5-1.5B, 1 "
        f"for the others, a vocabulary of {VOCAB_BUILT} (the embedding and LM head are accounted for separately), "
        "bfloat16 weights on the CPU, each shape in a fresh process. Every phase goes through the product's functions "
        "(`collect_statistics`, `plan_layers` + `prune_layer` with the `wanda` / `balanced` / `quality` presets); "
        "per-layer seconds are medians of 3 runs for phases under 30 s, one run above. SparseGPT is "
        "`benchmarks/sparsegpt_anchor.py` (the paper's algorithm, checked against the reference loop and against Wanda "
        "by `python benchmarks/scale.py check`), on the same layer and the same calibration inputs.",
        "",
    ]
    tokens = {key: tables[key]["tokens"] for key in order}
    lines += [
        f"Calibration tokens per layer as measured: {', '.join(f'{SHAPES[k].name} {t}' for k, t in tokens.items())} "
        f"(windows of 512). The product's default is 32 x 512 = {PRODUCT_TOKENS}: the passes over the tokens (forward, "
        "first-order and second-order collection) are fitted as a + b x tokens through their runs at T/2 and T tokens "
        "(a: per-layer work such as the factorization or the topic fit) and evaluated at "
        f"{PRODUCT_TOKENS}; SparseGPT's X^T X collection is scaled linearly; mask, refine, update and SparseGPT's inverse and sweep work on the Gram and do not depend on "
        "the number of tokens.",
        "",
        "## Per layer, as measured",
        "",
        "Seconds per decoder layer at the measured tokens; in brackets the ratio to that layer's plain forward pass "
        "(at the same tokens) and to SparseGPT's per-layer time (inverse + sweep).",
        "",
    ]
    header = "| phase | " + " | ".join(SHAPES[k].name for k in order) + " |"
    lines += [header, "|---|" + "---|" * len(order)]
    for phase in TABLE_PHASES:
        cells = []
        for key in order:
            t = tables[key]
            value = t["seconds"].get(phase)
            forward, anchor = t["seconds"].get("forward"), t["seconds"].get("sparsegpt")
            if value is None:
                cells.append("-")
                continue
            ratio_f = value / forward if forward else None
            ratio_s = value / anchor if anchor else None
            cells.append(f"{_s(value)} ({_x(ratio_f)} fwd, {_x(ratio_s)} SG)")
        lines.append(f"| {PHASE_LABELS[phase]} | " + " | ".join(cells) + " |")
    formulas: dict[str, list[str]] = {}
    for key in order:
        for phase in ("update", "quality"):
            if phase in tables[key]["notes"]:
                formulas.setdefault(f"{phase} = {tables[key]['notes'][phase].replace('_', ' + ')}", []).append(SHAPES[key].name)
    lines += ["", "Derived rows: refine = balanced - hybrid masks; " + "; ".join(
        f"{formula} ({', '.join(names)})" for formula, names in formulas.items()) + ". Rows of one shape can come from "
        "runs at different times (a partial rerun replaces the phases it measures; each row in scale.json has its time, "
        "commit and load)."]
    lines += ["", "The same as CPU seconds of this process (both threads; less sensitive to the other jobs' load than wall "
              "time, though a thread waiting for the other can spin): ratio to the forward pass and to SparseGPT.", "",
              header, "|---|" + "---|" * len(order)]
    lines += _phase_rows(tables, order, "cpu")
    lines += ["", "SparseGPT's parts, and the fits a + b x tokens of the passes (per layer):", ""]
    for key in order:
        t = tables[key]
        parts = t["parts"]
        bits = []
        if parts:
            bits.append(f"inverse {_s(parts['inverse'])}, sweep {_s(parts['sweep'])}")
        if "sparsegpt_gram" in t["seconds"]:
            bits.append(f"its X^T X collection {_s(t['seconds']['sparsegpt_gram'])}")
        for phase in ("forward", "first_order", "second_order"):
            if phase in t["notes"]:
                bits.append(f"{PHASE_LABELS[phase]} {t['notes'][phase]}")
        commits = sorted({row.get("commit", "?").split(" ")[0] for row in t["rows"].values() if "seconds" in row})
        bits.append(f"product commit{'s' if len(commits) > 1 else ''} {', '.join(commits)}")
        loads = [row["load1"] for row in t["rows"].values() if "load1" in row]
        if loads:
            bits.append(f"1-minute load average on the 2 cores during the run {min(loads):.1f}-{max(loads):.1f}")
        lines.append(f"- {SHAPES[key].name}: " + "; ".join(bits))
    lines += ["", "## Per layer at the product's 16384 calibration tokens", "",
              "Ratios to the plain forward pass at 16384 tokens and to SparseGPT's per-layer time (the goals of issue 21: "
              "first-order <= 1.1x forward, second-order <= 1.5x forward, balanced <= 1.0x and quality <= 1.5x SparseGPT).",
              "", header, "|---|" + "---|" * len(order)]
    lines += _phase_rows(tables, order, "at_product")
    lines += ["", "## Peak memory and bytes written, per layer", "",
              "Peak RSS above the phase's start (the process's high-water mark reset before each phase), and the bytes "
              "of one layer's statistics in the safetensors entry the cache writes.", "",
              "| shape | weights / layer (bf16) | " + " | ".join(PHASE_LABELS[p] for p in PHASES if p not in ("refine", "update"))
              + " | first-order bytes | second-order bytes |",
              "|---|---|" + "---|" * (len(PHASES) - 2) + "---|---|"]
    for key in order:
        t = tables[key]
        cells = [_b(t["peaks"].get(p)) for p in PHASES if p not in ("refine", "update")]
        lines.append(f"| {SHAPES[key].name} | {_b(2 * SHAPES[key].layer_parameters)} | " + " | ".join(cells)
                     + f" | {_b(t['bytes'].get('first_order'))} | {_b(t['bytes'].get('second_order'))} |")
    lines += ["", "## Whole models at 16384 calibration tokens, on this machine", "",
              "Layers x per-layer time. The product's passes run only the embedding lookup outside the decoder layers "
              "(no LM head), so calibration and pruning are layers x per-layer; the full forward adds the LM head at the "
              "real vocabulary, computed from a measured bfloat16 matmul rate ([512, hidden] x [hidden, 8192]). "
              "Reading the weights from disk is not included.", "",
              "| shape | layers | forward (+ LM head) | first-order | second-order | balanced prune | quality prune | "
              "default preset (calibrate + balanced) | quality preset | SparseGPT (X^T X + inverse + sweep) |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    wholes = {key: whole_model(document["shapes"][key], tables[key]) for key in order}
    for key in order:
        w = wholes[key]
        lines.append(f"| {SHAPES[key].name} | {SHAPES[key].layers} | {_s(w.get('forward'))} (+{_s(w.get('lm_head'))}) | "
                     f"{_s(w.get('first_order'))} | {_s(w.get('second_order'))} | {_s(w.get('balanced'))} | "
                     f"{_s(w.get('quality'))} | {_s(w.get('default_preset'))} | {_s(w.get('quality_preset'))} | "
                     f"{_s(w.get('sparsegpt_pipeline'))} |")
    lines += ["", "## Growth with the layer size", "",
              f"![time per layer vs parameters per layer]({png})", "",
              "Least-squares slope of log(seconds per layer at 16384 tokens) against log(parameters per layer) over the "
              "measured shapes (1 = linear in the layer's parameters, as a forward pass; SparseGPT's inverse grows as "
              "width^3, i.e. up to 1.5 in parameters):", "",
              "| phase | slope (all shapes) | shapes | slope between the two largest shapes measured |", "|---|---|---|---|"]
    anchor = fitted.get("sparsegpt", {}).get("slope")
    for phase in PHASES:
        if phase in fitted:
            lines.append(f"| {PHASE_LABELS[phase]} | {fitted[phase]['slope']:.2f} | {fitted[phase]['points']} | "
                         f"{fitted[phase]['top_slope']:.2f} |")
    if anchor is not None:
        faster = [PHASE_LABELS[p] for p in PHASES if p in fitted and p != "sparsegpt" and fitted[p]["slope"] > anchor + 0.05]
        lines += ["", "Phases growing faster than SparseGPT's per-layer time (slope above its "
                  f"{anchor:.2f} by more than 0.05): " + (", ".join(faster) if faster else "none") + "."]
    lines += ["", "## What the default preset costs on a whole model here", ""]
    lines += default_paragraph(document, order, tables, wholes)
    lines += goals(document, tables, fitted)
    lines += profiles(document)
    unmeasured = [f"- {SHAPES[k].name}: {document['shapes'][k]['status']}"
                  + (f" (during {document['shapes'][k]['unfinished_phase']})" if document['shapes'][k].get('unfinished_phase') else "")
                  + "".join(f"; {row['reason']}" for row in tables[k]["rows"].values() if row.get("phase") == "refused")
                  for k in order if document["shapes"][k]["status"] != "ok"
                  or any(row.get("phase") == "refused" for row in tables[k]["rows"].values())]
    lines += ["", "## Not measured", "", *unmeasured,
              "- `prune --second-order recompute` was not timed on its own: it collects each layer's x x^T inside the "
              "pruning pass instead of reading the cached entry, so per layer it costs about the second-order collection "
              "above on top of the pruning phases.",
              "- Nothing here ran on a GPU; every figure is this 2-core CPU."]
    return "\n".join(lines) + "\n"


def default_paragraph(document, order, tables, wholes) -> list[str]:
    lines = []
    for key in ("llama8b", "llama70b"):
        if key not in wholes:
            continue
        w, t, shape = wholes[key], tables[key], SHAPES[key]
        peak = max((v for v in t["peaks"].values()), default=None)
        second = t["bytes"].get("second_order")
        if "default_preset" in w:
            lines.append(
                f"- {shape.name} ({shape.layers} layers): the default `balanced` preset (first-order calibration + "
                f"second-order collection + hybrid masks and 50 refine swaps) costs about {_s(w['default_preset'])} of "
                f"compute here at 16384 calibration tokens ({_s(w['first_order'])} first-order, {_s(w['second_order'])} "
                f"second-order, {_s(w['balanced'])} pruning"
                + (f", {_s(w['outliers'])} the layer spread's outlier ratios" if "outliers" in w else
                   "; the layer spread's outlier ratios not measured at this shape") + f"), against {_s(w.get('sparsegpt_pipeline'))} for SparseGPT's "
                f"own pipeline (its X^T X, inverse and sweep) and {_s(w.get('forward'))} for one pass of the layers; "
                f"`quality` {_s(w.get('quality_preset'))}. The largest per-phase peak RSS above the loaded layers was "
                f"{_b(peak)} per layer (one layer at a time when layers stream), and the second-order entry "
                f"{_b(second)} per layer, {_b(second * shape.layers) if second else '-'} for the model.")
        else:
            have = ", ".join(f"{PHASE_LABELS[p]} {_s(w[p])}" for p in PHASES if p in w)
            lines.append(f"- {shape.name} ({shape.layers} layers): not every phase of the default preset was measured "
                         f"(see below); measured, for the whole model: {have or 'nothing'}; the largest per-phase peak RSS "
                         f"above the loaded layer {_b(peak)}, the second-order entry {_b(second)} per layer, "
                         f"{_b(second * shape.layers) if second else '-'} for the model.")
            guess = extrapolated(document, tables, key)
            if guess:
                p = {**t["at_product"], **guess}
                parts = ", ".join(f"{PHASE_LABELS[k]} {_s(v)}" for k, v in guess.items())
                line = (f"  EXTRAPOLATED, not measured: per layer {parts} (the largest smaller shape that has the phase x "
                        "(parameters ratio)^slope, the slope between the two largest shapes that have it).")
                if all(k in p for k in ("first_order", "second_order", "balanced")):
                    total = shape.layers * (p["first_order"] + p["second_order"] + p["balanced"])
                    line += f" With these, the default preset would take about {_s(total)} for the whole model here"
                    if all(k in p for k in ("sparsegpt", "sparsegpt_gram")):
                        line += f", SparseGPT about {_s(shape.layers * (p['sparsegpt'] + p['sparsegpt_gram']))}"
                    line += "."
                lines.append(line)
    return lines


def extrapolated(document, tables, key: str) -> dict[str, float]:
    """Per-layer seconds at 16384 tokens of the phases not measured at `key`, from the largest smaller shape that
    has each, times (parameters ratio)^(slope between the two largest shapes that have it). Labelled as such."""
    fitted = slopes(document)
    target = SHAPES[key]
    out = {}
    for phase in ("first_order", "second_order", "balanced", "update", "quality", "sparsegpt", "sparsegpt_gram"):
        if phase in tables[key]["at_product"]:
            continue
        slope = fitted.get(phase, {}).get("top_slope")
        if phase == "sparsegpt_gram":  # not fitted: a pass over the tokens like the forward
            slope = fitted.get("forward", {}).get("top_slope")
        known = [(SHAPES[k].layer_parameters, tables[k]["at_product"][phase]) for k in tables
                 if phase in tables[k]["at_product"] and SHAPES[k].layer_parameters < target.layer_parameters]
        if slope is None or not known:
            continue
        parameters, value = max(known)
        out[phase] = value * (target.layer_parameters / parameters) ** slope
    return out


def goals(document, tables, fitted) -> list[str]:
    """Issue 21's per-layer goals at the Llama-3.1-8B shape, each met or missed with its figure."""
    if "llama8b" not in tables:
        return []
    t = tables["llama8b"]
    p, rows = t["at_product"], t["rows"]
    shape = SHAPES["llama8b"]
    checks = []

    def ratio(name: str, over: str, limit: float, label: str) -> None:
        if name in p and over in p and p[over] > 0:
            value = p[name] / p[over]
            checks.append((label, f"{value:.2f}x", value <= limit))
        else:
            checks.append((label, "not measured", None))

    ratio("balanced", "sparsegpt", 1.0, "balanced <= 1.0x SparseGPT per layer")
    ratio("quality", "sparsegpt", 1.5, "quality <= 1.5x SparseGPT per layer")
    ratio("first_order", "forward", 1.1, "first-order calibration <= 1.1x forward (16384 tokens)")
    ratio("second_order", "forward", 1.5, "second-order collection (+ factorization, if any) <= 1.5x forward (16384 tokens)")
    second = t["bytes"].get("second_order")
    if second:
        value = second / (2 * shape.layer_parameters)
        checks.append(("second-order storage <= 0.5x the layer's bf16 weights", f"{value:.2f}x ({_b(second)} per layer)",
                       value <= 0.5))
    if "quality" in rows:
        peak = rows["quality"]["rss_at_start"] + rows["quality"]["peak_rss_above_start"]
        checks.append(("quality prune of one layer: process peak RSS (one layer resident + a restore copy) < 8 GB",
                       _b(peak), peak < 8 * GB))
    anchor = fitted.get("sparsegpt", {}).get("slope")
    if anchor is not None:
        worst = max(((fitted[k]["slope"], k) for k in PHASES if k in fitted and k != "sparsegpt"), default=None)
        if worst is not None:
            checks.append(("no phase grows faster with width than SparseGPT (log-log slope)",
                           f"steepest: {PHASE_LABELS[worst[1]]} {worst[0]:.2f} vs SparseGPT {anchor:.2f}", worst[0] <= anchor + 0.05))
    lines = ["", "## Issue 21's per-layer goals at the Llama-3.1-8B shape", "", "| goal | measured | met |", "|---|---|---|"]
    for label, value, met in checks:
        lines.append(f"| {label} | {value} | {'-' if met is None else ('yes' if met else 'no')} |")
    return lines


def profiles(document) -> list[str]:
    """Where the time goes (cProfile of the phases run with --profile), for the largest profiled shape."""
    lines = []
    for key in reversed(list(SHAPES)):
        entry = document["shapes"].get(key)
        if entry is None:
            continue
        found = [row for row in entry["rows"] if row["phase"].endswith("_profile")]
        if not found:
            continue
        lines += ["", f"## Where the time goes at the {SHAPES[key].name} shape (cProfile)", "",
                  "Top functions by cumulative and by own time (torch's C functions appear by own time) of each profiled "
                  "phase (all its runs together).", ""]
        for row in found:
            top = row["top"] if isinstance(row["top"], dict) else {"cumulative": row["top"], "own": []}
            phase = row["phase"].removesuffix("_profile")
            lines += [f"### {PHASE_LABELS.get(phase, phase)}", "", "| function | calls | own s | cumulative s |", "|---|---|---|---|"]
            shown = [r for r in top["cumulative"] if "scale.py" not in r["function"]][:14]
            shown += [r for r in top["own"][:10] if r not in shown]
            for r in shown:
                lines.append(f"| `{r['function']}` | {r['calls']} | {r['tottime']:.2f} | {r['cumtime']:.2f} |")
            lines.append("")
        break
    return lines


def check(_args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(2)
    from sparsegpt_anchor import self_check

    print(json.dumps(self_check()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="measure shapes (each in a fresh process), then write the report")
    run.add_argument("--shapes", default=",".join(SHAPES), help=f"comma list of {', '.join(SHAPES)}")
    run.add_argument("--nsamples", type=int, default=8, help="calibration windows per shape up to 14B (8 x 512 = 4096 tokens)")
    run.add_argument("--big-nsamples", type=int, default=4, help="windows for the 70B shape")
    run.add_argument("--seqlen", type=int, default=512)
    run.add_argument("--threads", type=int, default=2)
    run.add_argument("--repeats", type=int, default=3)
    run.add_argument("--batch-size", type=int, default=4, help="windows per forward batch (the product's default)")
    run.add_argument("--long-phase", type=float, default=30.0, help="a phase longer than this is run once")
    run.add_argument("--time-box", type=float, default=2400.0, help="seconds for the 70B shape (what was measured is kept)")
    run.add_argument("--box-all", action="store_true", help="apply --time-box to every shape")
    run.add_argument("--phases", default="", help="only these phases (comma list; the first-order statistics are always collected, recorded only if listed)")
    run.add_argument("--drop", default="", help="with --phases: earlier rows of these phases are removed")
    run.add_argument("--big-repeats", type=int, default=1, help="repeats for the 70B shape")
    run.add_argument("--profile", default="", help="shapes whose balanced / quality phases run under cProfile")
    run.add_argument("--margin", type=float, default=3.0, help="GB to keep free above a shape's estimate before starting")
    run.add_argument("--wait", type=int, default=1, help="0: do not wait for free memory")
    run.add_argument("--estimate-refine-gb", type=float, default=0.0,
                     help="GB balanced / quality may need above the loaded layer (0: scaled from the smaller shapes' "
                     "peaks, which predate the refine's chunking and overstate it at 70B)")
    run.add_argument("--json", default=str(DOCS / "scale.json"))
    run.add_argument("--out", default=str(DOCS / "scale.md"))
    shape = commands.add_parser("shape", help="(internal) measure one shape in this process")
    shape.add_argument("shape", choices=list(SHAPES))
    for flag, kind in (("--nsamples", int), ("--seqlen", int), ("--threads", int), ("--repeats", int), ("--batch-size", int),
                       ("--long-phase", float)):
        shape.add_argument(flag, type=kind, required=True)
    shape.add_argument("--partial", required=True)
    shape.add_argument("--phases", default="")
    shape.add_argument("--profile", action="store_true")
    shape.add_argument("--wait-minutes", type=float, default=20.0, help="how long a phase waits for free memory")
    shape.add_argument("--estimate-sparsegpt", type=float, default=0.0, help="bytes SparseGPT may need (0: not checked)")
    shape.add_argument("--estimate-second-order", type=float, default=0.0, help="bytes the second-order collection may need")
    shape.add_argument("--estimate-refine", type=float, default=0.0, help="bytes balanced / quality may need")
    rep = commands.add_parser("report", help="docs/scale.md and docs/scale.png from docs/scale.json")
    rep.add_argument("--json", default=str(DOCS / "scale.json"))
    rep.add_argument("--out", default=str(DOCS / "scale.md"))
    commands.add_parser("check", help="the SparseGPT anchor's self-check on a tiny layer")
    args = parser.parse_args()
    {"run": run_shapes, "shape": measure_shape, "report": report, "check": check}[args.command](args)



def _phase_rows(tables: dict, order: list, column: str) -> list[str]:
    """One table row per phase: each shape's seconds in `column` with its ratio to the forward pass and to SparseGPT."""
    rows = []
    for phase in TABLE_PHASES:
        cells = []
        for key in order:
            t = tables[key][column]
            value = t.get(phase)
            if value is None:
                cells.append("-")
                continue
            cells.append(f"{_s(value)} ({_x(value / t['forward'] if t.get('forward') else None)} fwd, "
                         f"{_x(value / t['sparsegpt'] if t.get('sparsegpt') else None)} SG)")
        rows.append(f"| {PHASE_LABELS[phase]} | " + " | ".join(cells) + " |")
    return rows


if __name__ == "__main__":
    main()
