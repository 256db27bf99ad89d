"""Print obs_results.jsonl as a table: name, split, windows, ppl, loss / Wanda's loss (same split and windows)."""

import json
from pathlib import Path

DENSE = {("validation", 16): 13.8779, ("test", 64): 14.92}
WANDA = {("validation", 16): 33.9922, ("test", 64): 36.23}
WANDA24 = {("validation", 16): 129.9737, ("test", 64): 139.52}

rows = [json.loads(line) for line in Path(__file__).with_name("obs_results.jsonl").read_text().splitlines()]
for r in rows:
    key = (r["split"], r["windows"])
    ref = WANDA24 if r.get("cfg", {}).get("pattern") == "2:4" else WANDA
    ratio = (r["ppl"] - DENSE[key]) / (ref[key] - DENSE[key]) if key in DENSE and key in ref else float("nan")
    print(f"{r['name']:34s} {r['split']:18s} {r['windows']:3d} {r['ppl']:9.2f} {ratio:6.3f} {r.get('prune_s', '')}")
