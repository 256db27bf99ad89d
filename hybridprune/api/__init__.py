"""The Python API: `calibrate`, `score`, `prune`, `evaluate`, `decompress`, the one pipeline of the tool.

The commands (hybridprune/cli), the wizard and the benchmarks all call these functions; a
notebook or a script can too:

    import hybridprune
    result = hybridprune.prune(sparsity=0.5, nr_tfidf_mode="topic", out="pruned/")
    print(result.runs[0].report.total.sparsity, result.runs[0].out)
    scores = hybridprune.evaluate(model="pruned/", baseline="embedded", windows=16)

Keywords are the commands' long option names with underscores (`--nr-tfidf-mode` is
`nr_tfidf_mode`); `--presets` is `presets_file`, `--eval` is `evaluate`. Each command's options
are declared once, in hybridprune/options.py, for the command line and this API alike. Every
keyword left at None takes the preset's value, else the default in config.py. Progress goes to
`reporter` (silent by default); results come back as dataclasses (api/results.py). Mistakes the
user can fix raise hybridprune.errors.UserError with a one-line message.

Heavy modules (torch, transformers) are imported inside the functions, so importing this
package (and `hybridprune --help`) stays light.
"""

from hybridprune.api.calibrate import calibrate
from hybridprune.api.common import calibration_request, choose_streaming, configure_torch
from hybridprune.api.decompress import decompress
from hybridprune.api.evaluate import evaluate, parse_windows
from hybridprune.api.prune import heldout_perplexity, mode_banner, output_path, parse_sparsities, prune
from hybridprune.api.results import CalibrateResult, EvalResult, Evaluation, PruneResult, PruneRun, ScoreResult
from hybridprune.api.score import score

__all__ = [
    "calibrate", "score", "prune", "evaluate", "decompress",
    "CalibrateResult", "ScoreResult", "PruneRun", "PruneResult", "Evaluation", "EvalResult",
    "calibration_request", "choose_streaming", "configure_torch", "heldout_perplexity", "mode_banner", "output_path",
    "parse_sparsities", "parse_windows",
]
