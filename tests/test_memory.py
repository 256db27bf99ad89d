"""Peak memory does not grow with depth: `prune --preset quality --offload` (calibration, the second-order
entry, refine and update; 2 refine steps instead of 50, to keep the test short) on 2 and on 8 layers of the
same width, each in a fresh process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import TRAINING_TEXT, make_tiny_model_folder

HIDDEN, INTERMEDIATE = 384, 1536

RUN = """
import json, resource, sys
from hybridprune.cli.main import main
sys.argv = ["hybridprune", *json.loads(sys.argv[1])]
try:
    main()
except SystemExit as exit:
    assert exit.code in (0, None), exit.code
print("PEAK_KB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def peak_rss(folder: Path, text: Path, cache: Path, out: Path) -> int:
    arguments = ["prune", "--model", str(folder), "--data", str(text), "--preset", "quality", "--refine", "2", "--offload",
                 "--nsamples", "4", "--seqlen", "64", "--topics", "4", "--cache-dir", str(cache), "--out", str(out), "--quiet"]
    # Big blocks always from mmap (glibc's threshold fixed, and the runner's kept_freed_memory declined): freed
    # memory goes back to the OS at once, so the peak measures what is live, not how the heap happened to
    # fragment (that varies by tens of MB between runs at this small width, more than a layer's worth: with
    # big blocks kept in the heap for the whole run 559 / 576 MiB at 2 / 8 layers in one run, 512 / 511 without).
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "HYBRIDPRUNE_MALLOC": "system"}
    done = subprocess.run([sys.executable, "-c", RUN, json.dumps(arguments)], capture_output=True, text=True, timeout=900, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    return int(done.stdout.split("PEAK_KB")[-1].split()[0]) * 1024


@pytest.mark.slow
def test_peak_memory_of_a_quality_prune_does_not_grow_with_depth(tmp_path: Path):
    from hybridprune.calibration.second_order import entry_bytes

    text = tmp_path / "text.txt"
    text.write_text(TRAINING_TEXT * 20)
    shape = dict(hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_attention_heads=6, num_key_value_heads=2, head_dim=64)
    peaks = {}
    for layers in (2, 8):
        folder = make_tiny_model_folder(tmp_path / f"model-{layers}", num_hidden_layers=layers, **shape)
        peaks[layers] = peak_rss(folder, text, tmp_path / f"cache-{layers}", tmp_path / f"out-{layers}")
    attention = 2 * HIDDEN * HIDDEN + 2 * HIDDEN * (2 * 64)
    layer_weights = 4 * (attention + 3 * HIDDEN * INTERMEDIATE)  # float32
    layer_worth = layer_weights + entry_bytes([HIDDEN, HIDDEN, HIDDEN, INTERMEDIATE])
    growth = peaks[8] - peaks[2]
    assert growth < layer_worth, f"peak RSS grew by {growth / 2**20:.1f} MiB from 2 to 8 layers (one layer: {layer_worth / 2**20:.1f} MiB)"
