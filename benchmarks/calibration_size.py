# ruff: noqa: E402  (a research script: validate.py's harness with another calibration size)
"""Does the best shrinkage of the Gram depend on how many calibration tokens there are per input channel?

Qwen's validation protocol calibrates on 16 x 256 = 4096 tokens, fewer than its down_proj's 8960 inputs (a
rank-deficient Gram; the product's default, 32 x 512, has 16384); SmolLM2's on 32 x 512 = 16384 tokens for 1536.
This runs validate.py's harness on SmolLM2 (validation halves, 8 windows, calibration wiki-vital+code, seed 0)
with NSAMPLES windows of 512 tokens: 2 (1024 tokens, 0.67 per down_proj input, Qwen's protocol is 0.46), 8 (4096,
2.7), 32 (16384, 10.7: the protocol's own rows). Rows go to calibration_size-N.jsonl; `table` prints each
configuration's loss ratio against Wanda at the same calibration size (mean / worst over the five domains).

`--model qwen` runs Qwen2.5-Coder-1.5B with more calibration tokens than its protocol's 16 x 256 (4096 tokens, 0.46
per down_proj input), evaluated as its protocol does (16 x 256-token windows per half): NxL windows of L tokens, 32x512
(the product's own default: 16384 tokens, 1.8 per down_proj input), 64x256 (as many tokens in the evaluation's
window length) and 176x512 (90112 tokens, 10.06 per down_proj input: where the Gram's default weight becomes 0.5,
config.RICH_GRAM_OFFDIAG; its dense rows are the 32x512 file's, which the calibration does not change). Each configuration is pruned once and evaluated on the halves `--half` names (default test, for
reporting; "validation,test" for choosing too: an evaluation of Qwen's five domains takes about 3 min on 2 cores).
Rows go to calibration_size-qwen-NxL.jsonl; its table sets them beside the protocol's own 16 x 256 rows.

    PYTHONPATH=. python benchmarks/calibration_size.py run NSAMPLES [CONFIGS]
    PYTHONPATH=. python benchmarks/calibration_size.py run --model qwen 32x512 [CONFIGS] [--half validation,test]
    PYTHONPATH=. python benchmarks/calibration_size.py run --model qwen 32x512 \
        balanced@2:4:refine0,quality@2:4:refine0,balanced@2:4:off0.25,quality@2:4:lsq-off0.25   # the 2:4 diagnoses
    PYTHONPATH=. python benchmarks/calibration_size.py table [--model qwen]
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import validate

# what moves the refined 2:4 masks at 32 x 512 (test halves: a diagnosis, not a choice)
# (balanced@2:4:off0.5 and quality@2:4:refine-off0.5: the N:M presets before 2026-12-07 refined under 0.5, the rows
# that are `balanced@2:4` / `quality@2:4` of 4361132; validation_choices.md, 21)
QWEN_DIAGNOSTICS = ["balanced@2:4:refine0", "quality@2:4:refine0", "balanced@2:4:off0.25", "quality@2:4:lsq-off0.25",
                    "balanced@2:4:off0.5", "quality@2:4:refine-off0.5"]
QWEN_CONFIGS = ["dense", "wanda", "wanda+update", "balanced", "quality", "wanda@2:4",
                "wanda+update@2:4", "balanced@2:4", "quality@2:4"]
CONFIGS = ["dense", "wanda", "balanced:refine0", "balanced:off0.1", "balanced:off0.25", "balanced:off0.5",
           "balanced:off1.0", "quality:off0.1", "quality:off0.25", "quality:off0.5", "quality:off1.0"]
# the presets as defined now (layer spread, least-squares update) with the weight varied, at 32 and 128 x 512
# (2026-12-08): does the best weight keep rising with the tokens per input?
NOW = ["balanced:off0.25:now", "balanced:off0.5:now", "balanced:off1.0:now", "quality:off0.25:now", "quality:off0.5:now",
       "quality:off0.75:now", "quality:off1.0:now"]
SIZES = (2, 8, 32, 128)


def results(nsamples: int | str, model: str = "smollm2") -> Path:
    return HERE / (f"calibration_size-{nsamples}.jsonl" if model == "smollm2" else f"calibration_size-{model}-{nsamples}.jsonl")


QWEN_SHAPES = ("64x256", "32x512", "176x512")


def run_qwen(shape: str, names: list[str], halves: str = "test") -> None:
    """Qwen calibrated on N windows of L tokens (shape "NxL"), evaluated on its protocol's windows."""
    nsamples, seqlen = (int(v) for v in shape.split("x"))
    validate.MODELS["qwen"].update(nsamples=nsamples, calibration_seqlen=seqlen)
    validate.RESULTS = results(shape, "qwen")
    validate.run("qwen", names, halves, list(validate.DOMAINS), [0], 2)


def table_qwen() -> None:
    """Each configuration's loss ratio against Wanda at the same calibration and pattern (validate.py's own table and
    ratios), per half: the protocol's 16 x 256 rows (validate.py's file) beside each larger calibration measured."""
    shapes = [shape for shape in QWEN_SHAPES if results(shape, "qwen").exists()]  # the sizes measured
    paths = [validate.RESULTS, *(results(shape, "qwen") for shape in shapes)]
    files = [[json.loads(line) for line in path.read_text().splitlines() if line.strip()] for path in paths]
    print("| configuration | half | 16 x 256 (protocol, 4096 tokens) | "
          + " | ".join(f"{s.replace('x', ' x ')} ({int(s.split('x')[0]) * int(s.split('x')[1])} tokens)" for s in shapes) + " |")
    print("|---|---|" + "---|" * len(paths))
    for half in ("validation", "test"):
        tables = [validate.table(rows, "qwen", half) for rows in files]
        for name in QWEN_CONFIGS[1:] + QWEN_DIAGNOSTICS:
            measured = [validate.ratios(t, name, list(validate.DOMAINS)) for t in tables]
            if any(measured[1:]):
                print(f"| {name} | {half} | " + " | ".join(
                    "-" if r is None else f"{sum(r.values()) / len(r):.3f} / {max(r.values()):.3f}" for r in measured) + " |")


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
    sizes = [n for n in SIZES if results(n).exists()]
    print("| configuration | " + " | ".join(f"{n} x 512 ({n * 512} tokens, {n * 512 / 1536:.1f} per down_proj input)"
                                          for n in sizes) + " |")
    print("|---|" + "---|" * len(sizes))
    cells: dict[str, list[str]] = {name: [] for name in CONFIGS[2:] + NOW}
    for n in sizes:
        ppl: dict[tuple[str, str], float] = {}  # (digest, domain): rows count for every name with their digest
        if results(n).exists():
            for line in results(n).read_text().splitlines():
                row = json.loads(line)
                ppl[(row["digest"], row["domain"])] = row["ppl"]
        for name in cells:
            cells[name].append(cell(ppl, names, name))
    for name, row in cells.items():
        if any(cell != "-" for cell in row):
            print(f"| {name} | " + " | ".join(row) + " |")


if __name__ == "__main__":
    args = sys.argv[1:]
    halves = "test"
    if "--half" in args:
        at = args.index("--half")
        halves = args[at + 1]
        del args[at : at + 2]
    qwen = args[1:3] == ["--model", "qwen"]
    if qwen:
        del args[1:3]
    if args[0] == "run" and qwen:
        run_qwen(args[1], args[2].split(",") if len(args) > 2 else QWEN_CONFIGS, halves)
    elif args[0] == "run":
        run(int(args[1]), args[2].split(",") if len(args) > 2 else CONFIGS)
    elif qwen:
        table_qwen()
    else:
        table()
