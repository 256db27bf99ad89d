"""`hybridprune presets`: the presets one line each; `presets --show NAME` (or `presets NAME`) one in full."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.markup import escape

from hybridprune import ui
from hybridprune.cli.common import JsonOpt, PresetsFileOpt, handle_errors
from hybridprune.cli.output import Output
from hybridprune.errors import UserError
from hybridprune.presets import DEFAULT_PRESET, get_preset, load_presets


def as_flags(values: dict) -> str:
    parts = []
    for key, value in values.items():
        flag = "--" + key.replace("_", "-")
        parts.append(flag if value is True else f"--no-{key.replace('_', '-')}" if value is False else f"{flag} {value}")
    return " ".join(parts)


@handle_errors
def presets(
    name: Annotated[str | None, typer.Argument(help="Show this preset in full (as --show NAME).", show_default=False)] = None,
    show: Annotated[str | None, typer.Option("--show", help="Show this preset in full: description, trade-off, flags.")] = None,
    presets_file: PresetsFileOpt = None,
    json_output: JsonOpt = False,
) -> None:
    """The presets (built-in, user file, --presets FILE), one line each; --show NAME for one in full."""
    Output(json_output)
    if name and show and name != show:
        raise UserError(f"name one preset to show, got '{name}' and --show '{show}'")
    name = name or show
    chosen = {name: get_preset(name, presets_file)} if name else load_presets(presets_file)
    if json_output:
        ui.emit_json({key: {**preset.values, **preset.calibration, "summary": preset.line, "description": preset.description,
                            "trade_off": preset.trade_off, "source": preset.source} for key, preset in chosen.items()})
        return
    if name:
        preset = chosen[name]
        rows = [[label, escape(text)] for label, text in (
            ("summary", preset.line), ("what", preset.description), ("trade-off", preset.trade_off),
            ("flags", as_flags({**preset.values, **preset.calibration})), ("from", preset.source)) if text]
        ui.console.print(ui.table(f"Preset {name}" + (" (default)" if name == DEFAULT_PRESET else ""), ["", ""], rows,
                                  justify_numbers=False, header=False))
        return
    rows = [[key + (" (default)" if key == DEFAULT_PRESET else ""), preset.line + ("" if preset.source == "built-in" else f" [{preset.source}]")]
            for key, preset in chosen.items()]
    ui.console.print(ui.table("Presets", ["name", "what"], rows, justify_numbers=False))
    ui.console.print("hybridprune presets --show NAME: the full description, trade-off and flags")
