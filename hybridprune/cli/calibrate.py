"""`hybridprune calibrate`: one layer-wise pass that fills the statistics cache."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from hybridprune import ui
from hybridprune.cache import StatsCache
from hybridprune.calibration.distributed import World
from hybridprune.calibration.session import HESSIAN_MODE, calibrated_statistics
from hybridprune.calibration.shards import ShardSpec
from hybridprune.cli.common import (
    BatchOpt,
    CalibrateOffloadOpt,
    CacheDirOpt,
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
    calibration_request,
    choose_streaming,
    configure_torch,
    handle_errors,
    setup_output,
)
from hybridprune.errors import UserError
from hybridprune.fsutil import cache_root, ensure_writable_dir
from hybridprune.models import load_model

HessiansOpt = Annotated[
    bool,
    typer.Option(
        "--hessians",
        help="Also collect the second-order statistics (x x^T per input) that --update and the quality preset use.",
    ),
]
ShardOpt = Annotated[
    str | None,
    typer.Option(
        "--shard",
        help="Calibrate only shard i of N (i/N) into a partial entry; `hybridprune cache merge` joins the N shards.",
    ),
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
    part = ShardSpec.parse(shard) if shard is not None else None
    with World.joined(device) as world:
        if world is not None and part is not None:
            raise UserError("--shard and torchrun both split the windows: use one of them")
        leader = world is None or world.leader
        reporter = setup_output(json_output and leader, quiet or not leader)  # one rank speaks for all
        configure_torch()
        request = calibration_request(
            None, dict(data=data, nsamples=nsamples, seqlen=seqlen, topics=topics, q_active=q_active), text_field, seed, batch_size
        )
        request.validate()
        root = ensure_writable_dir(cache_root(cache_dir), "cache folder")
        on = str(world.device) if world is not None and world.device.type == "cuda" else device  # one GPU per rank
        streaming = choose_streaming(offload, model, dtype, on, root, reporter, layerwise=True)
        loaded = load_model(model, dtype=dtype, device=on, cache_dir=root, trust_remote_code=trust_remote_code, streaming=streaming)
        result = calibrated_statistics(loaded, request, StatsCache(root), reporter, force=force, shard=part, world=world)
        second_order = (
            calibrated_statistics(loaded, request, StatsCache(root), reporter, force=force, mode=HESSIAN_MODE)
            if hessians
            else None
        )
    if not leader:
        return
    size = entry_bytes(result.entry)
    full = result.key.full().digest
    summary = {
        "key": result.key.digest,
        "reused": result.reused,
        "entry": str(result.entry),
        "bytes": size,
        "tokens": result.stats.tokens,
        "layers": result.stats.num_layers,
        "seconds": round(result.seconds, 2),
        "inputs": result.key.fields(),
        **({"shard": str(part), "full_key": full} if part is not None else {}),
        **({"hessians": {"key": second_order.key.digest, "reused": second_order.reused, "bytes": entry_bytes(second_order.entry)}}
           if second_order is not None else {}),
    }
    if json_output:
        ui.emit_json(summary)
    elif not quiet:
        ui.console.print(
            f"statistics [bold]{result.key.digest}[/]: {result.stats.num_layers} layers, "
            f"{result.stats.tokens:,} tokens, {size / 1e6:.1f} MB at {result.entry}"
        )
        if second_order is not None:
            ui.console.print(
                f"second-order statistics [bold]{second_order.key.digest}[/]: "
                f"{entry_bytes(second_order.entry) / 1e6:.1f} MB at {second_order.entry}"
            )
        if part is not None:
            ui.console.print(
                f"shard {part} of [bold]{full}[/]; once all {part.count} shards are done: "
                f"hybridprune cache merge --all-shards {full}"
            )


def entry_bytes(entry: Path) -> int:
    return sum(path.stat().st_size for path in entry.iterdir())
