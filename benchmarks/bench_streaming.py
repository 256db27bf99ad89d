"""Peak memory of streaming (--offload) calibration and pruning on a model larger than one layer by far.

Target (issue 6): peak RSS < 0.35x the model's weight bytes plus the calibration activations, for a
random-weight LLaMA of >= 1.5B parameters in bfloat16. The model is written layer by layer into a
temporary folder (never committed), so this script stays low-memory too.

    .venv/bin/python benchmarks/bench_streaming.py [--layers 32] [--nsamples 2] [--seqlen 128]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from common import PEAK_RSS_KB, REPO, run_cli

HIDDEN, INTERMEDIATE, HEADS, KV_HEADS, VOCAB = 2048, 5632, 32, 4, 32000
GIB = 1 << 30


def write_random_llama(folder: Path, layers: int) -> int:
    """A bfloat16 LLaMA folder with one safetensors shard per layer; returns its parameter count."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    sys.path.insert(0, str(REPO / "tests"))
    from helpers import make_tiny_tokenizer

    tokenizer = make_tiny_tokenizer(folder)
    token = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=layers,
        num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=2048,
        bos_token_id=token, eos_token_id=token, pad_token_id=token, tie_word_embeddings=False, dtype="bfloat16",
    )
    config.architectures = ["LlamaForCausalLM"]
    config.save_pretrained(folder)
    kv = HIDDEN // HEADS * KV_HEADS
    shapes = {
        "self_attn.q_proj.weight": (HIDDEN, HIDDEN), "self_attn.k_proj.weight": (kv, HIDDEN),
        "self_attn.v_proj.weight": (kv, HIDDEN), "self_attn.o_proj.weight": (HIDDEN, HIDDEN),
        "mlp.gate_proj.weight": (INTERMEDIATE, HIDDEN), "mlp.up_proj.weight": (INTERMEDIATE, HIDDEN),
        "mlp.down_proj.weight": (HIDDEN, INTERMEDIATE),
        "input_layernorm.weight": (HIDDEN,), "post_attention_layernorm.weight": (HIDDEN,),
    }
    generator = torch.Generator().manual_seed(0)
    shards = layers + 1
    weight_map, total, count = {}, 0, 0

    def write(number: int, tensors: dict[str, torch.Tensor]) -> None:
        nonlocal total, count
        name = f"model-{number:05d}-of-{shards:05d}.safetensors"
        save_file(tensors, folder / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        count += sum(t.numel() for t in tensors.values())

    def random(shape: tuple[int, ...]) -> torch.Tensor:
        if len(shape) == 1:
            return torch.ones(shape, dtype=torch.bfloat16)
        return (torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16)

    write(1, {"model.embed_tokens.weight": random((VOCAB, HIDDEN)), "model.norm.weight": random((HIDDEN,)),
              "lm_head.weight": random((VOCAB, HIDDEN))})
    for index in range(layers):
        write(index + 2, {f"model.layers.{index}.{name}": random(shape) for name, shape in shapes.items()})
    index_file = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index_file, indent=2))
    return count


def import_baseline() -> int:
    """Peak RSS of a process that only imports what the CLI imports (torch, transformers, the LLaMA code)."""
    code = f"{PEAK_RSS_KB}\nimport hybridprune.cli.main, transformers.models.llama.modeling_llama, accelerate\nprint(peak_rss_kb())"
    return int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO).stdout) * 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--layers", type=int, default=32, help="32 layers: 1.54B parameters")
    parser.add_argument("--nsamples", type=int, default=2)
    parser.add_argument("--seqlen", type=int, default=128)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-streaming-") as temporary:
        root = Path(temporary)
        model = root / "model"
        model.mkdir()
        parameters = write_random_llama(model, args.layers)
        weight_bytes = sum(p.stat().st_size for p in model.glob("*.safetensors"))
        text = root / "text.txt"
        sys.path.insert(0, str(REPO / "tests"))
        from helpers import TRAINING_TEXT

        text.write_text(TRAINING_TEXT * 50)
        window = ["--data", str(text), "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen), "--topics", "4"]
        common = ["--model", str(model), "--dtype", "bfloat16", "--offload", *window]
        activations = 2 * args.nsamples * args.seqlen * HIDDEN * 2  # two bfloat16 copies of the hidden states
        baseline = import_baseline()
        budget = 0.35 * weight_bytes + activations
        print(f"model       random LLaMA, {args.layers} layers, {parameters / 1e9:.2f}B parameters, bfloat16, "
              f"{weight_bytes / GIB:.2f} GiB of weights ({args.layers + 1} shards)")
        print(f"windows     {args.nsamples} x {args.seqlen} tokens: activations {activations / 2**20:.1f} MiB")
        print(f"baseline    importing torch + transformers + hybridprune: peak RSS {baseline / GIB:.2f} GiB")
        print(f"target      peak RSS < 0.35 x weights + activations = {budget / GIB:.2f} GiB")
        for command, extra in (("calibrate", []), ("prune", ["--out", str(root / "pruned")])):
            seconds, _, peak = run_cli([command, *common, *extra], root / "cache", timeout=3600)
            verdict = "ok" if peak < budget else "OVER"
            print(f"{command:<11} {seconds:6.1f}s  peak RSS {peak / GIB:.2f} GiB = {peak / weight_bytes:.3f}x weights "
                  f"({(peak - baseline) / weight_bytes:.3f}x above the import baseline)  [{verdict}]")
        written = sum(p.stat().st_size for p in (root / "pruned").glob("*.safetensors"))
        print(f"output      {len(list((root / 'pruned').glob('*.safetensors')))} shards, {written / GIB:.2f} GiB")


if __name__ == "__main__":
    main()
