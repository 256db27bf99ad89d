"""Where a command's output goes, decided once: human (Rich panels and tables), --json (one JSON
document on stdout, the human output on stderr) or --quiet (nothing but errors).

Each command builds one `Output`, hands `output.reporter` to the API for progress, and ends with
`output.result(document, render)`: the JSON document, or the tables that `render` prints.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from hybridprune import ui


class Output:
    def __init__(self, json_output: bool = False, quiet: bool = False, unit: str | None = None):
        ui.set_json_mode(json_output)
        self.json = json_output
        self.quiet = quiet
        self.reporter = ui.RichReporter(quiet=quiet, unit=unit)

    @property
    def human(self) -> bool:
        """Tables and remarks are shown (neither --json nor --quiet)."""
        return not self.json and not self.quiet

    def show(self, *renderables: Any) -> None:
        """Print in human mode only."""
        if self.human:
            for renderable in renderables:
                ui.console.print(renderable, soft_wrap=isinstance(renderable, str))

    def result(self, document: Any, render: Callable[[], None] | None = None) -> None:
        """The command's result: `document` as JSON with --json, else `render()` unless --quiet."""
        if self.json:
            ui.emit_json(document)
        elif not self.quiet and render is not None:
            render()
