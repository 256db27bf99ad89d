"""`hybridprune calibrate`: one layer-wise pass that fills the statistics cache."""

from __future__ import annotations

from hybridprune import ui
from hybridprune.cache import StatsCache
from hybridprune.calibration.session import calibrated_statistics
from hybridprune.cli.common import (
    BatchOpt,
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
    configure_torch,
    handle_errors,
    setup_output,
)
from hybridprune.fsutil import cache_root, ensure_writable_dir
from hybridprune.models import load_model


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
    json_output: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Collect Wanda and NeuronRank statistics once; every sparsity, preset and knob reuses them."""
    reporter = setup_output(json_output, quiet)
    configure_torch()
    request = calibration_request(
        None, dict(data=data, nsamples=nsamples, seqlen=seqlen, topics=topics, q_active=q_active), text_field, seed, batch_size
    )
    request.validate()
    root = ensure_writable_dir(cache_root(cache_dir), "cache folder")
    loaded = load_model(model, dtype=dtype, device=device, cache_dir=root, trust_remote_code=trust_remote_code)
    result = calibrated_statistics(loaded, request, StatsCache(root), reporter, force=force)
    size = sum(path.stat().st_size for path in result.entry.iterdir())
    summary = {
        "key": result.key.digest,
        "reused": result.reused,
        "entry": str(result.entry),
        "bytes": size,
        "tokens": result.stats.tokens,
        "layers": result.stats.num_layers,
        "seconds": round(result.seconds, 2),
        "inputs": result.key.fields(),
    }
    if json_output:
        ui.emit_json(summary)
    elif not quiet:
        ui.console.print(
            f"statistics [bold]{result.key.digest}[/]: {result.stats.num_layers} layers, "
            f"{result.stats.tokens:,} tokens, {size / 1e6:.1f} MB at {result.entry}"
        )
