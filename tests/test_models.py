"""Model loading and family adapters on tiny random models of every supported family."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from helpers import TINY_FAMILIES, make_tiny_tokenizer
from hybridprune.errors import UserError
from hybridprune.models import ADAPTERS, load_model
from hybridprune.models.loading import fingerprint_folder

LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_every_family_loads_and_its_adapter_finds_all_linears(family, tiny_model_factory, tiny_cache_dir):
    folder = tiny_model_factory(family)
    loaded = load_model(str(folder), cache_dir=tiny_cache_dir)
    config = loaded.model.config
    assert config.model_type == family and family in loaded.adapter.model_types
    assert loaded.folder == folder and loaded.source == str(folder)
    assert not loaded.model.training and next(loaded.model.parameters()).dtype == torch.float32
    assert loaded.num_layers == 2
    hidden, intermediate = config.hidden_size, config.intermediate_size
    head_dim = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
    heads_width, kv_width = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    for layer in loaded.adapter.layers(loaded.model):
        linears = loaded.adapter.linears(layer)
        assert tuple(linears) == LINEAR_NAMES
        assert all(isinstance(module, nn.Linear) for module in linears.values())
        assert len({id(module) for module in linears.values()}) == 7  # seven distinct modules
        assert linears["q_proj"].in_features == hidden and linears["q_proj"].out_features == heads_width
        assert linears["k_proj"].out_features == kv_width == linears["v_proj"].out_features
        assert linears["o_proj"].in_features == heads_width and linears["o_proj"].out_features == hidden
        assert linears["gate_proj"].out_features == intermediate == linears["up_proj"].out_features
        assert linears["down_proj"].in_features == intermediate and linears["down_proj"].out_features == hidden
    assert loaded.adapter.attention_names + loaded.adapter.mlp_names == LINEAR_NAMES
    # the tokenizer came along and fits the model
    ids = loaded.tokenizer("Pruning removes weights.")["input_ids"]
    assert ids and max(ids) < config.vocab_size


def test_adapters_cover_exactly_the_tiny_families():
    assert sorted(t for a in ADAPTERS for t in a.model_types) == sorted(TINY_FAMILIES)


def _tiny_gpt2_folder(folder: Path) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer = make_tiny_tokenizer(folder)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=64, n_embd=32, n_layer=1, n_head=2)
    GPT2LMHeadModel(config).save_pretrained(folder)
    return folder


def test_unsupported_family_is_refused_by_name(tmp_path, tiny_cache_dir):
    folder = _tiny_gpt2_folder(tmp_path / "gpt2")
    with pytest.raises(UserError) as caught:
        load_model(str(folder), cache_dir=tiny_cache_dir)
    message = str(caught.value)
    assert "'gpt2'" in message
    for adapter in ADAPTERS:
        assert adapter.family in message
        assert all(model_type in message for model_type in adapter.model_types)


def test_unsupported_family_is_refused_before_weights_are_read(tmp_path, tiny_cache_dir):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mamba"}))
    (tmp_path / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(UserError, match="unsupported architecture 'mamba'"):
        load_model(str(tmp_path), cache_dir=tiny_cache_dir)


def test_missing_folder_is_a_user_error(tmp_path, tiny_cache_dir):
    with pytest.raises(UserError, match="does not exist"):
        load_model(str(tmp_path / "no-such-model"), cache_dir=tiny_cache_dir)


def test_folder_without_config_is_a_user_error(tmp_path, tiny_cache_dir):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(UserError, match="no config.json"):
        load_model(str(tmp_path), cache_dir=tiny_cache_dir)


def test_unreadable_config_is_a_user_error(tmp_path, tiny_cache_dir):
    (tmp_path / "config.json").write_text("{ not json")
    with pytest.raises(UserError, match="cannot read"):
        load_model(str(tmp_path), cache_dir=tiny_cache_dir)


def test_hub_id_offline_is_a_user_error(monkeypatch, tiny_cache_dir):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="HYBRIDPRUNE_ONLINE"):
        load_model("someone/some-model", cache_dir=tiny_cache_dir)


def test_remote_code_is_refused_without_trust(tmp_path, tiny_llama_folder, tiny_cache_dir):
    folder = Path(shutil.copytree(tiny_llama_folder, tmp_path / "remote"))
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="trust-remote-code"):
        load_model(str(folder), cache_dir=tiny_cache_dir)


def test_fingerprint_follows_weights_and_config_only(tmp_path, tiny_llama_folder):
    folder = Path(shutil.copytree(tiny_llama_folder, tmp_path / "model"))
    cache = tmp_path / "cache"
    original = fingerprint_folder(folder, cache)
    assert len(original) == 32
    assert fingerprint_folder(folder, cache) == original  # from the memo
    assert fingerprint_folder(folder, tmp_path / "other-cache") == original  # recomputed from scratch
    assert load_model(str(folder), cache_dir=cache).fingerprint == original

    # files that are neither config nor weights do not matter
    (folder / "README.md").write_text("notes")
    (folder / "tokenizer_config.json").write_text((folder / "tokenizer_config.json").read_text() + "\n")
    assert fingerprint_folder(folder, cache) == original

    # the same model saved again under another folder name is the same model
    assert fingerprint_folder(Path(shutil.copytree(folder, tmp_path / "copy")), cache) == original

    # one weight changed: same file size, new content
    original_bytes = (folder / "model.safetensors").read_bytes()
    weights = load_file(folder / "model.safetensors")
    name = "model.layers.1.mlp.down_proj.weight"
    weights[name][0, 0] += 1.0
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    assert (folder / "model.safetensors").stat().st_size == len(original_bytes)  # only the content tells
    changed = fingerprint_folder(folder, cache)
    assert changed != original
    assert fingerprint_folder(folder, tmp_path / "fresh-cache") == changed

    # restoring the original file gives the original fingerprint back
    (folder / "model.safetensors").write_bytes(original_bytes)
    assert fingerprint_folder(folder, cache) == original

    # a config change is a different model too
    config = json.loads((folder / "config.json").read_text())
    config["rms_norm_eps"] = 1e-5 if config["rms_norm_eps"] != 1e-5 else 1e-6
    (folder / "config.json").write_text(json.dumps(config))
    assert fingerprint_folder(folder, cache) != original
