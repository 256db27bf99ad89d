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


def run_cli(args: list[str], cache: Path, timeout: float = 1800) -> tuple[float, dict, int]:
    """Run `hybridprune ARGS --json` in a new process: (wall seconds, the JSON document, peak RSS in bytes)."""
    env = {**os.environ, "HYBRIDPRUNE_CACHE": str(cache)}
    code = (
        "import resource, sys, runpy; sys.argv=['hybridprune', *sys.argv[1:]];"
        "from hybridprune.cli.main import main\n"
        "try:\n    main()\nexcept SystemExit as e:\n    code = e.code\nelse:\n    code = 0\n"
        "print('PEAK_RSS_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)\nsys.exit(code)"
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
