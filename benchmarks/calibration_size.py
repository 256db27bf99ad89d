# ruff: noqa: E402  (a research script: validate.py's harness with another calibration size)
"""Does the best shrinkage of the Gram depend on how many calibration tokens there are per input channel?

Qwen's validation protocol calibrates on 16 x 256 = 4096 tokens, fewer than its down_proj's 8960 inputs (a
rank-deficient Gram; the product's default, 32 x 512, has 16384); SmolLM2's on 32 x 512 = 16384 tokens for 1536.
This runs validate.py's harness on SmolLM2 (validation halves, 8 windows, calibration wiki-vital+code, seed 0)
with NSAMPLES windows of 512 tokens: 2 (1024 tokens, 0.67 per down_proj input, Qwen's protocol is 0.46), 8 (4096,
2.7), 32 (16384, 10.7: the protocol's own rows). Rows go to calibration_size-N.jsonl; `table` prints each
configuration's loss ratio against Wanda at the same calibration size (mean / worst over the five domains).

    PYTHONPATH=. python benchmarks/calibration_size.py run NSAMPLES [CONFIGS]
    PYTHONPATH=. python benchmarks/calibration_size.py table
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import validate

CONFIGS = ["dense", "wanda", "balanced:refine0", "balanced:off0.1", "balanced:off0.25", "balanced:off0.5",
           "balanced:off1.0", "quality:off0.1", "quality:off0.25", "quality:off0.5", "quality:off1.0"]
SIZES = (2, 8, 32)


def results(nsamples: int) -> Path:
    return HERE / f"calibration_size-{nsamples}.jsonl"


def run(nsamples: int, names: list[str]) -> None:
    protocol = validate.MODELS["smollm2"]
    if nsamples == protocol["nsamples"] and not results(nsamples).exists():  # the protocol's rows, measured already
        rows = [line for line in validate.RESULTS.read_text().splitlines()
                if (row := json.loads(line))["model"] == "smollm2" and row["half"] == "validation" and row["seed"] == 0
                and row["windows"] == protocol["windows"] and validate.calibration_of(row) == validate.CALIBRATION]
        results(nsamples).write_text("".join(line + "\n" for line in rows))
    protocol["nsamples"] = nsamples
    validate.RESULTS = results(nsamples)
    validate.run("smollm2", names, "validation", list(validate.DOMAINS), [0], 1)


def cell(ppl: dict[tuple[str, str], float], names: dict, name: str) -> str:
    """Mean / worst loss ratio against Wanda over the domains, '-' if a row is missing."""
    def of(config: str, domain: str) -> float | None:
        return ppl.get((validate.digest(None if config == "dense" else names[config]), domain))

    ratios = []
    for domain in validate.DOMAINS:
        dense, wanda, value = (of(c, domain) for c in ("dense", "wanda", name))
        if dense is None or wanda is None or value is None:
            return "-"
        ratios.append((value - dense) / (wanda - dense))
    return f"{sum(ratios) / len(ratios):.3f} / {max(ratios):.3f}"


def table() -> None:
    names = validate.configs()
    print("| configuration | " + " | ".join(f"{n} x 512 ({n * 512} tokens)" for n in SIZES) + " |")
    print("|---|" + "---|" * len(SIZES))
    cells: dict[str, list[str]] = {name: [] for name in CONFIGS[2:]}
    for n in SIZES:
        ppl: dict[tuple[str, str], float] = {}  # (digest, domain): rows count for every name with their digest
        if results(n).exists():
            for line in results(n).read_text().splitlines():
                row = json.loads(line)
                ppl[(row["digest"], row["domain"])] = row["ppl"]
        for name in cells:
            cells[name].append(cell(ppl, names, name))
    for name, row in cells.items():
        print(f"| {name} | " + " | ".join(row) + " |")


if __name__ == "__main__":
    if sys.argv[1] == "run":
        run(int(sys.argv[2]), sys.argv[3].split(",") if len(sys.argv) > 3 else CONFIGS)
    else:
        table()
