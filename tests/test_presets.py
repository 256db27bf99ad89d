"""Presets: names that cannot escape, the packaged copy, precedence."""

from __future__ import annotations

from pathlib import Path

import pytest
from reliability import (
    record,
)

from hybridprune.errors import UserError


@pytest.mark.parametrize("name", ["../evil", "/abs", "a/b", "..", ".hidden", "x" * 65, "bad name", "ok\n"])
def test_preset_names_cannot_escape(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from hybridprune.presets import check_name, get_preset, save_user_preset

    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    if name != "ok\n":  # check_name's `$` lets a trailing newline through; the TOML round trip then refuses it
        with pytest.raises(UserError):
            check_name(name)
    with pytest.raises(UserError):
        save_user_preset(name, {"sparsity": 0.5})
    with pytest.raises(UserError, match="unknown preset"):
        get_preset(name)
    assert not (tmp_path / "config").exists() or not any((tmp_path / "config").rglob("*.toml"))
    record("preset name with `..`, `/`, absolute, too long", "refused, nothing written")


REPO = Path(__file__).resolve().parent.parent


def test_one_presets_file_read_in_a_checkout_and_carried_by_a_wheel(tmp_path: Path):
    """presets.toml lives at the repository root only; a checkout (or an editable install) reads it there, and a
    built wheel carries it in the package (setup.py), so an installed copy finds it too."""
    import shutil
    import subprocess
    import sys
    import zipfile

    from hybridprune.presets import builtin_text

    tracked = subprocess.run(["git", "ls-files", "*presets.toml"], cwd=REPO, capture_output=True, text=True).stdout.split()
    assert tracked == ["presets.toml"]
    assert builtin_text() == (REPO / "presets.toml").read_text(encoding="utf-8")
    source = tmp_path / "source"  # what a clean clone holds (no build leftovers in the repository)
    source.mkdir()
    for name in ("pyproject.toml", "setup.py", "MANIFEST.in", "README.md", "presets.toml"):
        shutil.copy2(REPO / name, source / name)
    shutil.copytree(REPO / "hybridprune", source / "hybridprune", ignore=shutil.ignore_patterns("__pycache__", "presets.toml"))
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(tmp_path / "wheel")], capture_output=True, text=True)
    assert built.returncode == 0, built.stderr
    (wheel,) = (tmp_path / "wheel").glob("hybridprune-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        assert archive.read("hybridprune/presets.toml") == (REPO / "presets.toml").read_bytes()
        archive.extractall(tmp_path / "installed")
    loaded = subprocess.run([sys.executable, "-c", "import hybridprune.presets as p; print(p.__file__); print(sorted(p.load_presets()))"],
                            cwd=tmp_path, env={"PYTHONPATH": str(tmp_path / "installed"), "XDG_CONFIG_HOME": str(tmp_path),
                                               "PATH": "/usr/bin:/bin"}, capture_output=True, text=True)
    assert loaded.returncode == 0, loaded.stderr
    assert str(tmp_path / "installed") in loaded.stdout and "'balanced'" in loaded.stdout


def test_every_builtin_preset_validates_and_resolves(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from hybridprune.config import PruneConfig
    from hybridprune.presets import DEFAULT_PRESET, load_presets, resolve

    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    presets = load_presets()
    assert {"balanced", "quality", "fast", "conservative"} <= set(presets) and DEFAULT_PRESET in presets
    for preset in presets.values():
        config = resolve({}, preset).validate()
        assert isinstance(config, PruneConfig)
    # explicit value > preset > default
    quality = presets["quality"]
    assert resolve({"update": False}, quality).update is False
    assert resolve({}, quality).update == quality.values.get("update", PruneConfig().update)


def test_unknown_keys_and_bad_types_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from hybridprune.presets import load_presets

    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    extra = tmp_path / "extra.toml"
    extra.write_text("[mine]\nsparsity = 0.5\nsparsty = 0.4\n")
    with pytest.raises(UserError, match="unknown key 'sparsty'"):
        load_presets(extra)
    extra.write_text("[mine]\nsparsity = 'half'\n")
    with pytest.raises(UserError, match="must be float"):
        load_presets(extra)
    extra.write_text("[mine]\nprune_method = 'sparsegpt'\n")
    with pytest.raises(UserError, match="unknown --prune-method 'sparsegpt'"):
        load_presets(extra)


def test_a_presets_refine_gives_way_to_choices_it_cannot_work_with():
    from hybridprune.presets import get_preset, resolve, yielded

    balanced = get_preset("balanced")
    assert resolve({}, balanced).refine > 0  # the default refines its masks
    assert resolve({"sequential": True}, balanced).refine > 0  # --sequential refines from its own second-order sums
    for explicit, reason in (({"pattern": "structured"}, "--pattern structured"),
                             ({"update": True, "update_mask": "sweep"}, "--update-mask sweep")):
        config = resolve(explicit, balanced)
        assert config.refine == 0
        config.validate()  # no longer refused
        (line,) = [line for line in yielded(explicit, balanced, config) if "--refine" in line]
        assert reason in line and "balanced" in line
    # an explicit --refine is the user's: still refused where it cannot work
    with pytest.raises(UserError, match="--refine"):
        resolve({"pattern": "structured", "refine": 10}, balanced).validate()
    assert yielded({"pattern": "2:4", "sparsity": 0.5}, balanced, resolve({"pattern": "2:4", "sparsity": 0.5}, balanced)) == []


def test_balanced_and_quality_spread_sparsity_over_layers_where_it_can_work():
    """Both spread sparsity over layers by OWL's outlier ratio (benchmarks/validation_choices.md 17); joint does not."""
    from hybridprune.config import SPREAD_BY_SPARSITY
    from hybridprune.presets import get_preset, resolve, yielded

    for name in ("balanced", "quality"):
        preset = get_preset(name)
        assert preset.values["layer_spread"] == "auto"
        for sparsity, spread in SPREAD_BY_SPARSITY:  # `auto` is the measured spread at each measured sparsity
            assert resolve({"sparsity": sparsity}, preset).validate().layer_spread == spread
        assert resolve({}, preset).layer_spread == SPREAD_BY_SPARSITY[0][1]  # 50%: the lowest point's
        assert resolve({"layer_spread": 0.0}, preset).layer_spread == 0.0  # the user's flag wins
        assert resolve({"layer_spread": "0.1"}, preset).layer_spread == 0.1  # as the command line gives it
        structured = {"pattern": "structured"}
        assert resolve(structured, preset).validate().layer_spread == 0.0
        assert any("--layer-spread auto" in line for line in yielded(structured, preset, resolve(structured, preset)))
    assert resolve({}, get_preset("joint")).layer_spread == 0.0


def test_spread_for_is_linear_between_the_measured_points_and_flat_beyond():
    from hybridprune.config import SPREAD_BY_SPARSITY, spread_for

    (low, at_low), (high, at_high) = SPREAD_BY_SPARSITY[0], SPREAD_BY_SPARSITY[-1]
    assert spread_for("auto", low - 0.3) == at_low and spread_for(" AUTO ", high + 0.2) == at_high
    (x0, y0), (x1, y1) = SPREAD_BY_SPARSITY[:2]
    assert spread_for("auto", (x0 + x1) / 2) == pytest.approx((y0 + y1) / 2)  # halfway between two points
    assert spread_for(0.1, 0.5) == 0.1 and spread_for("0.2", 0.5) == 0.2 and spread_for(None, 0.5) is None
    with pytest.raises(UserError, match="--layer-spread must be a number in \\[0, 0.5\\) or auto"):
        spread_for("wide", 0.5)


def test_a_presets_file_may_say_layer_spread_auto_and_nothing_else_in_words(tmp_path):
    from hybridprune.presets import load_presets, resolve

    good, bad = tmp_path / "good.toml", tmp_path / "bad.toml"
    good.write_text('[mine]\nprune_method = "hybrid"\nlayer_spread = "auto"\n')
    bad.write_text('[mine]\nprune_method = "hybrid"\nlayer_spread = "wide"\n')
    assert resolve({"sparsity": 0.7}, load_presets(good)["mine"]).layer_spread > 0
    with pytest.raises(UserError, match="or auto"):
        load_presets(bad)


def test_a_presets_layer_spread_gives_way_where_it_cannot_work_or_was_never_measured():
    from hybridprune.presets import Preset, resolve, yielded

    spread = Preset(name="owl", values={"prune_method": "hybrid", "layer_spread": 0.04}, source="test")
    assert resolve({"sparsity": 0.7}, spread).layer_spread == 0.04
    assert yielded({"sparsity": 0.7}, spread, resolve({"sparsity": 0.7}, spread)) == []
    for explicit, reason in (({"sequential": True}, "--sequential"), ({"pattern": "structured"}, "--pattern structured")):
        config = resolve(explicit, spread)
        assert config.layer_spread == 0.0
        config.validate()  # not refused
        (line,) = yielded(explicit, spread, config)
        assert reason in line and "owl" in line and "--layer-spread 0.04" in line
    # N:M fixes every layer's sparsity by its definition: the spread gives way without a word
    nm = {"pattern": "2:4", "sparsity": 0.5}
    assert resolve(nm, spread).validate().layer_spread == 0.0 and yielded(nm, spread, resolve(nm, spread)) == []
    # an explicit --layer-spread is the user's: refused where it cannot work, kept with structured removal
    with pytest.raises(UserError, match="--layer-spread"):
        resolve({"pattern": "2:4", "sparsity": 0.5, "layer_spread": 0.1}, spread).validate()
    assert resolve({"pattern": "structured", "layer_spread": 0.1}, spread).validate().layer_spread == 0.1


def test_presets_list_fits_80_columns_and_show_gives_the_long_text(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from typer.testing import CliRunner

    from hybridprune.cli.main import app
    from hybridprune.presets import load_presets

    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    monkeypatch.setenv("COLUMNS", "80")
    listed = CliRunner().invoke(app, ["presets"])
    assert listed.exit_code == 0, listed.output
    lines = listed.output.splitlines()
    assert max(len(line.rstrip()) for line in lines) <= 80
    for name, preset in load_presets().items():  # one row a preset: its name and its one-line summary, nothing wrapped
        assert sum(line.startswith(f"│ {name} ") for line in lines) == 1 and any(preset.line in line for line in lines), name
    assert "Default choice" not in listed.output  # the long description waits for --show
    shown = CliRunner().invoke(app, ["presets", "--show", "balanced"])
    flat = " ".join(shown.output.replace("│", " ").split())  # the table's cells read as one text, however they wrap
    assert shown.exit_code == 0 and "Default choice" in shown.output and "--layer-spread auto --refine 50" in flat
    assert CliRunner().invoke(app, ["presets", "--show", "nope"]).exit_code != 0
