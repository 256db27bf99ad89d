"""One calibration serves every sparsity, knob and preset: cached runs vs the first, uncached run.

Target (issue 3): after one calibration with 128 x 512 windows, `prune` at 0.3 / 0.5 / 0.7,
`score`, a changed --idf-exp, --pattern or preset each run without a calibration forward pass
and take at most 15% of the first (uncached) run's time. Also reports how long the masks for
all decoder matrices take from cached statistics (inside the process, without start-up).
The default preset refines its masks (--refine), so the first run collects two cache entries, the
statistics and the second-order statistics; every later run reuses both, and the refine (and the
update of `quality`) is computed again for each configuration.

    .venv/bin/python benchmarks/bench_reuse.py [--nsamples 128]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from common import run_cli


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--nsamples", type=int, default=128)
    args = parser.parse_args()
    calibration = ["--nsamples", str(args.nsamples), "--seqlen", "512"]
    with tempfile.TemporaryDirectory() as folder:
        cache = Path(folder)
        from hybridprune.models.loading import embedded_folder

        (cache / "models").symlink_to(embedded_folder().parent)  # the converted model, not its conversion time
        first, document, _ = run_cli(["prune", "--sparsity", "0.5", *calibration], cache)
        run = document["runs"][0]
        assert not run["statistics_reused"] and not run["second_order_statistics"]["reused"]
        print(f"first run (calibration {args.nsamples} x 512, second-order statistics, prune 0.5 with the default "
              f"preset): {first:.1f}s (in-process prune {run['seconds']:.1f}s)")
        cases = {
            "prune --sparsity 0.3": ["prune", "--sparsity", "0.3"],
            "prune --sparsity 0.5": ["prune", "--sparsity", "0.5"],
            "prune --sparsity 0.7": ["prune", "--sparsity", "0.7"],
            "prune --idf-exp 2": ["prune", "--idf-exp", "2"],
            "prune --pattern 2:4": ["prune", "--pattern", "2:4"],
            "prune --preset fast": ["prune", "--preset", "fast"],
            "prune --refine 0 (default masks unrefined)": ["prune", "--refine", "0"],
            "score": ["score"],
        }
        cases.update({f"prune --preset quality --sparsity {s}": ["prune", "--preset", "quality", "--sparsity", s] for s in ("0.3", "0.5", "0.7")})
        worst = 0.0
        for label, command in cases.items():
            seconds, document, _ = run_cli([*command, *calibration], cache)
            reused = document["runs"][0]["statistics_reused"] if "runs" in document else True
            reused = reused and document.get("runs", [{}])[0].get("second_order_statistics", {}).get("reused", True)
            prune_seconds = document["runs"][0]["seconds"] if "runs" in document else float("nan")
            worst = max(worst, seconds / first)
            print(f"{label:40s} {seconds:6.1f}s  ratio {seconds / first:.3f}  reused={reused}  "
                  f"in-process load+masks+summary {prune_seconds:.1f}s")
        print(f"worst ratio {worst:.3f} (target <= 0.15)")


if __name__ == "__main__":
    main()
