"""Streaming (--offload): one decoder layer resident at a time gives the in-memory results exactly."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from helpers import TRAINING_TEXT, make_tiny_model_folder
from hybridprune.calibration.collect import CollectionOptions, collect_statistics
from hybridprune.cli.main import app, normalize_flags
from hybridprune.models import load_model, streaming

SMALL = ["--nsamples", "4", "--seqlen", "32", "--topics", "4"]


def folder_digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def tied_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model_folder(tmp_path_factory.mktemp("tied"), "llama", tie_word_embeddings=True)


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma2", "tied"])
def test_streaming_calibration_equals_in_memory(family, tiny_model_factory, tied_llama, tiny_cache_dir):
    folder = tied_llama if family == "tied" else tiny_model_factory(family)
    windows = torch.randint(0, 300, (6, 32), generator=torch.Generator().manual_seed(0))
    results = []
    for stream in (False, True):
        loaded = load_model(str(folder), cache_dir=tiny_cache_dir, streaming=stream)
        options = CollectionOptions(topics=4, q_active=0.8)
        results.append(collect_statistics(loaded.model, loaded.adapter, windows, options, batch_size=4, store=loaded.stream).tensors)
    dense, streamed = results
    assert dense.keys() == streamed.keys()
    for name in dense:
        assert torch.equal(dense[name], streamed[name]), name
    assert all(p.is_meta for p in loaded.adapter.layers(loaded.model).parameters())  # every layer released


@pytest.fixture(scope="module")
def text(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("text") / "text.txt"
    path.write_text(TRAINING_TEXT * 20)
    return path


def invoke(*args: str, expect: int = 0):
    result = CliRunner().invoke(app, normalize_flags(list(args)))
    assert result.exit_code == expect, result.output
    return result


@pytest.mark.parametrize(
    "flags",
    [[], ["--pattern", "structured"], ["--update"], ["--layer-spread", "0.1"], ["--sequential"],
     ["--sequential", "--dense-targets"]],
)
@pytest.mark.parametrize("family", ["llama", "tied"])
def test_prune_offload_writes_the_in_memory_model_as_shards(family, flags, tiny_llama_folder, tied_llama, text, tmp_path):
    from transformers import AutoModelForCausalLM

    model = tied_llama if family == "tied" else tiny_llama_folder
    before = folder_digest(model)
    common = ["prune", "--model", str(model), "--cache-dir", str(tmp_path / "cache"), "--data", str(text), *SMALL, *flags, "--quiet"]
    invoke(*common, "--out", str(tmp_path / "whole"))
    document = json.loads(invoke(*common, "--offload", "--out", str(tmp_path / "streamed"), "--json").stdout)
    assert folder_digest(model) == before  # the input folder is untouched

    streamed = tmp_path / "streamed"
    index = json.loads((streamed / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in streamed.glob("*.safetensors"))
    assert len(shards) == 3 and set(index["weight_map"].values()) == set(shards)  # trunk + one shard per layer
    tensors = [t for shard in shards for t in load_file(streamed / shard).values()]
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors)
    whole_model = AutoModelForCausalLM.from_pretrained(tmp_path / "whole")
    streamed_model = AutoModelForCausalLM.from_pretrained(streamed)
    assert whole_model.config.intermediate_size == streamed_model.config.intermediate_size
    whole, stream = whole_model.state_dict(), streamed_model.state_dict()
    assert whole.keys() == stream.keys()
    for name in whole:
        assert torch.equal(whole[name], stream[name]), name
    saved = json.loads((streamed / "hybridprune.json").read_text())
    assert saved["achieved"] == document["runs"][0]["achieved"]
    whole_saved = json.loads((tmp_path / "whole" / "hybridprune.json").read_text())
    assert saved["achieved"] == whole_saved["achieved"]


def test_calibrate_offload_reuses_the_in_memory_entry(tiny_llama_folder, text, tmp_path):
    common = ["calibrate", "--model", str(tiny_llama_folder), "--cache-dir", str(tmp_path), "--data", str(text), *SMALL, "--json"]
    first = json.loads(invoke(*common).stdout)
    forced = json.loads(invoke(*common, "--offload", "--force").stdout)
    assert forced["key"] == first["key"] and not forced["reused"]


def test_offload_needs_out_and_refuses_eval(tiny_llama_folder, text, tmp_path):
    common = ["prune", "--model", str(tiny_llama_folder), "--cache-dir", str(tmp_path), "--data", str(text), *SMALL, "--offload"]
    assert "--out" in invoke(*common, expect=2).output
    assert "eval" in invoke(*common, "--out", str(tmp_path / "o"), "--eval", expect=2).output


def test_streaming_is_chosen_when_the_weights_do_not_fit(tiny_llama_folder, monkeypatch):
    assert streaming.should_stream(tiny_llama_folder, torch.float32, torch.device("cpu"))[0] is False
    monkeypatch.setattr(streaming, "available_memory", lambda device: 1000)
    stream, reason = streaming.should_stream(tiny_llama_folder, torch.float32, torch.device("cpu"))
    assert stream and "do not fit" in reason


@pytest.mark.parametrize("update", [False, True])
def test_one_layer_is_resident_at_a_time(update, tiny_llama_folder, tiny_cache_dir, tmp_path, monkeypatch):
    from hybridprune.config import PruneConfig
    from hybridprune.passes import prune_streaming
    from hybridprune.reporting import SilentReporter

    loaded = load_model(str(tiny_llama_folder), cache_dir=tiny_cache_dir, streaming=True)
    layers = loaded.adapter.layers(loaded.model)
    materialize = loaded.stream.materialize

    def checked(index, layer):
        assert all(p.is_meta for p in layers.parameters()), f"another layer is resident when layer {index} loads"
        materialize(index, layer)

    monkeypatch.setattr(loaded.stream, "materialize", checked)
    windows = torch.randint(0, 300, (4, 32), generator=torch.Generator().manual_seed(0))
    stats = collect_statistics(loaded.model, loaded.adapter, windows, CollectionOptions(topics=4), store=loaded.stream)
    hessians = collect_statistics(loaded.model, loaded.adapter, windows, CollectionOptions(), store=loaded.stream, hessians=True)
    config = PruneConfig(update=update, layer_spread=0.1).validate()
    prune_streaming(loaded, stats, config, SilentReporter(), tmp_path, hessians if update else None)
    assert all(p.is_meta for p in layers.parameters())


def test_calibrate_streams_by_default_and_falls_back_for_other_checkpoints(tiny_llama_folder, text, tmp_path, monkeypatch):
    """Calibration never needs the whole model: it streams whenever the checkpoint is streamable safetensors."""
    import shutil

    from hybridprune.calibration import session

    modes = []
    real = session.calibrated_statistics

    def spy(loaded, *args, **kwargs):  # type: ignore[no-untyped-def]
        modes.append(loaded.stream is not None)
        return real(loaded, *args, **kwargs)

    monkeypatch.setattr("hybridprune.calibration.session.calibrated_statistics", spy)
    common = ["calibrate", "--cache-dir", str(tmp_path / "cache"), "--data", str(text), *SMALL, "--json"]
    streamed = json.loads(invoke(*common, "--model", str(tiny_llama_folder)).stdout)
    whole = json.loads(invoke(*common, "--model", str(tiny_llama_folder), "--no-offload", "--force").stdout)
    pickled = tmp_path / "pickled"  # torch.save weights: not streamable, loaded whole without a word
    pickled.mkdir()
    for path in tiny_llama_folder.iterdir():
        if path.suffix != ".safetensors":
            shutil.copy(path, pickled / path.name)
    torch.save(load_file(tiny_llama_folder / "model.safetensors"), pickled / "pytorch_model.bin")
    fallback = json.loads(invoke(*common, "--model", str(pickled)).stdout)
    assert modes == [True, False, False]
    assert streamed["key"] == whole["key"] and not whole["reused"]
    assert not fallback["reused"] and fallback["tokens"] == streamed["tokens"]
