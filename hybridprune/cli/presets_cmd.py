"""`hybridprune presets [NAME]`: list the presets, or show one as flags."""

from __future__ import annotations

from typing import Annotated

import typer

from hybridprune import ui
from hybridprune.cli.common import JsonOpt, PresetsFileOpt, handle_errors
from hybridprune.cli.output import Output
from hybridprune.presets import DEFAULT_PRESET, get_preset, load_presets


def as_flags(values: dict) -> str:
    parts = []
    for key, value in values.items():
        flag = "--" + key.replace("_", "-")
        parts.append(flag if value is True else f"--no-{key.replace('_', '-')}" if value is False else f"{flag} {value}")
    return " ".join(parts)


@handle_errors
def presets(
    name: Annotated[str | None, typer.Argument(help="Show only this preset.")] = None,
    presets_file: PresetsFileOpt = None,
    json_output: JsonOpt = False,
) -> None:
    """The presets (built-in, user file, --presets FILE) and the flags each stands for."""
    Output(json_output)
    chosen = {name: get_preset(name, presets_file)} if name else load_presets(presets_file)
    if json_output:
        ui.emit_json({key: {**preset.values, **preset.calibration, "description": preset.description,
                            "trade_off": preset.trade_off, "source": preset.source} for key, preset in chosen.items()})
        return
    rows = [
        [key + (" (default)" if key == DEFAULT_PRESET else ""), preset.description, preset.trade_off,
         as_flags({**preset.values, **preset.calibration}), preset.source]
        for key, preset in chosen.items()
    ]
    ui.console.print(ui.table("Presets", ["name", "what", "trade-off", "flags", "from"], rows, justify_numbers=False))
