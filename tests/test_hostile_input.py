"""Hostile and odd input: remote code, pickles, truncated weights, odd text, NaN / Inf (see reliability.py)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from reliability import (
    COMMON,
    ForkServer,
    World,
    entries,
    record,
    tree_hash,
)
from safetensors.torch import load_file, save_file

from hybridprune.cache import StatsCache, StatsKey
from hybridprune.errors import UserError


def test_remote_code_is_not_run_without_the_flag(tiny_model_copy, tmp_path: Path):  # type: ignore[no-untyped-def]
    from hybridprune.models import load_model

    marker = tmp_path / "EXECUTED"
    model = tiny_model_copy("remote-code")
    code = f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n"
    (model / "modeling_evil.py").write_text(code)
    (model / "tokenization_evil.py").write_text(code)
    config = json.loads((model / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilModel", "AutoConfig": "modeling_evil.EvilConfig"}
    (model / "config.json").write_text(json.dumps(config))
    before = tree_hash(model)
    with pytest.raises(UserError, match="--trust-remote-code"):
        load_model(str(model), cache_dir=tmp_path / "cache")
    assert not marker.exists()
    record("model folder with auto_map code, no --trust-remote-code", "refused, code not run")

    only_tokenizer = tiny_model_copy("remote-tokenizer")
    (only_tokenizer / "tokenization_evil.py").write_text(code)
    tokenizer_config = json.loads((only_tokenizer / "tokenizer_config.json").read_text())
    tokenizer_config["auto_map"] = {"AutoTokenizer": [None, "tokenization_evil.EvilTokenizer"]}
    (only_tokenizer / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    try:
        load_model(str(only_tokenizer), cache_dir=tmp_path / "cache")
        outcome = "loaded with the built-in tokenizer, code not run"
    except UserError:
        outcome = "refused, code not run"
    assert not marker.exists()
    assert tree_hash(model) == before
    record("tokenizer_config auto_map code, no --trust-remote-code", outcome)


def test_pickled_weights_are_never_unpickled(world: World, tmp_path: Path):
    from hybridprune.models import load_model

    marker = tmp_path / "UNPICKLED"

    class Evil:
        def __reduce__(self):  # type: ignore[no-untyped-def]
            return (os.system, (f"touch {marker}",))

    model = tmp_path / "pickled"
    model.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(world.model / name, model / name)
    weights: dict[str, Any] = dict(load_file(world.model / "model.safetensors"))
    weights["payload"] = Evil()
    torch.save(weights, model / "pytorch_model.bin")
    with pytest.raises(UserError, match="never unpickles"):
        load_model(str(model), cache_dir=tmp_path / "cache")
    assert not marker.exists()
    record("pytorch_model.bin with a code-running pickle", "refused with one line, nothing executed")


def test_truncated_weights_fail_fast(server: ForkServer, world: World, tiny_model_copy, tmp_path: Path):  # type: ignore[no-untyped-def]
    model = tiny_model_copy("truncated")
    weights = model / "model.safetensors"
    os.truncate(weights, weights.stat().st_size // 2)
    done = server.run(["calibrate", "--model", str(model), "--data", str(world.text), *COMMON], tmp_path / "cache", timeout=30)
    assert done.rc == 2 and "truncated" in done.message, done
    record("truncated model.safetensors", "exit 2, one line (it used to hang)")


def test_odd_text_files(world: World, tmp_path: Path):
    from transformers import AutoTokenizer

    from hybridprune.data import load_text, tokenize
    from hybridprune.data.tokens import encode_text

    cases = {
        "empty": (b"", "no text"),
        "only whitespace": (b" \n\n\t \n", "no text"),
        "binary": (bytes(range(256)) * 4, "binary"),
        "non-UTF-8 (Latin-1)": ("café crème".encode("latin-1"), "not UTF-8"),
        "UTF-16": ("hello world".encode("utf-16"), "binary"),
        "cut inside a character": ("abc é".encode()[:-1], "not UTF-8"),
    }
    for what, (data, expected) in cases.items():
        path = tmp_path / f"{what}.txt"
        path.write_bytes(data)
        with pytest.raises(UserError, match=expected):
            load_text(str(path))
        record(f"text file: {what}", "clear one-line error")
    for what, spec in {"a folder": tmp_path, "missing": tmp_path / "nope.txt", "a .exe": tmp_path / "x.exe"}.items():
        if what == "a .exe":
            Path(spec).write_bytes(b"MZ")
        with pytest.raises(UserError):
            load_text(str(spec))

    tokenizer = AutoTokenizer.from_pretrained(world.model)
    line = " ".join(f"word{i % 97}" for i in range(36_000))  # ~250 KB on one line: over 2 x CHUNK_CHARS
    path = tmp_path / "one-line.txt"
    path.write_text(line)
    ids = tokenize(load_text(str(path)), tokenizer, cache_dir=tmp_path / "tokens")
    assert torch.equal(ids, encode_text(line, tokenizer, chunk_chars=10**9))
    bom = tmp_path / "bom.txt"
    bom.write_bytes("\ufeffhello world".encode())
    assert load_text(str(bom)).text == "hello world"
    record("text file: one 250 KB line / UTF-8 BOM", "handled (same ids as one-shot tokenizing)")


def _poison(model: Path, tensor: str, value: float) -> None:
    weights = load_file(model / "model.safetensors")
    weights[tensor].view(-1)[0] = value
    save_file(weights, model / "model.safetensors", metadata={"format": "pt"})


@pytest.mark.parametrize(
    ("tensor", "value", "expected"),
    [
        ("model.layers.1.self_attn.q_proj.weight", float("nan"), "layer 1 .*q_proj weights"),
        ("model.layers.1.mlp.up_proj.weight", float("inf"), "layer 1 .*up_proj weights"),
        ("model.layers.1.post_attention_layernorm.weight", float("inf"), "layer 1 .*activations"),
    ],
)
def test_nan_or_inf_is_reported_by_layer(tensor: str, value: float, expected: str, tiny_model_copy, world: World, tmp_path: Path):  # type: ignore[no-untyped-def]
    from hybridprune.calibration.session import CalibrationRequest, calibrated_statistics
    from hybridprune.models import load_model
    from hybridprune.reporting import SilentReporter

    model = tiny_model_copy(f"poisoned-{tensor}-{value}")
    _poison(model, tensor, value)
    loaded = load_model(str(model), cache_dir=tmp_path / "cache")
    request = CalibrationRequest(data=str(world.text), nsamples=4, seqlen=32, topics=4)
    cache = StatsCache(tmp_path / "cache")
    with pytest.raises(UserError, match=f"NaN or Inf at {expected}.*nothing was cached"):
        calibrated_statistics(loaded, request, cache, SilentReporter())
    assert entries(tmp_path / "cache") == []
    record(f"{'NaN' if value != value else 'Inf'} in {tensor.removeprefix('model.')} during calibration",
           "refused naming layer 1, nothing cached")


def test_prune_refuses_nan_weights_by_layer(good_entry: Path, tiny_model_copy, tmp_path: Path):  # type: ignore[no-untyped-def]
    from hybridprune.calibration.stats import CalibrationStats
    from hybridprune.config import PruneConfig
    from hybridprune.models import load_model
    from hybridprune.passes import prune_model
    from hybridprune.reporting import SilentReporter

    (entry,) = entries(good_entry)
    stats = StatsCache(good_entry).load(StatsKey(**json.loads((entry / "manifest.json").read_text())["key"]))
    model = tiny_model_copy("nan-prune")
    _poison(model, "model.layers.1.mlp.down_proj.weight", float("nan"))
    loaded = load_model(str(model), cache_dir=tmp_path / "cache")
    with pytest.raises(UserError, match="layer 1 down_proj has NaN or Inf weights"):
        prune_model(loaded, stats, PruneConfig(sparsity=0.5).validate(), SilentReporter())
    stats = CalibrationStats(stats.all_tensors())
    stats.tensors["layer.0.mlp_in.sumsq"][0] = float("inf")
    with pytest.raises(UserError, match="layer 0 .*NaN or Inf activations"):
        prune_model(load_model(str(tiny_model_copy("clean")), cache_dir=tmp_path / "cache"), stats,
                    PruneConfig(sparsity=0.5).validate(), SilentReporter())
    record("NaN weights / Inf statistics met by prune", "refused naming the layer and module")
