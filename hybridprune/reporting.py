"""The small interface through which the core reports progress; the UI implements it.

Core modules (calibration, pruning, evaluation) never import Rich: they call a Reporter.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Protocol


class Reporter(Protocol):
    def phase(self, title: str, lines: list[str]) -> None:
        """A new phase of the run (shown as a panel)."""

    def note(self, text: str) -> None:
        """A one-line remark (cached entry reused, a warning, where a file went)."""

    def progress(self, description: str, total: int) -> contextlib.AbstractContextManager[Callable[[int], None]]:
        """A progress bar; the context yields `advance(n)`."""


class SilentReporter:
    """Reports nothing: for tests, --quiet and library use."""

    def phase(self, title: str, lines: list[str]) -> None:
        pass

    def note(self, text: str) -> None:
        pass

    @contextlib.contextmanager
    def progress(self, description: str, total: int) -> Iterator[Callable[[int], None]]:
        yield lambda n=1: None
