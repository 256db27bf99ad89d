"""End to end on the embedded SmolLM2-135M and wiki-vital, with small windows.

The GGUF is converted once into a session cache folder (about 20-30 s); everything else
reuses it. These are the only tests that touch the real model.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from hybridprune.cli.main import app, normalize_flags

pytestmark = pytest.mark.e2e
SMALL = ["--nsamples", "4", "--seqlen", "128"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("e2e-cache")


def invoke(*args: str) -> dict:
    result = CliRunner().invoke(app, normalize_flags([*args, "--json"]))
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_calibrate_then_reuse(cache: Path):
    first = invoke("calibrate", *SMALL, "--cache-dir", str(cache))
    assert not first["reused"] and first["layers"] == 30 and first["tokens"] == 4 * 128
    second = invoke("calibrate", *SMALL, "--cache-dir", str(cache))
    assert second["reused"] and second["key"] == first["key"]


def test_seed_card_one_liner_prunes_from_the_cache_and_eval_agrees(cache: Path, tmp_path: Path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "pruned"
    # --refine 10: the default's refine (50 steps) runs to its limit on a Gram of only 4 x 128 tokens
    # (rank-deficient, every row keeps finding swaps): minutes of CPU that test nothing more here
    document = invoke("prune", "--prune_method", "hybrid", "--sparsity_ratio", "0.5", "--refine", "10", *SMALL,
                      "--cache-dir", str(cache), "--out", str(out))
    run = document["runs"][0]
    assert run["statistics_reused"]
    assert run["achieved"]["total"]["sparsity"] == pytest.approx(0.5, abs=1e-3)
    assert run["achieved"]["attention"]["sparsity"] == pytest.approx(0.5, abs=1e-3)
    assert run["achieved"]["mlp"]["sparsity"] == pytest.approx(0.5, abs=1e-3)
    AutoModelForCausalLM.from_pretrained(out)  # plain transformers, no help from us
    evaluation = invoke("eval", "--model", str(out), "--windows", "2", "--seqlen", "128", "--cache-dir", str(cache))
    assert evaluation["model"]["sparsity"]["total"]["sparsity"] == pytest.approx(run["achieved"]["total"]["sparsity"], abs=1e-6)
    assert 1.0 < evaluation["model"]["perplexity"]["ppl"] < 1e4


def test_structured_half_of_the_neurons_gives_a_smaller_standard_model(cache: Path, tmp_path: Path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "structured"
    invoke("prune", "--pattern", "structured", "--sparsity", "0.5", "--attention-method", "none", *SMALL,
           "--cache-dir", str(cache), "--out", str(out))
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.intermediate_size == 768
    assert model.model.layers[0].mlp.down_proj.weight.shape == (576, 768)
