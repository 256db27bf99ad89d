"""Qwen2.5-Coder-1.5B end to end at the product's own defaults (issue 21, item 5).

    PYTHONPATH=. python benchmarks/qwen_e2e.py run --windows 4           # every step, then the evaluations
    PYTHONPATH=. python benchmarks/qwen_e2e.py run --no-eval --steps wanda --deadline UNIX_TIME   # one step, time-boxed
    PYTHONPATH=. python benchmarks/qwen_e2e.py run --no-steps --windows 4                          # evaluate what is pruned
    PYTHONPATH=. python benchmarks/qwen_e2e.py report [--note TEXT]      # docs/qwen_e2e.json + docs/qwen_e2e.md

Each step is one `hybridprune` command in its own process under `/usr/bin/time -v` (wall time, user + sys
CPU time, "Maximum resident set size"): `calibrate` (first order, the default 32 x 512 windows of the default
calibration text), `calibrate --hessians` (the second-order entry), `prune --preset wanda | balanced |
quality` at 50%, `prune --preset quality | balanced --pattern 2:4` and `prune --preset wanda --pattern 2:4`
(their reference), and two fallbacks that need no second-order entry (`balanced --refine 0`, at 50% and 2:4), all
with `--dtype bfloat16 --offload`, each into its own folder. Then the perplexity of the dense model and of
each folder on the test half of each of the five domains of benchmarks/domains.py (each half's first
200,000 characters written to a .txt), `--windows W` windows of 512 tokens, with `hybridprune eval`'s own
code path in one process per model (`ppl`, so that a model is loaded once for its five domains). Loss
ratio = (ppl - dense) / (Wanda's ppl - dense) per domain, against Wanda at the same pattern (as
benchmarks/validate.py's `ratios`, docs/validation.md).

Every step and every (model, domain) perplexity is kept as its own record under $QWEN_E2E_RUNS/records as
soon as it is measured (several of these processes may run at once) and merged into docs/qwen_e2e.json and
docs/qwen_e2e.md; a step or evaluation already recorded as done is not run again, so a run cut short
resumes where it stopped. `--deadline` stops a run still going at that time and records it as stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from domains import DOMAINS, domain_texts, fingerprint  # noqa: E402

MODEL = os.environ.get("QWEN_E2E_MODEL", "/work/models/qwen-coder-1.5b")
CACHE = Path(os.environ.get("HYBRIDPRUNE_CACHE", "/tmp/hpcache/qwen-e2e"))
RUNS = Path(os.environ.get("QWEN_E2E_RUNS", "/tmp/qwen-e2e"))
JSON_OUT = ROOT / "docs" / "qwen_e2e.json"
MD_OUT = ROOT / "docs" / "qwen_e2e.md"
COMMON = ["--model", MODEL, "--dtype", "bfloat16", "--cache-dir", str(CACHE)]
SEQLEN = 512

# (name, hybridprune arguments); the pruned ones write RUNS/<name>
STEPS: list[tuple[str, list[str]]] = [
    ("calibrate", ["calibrate", *COMMON, "--offload"]),
    ("calibrate --hessians", ["calibrate", *COMMON, "--offload", "--hessians"]),
    ("wanda", ["prune", *COMMON, "--offload", "--preset", "wanda", "--sparsity", "0.5"]),
    ("balanced", ["prune", *COMMON, "--offload", "--preset", "balanced", "--sparsity", "0.5"]),
    ("quality", ["prune", *COMMON, "--offload", "--preset", "quality", "--sparsity", "0.5"]),
    ("quality@2:4", ["prune", *COMMON, "--offload", "--preset", "quality", "--pattern", "2:4"]),
    ("balanced@2:4", ["prune", *COMMON, "--offload", "--preset", "balanced", "--pattern", "2:4"]),
    ("wanda@2:4", ["prune", *COMMON, "--offload", "--preset", "wanda", "--pattern", "2:4"]),
    # fallbacks that need no second-order entry (when it does not fit the time box): the hybrid masks unrefined
    ("balanced-refine0", ["prune", *COMMON, "--offload", "--preset", "balanced", "--refine", "0", "--sparsity", "0.5"]),
    ("balanced@2:4-refine0", ["prune", *COMMON, "--offload", "--preset", "balanced", "--refine", "0", "--pattern", "2:4"]),
]
PRUNED = [name for name, argv in STEPS if argv[0] == "prune"]
# the configuration each one is compared with (Wanda at the same pattern)
REFERENCE = {"balanced": "wanda", "quality": "wanda", "quality@2:4": "wanda@2:4", "balanced@2:4": "wanda@2:4",
             "balanced-refine0": "wanda",
             "balanced@2:4-refine0": "wanda@2:4"}
GOALS = {"balanced": 0.85, "quality": 0.7}


def folder(name: str) -> Path:
    return RUNS / name.replace("@", "-").replace(":", "")


def argv_of(name: str, argv: list[str]) -> list[str]:
    if argv[0] == "prune":
        return [*argv, "--out", str(folder(name)), "--overwrite"]
    return argv


def shown(argv: list[str]) -> str:
    return "hybridprune " + " ".join(argv)


def load() -> dict:
    """docs/qwen_e2e.json merged with the per-entry records under RUNS/records (several processes may run)."""
    doc = json.loads(JSON_OUT.read_text()) if JSON_OUT.exists() else {}
    doc.setdefault("steps", {})
    for kind in ("steps", "eval", "eval_process", "cli_check"):
        doc.setdefault(kind, {})
        for path in sorted((RUNS / "records" / kind).glob("*.json")):
            record = json.loads(path.read_text())
            # a record wins, but what the json holds beyond it (a field added later, such as cpu_s) is kept
            doc[kind][record["key"]] = {**doc[kind].get(record["key"], {}), **record["entry"]}
    return doc


def record(doc: dict, kind: str, key: str, entry: dict) -> None:
    """Keep one step's or one evaluation's entry (its own file, then the merged json and markdown)."""
    doc[kind][key] = entry
    path = RUNS / "records" / kind / (re.sub(r"[^A-Za-z0-9_.-]+", "_", key) + ".json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"key": key, "entry": entry}, indent=1) + "\n")
    merged = load()
    merged.update({k: v for k, v in doc.items() if k not in ("steps", "eval", "eval_process", "cli_check", "notes")})
    JSON_OUT.write_text(json.dumps(merged, indent=1) + "\n")
    MD_OUT.write_text(markdown(merged))


def log(message: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {message}", flush=True)


def timed(argv: list[str], logfile: Path, module: bool = True, deadline: float | None = None) -> dict:
    """Run `python -m hybridprune ARGV` (or `python ARGV`) under /usr/bin/time -v, its stderr live in LOGFILE.err;
    wall seconds, peak RSS, exit code, stdout. Past `deadline` (a time.time()) the run is stopped and says so."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    err_path = logfile.with_suffix(".err")
    start = time.monotonic()
    with open(err_path, "w") as err:
        proc = subprocess.Popen(["/usr/bin/time", "-v", sys.executable, *(["-m", "hybridprune"] if module else []), *argv],
                                stdout=subprocess.PIPE, stderr=err, text=True, env=env, cwd=str(RUNS))
        try:
            stdout, _ = proc.communicate(timeout=None if deadline is None else max(deadline - time.time(), 1))
            timed_out = False
        except subprocess.TimeoutExpired:
            for child in subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split():
                os.kill(int(child), 15)  # the measured process (time -v's child), then time -v reports and exits
            stdout, _ = proc.communicate()
            timed_out = True
    wall = time.monotonic() - start
    stderr = err_path.read_text(errors="replace")
    logfile.write_text(f"$ {shown(argv)}\n--- stdout\n{stdout}\n--- stderr\n{stderr}")
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", stderr)
    cpu = cpu_seconds(stderr)
    error = None
    if timed_out:
        error = [f"stopped after {wall:.0f} s: past the time box of this run (not finished)"]
    elif proc.returncode != 0:
        error = stderr.split("\tCommand being timed")[0].strip().splitlines()[-3:]
    return {"wall_s": round(wall, 1), "cpu_s": cpu, "peak_rss_gb": round(int(rss.group(1)) / 1024**2, 2) if rss else None,
            "rc": "timeout" if timed_out else proc.returncode, "stdout": stdout, "error": error}


def cpu_seconds(stderr: str) -> float | None:
    """User + system CPU seconds from /usr/bin/time -v's report (less sensitive than wall time to a busy machine)."""
    user = re.search(r"User time \(seconds\): ([\d.]+)", stderr)
    system = re.search(r"System time \(seconds\): ([\d.]+)", stderr)
    return round(float(user.group(1)) + float(system.group(1)), 1) if user and system else None


def backfill_cpu(doc: dict) -> None:
    """CPU seconds of the entries recorded before they were parsed, from the runs' logs."""
    for name, entry in doc["steps"].items():
        if entry.get("cpu_s") is None:
            for log_path in (RUNS / "logs").glob(f"{folder(name).name}-*.log"):
                entry["cpu_s"] = cpu_seconds(log_path.read_text(errors="replace"))
    for name, entry in doc["eval_process"].items():
        path = RUNS / "logs" / f"eval-{folder(name).name}.log"
        if entry.get("cpu_s") is None and path.exists():
            entry["cpu_s"] = cpu_seconds(path.read_text(errors="replace"))
    for entry in doc["cli_check"].values():
        path = RUNS / "logs" / "eval-dense-wiki.log"
        if entry.get("cpu_s") is None and path.exists():
            entry["cpu_s"] = cpu_seconds(path.read_text(errors="replace"))


def text_file(domain: str, windows: int) -> Path:
    """The start of the domain's test half as a .txt (as benchmarks/validate.py tokenizes a generous prefix)."""
    test = domain_texts(domain)[1]
    chars = max(windows * SEQLEN * 12, 200_000)
    path = RUNS / "texts" / f"{domain}-test-{fingerprint(domain)}-{chars}.txt"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(test[:chars], encoding="utf-8")
    return path


def run(args: argparse.Namespace) -> None:
    RUNS.mkdir(parents=True, exist_ok=True)
    (RUNS / "logs").mkdir(exist_ok=True)
    doc = load()
    doc.update({
        "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip(),
        "model": MODEL, "windows": args.windows, "seqlen": SEQLEN,
        "machine": f"{os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), shared with other jobs",
        "domains": {d: fingerprint(d) for d in DOMAINS},
    })
    wanted = set(args.steps.split(",")) if args.steps else None
    for name, argv in STEPS:
        if args.no_steps or (wanted and name not in wanted) or doc["steps"].get(name, {}).get("rc") == 0:
            continue
        full = argv_of(name, argv)
        log(f"step {name}: {shown(full)}")
        r = timed(full, RUNS / "logs" / f"{folder(name).name}-{name.split()[-1].strip('-')}.log", deadline=args.deadline)
        record(doc, "steps", name, {"command": shown(full), **{k: v for k, v in r.items() if k != "stdout"}})
        log(f"  {r['wall_s']} s, peak RSS {r['peak_rss_gb']} GB, rc {r['rc']}")
    if args.no_eval:
        return
    # the 50% goals first (dense, Wanda, balanced, quality), then the 2:4 pair; one process per model
    order = ["dense", "wanda", "balanced", "quality", *[n for n in PRUNED if n not in ("wanda", "balanced", "quality")]]
    for name in order:
        if (wanted and name not in wanted) or (name != "dense" and doc["steps"].get(name, {}).get("rc") != 0):
            continue
        todo = [d for d in DOMAINS if doc["eval"].get(f"{name}|{d}", {}).get("windows") != args.windows]
        if not todo:
            continue
        path = MODEL if name == "dense" else str(folder(name))
        argv = [str(Path(__file__).resolve()), "ppl", "--name", name, "--model", path, "--windows", str(args.windows),
                "--domains", ",".join(todo)]
        log(f"eval {name} on {', '.join(todo)}")
        r = timed(argv, RUNS / "logs" / f"eval-{folder(name).name}.log", module=False, deadline=args.deadline)
        record(doc, "eval_process", name, {"command": "python benchmarks/qwen_e2e.py " + " ".join(argv[1:]),
                                          **{k: v for k, v in r.items() if k != "stdout"}})
        doc = load()
        log(f"  {r['wall_s']} s, peak RSS {r['peak_rss_gb']} GB, rc {r['rc']}: "
            + ", ".join(f"{d} {doc['eval'].get(f'{name}|{d}', {}).get('ppl', float('nan')):.3f}" for d in todo))


def ppl(args: argparse.Namespace) -> None:
    """Perplexity of one model on several domains' test halves, loaded once: the code path of `hybridprune eval`
    (load_model, load_text of the .txt with split "all", tokenize, eval_windows, perplexity with batch 4)."""
    import torch

    from hybridprune.api import configure_torch
    from hybridprune.data import eval_windows, load_text, tokenize
    from hybridprune.evaluation import perplexity
    from hybridprune.models import load_model

    configure_torch()
    doc = load()
    loaded = load_model(args.model, dtype="bfloat16", device="cpu", cache_dir=CACHE)
    for domain in args.domains.split(","):
        source = load_text(str(text_file(domain, args.windows)), "all")
        ids = tokenize(source, loaded.tokenizer, cache_dir=CACHE / "tokens")
        windows = eval_windows(ids, SEQLEN, args.windows)
        with torch.no_grad():
            result = perplexity(loaded.model, windows, batch_size=4)
        record(doc, "eval", f"{args.name}|{domain}", {"ppl": result.ppl, "nll": result.nll, "tokens": result.tokens,
                                                     "seconds": round(result.seconds, 1), "windows": len(windows), "rc": 0})
        log(f"{args.name} {domain}: ppl {result.ppl:.3f} ({result.seconds:.0f} s)")


def ppl_table(doc: dict) -> dict[str, dict[str, float]]:
    t: dict[str, dict[str, float]] = {}
    for key, e in doc.get("eval", {}).items():
        if "ppl" in e:
            name, domain = key.split("|")
            t.setdefault(name, {})[domain] = e["ppl"]
    return t


def ratios(doc: dict) -> dict[str, dict[str, float]]:
    """Loss ratio vs Wanda at the same pattern, per domain: (ppl - dense) / (ppl_wanda - dense)."""
    t = ppl_table(doc)
    out: dict[str, dict[str, float]] = {}
    for name, ref in REFERENCE.items():
        for d in DOMAINS:
            if all(d in t.get(n, {}) for n in (name, ref, "dense")):
                out.setdefault(name, {})[d] = (t[name][d] - t["dense"][d]) / (t[ref][d] - t["dense"][d])
    return out


def cpu(entry: dict) -> str:
    return "-" if entry.get("cpu_s") is None else f"{entry['cpu_s']:.0f} s"


def markdown(doc: dict) -> str:
    t, r = ppl_table(doc), ratios(doc)
    lines = [
        "# Qwen2.5-Coder-1.5B end to end at the product's defaults",
        "",
        f"Measured by `benchmarks/qwen_e2e.py` (the latest run at commit {doc.get('commit', '?')}; the runs before it at the",
        f"commits the notes below name), on {doc.get('machine', '?')}: the wall times of a shared machine are",
        "noisy (CPU time is given where it was recorded). Model: Qwen2.5-Coder-1.5B-Instruct built by",
        "`../shared/models/qwen_coder_1p5b.py` (a dequantized Q4_K_M GGUF, bf16). Every step runs with `--dtype bfloat16`",
        "and, for `calibrate` / `prune`, `--offload`; calibration is the product default (32 x 512 windows of",
        "`wiki-vital+code`, seed 0). Perplexity: the test half of each domain of `benchmarks/domains.py` (its first",
        "200,000 characters written to a .txt), the first " + f"{doc.get('windows', '?')} non-overlapping windows of "
        + f"{doc.get('seqlen', SEQLEN)} tokens, computed by `hybridprune eval`'s own code path (`load_model`, `load_text(FILE,",
        "\"all\")`, `tokenize`, `eval_windows`, `perplexity`, batch 4) in one process per model so that each model is loaded",
        "once for its five domains (`python benchmarks/qwen_e2e.py ppl ...`).",
        "",
        "## Steps: wall time and peak RSS (`/usr/bin/time -v`)",
        "",
        "| step | command | wall time | CPU time (user + sys) | peak RSS | exit |",
        "|---|---|---|---|---|---|",
    ]
    for name, _ in STEPS:
        s = doc.get("steps", {}).get(name)
        if s is None:
            lines.append(f"| {name} | not run | - | - | - | - |")
            continue
        lines.append(f"| {name} | `{s['command']}` | {s['wall_s']:.0f} s | {cpu(s)} | {s['peak_rss_gb']} GB | {s['rc']} |")
    for name, p in doc.get("eval_process", {}).items():
        lines.append(f"| eval {name} | `{p['command']}` (one process, model loaded once) | {p['wall_s']:.0f} s | {cpu(p)} | "
                     f"{p['peak_rss_gb']} GB | {p['rc']} |")
    for key, c in doc.get("cli_check", {}).items():
        lines.append(f"| eval {key.replace('|', ' on ')} | `{c['command']}` | {c['wall_s']:.0f} s | {cpu(c)} | {c['peak_rss_gb']} GB | "
                     f"{c['rc']} |")
    for key, c in doc.get("cli_check", {}).items():
        mine = doc.get("eval", {}).get(key, {})
        if "ppl" in c and "ppl" in mine and "via" not in mine:
            lines += ["", f"Cross-check of the evaluation path ({key.replace('|', ' on ')}, the same {c['windows']} windows): "
                      f"`hybridprune eval` {c['ppl']:.4f}, this script's `ppl` {mine['ppl']:.4f}."]
    failed = {k: v for k, v in {**doc.get("steps", {}), **doc.get("eval_process", {})}.items() if v.get("rc") not in (0, None)}
    if failed:
        lines += ["", "Failed: " + "; ".join(f"{k}: {' / '.join(v.get('error') or [])}" for k, v in failed.items())]
    lines += ["", "## Perplexity per domain (test halves) and loss ratio vs Wanda", "",
              "Ratio = (ppl - dense) / (Wanda's ppl - dense) at the same pattern (below 1 loses less than Wanda).", "",
              "| model | " + " | ".join(DOMAINS) + " | mean ratio | worst ratio |",
              "|---|" + "---|" * (len(DOMAINS) + 2)]
    for name in ["dense", *PRUNED]:
        if name not in t:
            continue
        cells = []
        for d in DOMAINS:
            p = t[name].get(d)
            cell = "-" if p is None else f"{p:.2f}"
            if name in r and d in r[name]:
                cell += f" ({r[name][d]:.2f})"
            cells.append(cell)
        rr = r.get(name, {})
        if rr:
            worst = max(rr, key=rr.get)
            tail = f"{sum(rr.values()) / len(rr):.3f} | {rr[worst]:.3f} ({worst})"
        else:
            tail = "reference" if name in REFERENCE.values() else "-"
            tail += " | -"
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {tail} |")
    if doc.get("notes"):
        lines += ["", "## How this run went", "", *[f"- {n}" for n in doc["notes"]]]
    lines += ["", "## Goals (every domain's test half)", ""]
    for name, limit in GOALS.items():
        rr = r.get(name, {})
        if not rr:
            lines.append(f"- `{name}` <= {limit}x Wanda's loss on every domain: **not measured** (no `{name}` run recorded)")
            continue
        if len(rr) < len(DOMAINS):
            lines.append(f"- `{name}` <= {limit}x Wanda's loss on every domain: not measured on all five domains")
            continue
        worst = max(rr, key=rr.get)
        met = all(v <= limit for v in rr.values())
        over = [d for d, v in rr.items() if v > limit]
        lines.append(f"- `{name}` <= {limit}x Wanda's loss on every domain: **{'met' if met else 'missed'}** "
                     f"(worst {rr[worst]:.3f} on {worst}, mean {sum(rr.values()) / len(rr):.3f}"
                     + (f"; above the goal on {', '.join(over)}" if over else "") + ")")
    lines += ["", "Reproduce: `PYTHONPATH=. python benchmarks/qwen_e2e.py run --windows "
              f"{doc.get('windows', 4)}` (cache `$HYBRIDPRUNE_CACHE`, default /tmp/hpcache/qwen-e2e; pruned folders in "
              "`$QWEN_E2E_RUNS`, default /tmp/qwen-e2e), then `... report`.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="run every step not yet recorded, then the evaluations")
    p.add_argument("--windows", type=int, default=4, help="eval windows per domain (default %(default)s)")
    p.add_argument("--steps", default="", help="only these steps / models, comma-separated")
    p.add_argument("--no-eval", action="store_true", help="run the calibrate / prune steps only")
    p.add_argument("--deadline", type=float, default=None, help="stop any run still going at this Unix time (recorded as such)")
    p.add_argument("--no-steps", action="store_true", help="run the evaluations of the models already pruned only")
    q = sub.add_parser("ppl", help="(internal) perplexity of one model on some domains, one process")
    q.add_argument("--name", required=True)
    q.add_argument("--model", required=True)
    q.add_argument("--windows", type=int, required=True)
    q.add_argument("--domains", required=True)
    r = sub.add_parser("report", help="merge the records into docs/qwen_e2e.json and write docs/qwen_e2e.md")
    r.add_argument("--note", action="append", default=[], help="a line for the run's notes (repeatable)")
    args = parser.parse_args()
    if args.command == "run":
        run(args)
    elif args.command == "ppl":
        ppl(args)
    else:
        doc = load()
        backfill_cpu(doc)
        if args.note:
            doc["notes"] = [*doc.get("notes", []), *args.note]
        JSON_OUT.write_text(json.dumps(doc, indent=1) + "\n")
        MD_OUT.write_text(markdown(doc))


if __name__ == "__main__":
    main()
