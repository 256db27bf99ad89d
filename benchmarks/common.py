"""Shared helpers of the benchmark scripts: run the CLI in a fresh process and time it."""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


PEAK_RSS_KB = (
    "def peak_rss_kb():\n"
    "    return next(int(line.split()[1]) for line in open('/proc/self/status') if line.startswith('VmHWM:'))"
)
"""This process's own peak RSS. Not ru_maxrss: on Linux a spawned child's ru_maxrss starts at its parent's
peak (exec keeps the old address space's high-water mark), so a busy benchmark process would inflate it."""


def run_cli(args: list[str], cache: Path, timeout: float = 1800) -> tuple[float, dict, int]:
    """Run `hybridprune ARGS --json` in a new process: (wall seconds, the JSON document, peak RSS in bytes)."""
    env = {**os.environ, "HYBRIDPRUNE_CACHE": str(cache)}
    code = (
        f"{PEAK_RSS_KB}\nimport sys; sys.argv=['hybridprune', *sys.argv[1:]];"
        "from hybridprune.cli.main import main\n"
        "try:\n    main()\nexcept SystemExit as e:\n    code = e.code\nelse:\n    code = 0\n"
        "print('PEAK_RSS_KB', peak_rss_kb(), file=sys.stderr)\nsys.exit(code)"
    )
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", code, *args, "--json"], env=env, capture_output=True, text=True, timeout=timeout)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"hybridprune {' '.join(args)} failed:\n{done.stderr[-3000:]}")
    peak = next(int(line.split()[1]) * 1024 for line in done.stderr.splitlines() if line.startswith("PEAK_RSS_KB"))
    return seconds, json.loads(done.stdout), peak


def median(values: list[float]) -> float:
    return statistics.median(values)


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def module_at(rev: str, path: str = "hybridprune/methods/obs.py"):
    """The module at `path` as it was at git revision `rev`, imported under its own name (for A/B timings)."""
    import importlib.util
    import tempfile

    source = subprocess.run(["git", "show", f"{rev}:{path}"], check=True, capture_output=True, text=True, cwd=REPO).stdout
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as file:
        file.write(source)
    spec = importlib.util.spec_from_file_location(f"{Path(path).stem}_at_{rev}", file.name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
