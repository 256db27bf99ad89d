"""The README's results table and plots, regenerated with `hybridprune prune` + `hybridprune eval`.

Each configuration is pruned from one cached calibration (32 x 512 windows of the calibration
split) into runs/bench/<name>, then `hybridprune eval --compare` measures every folder (and the
dense model) on the test split (64 x 512 windows) and writes the plot. A second part sweeps
sparsity for magnitude, Wanda and the hybrid and plots perplexity against sparsity.

    .venv/bin/python benchmarks/quality.py                 # table: docs/research/2026-11-28-results.md, .json
    .venv/bin/python benchmarks/quality.py --sweep-only    # plot: docs/research/2026-11-28-sweep.png
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-m", "hybridprune"]
CONFIGS: dict[str, list[str]] = {
    "magnitude": ["--prune-method", "magnitude"],
    "wanda": ["--prune-method", "wanda"],
    "wanda-sequential": ["--prune-method", "wanda", "--sequential"],
    "hybrid-doc (balanced)": ["--preset", "balanced"],
    "hybrid-topic": ["--preset", "balanced", "--nr-tfidf-mode", "topic"],
    "hybrid-old (fast)": ["--preset", "fast"],
    "hybrid-topic, idf-exp 1 (seed exponents)": ["--preset", "balanced", "--nr-tfidf-mode", "topic", "--idf-exp", "1"],
    "hybrid + qk-shift 0.1": ["--preset", "balanced", "--qk-shift", "0.1"],
    "wanda + update": ["--prune-method", "wanda", "--update"],
    "hybrid quality (topic, qk-shift, update)": ["--preset", "quality"],
    "wanda 2:4": ["--prune-method", "wanda", "--pattern", "2:4"],
    "hybrid 2:4": ["--preset", "balanced", "--pattern", "2:4"],
    "hybrid 2:4 + update": ["--preset", "balanced", "--pattern", "2:4", "--update"],
    "hybrid 4:8 + update": ["--preset", "balanced", "--pattern", "4:8", "--update"],
    "structured MLP 25%": ["--pattern", "structured", "--sparsity", "0.25", "--attention-method", "none"],
    "structured MLP 50%": ["--pattern", "structured", "--sparsity", "0.5", "--attention-method", "none"],
    "structured MLP 25% + update": ["--pattern", "structured", "--sparsity", "0.25", "--attention-method", "none", "--update"],
    "structured MLP 50% + update": ["--pattern", "structured", "--sparsity", "0.5", "--attention-method", "none", "--update"],
}


def folder_name(name: str) -> str:
    return "".join(ch if ch.isalnum() else "-" for ch in name).strip("-")


def run(args: list[str]) -> dict:
    done = subprocess.run([*CLI, *args, "--json", "--quiet"], capture_output=True, text=True, cwd=REPO)
    if done.returncode:
        raise SystemExit(f"failed: hybridprune {' '.join(args)}\n{done.stderr[-2000:]}")
    return json.loads(done.stdout)


def table(args: argparse.Namespace) -> None:
    runs = REPO / args.runs
    folders = []
    for name, flags in CONFIGS.items():
        out = runs / folder_name(name)
        sparsity = [] if "--sparsity" in flags else ["--sparsity", "0.5"]
        document = run(["prune", *flags, *sparsity, "--out", str(out), "--overwrite"])
        print(f"pruned {name}: {document['runs'][0]['seconds']}s", flush=True)
        folders.append((name, out, document["runs"][0]["seconds"]))
    compare = run(["eval", "--windows", str(args.windows), "--baseline", "embedded", "--compare", *[str(f) for _, f, _ in folders],
                   "--plot", str(runs / "compare.png")])
    dense = compare["dense_ppl"]
    by_folder = {entry["folder"]: entry for entry in compare["entries"]}
    wanda_loss = by_folder[str(runs / "wanda")]["perplexity"]["ppl"] - dense
    lines = [
        f"Test split, {args.windows} x 512 windows; calibration 32 x 512 (seed 0). Dense: {dense:.2f}.",
        "",
        "| configuration | total sparsity | attention | MLP | test ppl | loss / Wanda's loss | prune time (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, folder, seconds in folders:
        entry = by_folder[str(folder)]
        ppl, sparsity = entry["perplexity"]["ppl"], entry["sparsity"]
        lines.append(
            f"| {name} | {sparsity['total']['sparsity']:.1%} | {sparsity['attention']['sparsity']:.1%} | "
            f"{sparsity['mlp']['sparsity']:.1%} | {ppl:.2f} | {(ppl - dense) / wanda_loss:.2f} | {seconds:.0f} |"
        )
    (REPO / "docs" / "research" / "2026-11-28-results.md").write_text("\n".join(lines) + "\n")
    (REPO / "docs" / "research" / "2026-11-28-results.json").write_text(json.dumps(compare, indent=1))
    print("\n".join(lines))


def sweep(args: argparse.Namespace) -> None:
    runs = REPO / args.runs / "sweep"
    folders = []
    for method, flags in {"magnitude": ["--prune-method", "magnitude"], "wanda": ["--prune-method", "wanda"],
                          "hybrid": ["--preset", "balanced"]}.items():
        run(["prune", *flags, "--sparsity", "0.3,0.4,0.5,0.6,0.7", "--out", str(runs / method), "--overwrite"])
        folders += sorted((runs / method).iterdir())
    compare = run(["eval", "--windows", str(args.sweep_windows), "--baseline", "embedded", "--compare", *map(str, folders),
                   "--plot", str(REPO / "docs" / "research" / "2026-11-28-sweep.png")])
    rows = [f"| {e['method']} | {e['sparsity']['total']['sparsity']:.0%} | {e['perplexity']['ppl']:.2f} |" for e in compare["entries"]]
    text = (f"Test split, {args.sweep_windows} x 512 windows. Dense: {compare['dense_ppl']:.2f}.\n\n"
            "| method | sparsity | test ppl |\n|---|---|---|\n" + "\n".join(rows) + "\n")
    (REPO / "docs" / "research" / "2026-11-28-sweep.md").write_text(text)
    print(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", default="runs/bench")
    parser.add_argument("--windows", type=int, default=64)
    parser.add_argument("--sweep-windows", type=int, default=16)
    parser.add_argument("--sweep-only", action="store_true")
    parser.add_argument("--table-only", action="store_true")
    args = parser.parse_args()
    (REPO / "docs" / "research").mkdir(parents=True, exist_ok=True)
    if not args.sweep_only:
        table(args)
    if not args.table_only:
        sweep(args)


if __name__ == "__main__":
    main()
