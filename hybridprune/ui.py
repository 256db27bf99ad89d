"""The one Rich console: panels, progress bars and tables, and the --json sink.

With --json the human-oriented output goes to stderr and stdout carries one JSON document.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.panel import Panel
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

console = Console(highlight=False)
error_console = Console(stderr=True, highlight=False)


class _RateColumn(ProgressColumn):
    """Items per second, in the bar's unit (tokens/s for evaluation)."""

    def __init__(self, unit: str):
        super().__init__()
        self.unit = unit

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed or (task.completed / task.elapsed if task.elapsed else None)
        return Text(f"{speed:,.0f} {self.unit}/s" if speed else f"- {self.unit}/s")


class _LineProgress:
    """Progress as plain lines for a console that is not a terminal: one when a tenth of the work more is done or a
    minute has passed since the last line, and one at the end (done / total, elapsed time, estimated time left)."""

    EVERY_S = 60.0

    def __init__(self, description: str, total: int, unit: str | None) -> None:
        self.description, self.total, self.unit = description, max(total, 1), unit or ""
        self.done = 0
        self.start = self.last_time = time.monotonic()
        self.last_done = 0

    def __call__(self, n: int = 1) -> None:
        self.done += n
        now = time.monotonic()
        if (self.done >= self.total or self.done - self.last_done >= self.total / 10
                or now - self.last_time >= self.EVERY_S):
            elapsed = now - self.start
            left = elapsed / self.done * (self.total - self.done) if self.done else float("nan")
            unit = f" {self.unit}" if self.unit else ""
            console.print(f"{self.description}: {self.done:,}/{self.total:,}{unit}, {elapsed:.0f} s elapsed"
                          + (f", about {left:.0f} s left" if self.done < self.total else ""), soft_wrap=True)
            self.last_time, self.last_done = now, self.done


class RichReporter:
    """Reporter (see reporting.py) that draws panels and progress bars on the console.

    With `unit` (e.g. "tokens") bars count in that unit and show its rate.
    """

    def __init__(self, quiet: bool = False, unit: str | None = None):
        self.quiet = quiet
        self.unit = unit

    def phase(self, title: str, lines: list[str]) -> None:
        if not self.quiet:
            console.print(Panel("\n".join(lines) if lines else "", title=f"[bold]{title}", title_align="left", expand=False))

    def note(self, text: str) -> None:
        if not self.quiet:
            console.print(text)

    @contextlib.contextmanager
    def progress(self, description: str, total: int) -> Iterator[Callable[[int], None]]:
        if self.quiet:
            yield lambda n=1: None
            return
        if not console.is_terminal:  # a log file or a pipe: Rich would draw the bar only once, at the end
            yield _LineProgress(description, total, self.unit)
            return
        counted = (
            (TextColumn("{task.completed:,.0f}/{task.total:,.0f} " + self.unit), _RateColumn(self.unit))
            if self.unit
            else (MofNCompleteColumn(),)
        )
        columns = (
            TextColumn("{task.description}"),
            BarColumn(),
            *counted,
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
        )
        with Progress(*columns, console=console, transient=False) as progress:
            task = progress.add_task(description, total=total)
            yield lambda n=1: progress.advance(task, n)


def set_json_mode(enabled: bool) -> None:
    """Send human output to stderr so stdout carries only the JSON document."""
    console.file = sys.stderr if enabled else sys.stdout


def emit_json(document: Any) -> None:
    sys.stdout.write(json.dumps(document, indent=2, default=str) + "\n")
    sys.stdout.flush()


def table(title: str, columns: list[str], rows: list[list[Any]], justify_numbers: bool = True, header: bool = True) -> Table:
    """A summary table; numeric columns right-aligned."""
    view = Table(title=title, title_justify="left", header_style="bold", show_header=header)
    for index, name in enumerate(columns):
        view.add_column(name, justify="right" if justify_numbers and index > 0 else "left")
    for row in rows:
        view.add_row(*[str(cell) for cell in row])
    return view


def print_error(message: str) -> None:
    error_console.print(f"[bold red]error:[/] {escape(message)}", soft_wrap=True)


def human_count(number: float) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(number) >= size:
            return f"{number / size:.1f}{unit}"
    return str(int(number))


def percent(fraction: float) -> str:
    return f"{100 * fraction:.2f}%"
