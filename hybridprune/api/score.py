"""`score`: per-neuron NeuronRank scores from cached statistics (options: hybridprune/options.py SCORE)."""

from __future__ import annotations

import dataclasses

from hybridprune.api.common import as_path, cache_folder, calibration_request, configure_torch
from hybridprune.api.results import ScoreResult
from hybridprune.config import PRUNE_FIELDS
from hybridprune.errors import UserError
from hybridprune.options import SCORE, Options, api_options
from hybridprune.presets import DEFAULT_PRESET, get_preset, resolve
from hybridprune.reporting import Reporter, SilentReporter


@api_options(SCORE, reporter=None)
def score(o: Options, *, reporter: Reporter | None = None) -> ScoreResult:
    """Per-neuron NeuronRank scores from cached statistics (calibrating first on a miss), cached too."""
    from hybridprune.cache import StatsCache
    from hybridprune.calibration.session import calibrated_statistics
    from hybridprune.models import load_model
    from hybridprune.pruning import neuron_scoring
    from hybridprune.scores import compute_scores, save_scores, scores_path, structured_share

    reporter = reporter or SilentReporter()
    configure_torch()
    if not 0.0 <= o.sparsity < 1.0:
        raise UserError(f"--sparsity must be in [0, 1), got {o.sparsity:g}")
    chosen = get_preset(o.preset or DEFAULT_PRESET, as_path(o.presets_file))
    config = resolve({name: value for name, value in vars(o).items() if name in PRUNE_FIELDS}, chosen).validate()
    request = calibration_request(chosen, vars(o))
    root = cache_folder(o.cache_dir)
    loaded = load_model(o.model, dtype=o.dtype, device=o.device, cache_dir=root, trust_remote_code=o.trust_remote_code)
    calibration = calibrated_statistics(loaded, request, StatsCache(root), reporter, force=o.force)
    scoring = neuron_scoring(config)
    layers = compute_scores(calibration.stats, scoring, loaded)
    path = scores_path(root, calibration.key.digest, scoring)
    save_scores(path, layers)
    rows = []
    for entry, share in zip(layers, structured_share(layers, o.sparsity)):
        quantiles = entry.scores.quantile(entry.scores.new_tensor([0.1, 0.5, 0.9])).tolist()
        rows.append({
            "layer": entry.layer,
            "tau": calibration.stats.tau(entry.layer),
            "score_p10": quantiles[0], "score_median": quantiles[1], "score_p90": quantiles[2],
            "spread_p90_p10": quantiles[2] / max(quantiles[0], 1e-30),
            "idf_min": float(entry.idf.min()), "idf_max": float(entry.idf.max()),
            "structured_removed_share": share,
        })
    return ScoreResult(calibration.key.digest, dataclasses.asdict(scoring), path, o.sparsity, rows)
