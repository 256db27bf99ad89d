"""Perplexity against sparsity, one line per method: the picture a sweep or a comparison is for."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

from hybridprune.errors import UserError

LOG_SCALE_RATIO = 10.0
"""Above this max/min perplexity ratio the y axis is logarithmic (pruning curves explode)."""


def plot_sweep(rows: list[dict[str, Any]], dense_ppl: float | None, path: Path, title: str) -> Path:
    """Write a plot (PNG unless the suffix says otherwise) of ppl vs sparsity; `rows` are {"method", "sparsity" (0..1), "ppl"}.

    Each method is one line through its points sorted by sparsity; the dense model, when known,
    is a dashed horizontal reference line. matplotlib is imported here, with the Agg backend,
    so the rest of the tool never pays for it and no display is needed.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not rows and dense_ppl is None:
        raise UserError("nothing to plot: no pruned model and no dense reference")
    by_method: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for row in rows:
        by_method[str(row["method"])].append((100 * float(row["sparsity"]), float(row["ppl"])))
    figure, axes = plt.subplots(figsize=(7, 4.5), dpi=120)
    try:
        for method, points in sorted(by_method.items()):
            points.sort()
            axes.plot([x for x, _ in points], [y for _, y in points], marker="o", label=method)
        if dense_ppl is not None:
            axes.axhline(dense_ppl, color="black", linestyle="--", linewidth=1, label=f"dense ({dense_ppl:.2f})")
        values = [ppl for points in by_method.values() for _, ppl in points] + ([dense_ppl] if dense_ppl else [])
        if min(values) > 0 and max(values) / min(values) > LOG_SCALE_RATIO:
            axes.set_yscale("log")
        axes.set_xlabel("sparsity of the decoder Linears (%)")
        axes.set_ylabel("perplexity")
        axes.set_title(title)
        axes.grid(True, which="both", alpha=0.3)
        axes.legend()
        figure.tight_layout()
        path = Path(path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            figure.savefig(path)  # the suffix picks the format (.png, .svg, .pdf); PNG without one
        except OSError as err:
            raise UserError(f"cannot write the plot to {path}: {err.strerror or err}") from None
        except ValueError as err:  # an unknown suffix
            raise UserError(f"cannot write the plot to {path}: {err}: use a .png path") from None
    finally:
        plt.close(figure)
    return path
