"""What every command shares: the Typer signature built from hybridprune/options.py (each option declared
once there, for the commands and the API), --json / --quiet, and error handling. Nothing here imports torch."""

from __future__ import annotations

import functools
import inspect
import os
import traceback
from collections.abc import Callable
from typing import Annotated, Any, TypeVar

import typer

from hybridprune import ui
from hybridprune.errors import UserError
from hybridprune.options import CACHE_DIR, PRESETS_FILE, Command, Opt

F = TypeVar("F", bound=Callable[..., Any])


JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout (human output goes to stderr).")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No panels or progress bars.")]


def annotated(option: Opt) -> Any:
    """One option as a Typer annotation: Annotated[type, typer.Option(*flags, help)]."""
    return Annotated[option.type, typer.Option(*option.flags, help=option.help)]


def typer_parameter(option: Opt) -> inspect.Parameter:
    return inspect.Parameter(option.name, inspect.Parameter.KEYWORD_ONLY, default=option.default, annotation=annotated(option))


CacheDirOpt = annotated(CACHE_DIR)
PresetsFileOpt = annotated(PRESETS_FILE)


def cli_options(command: Command) -> Callable[[F], F]:
    """Give a command function `(*own, json_output, quiet, **options)` the Typer signature of `command`'s
    options, after its own parameters (arguments, command-line-only flags) and before --json / --quiet."""

    def decorate(function: F) -> F:
        own = [p for p in inspect.signature(function, eval_str=True).parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
        last = [p for p in own if p.name in ("json_output", "quiet")]
        first = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own if p not in last]
        parameters = [*first, *(typer_parameter(option) for option in command.options),
                      *(p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in last)]
        function.__signature__ = inspect.Signature(parameters)  # type: ignore[attr-defined]
        function.__annotations__ = {p.name: p.annotation for p in parameters}
        return function

    return decorate


def handle_errors(command: F) -> F:
    """One clear line and a non-zero exit for user errors; a traceback only with HYBRIDPRUNE_DEBUG=1."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except UserError as err:
            if os.environ.get("HYBRIDPRUNE_DEBUG") == "1":
                traceback.print_exc()
            ui.print_error(str(err))
            raise typer.Exit(err.exit_code) from None
        except KeyboardInterrupt:
            ui.print_error("interrupted: nothing was written (partial results are discarded)")
            raise typer.Exit(130) from None
        except typer.Exit:
            raise
        except Exception as err:  # a bug of ours: say so in one line, keep the traceback behind the flag
            if os.environ.get("HYBRIDPRUNE_DEBUG") == "1":
                raise
            ui.print_error(f"internal error: {type(err).__name__}: {err} (rerun with HYBRIDPRUNE_DEBUG=1 for the traceback)")
            raise typer.Exit(1) from None

    return wrapper  # type: ignore[return-value]
