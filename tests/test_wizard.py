"""`hybridprune wizard`: the real questionary prompts driven through a prompt_toolkit pipe input."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest
import typer
from prompt_toolkit.input import create_pipe_input
from prompt_toolkit.output import DummyOutput
from typer.testing import CliRunner

from helpers import TRAINING_TEXT
from hybridprune import ui, wizard
from hybridprune.cli import wizard_cmd
from hybridprune.cli.main import app
from hybridprune.config import DEFAULT_CALIBRATION_DATA
from hybridprune.presets import get_preset, load_presets, resolve, user_presets_path

pytestmark = pytest.mark.timeout(120)  # a prompt waiting for keys the test never sends fails instead of hanging

ENTER, DOWN, KILL_LINE, CTRL_C = "\r", "\x1b[B", "\x15", "\x03"
DEFAULTS = [ENTER] * 7  # model, what matters, sparsity, pattern, calibration size, folder, evaluate
RUN, BACK, SAVE, CANCEL = ENTER, DOWN + ENTER, DOWN * 2 + ENTER, DOWN * 3 + ENTER


class ScriptedPrompter(wizard.Prompter):
    """The real prompts, reading the keys of question i from a pipe just before question i is asked."""

    def __init__(self, pipe, keys: list[str]):
        super().__init__(input=pipe, output=DummyOutput())
        self.pipe, self.keys = pipe, list(keys)

    def before_ask(self) -> None:
        assert self.keys, "the wizard asked more questions than the test scripted"
        self.pipe.send_text(self.keys.pop(0))


@pytest.fixture
def script():
    with create_pipe_input() as pipe:
        yield lambda *keys: ScriptedPrompter(pipe, list(keys))


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """Fresh working folder, user config and cache; offline; the console back on sys.stdout afterwards."""
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.setenv("HYBRIDPRUNE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    yield work
    ui.console.file = None  # prune's setup_output pins it to the captured stdout of this test


def parsed_prune_arguments(argv: list[str]) -> dict:
    """What `hybridprune prune` itself makes of a command line (click's parsing, no run)."""
    command = typer.main.get_command(app).commands["prune"]
    assert argv[:2] == ["hybridprune", "prune"]
    return command.make_context("prune", argv[2:]).params


def assert_same_run(answers: wizard.Answers) -> None:
    """The printed command line and the keyword arguments the wizard calls prune with agree."""
    params = parsed_prune_arguments(wizard.build_command(answers))
    for key, value in wizard.prune_kwargs(answers).items():
        assert params[key] == value, key


def test_enter_through_everything_gives_balanced_at_half_on_the_embedded_model(script):
    prompter = script(*DEFAULTS)
    answers = wizard.ask_answers(prompter)
    assert not prompter.keys
    assert (answers.model_kind, answers.model, answers.preset, answers.sparsity) == ("embedded", None, "balanced", 0.5)
    assert (answers.pattern, answers.nsamples, answers.evaluate, answers.data) == ("unstructured", 32, False, DEFAULT_CALIBRATION_DATA)
    assert answers.out == "./pruned-balanced-s0.5"
    assert answers.parameters == pytest.approx(134.5e6, rel=0.01)
    assert wizard.build_command(answers) == [
        "hybridprune", "prune", "--preset", "balanced", "--sparsity", "0.5", "--out", "./pruned-balanced-s0.5"
    ]
    assert wizard.prune_kwargs(answers) == {"preset": "balanced", "sparsity": "0.5", "out": Path("./pruned-balanced-s0.5")}
    assert_same_run(answers)


def test_quality_branch_picks_the_update(script):
    answers = wizard.ask_answers(script(ENTER, DOWN + ENTER, *[ENTER] * 5))
    assert answers.preset == "quality" and answers.out == "./pruned-quality-s0.5"
    config = resolve({}, get_preset(answers.preset))
    assert config.hybrid_mlp_method == "neuronrank_tfidf" and config.update and config.refine > 0 and config.gram_weight < 1
    assert wizard.command_text(answers) == "hybridprune prune --preset quality --sparsity 0.5 --out ./pruned-quality-s0.5"


def test_speed_and_conservative_map_to_their_presets(script):
    assert wizard.ask_answers(script(ENTER, DOWN * 2 + ENTER, *[ENTER] * 5)).preset == "fast"
    assert wizard.ask_answers(script(ENTER, DOWN * 3 + ENTER, *[ENTER] * 5)).preset == "conservative"


def test_local_model_folder_is_validated_and_a_bad_path_re_asked(script, tiny_llama_folder, tmp_path):
    empty = tmp_path / "not-a-model"
    empty.mkdir()
    folder_keys = f"{tmp_path / 'missing'}{ENTER}{KILL_LINE}{empty}{ENTER}{KILL_LINE}{tiny_llama_folder}{ENTER}"
    prompter = script(DOWN + ENTER, folder_keys, *[ENTER] * 5, "y")
    answers = wizard.ask_answers(prompter)
    assert not prompter.keys
    assert answers.model_kind == "folder" and answers.model == str(tiny_llama_folder) and answers.evaluate
    config = json.loads((tiny_llama_folder / "config.json").read_text())
    per_layer = 2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 128  # q/o, k/v (2 of 4 heads), gate/up/down
    assert answers.parameters == 2 * per_layer + 2 * config["vocab_size"] * 64  # untied embeddings + head
    assert wizard.build_command(answers)[2:4] == ["--model", str(tiny_llama_folder)]
    assert wizard.build_command(answers)[-1] == "--eval"
    assert_same_run(answers)
    assert wizard.validate_model_folder(str(empty)).startswith(f"'{empty}' has no readable config.json")
    assert "is not a folder" in wizard.validate_model_folder(str(tmp_path / "missing"))


def test_invalid_sparsity_is_re_asked(script):
    sparsity_keys = f"{KILL_LINE}1.5{ENTER}{KILL_LINE}abc{ENTER}{KILL_LINE}0.6{ENTER}"
    prompter = script(ENTER, ENTER, sparsity_keys, *[ENTER] * 4)
    answers = wizard.ask_answers(prompter)
    assert not prompter.keys
    assert answers.sparsity == 0.6 and answers.pattern == "unstructured" and answers.out == "./pruned-balanced-s0.6"
    assert "--sparsity 0.6" in wizard.command_text(answers)
    assert "out of range" in wizard.validate_sparsity("1.5") and "not a number" in wizard.validate_sparsity("abc")
    assert wizard.parse_sparsity("70%") == 0.7


def test_n_m_patterns_need_half_sparsity(script):
    # at 0.6 the 2:4 and 4:8 choices are disabled, so one Down goes from unstructured to structured
    answers = wizard.ask_answers(script(ENTER, ENTER, f"{KILL_LINE}0.6{ENTER}", DOWN + ENTER, *[ENTER] * 3))
    assert answers.pattern == "structured" and "--pattern structured" in wizard.command_text(answers)
    answers = wizard.ask_answers(script(ENTER, ENTER, ENTER, DOWN + ENTER, DOWN + ENTER, ENTER, ENTER))
    assert (answers.pattern, answers.nsamples) == ("2:4", 64)
    assert wizard.build_command(answers)[6:] == ["--pattern", "2:4", "--nsamples", "64", "--out", "./pruned-balanced-s0.5-2of4"]
    assert_same_run(answers)


def test_default_output_folder_moves_to_a_free_name(isolated):
    (isolated / "pruned-balanced-s0.5").mkdir()
    assert wizard.default_out("balanced", 0.5, "unstructured") == "./pruned-balanced-s0.5"  # empty: usable
    (isolated / "pruned-balanced-s0.5" / "model.safetensors").write_text("x")
    assert wizard.default_out("balanced", 0.5, "unstructured") == "./pruned-balanced-s0.5-2"
    assert "not empty" in wizard.validate_out("pruned-balanced-s0.5")


@pytest.mark.parametrize("keys", [DEFAULTS + [CANCEL], DEFAULTS + [CTRL_C], [ENTER, ENTER, CTRL_C]],
                         ids=["cancel-choice", "ctrl-c-at-confirmation", "ctrl-c-at-a-question"])
def test_cancel_writes_nothing(script, isolated, tmp_path, capsys, keys):
    with pytest.raises(typer.Exit) as raised:
        wizard_cmd.run_wizard(script(*keys))
    assert raised.value.exit_code == 130
    assert "cancelled: nothing was written" in capsys.readouterr().err
    assert list(isolated.iterdir()) == []
    assert not (tmp_path / "cache").exists() and not (tmp_path / "config").exists()


def test_confirmation_panel_shows_configuration_and_command(script, capsys):
    answers, _ = wizard_cmd.settle(script(*DEFAULTS, RUN), data=None, cache_dir=None)
    shown = capsys.readouterr().out
    assert "The run you chose" in shown and "balanced: medium speed, good quality" in shown
    assert "hybridprune prune --preset balanced --sparsity 0.5 --out ./pruned-balanced-s0.5" in shown
    assert answers.preset == "balanced"


def test_go_back_asks_again_with_the_previous_answers_as_defaults(script):
    # first pass: quality at 0.6 into a typed folder; back; Enter through keeps all three
    first = [ENTER, DOWN + ENTER, f"{KILL_LINE}0.6{ENTER}", ENTER, ENTER, f"{KILL_LINE}my-folder{ENTER}", ENTER]
    prompter = script(*first, BACK, *DEFAULTS, RUN)
    answers, _ = wizard_cmd.settle(prompter, data=None, cache_dir=None)
    assert not prompter.keys
    assert (answers.preset, answers.sparsity, answers.out) == ("quality", 0.6, "my-folder")


def test_save_answers_as_a_named_preset(script):
    name_keys = f"balanced{ENTER}{KILL_LINE}my-run{ENTER}"  # a built-in name is refused and re-asked
    prompter = script(ENTER, ENTER, f"{KILL_LINE}0.6{ENTER}", DOWN + ENTER, ENTER, ENTER, ENTER, SAVE, name_keys, RUN)
    answers, presets = wizard_cmd.settle(prompter, data=None, cache_dir=None)
    assert not prompter.keys
    saved = tomllib.loads(user_presets_path().read_text())["my-run"]
    assert saved["sparsity"] == 0.6 and saved["pattern"] == "structured" and saved["nr_tfidf_mode"] == "doc"
    assert answers.preset == "my-run" and "my-run" in load_presets()
    assert wizard.command_text(answers, presets).startswith("hybridprune prune --preset my-run --sparsity 0.6 --out")
    assert "--pattern" not in wizard.command_text(answers, presets)  # the preset carries it now
    assert resolve({}, get_preset("my-run")).sparsity == 0.6  # `prune --preset my-run` alone prunes at 0.6
    # next time the user preset is offered, and Enter through it keeps its sparsity and pattern
    again = wizard.ask_answers(script(ENTER, DOWN * 6 + ENTER, *[ENTER] * 5))  # after the four card presets, `wanda`, `joint`
    assert (again.preset, again.sparsity, again.pattern) == ("my-run", 0.6, "structured")


def test_a_saved_preset_keeps_the_layer_spread_only_where_it_applies():
    """balanced's spread is refused next to an N:M pattern in a preset file: a 2:4 run saves without it."""
    from hybridprune.presets import save_user_preset

    for name, pattern, sparsity, spread in (("mine-24", "2:4", 0.5, 0.0), ("mine-70", "unstructured", 0.7, 0.15)):
        save_user_preset(name, wizard.preset_values(wizard.Answers(preset="balanced", sparsity=sparsity, pattern=pattern)))
        assert resolve({}, get_preset(name)).validate().layer_spread == spread  # the file loads, and means the same run
    assert "layer_spread" not in tomllib.loads(user_presets_path().read_text())["mine-24"]


def test_without_a_terminal_the_wizard_refuses_in_one_line():
    result = CliRunner().invoke(app, ["wizard"])
    assert result.exit_code != 0
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "interactive terminal" in lines[0] and "prune --preset" in lines[0]


def tiny_run_keys(model: Path, evaluate: bool = True) -> list[str]:
    return [DOWN + ENTER, f"{model}{ENTER}", ENTER, ENTER, ENTER, ENTER, ENTER, "y" if evaluate else "n", RUN]


@pytest.fixture
def corpus(tmp_path) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text("\n\n".join([TRAINING_TEXT] * 4), encoding="utf-8")
    return path


def test_full_run_on_a_tiny_model_saves_and_reuses_statistics(script, tiny_llama_folder, corpus, isolated, tmp_path, capsys):
    answers = wizard_cmd.run_wizard(script(*tiny_run_keys(tiny_llama_folder)), data=str(corpus), seqlen=32)
    shown = capsys.readouterr().out
    saved = isolated / "pruned-balanced-s0.5"
    assert answers.out == "./pruned-balanced-s0.5"
    assert {"config.json", "model.safetensors", "hybridprune.json"} <= {p.name for p in saved.iterdir()}
    record = json.loads((saved / "hybridprune.json").read_text())
    assert record["preset"] == "balanced" and record["achieved"]["total"]["sparsity"] == pytest.approx(0.5, abs=1e-3)
    assert "no cached statistics" in shown and "PRUNING SUMMARY" in shown and "Perplexity" in shown
    assert "--data" in shown and "--seqlen 32" in shown and "--eval" in shown

    answers = wizard_cmd.run_wizard(script(*tiny_run_keys(tiny_llama_folder, evaluate=False)), data=str(corpus), seqlen=32)
    shown = capsys.readouterr().out
    assert answers.out == "./pruned-balanced-s0.5-2"  # the first folder is taken now
    assert "reused cached statistics" in shown and "PRUNING SUMMARY" in shown
    assert (isolated / "pruned-balanced-s0.5-2" / "model.safetensors").is_file()


def test_ctrl_c_during_the_run_leaves_no_half_written_output_or_cache(
    script, tiny_llama_folder, corpus, isolated, tmp_path, monkeypatch
):
    import transformers

    import hybridprune.calibration.stats as stats_module

    def interrupted_clustering(*args, **kwargs):  # Ctrl-C inside a forward hook, in the middle of layer 0
        raise KeyboardInterrupt

    monkeypatch.setattr(stats_module, "kmeans_cosine", interrupted_clustering)
    with pytest.raises(typer.Exit) as raised:
        wizard_cmd.run_wizard(script(*tiny_run_keys(tiny_llama_folder)), data=str(corpus), seqlen=32)
    assert raised.value.exit_code == 130
    stats = tmp_path / "cache" / "stats"
    assert not stats.exists() or list(stats.iterdir()) == []
    assert list(isolated.iterdir()) == []
    monkeypatch.undo()
    monkeypatch.chdir(isolated)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.setenv("HYBRIDPRUNE_CACHE", str(tmp_path / "cache"))

    def interrupted_save(self, folder, *args, **kwargs):
        (Path(folder) / "model.safetensors").write_bytes(b"half a model")
        raise KeyboardInterrupt

    monkeypatch.setattr(transformers.PreTrainedModel, "save_pretrained", interrupted_save)
    with pytest.raises(typer.Exit) as raised:
        wizard_cmd.run_wizard(script(*tiny_run_keys(tiny_llama_folder, evaluate=False)), data=str(corpus), seqlen=32)
    assert raised.value.exit_code == 130
    assert list(isolated.iterdir()) == []  # neither the folder nor its hidden staging sibling
    entries = [entry for entry in (tmp_path / "cache" / "stats").iterdir()]
    assert all((entry / "manifest.json").is_file() for entry in entries)  # only complete entries


def test_built_in_extra_presets_are_listed_with_their_trade_off(script):
    """`wanda` (no PRIORITIES entry) is offered by name with its trade-off; it needs no second-order pass."""
    presets = load_presets()
    answers = wizard.ask_answers(script(ENTER, DOWN * 4 + ENTER, *[ENTER] * 5), presets=presets)
    assert answers.preset == "wanda"
    assert wizard.command_text(answers) == "hybridprune prune --preset wanda --sparsity 0.5 --out ./pruned-wanda-s0.5"
    config = resolve({}, get_preset("wanda"))
    assert config.prune_method == "wanda" and not config.refine and not config.update


def test_the_joint_preset_is_offered_after_wanda(script):
    answers = wizard.ask_answers(script(ENTER, DOWN * 5 + ENTER, *[ENTER] * 5), presets=load_presets())
    assert answers.preset == "joint"
    config = resolve({}, get_preset("joint"))
    assert config.update and config.update_mask == "admm" and config.refine > 0


def test_calibration_estimate_counts_the_second_order_pass_when_the_preset_needs_it(monkeypatch):
    from hybridprune import estimates

    monkeypatch.setattr(estimates, "machine_flops", lambda: 1e10)
    plain = wizard.calibration_estimate(135_000_000, 32, 512, second_order=False)
    both = wizard.calibration_estimate(135_000_000, 32, 512, second_order=True)
    assert plain == "about 7 min 22 s"  # 32 x 512 tokens x 2 x 135M / 1e10 flop/s = 442 s
    assert both.startswith("about 11 min ") and "second-order" in both  # x (1 + 0.6), one pass for both
    assert wizard.calibration_estimate(None, 32, 512, second_order=True) == "time unknown"
