"""Print results.jsonl as a markdown table (last row per name/split/windows wins)."""
import json
from pathlib import Path

rows = {}
for line in Path(__file__).with_name("results.jsonl").read_text().splitlines():
    r = json.loads(line)
    rows[(r["name"], r["split"], r["windows"])] = r
print("| config | split | windows | ppl | attn / mlp / total sparsity |")
print("|---|---|---|---|---|")
for (name, split, w), r in rows.items():
    s = r["sparsity"]
    print(f"| {name} | {split} | {w} | {r['ppl']:.2f} | {s['attn']:.3f} / {s['mlp']:.3f} / {s['total']:.3f} |")
