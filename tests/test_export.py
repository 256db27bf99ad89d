"""Compressed storage (sparse-bitmask / sparse-24-bitmask) on tiny random models, read back in fresh processes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hybridprune.export import (
    BITMASK,
    BITMASK_24,
    compress_folder,
    compress_weight,
    compression_format,
    decompress_folder,
    decompress_weight,
    follows_24,
    save_compressed,
)
from hybridprune.models import load_model

REPO = Path(__file__).resolve().parents[1]


def prune_in_place(model: torch.nn.Module, pattern: str = "unstructured") -> None:
    """Magnitude pruning at 50% of every projection (unstructured, or 2:4 along inputs)."""
    with torch.no_grad():
        for name, weight in model.named_parameters():
            if not name.endswith("proj.weight"):
                continue
            if pattern == "2:4":
                blocks = weight.abs().reshape(-1, 4)
                keep = torch.zeros_like(blocks, dtype=torch.bool).scatter_(1, blocks.topk(2, dim=1).indices, True)
                weight.mul_(keep.reshape(weight.shape))
            else:
                weight.mul_(weight.abs() > weight.abs().flatten().kthvalue(weight.numel() // 2).values)


def fresh_logits(runs: list[tuple[Path, str]], ids: torch.Tensor, dtype: str = "float32") -> list[torch.Tensor]:
    """Logits of each (folder, loader) computed in one new Python process (nothing shared with this one).

    loader "transformers": plain AutoModelForCausalLM.from_pretrained; "hybridprune": hybridprune's load_model.
    """
    work = runs[0][0].parent
    torch.save(ids, work / "ids.pt")
    code = f"""
import torch
from transformers import AutoModelForCausalLM
from hybridprune.models import load_model
ids = torch.load({str(work / "ids.pt")!r})
out = []
for folder, loader in {[(str(f), kind) for f, kind in runs]!r}:
    if loader == "transformers":
        m = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.{dtype})
    else:
        m = load_model(folder, dtype={dtype!r}).model
    with torch.no_grad():
        out.append(m(input_ids=ids).logits.float())
torch.save(out, {str(work / "logits.pt")!r})
"""
    env = {"PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=work, timeout=300)
    return torch.load(work / "logits.pt")


@pytest.mark.parametrize("fmt", [BITMASK, BITMASK_24])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_weight_round_trip(fmt, dtype):
    weight = torch.randn(24, 40, generator=torch.Generator().manual_seed(0)).to(dtype)
    blocks = weight.abs().float().reshape(-1, 4)
    keep = torch.zeros_like(blocks, dtype=torch.bool).scatter_(1, blocks.topk(2, dim=1).indices, True)
    weight = weight * keep.reshape(weight.shape)
    parts = compress_weight("m.q_proj", weight, fmt)
    assert parts["m.q_proj.weight"].dtype == dtype
    assert follows_24(weight)
    restored = decompress_weight({name.rsplit(".", 1)[1]: t for name, t in parts.items()}, fmt)
    assert torch.equal(restored, weight)


def test_24_refuses_unstructured():
    with pytest.raises(ValueError):
        compress_weight("m.q_proj", torch.randn(4, 8), BITMASK_24)


@pytest.mark.parametrize("pattern,dtype", [("unstructured", "float32"), ("2:4", "float32"), ("unstructured", "bfloat16")])
def test_compressed_folder_loads_to_the_same_logits(tiny_llama_folder: Path, tiny_cache_dir: Path, tmp_path: Path, pattern, dtype):
    loaded = load_model(str(tiny_llama_folder), dtype=dtype, cache_dir=tiny_cache_dir)
    prune_in_place(loaded.model, pattern)
    dense = tmp_path / "dense"
    loaded.model.save_pretrained(dense)
    loaded.tokenizer.save_pretrained(dense)
    result = save_compressed(loaded.model, tmp_path / "compressed", tokenizer=loaded.tokenizer)
    assert result.format == (BITMASK_24 if pattern == "2:4" else BITMASK)
    assert result.global_sparsity == pytest.approx(0.5, abs=0.01)
    assert compression_format(tmp_path / "compressed") == result.format
    config = json.loads((tmp_path / "compressed" / "config.json").read_text())
    assert config["hybridprune_compressed"]["format"] == result.format and "quantization_config" not in config
    # smaller on disk than the dense-format folder
    size = lambda folder: sum(p.stat().st_size for p in folder.glob("*.safetensors"))  # noqa: E731
    assert size(tmp_path / "compressed") < 0.85 * size(dense)
    ids = torch.randint(0, loaded.model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    decompress_folder(tmp_path / "compressed", tmp_path / "restored")
    restored_config = json.loads((tmp_path / "restored" / "config.json").read_text())
    assert "hybridprune_compressed" not in restored_config and restored_config == json.loads((dense / "config.json").read_text())
    reference, ours, restored = fresh_logits(
        [(dense, "transformers"), (tmp_path / "compressed", "hybridprune"), (tmp_path / "restored", "transformers")], ids, dtype
    )
    # hybridprune's loader (eval, --compare) decompresses; the decompressed folder is a plain one again
    assert (ours - reference).abs().max() <= 1e-4
    assert (restored - reference).abs().max() <= 1e-4


def test_sharded_folder_post_pass(tiny_llama_folder: Path, tiny_cache_dir: Path, tmp_path: Path):
    """A folder of several shards (what a streamed prune writes) is compressed file by file, index rewritten."""
    loaded = load_model(str(tiny_llama_folder), cache_dir=tiny_cache_dir)
    prune_in_place(loaded.model)
    dense = tmp_path / "dense"
    loaded.model.save_pretrained(dense, max_shard_size="60KB")
    loaded.tokenizer.save_pretrained(dense)
    assert len(list(dense.glob("*.safetensors"))) > 2
    compress_folder(dense, tmp_path / "out")
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert any(name.endswith(".bitmask") for name in index["weight_map"])
    again = load_model(str(tmp_path / "out"), cache_dir=tiny_cache_dir)
    ids = torch.randint(0, loaded.model.config.vocab_size, (1, 10))
    with torch.no_grad():
        assert torch.equal(again.model(ids).logits, loaded.model(ids).logits)
    # streaming reads (one layer at a time) decompress too
    streamed = load_model(str(tmp_path / "out"), cache_dir=tiny_cache_dir, streaming=True)
    assert streamed.stream is not None


def test_weight_bytes_counts_compressed_weights_dense(tiny_llama_folder: Path, tiny_cache_dir: Path, tmp_path: Path):
    from hybridprune.models.streaming import weight_bytes

    loaded = load_model(str(tiny_llama_folder), cache_dir=tiny_cache_dir)
    prune_in_place(loaded.model)
    save_compressed(loaded.model, tmp_path / "c", tokenizer=loaded.tokenizer)
    dense = weight_bytes(tiny_llama_folder, torch.float32)
    assert dense <= weight_bytes(tmp_path / "c", torch.float32) <= dense * 1.05  # packed columns round up to 8


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_plain_transformers_refuses_a_compressed_folder_naming_decompress(tiny_llama_folder: Path, tiny_cache_dir: Path,
                                                                           tmp_path: Path, pattern):
    """No loader but ours may read a compressed folder with random weights: AutoModelForCausalLM stops with a message
    that names `hybridprune decompress`; a model class used directly stops on the stored shapes."""
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    loaded = load_model(str(tiny_llama_folder), cache_dir=tiny_cache_dir)
    prune_in_place(loaded.model, pattern)
    folder = tmp_path / "compressed"
    save_compressed(loaded.model, folder, tokenizer=loaded.tokenizer)
    model = None
    with pytest.raises(Exception, match="hybridprune decompress"):
        model = AutoModelForCausalLM.from_pretrained(folder)
    with pytest.raises(RuntimeError, match="mismatched_sizes|size mismatch"):  # transformers 5: the load report; 4.x: "size mismatch"
        model = LlamaForCausalLM.from_pretrained(folder)
    assert model is None
    # hybridprune itself still reads it, weight for weight
    ours = load_model(str(folder), cache_dir=tiny_cache_dir).model.state_dict()
    for name, tensor in loaded.model.state_dict().items():
        assert torch.equal(ours[name], tensor), name
