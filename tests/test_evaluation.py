"""Perplexity, sparsity counting, plotting and `hybridprune eval`, on tiny random models."""

from __future__ import annotations

import json
import math
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from helpers import TRAINING_TEXT, make_tiny_model_folder
from hybridprune.cli.main import app
from hybridprune.errors import UserError
from hybridprune.evaluation import check_vocabulary, latency, perplexity, prepare_tasks
from hybridprune.latency import folder_size, parameter_count
from hybridprune.models import load_model
from hybridprune.plotting import plot_sweep
from hybridprune.sparsity import sparsity_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def tiny(tiny_llama_folder, tiny_cache_dir):
    return load_model(str(tiny_llama_folder), cache_dir=tiny_cache_dir)


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("text") / "corpus.txt"
    path.write_text(TRAINING_TEXT)
    return path


def _reference_perplexity(model, windows: torch.Tensor) -> float:
    """The protocol written out once per window: float64 log-softmax, tokens 1..L-1 from their prefix."""
    total, count = 0.0, 0
    with torch.no_grad():
        for window in windows:
            logits = model(input_ids=window[None]).logits[0].double()
            log_probs = torch.log_softmax(logits[:-1], dim=-1)
            total -= log_probs.gather(1, window[1:, None]).sum().item()
            count += len(window) - 1
    return math.exp(total / count)


def test_perplexity_equals_the_protocol_for_any_batch_size(tiny):
    windows = torch.randint(0, tiny.model.config.vocab_size, (5, 24), generator=torch.Generator().manual_seed(1))
    expected = _reference_perplexity(tiny.model, windows)
    for batch_size in (1, 2, 5):
        result = perplexity(tiny.model, windows, batch_size=batch_size)
        assert result.ppl == pytest.approx(expected, rel=1e-5)
        assert result.tokens == 5 * 23 and result.nll == pytest.approx(math.log(expected), rel=1e-5)
        assert result.seconds > 0 and result.tokens_per_second > 0


def test_uniform_predictions_give_the_vocabulary_size(tiny_llama_folder, tiny_cache_dir):
    loaded = load_model(str(tiny_llama_folder), cache_dir=tiny_cache_dir)
    with torch.no_grad():
        loaded.model.get_output_embeddings().weight.zero_()  # every logit 0: p = 1/V
    windows = torch.randint(0, 50, (3, 16))
    assert perplexity(loaded.model, windows, batch_size=2).ppl == pytest.approx(loaded.model.config.vocab_size, rel=1e-5)


def test_latency_size_and_parameters(tiny, tiny_llama_folder):
    assert latency(tiny.model, seqlen=8, runs=2) > 0
    assert parameter_count(tiny.model) == sum(p.numel() for p in tiny.model.parameters())
    assert folder_size(tiny_llama_folder) >= (tiny_llama_folder / "model.safetensors").stat().st_size


def test_vocabulary_mismatch_is_refused(tiny):
    class SmallTokenizer:
        def __len__(self) -> int:
            return 10

    with pytest.raises(UserError, match="does not belong"):
        check_vocabulary(tiny.model, SmallTokenizer(), torch.tensor([[0, tiny.model.config.vocab_size]]))
    with pytest.raises(UserError, match="embedding only"):
        check_vocabulary(tiny.model, range(tiny.model.config.vocab_size + 1), torch.tensor([[0, 1]]))


# --- sparsity -----------------------------------------------------------------------------


def _zero_some(model, adapter) -> None:
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in adapter.layers(model):
            for linear in adapter.linears(layer).values():
                linear.weight[torch.rand(linear.weight.shape, generator=generator) < 0.3] = 0
        model.get_input_embeddings().weight[:7] = 0
        model.get_output_embeddings().weight[:3] = 0


def test_sparsity_report_counts_decoder_linears_only(tiny_llama_folder, tiny_cache_dir):
    loaded = load_model(str(tiny_llama_folder), cache_dir=tiny_cache_dir)
    model, adapter = loaded.model, loaded.adapter
    _zero_some(model, adapter)
    report = sparsity_report(model, adapter)
    direct = {
        (index, name): (int((linear.weight == 0).sum()), linear.weight.numel())
        for index, layer in enumerate(adapter.layers(model))
        for name, linear in adapter.linears(layer).items()
    }
    for module in report.modules:
        assert (module.count.zeros, module.count.total) == direct[module.layer, module.name]
    assert report.total.zeros == sum(z for z, _ in direct.values())
    assert report.total.total == sum(t for _, t in direct.values())
    attention = [v for (_, name), v in direct.items() if name in adapter.attention_names]
    assert report.kind("attention").zeros == sum(z for z, _ in attention)
    assert report.kind("attention") + report.kind("mlp") == report.total
    assert report.layer(1) == sum((m.count for m in report.modules if m.layer == 1), type(report.total)())
    embedding, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    assert report.embeddings.zeros == int((embedding == 0).sum()) >= 7 * embedding.shape[1]
    assert report.lm_head is not None and report.lm_head.zeros == int((head == 0).sum()) >= 3 * head.shape[1]
    document = json.loads(json.dumps(report.to_dict()))
    assert document["total"]["zeros"] == report.total.zeros and document["lm_head"]["tied"] is False
    assert len(document["layers"]) == 2 and set(document["modules"]) == set(adapter.attention_names + adapter.mlp_names)
    assert len(report.layer_rows()) == 2 and len(report.layer_rows()[0]) == len(report.layer_columns())


def test_tied_head_is_counted_once_and_structured_width_counts_as_zeros(tiny_llama_folder, tiny):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(tiny_llama_folder, tie_word_embeddings=True, intermediate_size=96)
    model = AutoModelForCausalLM.from_config(config)
    report = sparsity_report(model, tiny.adapter, dense_intermediate_size=128)
    assert report.lm_head is None and report.to_dict()["lm_head"] == {"tied": True}
    hidden, layers = config.hidden_size, config.num_hidden_layers
    assert report.kind("mlp").total == layers * 3 * 128 * hidden  # the dense shapes
    assert report.kind("mlp").zeros == layers * 3 * 32 * hidden  # the 32 removed neurons
    assert report.kind("attention") == sparsity_report(model, tiny.adapter).kind("attention")


def test_plot_sweep_writes_a_png(tmp_path):
    rows = [{"method": "wanda", "sparsity": s, "ppl": p} for s, p in ((0.3, 20.0), (0.5, 40.0), (0.7, 900.0))]
    rows.append({"method": "magnitude", "sparsity": 0.5, "ppl": 300.0})
    path = plot_sweep(rows, 15.0, tmp_path / "sub" / "plot.png", "test")
    assert path.read_bytes().startswith(PNG_MAGIC)


# --- the command --------------------------------------------------------------------------


def _pruned_copy(source: Path, target: Path, fraction: float, method: str) -> Path:
    """A copy of `source` with the smallest `fraction` of every decoder Linear row zeroed, like `prune` writes."""
    from transformers import AutoModelForCausalLM

    shutil.copytree(source, target)
    model = AutoModelForCausalLM.from_pretrained(target)
    with torch.no_grad():
        for layer in model.model.layers:
            for module in layer.modules():
                if isinstance(module, torch.nn.Linear):
                    drop = int(module.weight.shape[1] * fraction)
                    order = module.weight.abs().argsort(dim=1)[:, :drop]
                    module.weight.scatter_(1, order, 0.0)
    model.save_pretrained(target)
    (target / "hybridprune.json").write_text(json.dumps({"method": method, "sparsity": fraction}))
    return target


@pytest.fixture(scope="module")
def pruned(tiny_llama_folder, tmp_path_factory) -> dict[float, Path]:
    root = tmp_path_factory.mktemp("pruned")
    return {f: _pruned_copy(tiny_llama_folder, root / f"wanda-{f}", f, "wanda") for f in (0.3, 0.6)}


@pytest.fixture
def run_eval(text_file, tiny_cache_dir):
    runner = CliRunner()

    def run(*args: str):
        common = ["eval", "--data", str(text_file), "--seqlen", "32", "--windows", "4", "--cache-dir", str(tiny_cache_dir)]
        return runner.invoke(app, [*common, *map(str, args)])

    return run


def test_eval_prints_the_perplexity_of_the_protocol(run_eval, tiny, tiny_llama_folder, text_file, tiny_cache_dir):
    from hybridprune.data import eval_windows, load_text, tokenize

    result = run_eval("--model", tiny_llama_folder, "--per-layer")
    assert result.exit_code == 0, result.output
    ids = tokenize(load_text(str(text_file), "test"), tiny.tokenizer)
    expected = perplexity(tiny.model, eval_windows(ids, 32, 4)).ppl
    assert f"{expected:.3f}" in result.stdout
    assert "Sparsity per layer" in result.stdout and "embeddings (not in total)" in result.stdout


def test_eval_json_with_baseline(run_eval, tiny_llama_folder, pruned):
    result = run_eval("--model", pruned[0.6], "--baseline", tiny_llama_folder, "--latency", "--json", "--quiet")
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    model, baseline = document["model"], document["baseline"]
    assert model["method"] == "wanda" and model["target_sparsity"] == 0.6 and baseline["method"] == "dense"
    assert model["sparsity"]["total"]["sparsity"] == pytest.approx(0.6, abs=0.02)
    assert baseline["sparsity"]["total"]["zeros"] == 0
    assert document["delta"]["ppl"] == pytest.approx(model["perplexity"]["ppl"] - baseline["perplexity"]["ppl"])
    assert model["latency_s"] > 0 and model["perplexity"]["tokens"] == 4 * 31
    assert document["protocol"]["windows"] == 4 and document["protocol"]["seqlen"] == 32


def test_eval_compare_writes_a_plot(run_eval, tiny_llama_folder, pruned, tmp_path):
    plot = tmp_path / "compare.png"
    result = run_eval("--compare", tiny_llama_folder, pruned[0.3], pruned[0.6], "--plot", plot)
    assert result.exit_code == 0, result.output
    assert plot.read_bytes().startswith(PNG_MAGIC)
    assert "Comparison" in result.stdout and "wanda" in result.stdout and "dense" in result.stdout


@pytest.fixture(scope="module")
def small_vocab_folder(tmp_path_factory) -> Path:
    return make_tiny_model_folder(tmp_path_factory.mktemp("small-vocab"), vocab_size=200)


@pytest.mark.parametrize(
    "case",
    ["not-a-model", "vocab-mismatch", "windows-0", "windows-negative", "windows-text", "split-too-small", "stray-folder"],
)
def test_bad_input_is_one_line(case, run_eval, tiny_llama_folder, small_vocab_folder, tmp_path):
    args: dict[str, list] = {
        "not-a-model": ["--model", tmp_path],
        "vocab-mismatch": ["--model", small_vocab_folder],
        "windows-0": ["--model", tiny_llama_folder, "--windows", "0"],
        "windows-negative": ["--model", tiny_llama_folder, "--windows", "-3"],
        "windows-text": ["--model", tiny_llama_folder, "--windows", "many"],
        "split-too-small": ["--model", tiny_llama_folder, "--data", _short_text(tmp_path)],
        "stray-folder": ["--model", tiny_llama_folder, tmp_path],
    }
    _assert_one_line_error(run_eval(*args[case]))


def _short_text(folder: Path) -> Path:
    path = folder / "short.txt"
    path.write_text("Too short for a window.")
    return path


def _assert_one_line_error(result) -> None:
    assert result.exit_code != 0
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr


# --- zero-shot tasks ----------------------------------------------------------------------


def test_tasks_without_the_extra_say_how_to_install(run_eval, tiny_llama_folder, monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # makes `import lm_eval...` fail
    monkeypatch.setitem(sys.modules, "lm_eval.tasks", None)
    with pytest.raises(UserError, match=re.escape("pip install 'hybridprune[lm-eval]'")):
        prepare_tasks(["hellaswag"])
    result = run_eval("--model", tiny_llama_folder, "--tasks", "hellaswag")
    _assert_one_line_error(result)
    assert "pip install 'hybridprune" in result.stderr


@pytest.fixture(scope="module")
def local_task(tmp_path_factory) -> Path:
    """A multiple-choice task in the harness's own YAML format, reading a local jsonl (the hub is out of reach)."""
    folder = tmp_path_factory.mktemp("lm-eval-tasks")
    rows = [{"question": f"What follows {i}?", "choices": [str(i + 1), str(i + 7), "a fox"], "label": 0} for i in range(6)]
    (folder / "tiny_mc.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    (folder / "tiny_mc.yaml").write_text(
        "task: tiny_mc\n"
        "dataset_path: json\n"
        "dataset_kwargs:\n"
        f"  data_files: {{test: '{folder / 'tiny_mc.jsonl'}'}}\n"
        f"  cache_dir: '{folder / 'hf-cache'}'\n"
        "output_type: multiple_choice\n"
        "test_split: test\n"
        'doc_to_text: "Question: {{question}}\\nAnswer:"\n'
        'doc_to_target: "{{label}}"\n'
        'doc_to_choice: "{{choices}}"\n'
        "metric_list:\n"
        "  - metric: acc\n"
        "    aggregation: mean\n"
        "    higher_is_better: true\n"
        "metadata:\n"
        "  version: 1.0\n"
    )
    return folder


def test_tasks_run_through_lm_eval_on_the_model_in_memory(run_eval, tiny_llama_folder, local_task):
    pytest.importorskip("lm_eval", reason="lm-eval is an optional extra: pip install 'hybridprune[lm-eval]'")
    result = run_eval("--model", tiny_llama_folder, "--tasks", "tiny_mc", "--include-path", local_task, "--json", "--quiet")
    assert result.exit_code == 0, result.output
    tasks = json.loads(result.stdout)["model"]["tasks"]
    assert set(tasks) == {"tiny_mc"} and 0.0 <= tasks["tiny_mc"]["acc"] <= 1.0
    assert tasks["tiny_mc"]["acc"] * 6 == pytest.approx(round(tasks["tiny_mc"]["acc"] * 6))  # k of 6 documents


def test_unknown_task_is_one_line(run_eval, tiny_llama_folder, local_task):
    pytest.importorskip("lm_eval", reason="lm-eval is an optional extra: pip install 'hybridprune[lm-eval]'")
    result = run_eval("--model", tiny_llama_folder, "--tasks", "no_such_task", "--include-path", local_task)
    _assert_one_line_error(result)
    assert "unknown task no_such_task" in result.stderr
