"""Prefill / decode latency measurement on tiny random models."""

from __future__ import annotations

from pathlib import Path

import pytest

from hybridprune.latency import latency_ratios, measure_latency, time_decode, time_prefill
from hybridprune.models import load_model


def test_prefill_and_decode_medians(tiny_llama_folder: Path, tiny_cache_dir: Path):
    loaded = load_model(str(tiny_llama_folder), cache_dir=tiny_cache_dir)
    assert time_prefill(loaded.model, 32) > 0
    assert time_decode(loaded.model, 8) > 0
    results = measure_latency(
        {"dense": loaded.model, "same": loaded.model}, seqlen=32, new_tokens=8, runs=3,
        folders={"dense": tiny_llama_folder, "same": tiny_llama_folder},
    )
    result = results["dense"]
    assert len(result.prefill_all) == 3 and len(result.decode_all) == 3
    assert result.decode_tokens_per_second > 0 and result.prefill_tokens_per_second > 0
    assert result.folder_bytes > 0
    ratios = latency_ratios(results, "dense")
    assert ratios["dense"]["prefill_time_ratio"] == 1.0
    assert ratios["same"]["size_ratio"] == 1.0
    assert set(result.to_dict()) >= {"prefill_seconds", "decode_tokens_per_second", "folder_bytes"}


def test_decode_works_on_a_streamed_free_model_without_cache_config(tiny_model_factory):
    loaded = load_model(str(tiny_model_factory("qwen2")))
    assert loaded.model.config.use_cache is False  # load_model turns it off; decode asks for the cache itself
    assert measure_latency({"m": loaded.model}, seqlen=16, new_tokens=4, runs=1, warmup=0)["m"].decode_ms_per_token > 0


def test_bad_arguments():
    from hybridprune.errors import UserError

    with pytest.raises(UserError):
        measure_latency({}, runs=0)
