"""Quality regression on the embedded SmolLM2-135M: the default hybrid must beat Wanda in-domain
(wiki-vital test split) and out of domain (Python standard-library source, on every machine).

Few windows (16 x 512 calibration windows from the start of the calibration split, 4 x 512 evaluation
windows per text), paired: both methods are scored
on the same windows from the same statistics. About a minute on 2 CPU cores (plus the one-off GGUF
conversion into a module cache folder). The full protocol is benchmarks/validate.py.
"""

from __future__ import annotations

import random
import sysconfig
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.slow, pytest.mark.e2e]


def stdlib_code_text() -> str:
    """The `code` domain's test half (benchmarks/domains.py): top-level stdlib modules, shuffled, odd positions."""
    files = sorted(p for p in Path(sysconfig.get_paths()["stdlib"]).glob("*.py") if p.is_file())
    documents = [p.read_text(encoding="utf-8", errors="replace").replace("\r\n", "\n").strip() for p in files]
    order = list(range(len(documents)))
    random.Random(0).shuffle(order)
    shuffled = [documents[i] for i in order if documents[i]]
    return "\n\n".join(shuffled[1::2])


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory):
    from hybridprune.calibration.collect import CollectionOptions, collect_statistics
    from hybridprune.data import eval_windows, load_text, sample_windows
    from hybridprune.data.tokens import encode_text
    from hybridprune.models import load_model

    torch.set_num_threads(2)
    cache = tmp_path_factory.mktemp("quality-cache")
    loaded = load_model(None, cache_dir=cache)
    loaded.model.eval()
    # prefixes keep tokenizing cheap: 16 windows are drawn from the first ~600k characters of the split
    calibration = encode_text(load_text("wiki-vital", "calibration").text[:600_000], loaded.tokenizer)
    with torch.no_grad():
        stats = collect_statistics(loaded.model, loaded.adapter, sample_windows(calibration, 16, 512, 0), CollectionOptions())
    texts = {
        "wiki-vital test": eval_windows(encode_text(load_text("wiki-vital", "test").text[:60_000], loaded.tokenizer), 512, 4),
        "stdlib code": eval_windows(encode_text(stdlib_code_text()[:60_000], loaded.tokenizer), 512, 4),
    }
    dense = {name: p.detach().clone() for name, p in loaded.model.named_parameters()}
    return loaded, stats, texts, dense


def perplexities(setup, config) -> dict[str, float]:
    from hybridprune.evaluation import perplexity
    from hybridprune.pruning import prune_model
    from hybridprune.reporting import SilentReporter

    loaded, stats, texts, dense = setup
    with torch.no_grad():
        for name, parameter in loaded.model.named_parameters():
            parameter.copy_(dense[name])
        prune_model(loaded, stats, config, SilentReporter())
        return {name: perplexity(loaded.model, windows).ppl for name, windows in texts.items()}


def test_default_hybrid_beats_wanda_in_and_out_of_domain(setup):
    from hybridprune.config import PruneConfig

    wanda = perplexities(setup, PruneConfig(prune_method="wanda"))
    hybrid = perplexities(setup, PruneConfig())
    for text in wanda:
        assert hybrid[text] < wanda[text], f"default hybrid {hybrid[text]:.2f} >= Wanda {wanda[text]:.2f} on {text}"
