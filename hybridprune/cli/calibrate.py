"""`hybridprune calibrate`: one layer-wise pass that fills the statistics cache."""

from __future__ import annotations

import os
from typing import Any

from hybridprune import api
from hybridprune.cli.common import JsonOpt, QuietOpt, cli_options, handle_errors
from hybridprune.cli.output import Output
from hybridprune.options import CALIBRATE


@handle_errors
@cli_options(CALIBRATE)
def calibrate(json_output: JsonOpt = False, quiet: QuietOpt = False, **options: Any) -> None:
    """Collect Wanda and NeuronRank statistics once; every sparsity, preset and knob reuses them.

    Under `torchrun --nproc-per-node N -m hybridprune calibrate ...` the N processes split the
    windows, and rank 0 writes the one entry once all of them are done.
    """
    # under torchrun one rank (0) speaks for all: RANK is the rank torchrun gives the process group
    follower = "WORLD_SIZE" in os.environ and os.environ.get("RANK", "0") != "0"
    output = Output(json_output and not follower, quiet or follower)
    result = api.calibrate(**options, reporter=output.reporter)
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
