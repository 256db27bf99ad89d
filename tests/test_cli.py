"""The commands through Typer's runner on a tiny random model: cache keys, reuse, and bad input."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from helpers import TRAINING_TEXT
from hybridprune.cli.main import app, normalize_flags

SMALL = ["--nsamples", "4", "--seqlen", "32", "--topics", "4"]


@pytest.fixture(scope="module")
def setup(tiny_llama_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("cli")
    text = folder / "text.txt"
    text.write_text(TRAINING_TEXT * 20)
    other = folder / "other.txt"
    other.write_text(TRAINING_TEXT[::-1] * 20)
    return {"model": tiny_llama_folder, "text": text, "other": other, "cache": folder / "cache"}


def invoke(setup: dict[str, Path], *args: str, expect: int = 0):
    base = ["--model", str(setup["model"]), "--cache-dir", str(setup["cache"])]
    result = CliRunner().invoke(app, normalize_flags([*args, *base]))
    assert result.exit_code == expect, result.output
    return result


def stats_key(setup: dict[str, Path], *args: str) -> tuple[str, bool]:
    document = json.loads(invoke(setup, "calibrate", "--data", str(setup["text"]), *SMALL, *args, "--json").stdout)
    return document["key"], document["reused"]


def test_the_key_changes_exactly_when_the_statistics_would(setup):
    base, _ = stats_key(setup)
    assert stats_key(setup) == (base, True)
    changed = {
        "seed": ["--seed", "1"],
        "nsamples": ["--nsamples", "5"],
        "seqlen": ["--seqlen", "24"],
        "topics": ["--topics", "3"],
        "q_active": ["--q-active", "0.8"],
    }
    keys = {name: stats_key(setup, *flags)[0] for name, flags in changed.items()}
    keys["data"] = json.loads(
        invoke(setup, "calibrate", "--data", str(setup["other"]), *SMALL, "--json").stdout
    )["key"]
    assert base not in keys.values() and len(set(keys.values())) == len(keys)


@pytest.mark.parametrize(
    "flags",
    [["--sparsity", "0.3"], ["--sparsity", "0.7"], ["--idf-exp", "2"], ["--pattern", "2:4"], ["--preset", "fast"],
     ["--preset", "quality"], ["--pattern", "structured"], ["--tf-exp", "0.5"], ["--pruning-last", "1"]],
)
def test_pruning_knobs_reuse_the_same_statistics(setup, flags):
    base, _ = stats_key(setup)
    document = json.loads(invoke(setup, "prune", "--data", str(setup["text"]), *SMALL, *flags, "--json").stdout)
    assert document["runs"][0]["statistics_key"] == base
    assert document["runs"][0]["statistics_reused"]


def test_update_collects_second_order_statistics_once_for_every_sparsity_and_preset(setup, tmp_path):
    """--update's sums x x^T are one more cache entry: made by the first run (or calibrate --hessians), then reused."""
    own_inputs = ["--seed", "5"]  # inputs of their own: other tests share this cache folder

    def update_run(*flags: str) -> dict:
        document = json.loads(invoke(setup, "prune", "--data", str(setup["text"]), *SMALL, *flags, *own_inputs, "--json").stdout)
        return document["runs"][0]["second_order_statistics"]

    first = update_run("--update", "--sparsity", "0.5")
    assert not first["reused"]
    assert update_run("--update", "--sparsity", "0.3") == {**first, "reused": True}
    assert update_run("--preset", "quality", "--topics", "3") == {**first, "reused": True}  # topics do not change x x^T
    calibrated = json.loads(invoke(setup, "calibrate", "--data", str(setup["text"]), *SMALL, "--hessians", *own_inputs, "--json").stdout)
    assert calibrated["reused"] and calibrated["hessians"]["key"] == first["key"] and calibrated["hessians"]["reused"]
    # the default preset refines its masks from the same entry, and says so; a preset that neither refines nor updates does not
    assert json.loads(invoke(setup, "prune", "--data", str(setup["text"]), *SMALL, *own_inputs, "--json").stdout
                      )["runs"][0]["second_order_statistics"] == {**first, "reused": True}
    assert "second_order_statistics" not in json.loads(
        invoke(setup, "prune", "--data", str(setup["text"]), *SMALL, *own_inputs, "--preset", "wanda", "--json").stdout
    )["runs"][0]


def test_sequential_update_takes_its_second_order_sums_from_its_own_pass_and_replays_them(setup, tmp_path):
    """--sequential --update: one pass collects both kinds of statistics on pruned inputs (one cache entry);
    the second run reuses that entry and saves the same weights."""
    from safetensors.torch import load_file

    def run(out: str) -> dict:
        return json.loads(invoke(setup, "prune", "--data", str(setup["text"]), *SMALL, "--seed", "6", "--sequential",
                                 "--update", "--preset", "wanda", "--out", str(tmp_path / out), "--json").stdout)["runs"][0]

    first, again = run("a"), run("b")
    assert not first["statistics_reused"] and again["statistics_reused"]
    assert first["statistics_key"] == again["statistics_key"] != stats_key(setup)[0]
    a, b = (load_file(str(tmp_path / out / "model.safetensors")) for out in ("a", "b"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_sweep_uses_one_calibration_and_saves_each_point(setup, tmp_path):
    out = tmp_path / "sweep"
    document = json.loads(invoke(setup, "prune", "--data", str(setup["text"]), *SMALL, "--sparsity", "0.3,0.5",
                                 "--out", str(out), "--json").stdout)
    assert [run["achieved"]["total"]["sparsity"] for run in document["runs"]] == pytest.approx([0.3, 0.5], abs=1e-3)
    assert len({run["statistics_key"] for run in document["runs"]}) == 1
    assert sorted(p.name for p in out.iterdir()) == ["hybrid-unstructured-s0.3", "hybrid-unstructured-s0.5"]
    metadata = json.loads((out / "hybrid-unstructured-s0.5" / "hybridprune.json").read_text())
    assert metadata["statistics_key"] == document["runs"][0]["statistics_key"]
    assert len(metadata["achieved"]["layers"]) == 2


def one_line_error(result) -> str:
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert "Traceback" not in result.output
    assert lines and lines[0].startswith("error:"), result.output
    return result.output


@pytest.mark.parametrize(
    "args, needle",
    [
        (["calibrate", "--nsamples", "0"], "--nsamples"),
        (["calibrate", "--seqlen", "-1"], "--seqlen"),
        (["calibrate", "--data", "no-such-source"], "unknown data source"),
        (["calibrate", "--nsamples", "4", "--seqlen", "100000"], "max_position_embeddings"),
        (["prune", "--sparsity", "1.0"], "--sparsity"),
        (["prune", "--sparsity", "-0.1"], "--sparsity"),
        (["prune", "--pattern", "5:4"], "5:4"),
        (["prune", "--pattern", "2:0"], "2:0"),
        (["prune", "--pattern", "2:4", "--sparsity", "0.3"], "2:4"),
        (["prune", "--prune-method", "sparsegpt"], "--prune-method"),
        (["prune", "--preset", "nope"], "unknown preset"),
        (["prune", "--pruning-last", "0"], "--pruning-last"),
        (["prune", "--pruning-last", "3"], "exceeds"),
        (["prune", "--layer-spread", "wide"], "--layer-spread must be a number in [0, 0.5) or auto"),
        (["prune", "--layer-spread", "auto", "--pattern", "2:4"], "--layer-spread"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(setup, tmp_path, args, needle):
    cache = tmp_path / "cache"
    result = CliRunner().invoke(app, [*args, "--model", str(setup["model"]), "--cache-dir", str(cache),
                                      *([] if "--data" in args else ["--data", str(setup["text"])])])
    assert result.exit_code == 2
    assert needle in one_line_error(result)
    assert not (cache / "stats").exists() or not any((cache / "stats").iterdir())


def test_short_text_unwritable_cache_missing_and_unsupported_models(setup, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("too short")
    checks = [
        (["calibrate", "--model", str(setup["model"]), "--data", str(short), "--cache-dir", str(tmp_path / "c1")], "tokens"),
        (["calibrate", "--model", str(tmp_path / "missing"), "--cache-dir", str(tmp_path / "c2")], "does not exist"),
    ]
    unsupported = tmp_path / "gpt"
    unsupported.mkdir()
    (unsupported / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    checks.append((["calibrate", "--model", str(unsupported), "--cache-dir", str(tmp_path / "c3")], "unsupported architecture"))
    if os.geteuid() != 0:  # root writes anywhere; the check needs a real permission barrier
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        checks.append((["calibrate", "--model", str(setup["model"]), "--cache-dir", str(locked / "cache")], "not writable"))
    checks.append((["calibrate", "--model", str(setup["model"]), "--cache-dir", "/proc/hybridprune-cache"], "not writable"))
    for args, needle in checks:
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 2, result.output
        assert needle in one_line_error(result)


def test_out_must_not_be_the_model_folder_or_a_non_empty_folder(setup, tmp_path):
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    for out, needle in ((setup["model"], "overlaps the input model folder"), (busy, "not empty")):
        result = invoke(setup, "prune", "--data", str(setup["text"]), *SMALL, "--out", str(out), expect=2)
        assert needle in one_line_error(result)
    assert (busy / "keep.txt").read_text() == "mine"


def test_dense_targets_replay_from_their_entry_and_refuse_without_sequential(setup, tmp_path):
    """--sequential --dense-targets: the second run reuses the pass's entry (its own key) and saves the same weights;
    without --sequential one line says what to add."""
    from safetensors.torch import load_file

    def run(out: str) -> dict:
        return json.loads(invoke(setup, "prune", "--data", str(setup["text"]), *SMALL, "--seed", "7", "--sequential",
                                 "--dense-targets", "--update", "--preset", "wanda", "--out", str(tmp_path / out),
                                 "--json").stdout)["runs"][0]

    first, again = run("a"), run("b")
    assert not first["statistics_reused"] and again["statistics_reused"]
    assert first["statistics_key"] == again["statistics_key"]
    a, b = (load_file(str(tmp_path / out / "model.safetensors")) for out in ("a", "b"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    refused = invoke(setup, "prune", "--data", str(setup["text"]), *SMALL, "--dense-targets", "--out", str(tmp_path / "c"),
                     expect=2)
    assert "add --sequential" in one_line_error(refused)
    assert not (tmp_path / "c").exists()
