"""Output when stdout is not a terminal (a log file, a pipe): progress as plain lines, not one bar at the end."""

from __future__ import annotations

import io

from hybridprune import ui


def test_progress_writes_plain_lines_to_a_log_file(monkeypatch):
    sink = io.StringIO()
    monkeypatch.setattr(ui.console, "file", sink)
    assert not ui.console.is_terminal
    with ui.RichReporter().progress("prune layers", 30) as advance:
        for _ in range(30):
            advance(1)
    lines = sink.getvalue().strip().splitlines()
    assert 2 <= len(lines) <= 11  # about every tenth of the work, never one line per step
    assert lines[0].startswith("prune layers: 3/30") and "left" in lines[0]
    assert lines[-1].startswith("prune layers: 30/30") and "left" not in lines[-1]


def test_quiet_progress_writes_nothing(monkeypatch):
    sink = io.StringIO()
    monkeypatch.setattr(ui.console, "file", sink)
    with ui.RichReporter(quiet=True).progress("x", 5) as advance:
        advance(5)
    assert sink.getvalue() == ""
