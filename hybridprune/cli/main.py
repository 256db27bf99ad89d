"""The `hybridprune` command: a thin Typer app; each command lives in its own module."""

from __future__ import annotations

import re
import sys

import typer

from hybridprune.cli import cache_cmd
from hybridprune.cli.calibrate import calibrate
from hybridprune.cli.decompress_cmd import decompress
from hybridprune.cli.eval_cmd import eval_command
from hybridprune.cli.presets_cmd import presets
from hybridprune.cli.prune_cmd import prune
from hybridprune.cli.score_cmd import score
from hybridprune.cli.wizard_cmd import wizard_command

app = typer.Typer(
    name="hybridprune",
    help="Prune decoder-only LLMs without retraining: Wanda for attention, NeuronRank for MLPs, from cached statistics.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
app.command()(calibrate)
app.command("eval")(eval_command)
app.command()(score)
app.command()(prune)
app.command()(presets)
app.command()(decompress)
app.command("wizard")(wizard_command)
app.add_typer(cache_cmd.app, name="cache")


def normalize_flags(argv: list[str]) -> list[str]:
    """The seed card spells flags with underscores (--sparsity_ratio); accept them as dashes."""
    return [re.sub(r"^--([a-z0-9]+(?:_[a-z0-9]+)+)(=|$)", lambda m: "--" + m.group(1).replace("_", "-") + m.group(2), a) for a in argv]


def main(argv: list[str] | None = None) -> None:
    args = normalize_flags(sys.argv[1:] if argv is None else argv)
    app(args=args, prog_name="hybridprune")
