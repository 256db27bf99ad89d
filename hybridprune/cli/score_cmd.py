"""`hybridprune score`: NeuronRank scores per layer from cached statistics, with a summary table."""

from __future__ import annotations

from typing import Any

from hybridprune import api, ui
from hybridprune.cli.common import JsonOpt, QuietOpt, cli_options, handle_errors
from hybridprune.cli.output import Output
from hybridprune.options import SCORE


@handle_errors
@cli_options(SCORE)
def score(json_output: JsonOpt = False, quiet: QuietOpt = False, **options: Any) -> None:
    """Turn cached statistics into per-neuron NeuronRank scores; calibrates first on a cache miss."""
    output = Output(json_output, quiet)
    result = api.score(**options, reporter=output.reporter)
    output.result(result.to_dict(), lambda: render(output, result))


def render(output: Output, result: api.ScoreResult) -> None:
    scoring = result.scoring
    output.show(ui.table(
        f"NeuronRank scores ({scoring['mode']} mode, tf={scoring['tf_kind']}^{scoring['tf_exp']:g}, idf^{scoring['idf_exp']:g})",
        ["layer", "tau", "score p10 / median / p90", "spread p90/p10", "IDF range", f"removed at {result.sparsity:.0%} (global cut)"],
        [[r["layer"], f"{r['tau']:.3g}", f"{r['score_p10']:.3g} / {r['score_median']:.3g} / {r['score_p90']:.3g}",
          f"{r['spread_p90_p10']:.2f}x", f"{r['idf_min']:.3f} – {r['idf_max']:.3f}", f"{r['structured_removed_share']:.0%}"]
         for r in result.layers],
    ))
    output.show(f"scores cached at {result.scores_file}")
