"""Quality regression on the embedded SmolLM2-135M: the default (the `balanced` preset on the default
calibration text) must beat Wanda in-domain (wiki-vital test split) and out of domain (Python
standard-library top-level modules, on every machine; the calibration's code is the stdlib's packages).

Few windows (16 x 512 calibration windows: 12 from the start of wiki-vital's calibration split and 4 from
the start of its code part, the default text's proportions; 4 x 512 evaluation windows per text), paired:
both methods are scored on the same windows from the same statistics. A few minutes on 2 CPU cores
(the default refines its masks with the second-order statistics). The full protocol is benchmarks/validate.py.
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
    from hybridprune.config import DEFAULT_CALIBRATION_DATA

    default_text = load_text(DEFAULT_CALIBRATION_DATA, "calibration").text
    wiki = load_text("wiki-vital", "calibration").text
    code = default_text[len(wiki):]  # "" when the default is wiki-vital alone
    windows = sample_windows(encode_text(wiki[:450_000], loaded.tokenizer), 12 if code else 16, 512, 0)
    if code:
        windows = torch.cat([windows, sample_windows(encode_text(code[:150_000], loaded.tokenizer), 4, 512, 0)])
    with torch.no_grad():
        stats = collect_statistics(loaded.model, loaded.adapter, windows, CollectionOptions())
        hessians = collect_statistics(loaded.model, loaded.adapter, windows, CollectionOptions(), hessians=True)
    texts = {
        "wiki-vital test": eval_windows(encode_text(load_text("wiki-vital", "test").text[:60_000], loaded.tokenizer), 512, 4),
        "stdlib code": eval_windows(encode_text(stdlib_code_text()[:60_000], loaded.tokenizer), 512, 4),
    }
    dense = {name: p.detach().clone() for name, p in loaded.model.named_parameters()}
    return loaded, (stats, hessians), texts, dense


def perplexities(setup, config) -> dict[str, float]:
    from hybridprune.evaluation import perplexity
    from hybridprune.passes import prune_model
    from hybridprune.reporting import SilentReporter

    loaded, (stats, hessians), texts, dense = setup
    with torch.no_grad():
        for name, parameter in loaded.model.named_parameters():
            parameter.copy_(dense[name])
        prune_model(loaded, stats, config, SilentReporter(), hessians if config.update or config.refine else None)
        return {name: perplexity(loaded.model, windows).ppl for name, windows in texts.items()}


def test_default_hybrid_beats_wanda_in_and_out_of_domain(setup):
    from hybridprune.presets import DEFAULT_PRESET, get_preset, resolve

    wanda = perplexities(setup, resolve({}, get_preset("wanda")))
    hybrid = perplexities(setup, resolve({}, get_preset(DEFAULT_PRESET)))
    for text in wanda:
        assert hybrid[text] < wanda[text], f"default hybrid {hybrid[text]:.2f} >= Wanda {wanda[text]:.2f} on {text}"
