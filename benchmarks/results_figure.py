"""README's picture: each preset's loss relative to Wanda's on the five domains' test halves, both models.

    python benchmarks/results_figure.py          # reads docs/validation.json, writes docs/results.png

Bars are the mean over the five domains, the black mark the worst domain; 1 is Wanda's loss (at the same
pattern), lower is better. The rows are those `python benchmarks/validate.py` measured (docs/validation.md).
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ROWS = [  # (validation.json configuration, label)
    ("wanda+update", "Wanda + update"),
    ("balanced:refine0", "hybrid masks\n(balanced, no refine)"),
    ("balanced", "balanced\n(default)"),
    ("quality", "quality"),
    ("joint", "joint"),
    ("wanda+update@2:4", "2:4 Wanda\n+ update"),
    ("balanced@2:4", "2:4 balanced"),
    ("quality@2:4", "2:4 quality"),
    ("joint@2:4", "2:4 joint"),
]
MODELS = (("smollm2", "SmolLM2-135M"), ("qwen", "Qwen2.5-Coder-1.5B"))


def main() -> None:
    test = json.loads((ROOT / "docs" / "validation.json").read_text())["test"]
    figure, axis = plt.subplots(figsize=(9, 4.2))
    width = 0.38
    for offset, (model, label) in enumerate(MODELS):
        xs, means, worsts = [], [], []
        for index, (name, _) in enumerate(ROWS):
            row = test.get(name, {}).get(model)
            if row is None:
                continue
            xs.append(index + (offset - 0.5) * width)
            means.append(row["mean"])
            worsts.append(row["worst"])
        axis.bar(xs, means, width, label=f"{label}: mean of 5 domains")
        axis.scatter(xs, worsts, color="black", marker="_", s=200, zorder=3, label="worst domain" if offset else None)
    axis.axhline(1.0, color="grey", linestyle="--", linewidth=1)
    axis.text(len(ROWS) - 0.5, 1.01, "Wanda", ha="right", va="bottom", color="grey")
    axis.set_xticks(range(len(ROWS)), [label for _, label in ROWS], fontsize=8)
    axis.set_ylabel("perplexity loss / Wanda's loss")
    axis.set_ylim(0, 1.15)
    axis.set_title("Test halves of five domains (wiki, code, docs, plays, poetry); no bar: not measured on that model", fontsize=10)
    axis.legend(fontsize=8, loc="lower left")
    figure.tight_layout()
    out = ROOT / "docs" / "results.png"
    figure.savefig(out, dpi=110)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
