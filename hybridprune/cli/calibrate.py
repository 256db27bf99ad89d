"""`hybridprune calibrate`: one layer-wise pass that fills the statistics cache."""

from __future__ import annotations

import os
from typing import Annotated

import typer

from hybridprune import api
from hybridprune.cli.common import (
    BatchOpt,
    CacheDirOpt,
    CalibrateOffloadOpt,
    DataOpt,
    DeviceOpt,
    DtypeOpt,
    ForceOpt,
    JsonOpt,
    ModelOpt,
    NsamplesOpt,
    QActiveOpt,
    QuietOpt,
    SeedOpt,
    SeqlenOpt,
    TextFieldOpt,
    TopicsOpt,
    TrustOpt,
    handle_errors,
)
from hybridprune.cli.output import Output

HessiansOpt = Annotated[
    bool,
    typer.Option("--hessians", help="Also collect the second-order statistics (x x^T per input) that --update and the quality preset use."),
]
ShardOpt = Annotated[
    str | None,
    typer.Option("--shard", help="Calibrate only shard i of N (i/N) into a partial entry; `hybridprune cache merge` joins the N shards."),
]


@handle_errors
def calibrate(
    model: ModelOpt = None,
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
    shard: ShardOpt = None,
    hessians: HessiansOpt = False,
    offload: CalibrateOffloadOpt = None,
    json_output: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Collect Wanda and NeuronRank statistics once; every sparsity, preset and knob reuses them.

    Under `torchrun --nproc-per-node N -m hybridprune calibrate ...` the N processes split the
    windows, and rank 0 writes the one entry once all of them are done.
    """
    # under torchrun one rank (0) speaks for all: RANK is the rank torchrun gives the process group
    follower = "WORLD_SIZE" in os.environ and os.environ.get("RANK", "0") != "0"
    output = Output(json_output and not follower, quiet or follower)
    result = api.calibrate(
        model=model, data=data, text_field=text_field, nsamples=nsamples, seqlen=seqlen, seed=seed, topics=topics,
        q_active=q_active, batch_size=batch_size, dtype=dtype, device=device, cache_dir=cache_dir, force=force,
        trust_remote_code=trust_remote_code, shard=shard, hessians=hessians, offload=offload, reporter=output.reporter,
    )
    if result.leader:
        output.result(result.to_dict(), lambda: render(output, result))


def render(output: Output, result: api.CalibrateResult) -> None:
    output.show(f"statistics [bold]{result.key}[/]: {result.layers} layers, {result.tokens:,} tokens, "
                f"{result.bytes / 1e6:.1f} MB at {result.entry}")
    if result.hessians is not None:
        output.show(f"second-order statistics [bold]{result.hessians['key']}[/]: "
                    f"{result.hessians['bytes'] / 1e6:.1f} MB at {result.hessians['entry']}")
    if result.shard is not None:
        output.show(f"shard {result.shard} of [bold]{result.full_key}[/]; once all {result.shard_count} shards are done: "
                    f"hybridprune cache merge --all-shards {result.full_key}")
