"""Start-up time of the light commands (no torch / transformers import): median of N runs each.

    .venv/bin/python benchmarks/bench_startup.py            # prints a table; goal: `--help` median < 0.5 s

Each run is a fresh `python -m hybridprune ARGS` process, so it measures what a user waits for.
For scale, it also times `python -c "import torch, transformers"` (what a heavy start-up would add).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time

CASES = {
    "hybridprune --help": ["-m", "hybridprune", "--help"],
    "hybridprune prune --help": ["-m", "hybridprune", "prune", "--help"],
    "hybridprune presets": ["-m", "hybridprune", "presets"],
    "hybridprune cache list": ["-m", "hybridprune", "cache", "list"],
    "(reference) import torch, transformers": ["-c", "import torch, transformers"],
}


def median_seconds(argv: list[str], runs: int, env: dict[str, str]) -> float:
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        subprocess.run([sys.executable, *argv], check=True, capture_output=True, env=env)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        env = {"HYBRIDPRUNE_CACHE": scratch, "XDG_CONFIG_HOME": scratch, "PATH": "/usr/bin:/bin", "COLUMNS": "100"}
        print(f"| command | median of {args.runs} (s) |\n|---|---|")
        for name, argv in CASES.items():
            print(f"| `{name}` | {median_seconds(argv, args.runs, env):.2f} |")


if __name__ == "__main__":
    main()
