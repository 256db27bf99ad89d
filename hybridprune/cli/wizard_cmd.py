"""`hybridprune wizard`: the seed card's decision tree as questions, then the very same run as `prune`."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.panel import Panel
from rich.table import Table

from hybridprune import ui, wizard
from hybridprune.api import configure_torch
from hybridprune.cli.common import CacheDirOpt, handle_errors
from hybridprune.cli.output import Output
from hybridprune.cli.prune_cmd import run_prune
from hybridprune.errors import UserError
from hybridprune.presets import Preset, load_presets, save_user_preset

NO_TERMINAL = (
    "the wizard needs an interactive terminal: use `hybridprune prune --preset balanced --sparsity 0.5 --out DIR`"
)


@handle_errors
def wizard_command(
    cache_dir: CacheDirOpt = None,
    data: Annotated[str | None, typer.Option("--data", hidden=True, help="Calibration text (default wiki-vital).")] = None,
    seqlen: Annotated[int, typer.Option("--seqlen", hidden=True, help="Tokens per window (default 512).")] = wizard.SEQLEN,
) -> None:
    """Answer a few questions, see the equivalent `prune` command line, then run it (same panels, same cache)."""
    if not (sys.stdin.isatty() and sys.stdout.isatty()):
        raise UserError(NO_TERMINAL)
    if seqlen <= 0:
        raise UserError(f"--seqlen must be a positive number of tokens, got {seqlen}")
    configure_torch()  # the time estimates measure the threads the run will use
    run_wizard(wizard.Prompter(), data=data, cache_dir=cache_dir, seqlen=seqlen)


def run_wizard(
    prompter: wizard.Prompter, data: str | None = None, cache_dir: Path | str | None = None, seqlen: int = wizard.SEQLEN
) -> wizard.Answers:
    """Ask, confirm, run `prune` with the answers; Ctrl-C at a question exits 130 with nothing written."""
    try:
        answers, presets = settle(prompter, data, str(cache_dir) if cache_dir else None, seqlen)
    except wizard.Cancelled:
        ui.error_console.print("cancelled: nothing was written")
        raise typer.Exit(130) from None
    command = wizard.command_text(answers, presets)
    ui.console.print(f"[bold]running[/] {escape(command)}", soft_wrap=True)
    run_prune(Output(), **wizard.prune_kwargs(answers, presets))  # the same code path, panels and summary as `prune`
    ui.console.print(f"[green]✓[/] done. Next time, without the wizard:\n  [bold]{escape(command)}[/]", soft_wrap=True)
    return answers


def settle(
    prompter: wizard.Prompter, data: str | None, cache_dir: str | None, seqlen: int = wizard.SEQLEN
) -> tuple[wizard.Answers, dict[str, Preset]]:
    """Questions, then the panel and run / go back / save as a preset / cancel, until the user says run."""
    from questionary import Choice

    answers: wizard.Answers | None = None
    while True:
        presets = load_presets()
        answers = wizard.ask_answers(prompter, answers, data=data, cache_dir=cache_dir, presets=presets, seqlen=seqlen)
        while True:
            ui.console.print(panel(answers, presets))
            # outside the panel and soft-wrapped, so it copies and pastes as one line at any width
            ui.console.print(f"[bold]the same run, scriptable:[/] [cyan]{escape(wizard.command_text(answers, presets))}[/]",
                             soft_wrap=True)
            action = prompter.select(
                "Run it?",
                choices=[
                    Choice("run it", value="run"),
                    Choice("go back and change the answers", value="back"),
                    Choice("save these answers as a preset (in your presets file)", value="save"),
                    Choice("cancel", value="cancel"),
                ],
                default="run",
            )
            if action == "run":
                return answers, presets
            if action == "cancel":
                raise wizard.Cancelled
            if action == "back":
                break
            name = prompter.text(
                "Preset name:", validate=lambda text, known=presets: wizard.validate_new_preset_name(text, known)
            ).strip()
            path = save_user_preset(
                name,
                wizard.preset_values(answers, presets),
                description=f"Saved by the wizard: {answers.preset} at {answers.sparsity:g}, {answers.pattern}.",
            )
            presets = load_presets()
            answers = wizard.with_saved_preset(answers, name)
            ui.console.print(f"[green]✓[/] saved preset '{escape(name)}' to {escape(str(path))}")


def panel(answers: wizard.Answers, presets: dict[str, Preset]) -> Panel:
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column()
    for label, value in wizard.describe(answers, presets):
        grid.add_row(label, escape(value))
    return Panel(grid, title="[bold]The run you chose", title_align="left", expand=False)
