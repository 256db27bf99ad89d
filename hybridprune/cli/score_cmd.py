"""`hybridprune score`: NeuronRank scores per layer from cached statistics, with a summary table."""

from __future__ import annotations

from typing import Annotated

import typer

from hybridprune import ui
from hybridprune.cache import StatsCache
from hybridprune.calibration.session import calibrated_statistics
from hybridprune.cli.common import (
    BatchOpt,
    CacheDirOpt,
    DeviceOpt,
    DtypeOpt,
    ForceOpt,
    JsonOpt,
    ModelOpt,
    QuietOpt,
    SeedOpt,
    TextFieldOpt,
    TrustOpt,
    DataOpt,
    IdfExpOpt,
    MinTokensOpt,
    MlpMethodOpt,
    NsamplesOpt,
    PresetOpt,
    PresetsFileOpt,
    QActiveOpt,
    SeqlenOpt,
    TfExpOpt,
    TfidfModeOpt,
    TfKindOpt,
    TopicRateOpt,
    TopicsOpt,
    calibration_request,
    configure_torch,
    handle_errors,
    setup_output,
)
from hybridprune.errors import UserError
from hybridprune.fsutil import cache_root, ensure_writable_dir
from hybridprune.models import load_model
from hybridprune.presets import DEFAULT_PRESET, get_preset, resolve
from hybridprune.prune import neuron_scoring
from hybridprune.scores import compute_scores, save_scores, scores_path, structured_share

OptStr = str | None
OptFloat = float | None


@handle_errors
def score(
    model: ModelOpt = None,
    preset: PresetOpt = None,
    presets_file: PresetsFileOpt = None,
    hybrid_mlp_method: MlpMethodOpt = None,
    nr_tfidf_mode: TfidfModeOpt = None,
    tf_exp: TfExpOpt = None,
    idf_exp: IdfExpOpt = None,
    tf_kind: TfKindOpt = None,
    nr_min_tokens: MinTokensOpt = None,
    nr_topic_rate: TopicRateOpt = None,
    sparsity: Annotated[float, typer.Option("--sparsity", "--sparsity-ratio", help="For the structured-removal column.")] = 0.5,
    data: DataOpt = None,
    text_field: TextFieldOpt = None,
    nsamples: NsamplesOpt = None,
    seqlen: SeqlenOpt = None,
    seed: SeedOpt = 0,
    topics: TopicsOpt = None,
    q_active: QActiveOpt = None,
    batch_size: BatchOpt = 4,
    dtype: DtypeOpt = "float32",
    device: DeviceOpt = "cpu",
    cache_dir: CacheDirOpt = None,
    force: ForceOpt = False,
    trust_remote_code: TrustOpt = False,
    json_output: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Turn cached statistics into per-neuron NeuronRank scores; calibrates first on a cache miss."""
    reporter = setup_output(json_output, quiet)
    configure_torch()
    if not 0.0 <= sparsity < 1.0:
        raise UserError(f"--sparsity must be in [0, 1), got {sparsity:g}")
    chosen = get_preset(preset or DEFAULT_PRESET, presets_file)
    config = resolve(
        dict(hybrid_mlp_method=hybrid_mlp_method, nr_tfidf_mode=nr_tfidf_mode, tf_exp=tf_exp, idf_exp=idf_exp,
             tf_kind=tf_kind, nr_min_tokens=nr_min_tokens, nr_topic_rate=nr_topic_rate, sparsity=sparsity),
        chosen,
    ).validate()
    request = calibration_request(
        chosen, dict(nsamples=nsamples, seqlen=seqlen, topics=topics, q_active=q_active, data=data),
        text_field, seed, batch_size,
    )
    request.validate()
    root = ensure_writable_dir(cache_root(cache_dir), "cache folder")
    loaded = load_model(model, dtype=dtype, device=device, cache_dir=root, trust_remote_code=trust_remote_code)
    calibration = calibrated_statistics(loaded, request, StatsCache(root), reporter, force=force)
    scoring = neuron_scoring(config)
    layers = compute_scores(calibration.stats, scoring, loaded)
    path = scores_path(root, calibration.key.digest, scoring)
    save_scores(path, layers)
    shares = structured_share(layers, sparsity)
    rows = []
    for entry, share in zip(layers, shares):
        scores, idf = entry.scores, entry.idf
        quantiles = scores.quantile(scores.new_tensor([0.1, 0.5, 0.9])).tolist()
        rows.append({
            "layer": entry.layer,
            "tau": calibration.stats.tau(entry.layer),
            "score_p10": quantiles[0], "score_median": quantiles[1], "score_p90": quantiles[2],
            "spread_p90_p10": quantiles[2] / max(quantiles[0], 1e-30),
            "idf_min": float(idf.min()), "idf_max": float(idf.max()),
            "structured_removed_share": share,
        })
    if json_output:
        ui.emit_json({"statistics_key": calibration.key.digest, "scoring": scoring.__dict__, "scores_file": str(path), "layers": rows})
        return
    if quiet:
        return
    mode = scoring.mode if config.hybrid_mlp_method == "neuronrank_tfidf" else "old"
    ui.console.print(ui.table(
        f"NeuronRank scores ({mode} mode, tf={scoring.tf_kind}^{scoring.tf_exp:g}, idf^{scoring.idf_exp:g})",
        ["layer", "tau", "score p10 / median / p90", "spread p90/p10", "IDF range", f"removed at {sparsity:.0%} (global cut)"],
        [[r["layer"], f"{r['tau']:.3g}", f"{r['score_p10']:.3g} / {r['score_median']:.3g} / {r['score_p90']:.3g}",
          f"{r['spread_p90_p10']:.2f}x", f"{r['idf_min']:.3f} – {r['idf_max']:.3f}", f"{r['structured_removed_share']:.0%}"]
         for r in rows],
    ))
    ui.console.print(f"scores cached at {path}")

