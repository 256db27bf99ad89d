"""Presets: named sets of flags from presets.toml (the repository root's; a wheel carries it in the package) and user files.

A preset may set any PruneConfig field and the calibration inputs below; anything else is
refused with the key named, so a typo never silently does nothing.
"""

from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any

from hybridprune.config import PRUNE_FIELDS, PruneConfig, spread_for
from hybridprune.errors import UserError
from hybridprune.fsutil import atomic_write_text

CALIBRATION_KEYS: dict[str, type] = {"topics": int, "q_active": float, "nsamples": int, "seqlen": int, "data": str}
META_KEYS = ("summary", "description", "trade_off")
SUMMARY_WIDTH = 56
"""A summary longer than this is cut (`hybridprune presets` lists name + summary in 80 columns)."""
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
DEFAULT_PRESET = "balanced"
NO_PRESET = "none"
"""The preset a run names when --prune-method is given without --preset: the method with its own defaults."""
IMPLIED_BY_SPEEDUP = {"pattern": "structured", "sparsity": 0.0}
"""--target-speedup implies these unless they are given (a conflicting one is refused by PruneConfig.validate)."""


@dataclass(frozen=True)
class Preset:
    name: str
    values: dict[str, Any]
    source: str
    description: str = ""
    trade_off: str = ""
    calibration: dict[str, Any] = field(default_factory=dict)
    summary: str = ""  # one line for `hybridprune presets`; the description is the long text (`presets --show NAME`)

    @property
    def line(self) -> str:
        """The one-line summary, else the description's first sentence, cut to SUMMARY_WIDTH characters."""
        text = (self.summary or self.description.split(". ")[0] or self.trade_off).strip()
        return text if len(text) <= SUMMARY_WIDTH else text[: SUMMARY_WIDTH - 1].rstrip() + "…"


def user_presets_path() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config"
    return Path(base) / "hybridprune" / "presets.toml"


def check_name(name: str) -> str:
    """Preset names are plain words: they end up in file names and TOML tables."""
    if not NAME_PATTERN.match(name):
        raise UserError(f"'{name}' is not a valid preset name: use letters, digits, '-' and '_' (max 64)")
    return name


def builtin_text() -> str:
    """The built-in presets: the copy a wheel carries in the package (setup.py puts it there), else the repository's
    presets.toml (an editable install or a source checkout: the one file, no copy to keep in step)."""
    packaged = resources.files("hybridprune").joinpath("presets.toml")
    if packaged.is_file():
        return packaged.read_text(encoding="utf-8")
    return (Path(__file__).resolve().parent.parent / "presets.toml").read_text(encoding="utf-8")


def load_presets(extra_file: Path | None = None) -> dict[str, Preset]:
    """Built-in presets, then the user's file, then --presets FILE (later ones override by name)."""
    presets: dict[str, Preset] = {}
    presets.update(_parse(builtin_text(), "built-in"))
    for path in (user_presets_path(), extra_file):
        if path is None:
            continue
        path = Path(path).expanduser()
        if path == extra_file and not path.is_file():
            raise UserError(f"presets file '{path}' does not exist")
        if path.is_file():
            try:
                text = path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as err:
                raise UserError(f"cannot read presets file '{path}': {err}") from None
            presets.update(_parse(text, str(path)))
    return presets


def _parse(text: str, source: str) -> dict[str, Preset]:
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise UserError(f"presets file {source} is not valid TOML: {err}") from None
    parsed = {}
    for name, table in document.items():
        check_name(name)
        if not isinstance(table, dict):
            raise UserError(f"preset '{name}' in {source} must be a table ([{name}])")
        values, calibration = {}, {}
        for key, value in table.items():
            if key in META_KEYS:
                continue
            if key in CALIBRATION_KEYS:
                calibration[key] = _typed(name, source, key, value, CALIBRATION_KEYS[key])
            elif key == "layer_spread" and isinstance(value, str):  # `auto` (other text is refused just below)
                values[key] = value.strip().lower()
            elif key in PRUNE_FIELDS:
                values[key] = _typed(name, source, key, value, type(PRUNE_FIELDS[key].default))
            else:
                known = ", ".join([*PRUNE_FIELDS, *CALIBRATION_KEYS])
                raise UserError(f"preset '{name}' in {source}: unknown key '{key}' (known keys: {known})")
        try:
            PruneConfig(**_numeric_spread(values)).validate()
        except UserError as err:
            raise UserError(f"preset '{name}' in {source}: {err}") from None
        parsed[name] = Preset(
            name, values, source, str(table.get("description", "")), str(table.get("trade_off", "")), calibration,
            str(table.get("summary", "")),
        )
    return parsed


def _typed(name: str, source: str, key: str, value: Any, expected: type) -> Any:
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
        raise UserError(
            f"preset '{name}' in {source}: key '{key}' must be {expected.__name__}, got {value!r}"
        )
    return value


def get_preset(name: str, extra_file: Path | None = None) -> Preset:
    presets = load_presets(extra_file)
    if name not in presets:
        raise UserError(f"unknown preset '{name}': use one of {', '.join(presets)} (see `hybridprune presets`)")
    return presets[name]


def resolve(explicit: dict[str, Any], preset: Preset | None) -> PruneConfig:
    """explicit flag (not None) > preset value > PruneConfig default.

    --target-speedup implies --pattern structured --sparsity 0. A preset's --refine gives way to explicit choices it cannot work with (--pattern structured,
    --sequential, --update-mask sweep): see `yielded`, which says so."""
    values = dict(preset.values) if preset else {}
    given = {key: value for key, value in explicit.items() if value is not None}
    values.update(given)
    if values.get("target_speedup"):  # a speed-up plan can only be a structured removal of its own choosing
        values.update({key: value for key, value in IMPLIED_BY_SPEEDUP.items() if key not in given})
    config = PruneConfig(**_numeric_spread(values))
    if "refine" not in given and config.refine and config.refine_conflict():
        config = PruneConfig(**_numeric_spread({**values, "refine": 0}))
    if "layer_spread" not in given and config.layer_spread and _spread_yields(config):
        config = replace(config, layer_spread=0.0)
    return config


def _numeric_spread(values: dict[str, Any]) -> dict[str, Any]:
    """`values` with --layer-spread as the number it means at their sparsity (`auto`: config.spread_for)."""
    if "layer_spread" not in values:
        return values
    sparsity = values.get("sparsity", PRUNE_FIELDS["sparsity"].default)
    return {**values, "layer_spread": spread_for(values["layer_spread"], sparsity)}


def _spread_yields(config: PruneConfig) -> str:
    """What makes a preset's --layer-spread give way: what excludes it, or --pattern structured (a spread of removed
    neurons over layers was never measured; an explicit --layer-spread there is the user's)."""
    if config.spread_conflict():
        return config.spread_conflict()
    return "--pattern structured" if config.pattern.strip().lower() == "structured" else ""


def yielded(explicit: dict[str, Any], preset: Preset | None, config: PruneConfig) -> list[str]:
    """One line per preset knob that `resolve` dropped because an explicit choice excludes it."""
    lines = []
    wanted = preset.values.get("refine", 0) if preset else 0
    if explicit.get("refine") is None and wanted and not config.refine:
        lines.append(f"the {preset.name} preset's --refine {wanted} does not apply with "
                     f"{config.refine_conflict()}: pruning without it")
    spread = preset.values.get("layer_spread", 0.0) if preset else 0.0
    # said for --sequential and structured removal; an N:M pattern fixes every layer's sparsity by its definition
    if explicit.get("layer_spread") is None and spread and not config.layer_spread and _spread_yields(config) != "--pattern N:M":
        lines.append(f"the {preset.name} preset's --layer-spread {spread if isinstance(spread, str) else f'{spread:g}'} does not apply with "
                     f"{_spread_yields(config)}: every layer at the same sparsity")
    return lines


def save_user_preset(name: str, values: dict[str, Any], description: str = "") -> Path:
    """Append or replace [name] in the user's presets file (written atomically)."""
    check_name(name)
    path = user_presets_path()
    existing = {}
    if path.is_file():
        existing = tomllib.loads(path.read_text(encoding="utf-8"))
    existing[name] = {"description": description, **values} if description else dict(values)
    _parse(_dump(existing), str(path))  # refuse to write what we could not read back
    atomic_write_text(path, _dump(existing))
    return path


def _dump(document: dict[str, dict[str, Any]]) -> str:
    lines = ["# hybridprune user presets (written by `hybridprune wizard`; edit freely)"]
    for name, table in document.items():
        lines.append(f"\n[{name}]")
        for key, value in table.items():
            if isinstance(value, bool):
                rendered = "true" if value else "false"
            elif isinstance(value, str):
                rendered = '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
            else:
                rendered = repr(value)
            lines.append(f"{key} = {rendered}")
    return "\n".join(lines) + "\n"
