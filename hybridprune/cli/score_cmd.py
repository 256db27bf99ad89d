"""`hybridprune score`: NeuronRank scores per layer from cached statistics, with a summary table."""

from __future__ import annotations

from typing import Annotated

import typer

from hybridprune import api, ui
from hybridprune.cli.common import (
    BatchOpt,
    CacheDirOpt,
    DataOpt,
    DeviceOpt,
    DocRateOpt,
    DtypeOpt,
    ForceOpt,
    IdfExpOpt,
    JsonOpt,
    MinTokensOpt,
    MlpMethodOpt,
    ModelOpt,
    NsamplesOpt,
    PresetOpt,
    PresetsFileOpt,
    QActiveOpt,
    QuietOpt,
    SeedOpt,
    SeqlenOpt,
    TextFieldOpt,
    TfExpOpt,
    TfidfModeOpt,
    TfKindOpt,
    TopicRateOpt,
    TopicsOpt,
    TrustOpt,
    handle_errors,
)
from hybridprune.cli.output import Output


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
    nr_doc_rate: DocRateOpt = None,
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
    output = Output(json_output, quiet)
    result = api.score(
        model=model, preset=preset, presets_file=presets_file, hybrid_mlp_method=hybrid_mlp_method,
        nr_tfidf_mode=nr_tfidf_mode, tf_exp=tf_exp, idf_exp=idf_exp, tf_kind=tf_kind, nr_min_tokens=nr_min_tokens,
        nr_topic_rate=nr_topic_rate, nr_doc_rate=nr_doc_rate, sparsity=sparsity, data=data, text_field=text_field, nsamples=nsamples,
        seqlen=seqlen, seed=seed, topics=topics, q_active=q_active, batch_size=batch_size, dtype=dtype, device=device,
        cache_dir=cache_dir, force=force, trust_remote_code=trust_remote_code, reporter=output.reporter,
    )
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
