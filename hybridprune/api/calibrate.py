"""`calibrate`: the statistics cache filled once (options: hybridprune/options.py CALIBRATE)."""

from __future__ import annotations

from hybridprune.api.common import calibration_request, choose_streaming, configure_torch, entry_bytes
from hybridprune.api.results import CalibrateResult
from hybridprune.errors import UserError
from hybridprune.options import CALIBRATE, Options, api_options
from hybridprune.reporting import Reporter, SilentReporter


@api_options(CALIBRATE, reporter=None)
def calibrate(o: Options, *, reporter: Reporter | None = None) -> CalibrateResult:
    """Collect the Wanda and NeuronRank statistics once (cached); `hessians` adds the second-order entry.

    Under torchrun the processes split the windows and rank 0 writes the one entry.
    """
    from hybridprune.api.common import cache_folder
    from hybridprune.cache import StatsCache
    from hybridprune.calibration.distributed import World
    from hybridprune.calibration.session import HESSIAN_MODE, calibrated_statistics
    from hybridprune.calibration.shards import ShardSpec
    from hybridprune.models import load_model

    reporter = reporter or SilentReporter()
    configure_torch()
    part = ShardSpec.parse(o.shard) if o.shard is not None else None
    with World.joined(o.device) as world:
        if world is not None and part is not None:
            raise UserError("--shard and torchrun both split the windows: use one of them")
        request = calibration_request(None, vars(o))
        root = cache_folder(o.cache_dir)
        on = str(world.device) if world is not None and world.device.type == "cuda" else o.device  # one GPU per rank
        streaming = choose_streaming(o.offload, o.model, o.dtype, on, root, reporter, layerwise=True)
        loaded = load_model(o.model, dtype=o.dtype, device=on, cache_dir=root, trust_remote_code=o.trust_remote_code,
                            streaming=streaming)
        cache = StatsCache(root)
        result = calibrated_statistics(loaded, request, cache, reporter, force=o.force, shard=part, world=world,
                                       with_second_order=o.hessians)
        second = None
        if o.hessians:
            second = result.second_order or calibrated_statistics(loaded, request, cache, reporter, force=o.force, mode=HESSIAN_MODE)
    return CalibrateResult(
        key=result.key.digest,
        reused=result.reused,
        entry=result.entry,
        bytes=entry_bytes(result.entry),
        tokens=result.stats.tokens,
        layers=result.stats.num_layers,
        seconds=result.seconds,
        inputs=result.key.fields(),
        shard=str(part) if part is not None else None,
        full_key=result.key.full().digest if part is not None else None,
        shard_count=part.count if part is not None else None,
        hessians={"key": second.key.digest, "reused": second.reused, "entry": str(second.entry), "bytes": entry_bytes(second.entry)}
        if second is not None else None,
        leader=world is None or world.leader,
    )
