"""The Python API (hybridprune/api.py) on a tiny random model: typed results, the same weights as the
CLI for the same options, and the review's bugs (batch size, combined allocations, seqlen cap, streamed
calibration on a cache miss)."""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

import hybridprune
from helpers import TRAINING_TEXT
from hybridprune import api
from hybridprune.cli.main import app
from hybridprune.errors import UserError

SMALL = dict(nsamples=4, seqlen=32, topics=4)
SMALL_FLAGS = ["--nsamples", "4", "--seqlen", "32", "--topics", "4"]


@pytest.fixture(scope="module")
def world(tiny_llama_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("api")
    text = folder / "text.txt"
    text.write_text(TRAINING_TEXT * 20)
    return {"model": tiny_llama_folder, "text": text, "cache": folder / "cache", "work": folder}


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


def test_top_level_names_are_the_api():
    assert hybridprune.prune is api.prune and hybridprune.calibrate is api.calibrate
    assert hybridprune.score is api.score and hybridprune.evaluate is api.evaluate


def test_api_and_cli_write_identical_weights(world):
    out_api, out_cli = world["work"] / "api-out", world["work"] / "cli-out"
    common = dict(model=str(world["model"]), data=str(world["text"]), cache_dir=world["cache"], **SMALL)
    result = api.prune(sparsity=0.5, nr_tfidf_mode="topic", qk_shift=0.1, out=out_api, **common)
    cli = CliRunner().invoke(app, [
        "prune", "--model", str(world["model"]), "--data", str(world["text"]), "--cache-dir", str(world["cache"]), *SMALL_FLAGS,
        "--sparsity", "0.5", "--nr-tfidf-mode", "topic", "--qk-shift", "0.1", "--out", str(out_cli), "--json",
    ])
    assert cli.exit_code == 0, cli.output
    mine, theirs = weights(out_api), weights(out_cli)
    assert mine.keys() == theirs.keys()
    assert all(torch.equal(mine[name], theirs[name]) for name in mine)
    run = result.runs[0]
    assert isinstance(result, api.PruneResult) and run.out == out_api
    assert run.config.nr_tfidf_mode == "topic" and abs(run.report.total.sparsity - 0.5) < 0.01
    assert json.loads(cli.stdout)["runs"][0]["statistics_key"] == run.statistics_key
    assert json.loads((out_api / "hybridprune.json").read_text())["method"] == "hybrid (neuronrank_tfidf (topic))"


def test_api_sweep_calls_on_run_and_keeps_the_last_model(world):
    seen = []
    result = api.prune(model=str(world["model"]), data=str(world["text"]), cache_dir=world["cache"], sparsity=[0.3, 0.6],
                       prune_method="wanda", on_run=seen.append, **SMALL)
    assert [run.config.sparsity for run in seen] == [0.3, 0.6] and result.runs == seen
    assert result.model is not None and result.to_dict()["runs"][1]["sparsity"] == 0.6


def test_calibrate_and_score_results(world):
    calibrated = api.calibrate(model=str(world["model"]), data=str(world["text"]), cache_dir=world["cache"], **SMALL)
    assert calibrated.entry.is_dir() and calibrated.layers == 2 and calibrated.bytes > 0
    scored = api.score(model=str(world["model"]), data=str(world["text"]), cache_dir=world["cache"], **SMALL)
    assert scored.statistics_key == calibrated.key and scored.scores_file.is_file() and len(scored.layers) == 2


def test_batch_size_never_changes_the_statistics(world, tmp_path):
    """The activity threshold and topics are fitted on the same windows whatever --batch-size is."""
    from hybridprune.cache import StatsCache, StatsKey

    cache = StatsCache(tmp_path / "cache")
    results = [
        api.calibrate(model=str(world["model"]), data=str(world["text"]), cache_dir=cache.root, batch_size=size, force=True, **SMALL)
        for size in (1, 3, 4)
    ]
    assert len({result.key for result in results}) == 1
    keys = [StatsKey(**result.inputs) for result in results]
    assert keys[0] == keys[1]
    # the entry was rewritten by each run: compare the tensors of fresh runs in separate caches instead
    tensors = []
    for size in (1, 3, 4):
        root = tmp_path / f"cache-{size}"
        api.calibrate(model=str(world["model"]), data=str(world["text"]), cache_dir=root, batch_size=size, **SMALL)
        tensors.append(StatsCache(root).load(keys[0]).all_tensors())
    for other in tensors[1:]:
        assert tensors[0].keys() == other.keys()
        for name in tensors[0]:
            # the same windows fit tau and the topics; only float rounding of differently shaped batches remains
            mine, theirs = tensors[0][name].double(), other[name].double()
            assert float((mine - theirs).abs().sum()) <= 1e-3 * float(mine.abs().sum()) + 1e-9, name


def test_combined_allocations_stay_inside_each_layer(world):
    """--sparsity 0.7 --layer-spread 0.2 --qk-shift 0.2 once ended in an internal error: the shift is now clamped per
    layer, so q/k and v/o stay in [0, 1) and the total stays exact."""
    result = api.prune(model=str(world["model"]), data=str(world["text"]), cache_dir=world["cache"], sparsity=0.7,
                       layer_spread=0.2, qk_shift=0.2, **SMALL)
    assert abs(result.runs[0].report.total.sparsity - 0.7) < 0.01
    cli = CliRunner().invoke(app, ["prune", "--model", str(world["model"]), "--data", str(world["text"]), "--cache-dir",
                                   str(world["cache"]), *SMALL_FLAGS, "--sparsity", "0.7", "--layer-spread", "0.2", "--qk-shift", "0.2"])
    assert cli.exit_code == 0 and "internal error" not in cli.output, cli.output


def test_eval_seqlen_defaults_to_the_model_context(world, tmp_path):
    """A model with 32 positions is evaluated on 32-token windows by default; more is refused."""
    small = tmp_path / "short-context"
    shutil.copytree(world["model"], small)
    config = json.loads((small / "config.json").read_text())
    config["max_position_embeddings"] = 32
    (small / "config.json").write_text(json.dumps(config))
    result = api.evaluate(str(small), data=str(world["text"]), split="all", windows=2, cache_dir=world["cache"])
    assert result.protocol["seqlen"] == 32 and result.model.windows == 2
    with pytest.raises(UserError, match="max_position_embeddings"):
        api.evaluate(str(small), data=str(world["text"]), split="all", windows=2, seqlen=64, cache_dir=world["cache"])


@pytest.fixture(scope="module")
def pruned_folder(world) -> Path:
    out = world["work"] / "pruned-wanda"
    api.prune(model=str(world["model"]), data=str(world["text"]), cache_dir=world["cache"], sparsity=0.5,
              prune_method="wanda", out=out, overwrite=True, **SMALL)
    return out


@pytest.fixture(scope="module")
def compressed_folder(world) -> tuple[Path, api.PruneResult]:
    out = world["work"] / "compressed"
    result = api.prune(model=str(world["model"]), data=str(world["text"]), cache_dir=world["cache"], sparsity=0.5,
                       prune_method="wanda", save_format="compressed", out=out, overwrite=True, **SMALL)
    return out, result


def test_baseline_deltas_are_joined_by_name(world, pruned_folder):
    pruned = pruned_folder
    result = api.evaluate(str(pruned), baseline=str(world["model"]), data=str(world["text"]), split="all", windows=2,
                          seqlen=32, cache_dir=world["cache"])
    delta = result.delta()
    assert delta is not None and delta["ppl"] == pytest.approx(result.model.result.ppl - result.baseline.result.ppl)
    assert delta["sparsity"] > 0.4 and delta["latency_s"] is None


def test_prune_on_a_cache_miss_calibrates_a_streamed_model(world, tmp_path, monkeypatch):
    """A miss costs what `calibrate` costs in memory: the statistics come from a model streamed layer by layer."""
    from hybridprune.calibration import session

    streamed = []
    real = session.calibrated_statistics

    def spy(loaded, *args, **kwargs):  # type: ignore[no-untyped-def]
        streamed.append(loaded.stream is not None)
        return real(loaded, *args, **kwargs)

    monkeypatch.setattr(session, "calibrated_statistics", spy)
    api.prune(model=str(world["model"]), data=str(world["text"]), cache_dir=tmp_path / "cache", sparsity=0.5, update=True, **SMALL)
    assert streamed == [True]  # one streamed pass: the dense statistics and the second-order entry together


def test_a_first_run_needing_both_entries_makes_one_forward_pass_with_the_same_entries(world, tmp_path, monkeypatch):
    """The default preset refines (second order): on an empty cache one pass collects both entries, the same
    tensors two separate passes store; the run says it reused neither."""
    from hybridprune.cache import StatsCache, StatsKey
    from hybridprune.calibration import collect
    from hybridprune.calibration.session import second_order_key

    passes = []
    real = collect.run_layerwise
    monkeypatch.setattr(collect, "run_layerwise", lambda *args, **kwargs: (passes.append(1), real(*args, **kwargs))[1])
    inputs = dict(model=str(world["model"]), data=str(world["text"]), **SMALL)
    run = api.prune(cache_dir=tmp_path / "one", sparsity=0.5, refine=5, **inputs).to_dict()["runs"][0]
    assert len(passes) == 1
    assert not run["statistics_reused"] and not run["second_order_statistics"]["reused"]
    passes.clear()
    separate = api.calibrate(cache_dir=tmp_path / "two", **inputs)  # the first-order entry alone
    second = api.calibrate(cache_dir=tmp_path / "two", hessians=True, **inputs).hessians  # then its own pass
    assert len(passes) == 2 and second["key"] == run["second_order_statistics"]["key"]
    keys = [StatsKey(**separate.inputs), second_order_key(StatsKey(**separate.inputs))]
    for key in keys:
        first, second = StatsCache(tmp_path / "one").load(key), StatsCache(tmp_path / "two").load(key)
        assert first.num_layers == second.num_layers == 2
        parts = [(first.tensors, second.tensors)]
        # both entries: one file per layer, nothing of them in the main file
        assert first.shards is not None and second.shards is not None and set(first.tensors) == {"tokens"}
        parts += [(first.shards.layer(index), second.shards.layer(index)) for index in range(2)]
        for one, two in parts:
            assert one.keys() == two.keys()
            for name in one:
                assert torch.equal(one[name], two[name]), name
    # and a later run reuses both
    again = api.prune(cache_dir=tmp_path / "one", sparsity=0.3, refine=5, **inputs).to_dict()["runs"][0]
    assert again["statistics_reused"] and again["second_order_statistics"]["reused"] and len(passes) == 2


def test_structured_heads_and_layers_through_the_api_load_in_plain_transformers(world):
    from transformers import AutoModelForCausalLM

    out = world["work"] / "heads-layers"
    result = api.prune(model=str(world["model"]), data=str(world["text"]), cache_dir=world["cache"], pattern="structured",
                       sparsity=0.25, attention_method="none", heads_sparsity=0.5, drop_layers=1, update=True, out=out, **SMALL)
    structure = result.runs[0].record["structure"]
    assert structure["layers"] == [2, 1] and structure["heads"] == [4, 2] and structure["intermediate_size"] == [128, 96]
    model = AutoModelForCausalLM.from_pretrained(out)
    ids = torch.randint(0, model.config.vocab_size, (1, 12))
    expected = result.model.model(input_ids=ids).logits
    assert (model(input_ids=ids).logits - expected).abs().max() < 1e-4


def test_structured_options_need_the_structured_pattern(world):
    with pytest.raises(UserError, match="--pattern structured"):
        api.prune(model=str(world["model"]), data=str(world["text"]), cache_dir=world["cache"], heads_sparsity=0.5, **SMALL)


def test_compressed_save_format_through_the_api(world, compressed_folder):
    out, result = compressed_folder
    config = json.loads((out / "config.json").read_text())
    assert config["hybridprune_compressed"]["format"] == "sparse-bitmask"
    evaluated = api.evaluate(str(out), data=str(world["text"]), split="all", windows=2, seqlen=32, cache_dir=world["cache"])
    assert abs(evaluated.model.sparsity.total.sparsity - result.runs[0].report.total.sparsity) < 1e-6


def test_decompress_gives_a_folder_plain_transformers_loads(world, compressed_folder):
    from transformers import AutoModelForCausalLM

    compressed = compressed_folder[0]
    dense = world["work"] / "decompressed"
    cli = CliRunner().invoke(app, ["decompress", str(compressed), "--out", str(dense), "--json"])
    assert cli.exit_code == 0, cli.output
    model = AutoModelForCausalLM.from_pretrained(dense)
    ours = api.evaluate(str(compressed), data=str(world["text"]), split="all", windows=2, seqlen=32, cache_dir=world["cache"])
    assert "hybridprune_compressed" not in json.loads((dense / "config.json").read_text())
    zeros = sum(int((p == 0).sum()) for n, p in model.named_parameters() if n.endswith("proj.weight"))
    assert zeros == ours.model.sparsity.total.zeros
    refused = CliRunner().invoke(app, ["decompress", str(world["model"]), "--out", str(world["work"] / "nope")])
    assert refused.exit_code == 2 and "not a compressed model folder" in refused.output


def test_a_full_gram_on_few_calibration_tokens_is_noted(world):
    """4 x 32 calibration tokens for the tiny model's MLP inputs: --gram-offdiag 1 with --refine gets the note."""
    from hybridprune.reporting import SilentReporter

    class Notes(SilentReporter):
        def __init__(self) -> None:
            self.lines: list[str] = []

        def note(self, text: str) -> None:
            self.lines.append(text)

    common = dict(model=str(world["model"]), data=str(world["text"]), cache_dir=world["cache"], **SMALL)
    full, default = Notes(), Notes()
    api.prune(sparsity="0.4,0.5", refine=5, gram_offdiag=1.0, reporter=full, **common)
    api.prune(sparsity=0.5, refine=5, reporter=default, **common)
    assert sum("--gram-offdiag 1 with 128 calibration tokens" in line for line in full.lines) == 1, full.lines
    assert not any("--gram-offdiag" in line for line in default.lines)


def test_the_grams_weight_follows_the_calibration_tokens(world):
    """The tiny model's 128 MLP inputs: 4 x 32 tokens keep the pattern's default weight, 40 x 32 (10 per input) take
    RICH_GRAM_OFFDIAG for the refine and the update, and the run's record names it."""
    from hybridprune.config import RICH_GRAM_OFFDIAG

    common = dict(model=str(world["model"]), data=str(world["text"]), cache_dir=world["cache"], topics=4, seqlen=32)
    few = api.prune(sparsity=0.5, refine=5, update=True, nsamples=4, **common).runs[0]
    many = api.prune(sparsity=0.5, refine=5, update=True, nsamples=40, **common).runs[0]
    assert few.config.gram_offdiag is None and few.record["config"]["gram_offdiag"] == 0.25
    assert many.config.gram_offdiag == RICH_GRAM_OFFDIAG and many.record["config"]["gram_offdiag"] == RICH_GRAM_OFFDIAG


class RecordingReporter:
    """Keeps every note and progress label a run shows."""

    def __init__(self) -> None:
        self.notes: list[str] = []
        self.labels: list[str] = []

    def phase(self, title: str, lines: list[str]) -> None:
        self.labels.append(title)

    def note(self, text: str) -> None:
        self.notes.append(text)

    @contextlib.contextmanager
    def progress(self, description: str, total: int):
        self.labels.append(description)
        yield lambda steps: None


def test_prune_method_without_a_preset_is_that_method_with_its_own_defaults(world):
    reporter = RecordingReporter()
    run = api.prune(model=str(world["model"]), data=str(world["text"]), cache_dir=world["cache"], prune_method="wanda",
                    sparsity=0.5, reporter=reporter, **SMALL).runs[0]
    assert run.preset == "none" and (run.config.qk_shift, run.config.refine, run.config.update) == (0.0, 0, False)
    assert any("--prune-method wanda without --preset" in note for note in reporter.notes)
    named = api.prune(model=str(world["model"]), data=str(world["text"]), cache_dir=world["cache"], prune_method="wanda",
                      preset="fast", sparsity=0.5, **SMALL).runs[0]
    assert named.preset == "fast" and named.config.prune_method == "wanda"  # a named preset still applies


def test_target_speedup_implies_the_structured_pattern_and_refuses_a_conflicting_one():
    from hybridprune.presets import get_preset, resolve

    config = resolve({"target_speedup": 1.5, "sparsity": None}, get_preset("balanced")).validate()
    assert (config.pattern, config.sparsity, config.refine) == ("structured", 0.0, 0)
    with pytest.raises(UserError, match="implies --pattern structured.*drop --pattern 2:4"):
        resolve({"target_speedup": 1.5, "pattern": "2:4", "sparsity": 0.5}, get_preset("balanced")).validate()
    with pytest.raises(UserError, match="drop --heads-sparsity / --drop-layers and --sparsity"):
        resolve({"target_speedup": 1.5, "sparsity": 0.3}, None).validate()


def test_progress_says_what_runs_after_the_masks(world):
    """A refine-only run (balanced) never claims a weight update; an update run says so."""
    reporter = RecordingReporter()
    api.prune(model=str(world["model"]), data=str(world["text"]), cache_dir=world["cache"], sparsity=0.5, refine=2,
              reporter=reporter, **SMALL)
    shown = " | ".join(reporter.labels + reporter.notes)
    assert "applying pruning + refine" in shown
    assert "weight update" not in shown and "every --update run" not in shown
    reporter = RecordingReporter()
    api.prune(model=str(world["model"]), data=str(world["text"]), cache_dir=world["cache"], sparsity=0.5, refine=0,
              update=True, reporter=reporter, **SMALL)
    assert "applying pruning + weight update" in reporter.labels


@pytest.mark.parametrize("offload", [False, True])
def test_second_order_recompute_prunes_as_the_cache_does_and_stores_none(world, tmp_path, offload):
    """--second-order recompute: the x x^T of each layer collected in the pass that prunes it, never stored; the
    saved weights are those of the run that reads the cached entry (in memory and streamed)."""
    inputs = dict(model=str(world["model"]), data=str(world["text"]), preset="quality", refine=3, sparsity=0.5, offload=offload, **SMALL)
    cached = api.prune(cache_dir=tmp_path / "cached", out=tmp_path / "a", **inputs).to_dict()["runs"][0]
    assert cached["second_order_statistics"]["reused"] is False
    recomputed = api.prune(cache_dir=tmp_path / "recomputed", out=tmp_path / "b", second_order="recompute", **inputs)
    record = recomputed.runs[0].record
    assert record["second_order_statistics"] == "recomputed in the pruning pass"
    modes = [json.loads(path.read_text())["key"]["mode"] for path in (tmp_path / "recomputed").glob("stats/*/manifest.json")]
    assert modes == ["dense"]  # the first-order entry only
    expected, got = weights_of(tmp_path / "a"), weights_of(tmp_path / "b")
    assert expected.keys() == got.keys()
    for name, tensor in got.items():
        assert torch.equal(tensor, expected[name]), name


def weights_of(folder: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for path in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(path))
    return tensors


def test_second_order_recompute_refuses_what_it_cannot_serve(world, tmp_path):
    with pytest.raises(UserError, match="unknown --second-order 'later'"):
        api.prune(model=str(world["model"]), data=str(world["text"]), cache_dir=tmp_path, second_order="later", **SMALL)
    with pytest.raises(UserError, match="structured removal with --update reads the cached entry"):
        api.prune(model=str(world["model"]), data=str(world["text"]), cache_dir=tmp_path, second_order="recompute",
                  pattern="structured", sparsity=0.25, update=True, **SMALL)


def test_the_mode_panel_says_the_layer_spread_a_run_uses():
    """The spread is data printed before the run: `auto` at 70% is 0.15, and no line where every layer is at the target."""
    from hybridprune.presets import get_preset, resolve

    balanced = get_preset("balanced")
    assert any("layer spread: target +- 0.15" in line for line in api.mode_banner(resolve({"sparsity": 0.7}, balanced), balanced))
    uniform = resolve({"sparsity": 0.7, "layer_spread": 0.0}, balanced)
    assert not any("layer spread" in line for line in api.mode_banner(uniform, balanced))
