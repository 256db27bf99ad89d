"""Sharded and data-parallel calibration give the statistics of one process.

Every shard fits tau and the topic centroids on the same anchor (the first batch of all
windows), so merged shards equal the single run: counts exactly, sums to float tolerance,
per-window rows in the global window order. The shards here are uneven and do not start on
the single run's batch boundaries (6 windows, batches of 2, 2 shards of 3).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from helpers import TRAINING_TEXT
from hybridprune.cache import StatsCache, StatsKey
from hybridprune.calibration.shards import ShardSpec
from hybridprune.calibration.stats import COUNT_ENTRIES, CalibrationStats
from hybridprune.cli.main import app
from hybridprune.config import PruneConfig
from hybridprune.errors import UserError
from hybridprune.fsutil import clean_stale_staging, staging_owner
from hybridprune.models import load_model
from hybridprune.passes import prune_model
from hybridprune.reporting import SilentReporter

REPO = Path(__file__).resolve().parents[1]
EXACT = tuple("." + entry for entry in (*COUNT_ENTRIES, "nr.tau"))


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_llama_folder):
    root = tmp_path_factory.mktemp("distributed")
    text = root / "text.txt"
    text.write_text(TRAINING_TEXT, encoding="utf-8")
    return root / "cache", text, tiny_llama_folder


def calibrate(setup, *extra: str, nsamples: int = 6, seed: int = 0) -> dict:
    cache, text, model = setup
    args = ["calibrate", "--model", str(model), "--data", str(text), "--nsamples", str(nsamples), "--seqlen", "32",
            "--topics", "4", "--batch-size", "2", "--seed", str(seed), "--cache-dir", str(cache), "--json", "--quiet", *extra]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def merge(setup, *args: str):
    return CliRunner().invoke(app, ["cache", "merge", *args, "--cache-dir", str(setup[0]), "--json"])


def load(setup, digest: str) -> CalibrationStats:
    """The entry's statistics read whole (the tests remove and rewrite entries under the same key)."""
    cache = StatsCache(setup[0])
    return CalibrationStats(cache.load(StatsKey(**cache.read_manifest(digest)["key"])).all_tensors())


def assert_same_statistics(actual: CalibrationStats, expected: CalibrationStats) -> None:
    mine, theirs = actual.all_tensors(), expected.all_tensors()
    assert set(mine) == set(theirs) and len(mine) > 1
    for name, tensor in theirs.items():
        assert mine[name].shape == tensor.shape, name
        if name.endswith(EXACT):
            assert torch.equal(mine[name], tensor), name  # counts and the shared tau are exact
        else:
            torch.testing.assert_close(mine[name], tensor, rtol=1e-6, atol=1e-9, msg=name)  # float32 batch sums


def torchrun(setup, ranks: int, nsamples: int, path: tuple[Path, ...] = (), check: bool = True) -> subprocess.CompletedProcess[str]:
    """`torchrun --nproc-per-node ranks -m hybridprune calibrate ...`; `path` goes first on PYTHONPATH."""
    cache, text, model = setup
    paths = [*map(str, path), str(REPO), os.environ.get("PYTHONPATH")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(filter(None, paths))}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks),
               "-m", "hybridprune", "calibrate", "--model", str(model), "--data", str(text), "--nsamples", str(nsamples),
               "--seqlen", "32", "--topics", "4", "--batch-size", "2", "--cache-dir", str(cache)]
    result = subprocess.run(command, check=False, env=env, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0 or not check, result.stdout + result.stderr
    return result


def test_shard_bounds_cover_every_window_once():
    for total in range(1, 9):
        for count in range(1, total + 1):
            covered = [w for index in range(count) for w in range(*ShardSpec(index, count).bounds(total))]
            assert covered == list(range(total))
    assert ShardSpec.parse("1/4") == ShardSpec(1, 4)
    for bad in ("4/4", "1", "-1/2", "a/b"):
        with pytest.raises(UserError, match="--shard"):
            ShardSpec.parse(bad)


def test_merged_shards_equal_the_single_process_entry(setup):
    single = calibrate(setup)
    shards = [calibrate(setup, "--shard", f"{index}/2") for index in range(2)]
    assert {shard["full_key"] for shard in shards} == {single["key"]}
    assert len({shard["key"] for shard in shards} | {single["key"]}) == 3  # partial entries have keys of their own
    assert [shard["tokens"] for shard in shards] == [3 * 32, 3 * 32]
    expected = load(setup, single["key"])
    StatsCache(setup[0]).remove(single["key"])

    result = merge(setup, shards[1]["key"], shards[0]["key"])  # any order: shards are ordered by index
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["key"] == single["key"]
    merged = load(setup, single["key"])
    assert_same_statistics(merged, expected)
    assert merged.layer_entry(0, "nr.window_active").shape[0] == 6

    again = merge(setup, "--all-shards", single["key"])
    assert again.exit_code == 0, again.output
    assert_same_statistics(load(setup, single["key"]), expected)


def test_merge_refuses_shards_that_do_not_belong_together(setup):
    first = calibrate(setup, "--shard", "0/2")["key"]
    second = calibrate(setup, "--shard", "1/2")["key"]
    other_seed = calibrate(setup, "--shard", "1/2", seed=1)["key"]
    of_three = calibrate(setup, "--shard", "1/3")["key"]
    refusals = {
        (first, other_seed): "in seed (0 vs 1)",
        (first, of_three): "in shard_count (2 vs 3)",
        (first,): "shard 1/2 missing",
        (first, first): "shard 0/2 is given twice",
        (second, second): "shard 1/2 is given twice",
    }
    for keys, message in refusals.items():
        result = merge(setup, *keys)
        assert result.exit_code != 0 and message in result.output, (keys, result.output)
        assert len(result.output.strip().splitlines()) == 1  # one clear line


def test_torchrun_two_ranks_equal_one_process_with_the_same_masks(setup, tiny_llama_folder):
    single = calibrate(setup)
    expected = load(setup, single["key"])
    StatsCache(setup[0]).remove(single["key"])
    result = torchrun(setup, ranks=2, nsamples=6)
    output = result.stdout + result.stderr
    assert output.count("collected statistics for") == 1 and output.count(f"statistics {single['key']}") == 1
    manifest = StatsCache(setup[0]).read_manifest(single["key"])
    assert manifest["ranks"] == 2
    actual = load(setup, single["key"])
    assert_same_statistics(actual, expected)

    for mode in ("doc", "topic"):
        config = PruneConfig(nr_tfidf_mode=mode).validate()
        masks = []
        for stats in (expected, actual):
            loaded = load_model(str(tiny_llama_folder))
            prune_model(loaded, stats, config, SilentReporter())
            masks.append({name: p == 0 for name, p in loaded.model.named_parameters() if p.dim() == 2})
        assert masks[0].keys() == masks[1].keys()
        assert all(torch.equal(masks[0][name], masks[1][name]) for name in masks[0]), mode
        assert any(mask.any() for mask in masks[0].values())


def test_uneven_world_size_counts_every_window_once(setup):
    single = calibrate(setup, nsamples=4)
    expected = load(setup, single["key"])
    StatsCache(setup[0]).remove(single["key"])
    torchrun(setup, ranks=3, nsamples=4)  # windows 1 + 1 + 2: rank 0 holds less than the anchor batch
    actual = load(setup, single["key"])
    assert actual.tokens == 4 * 32
    assert torch.equal(actual.layer_entry(1, "nr.window_tokens"), torch.full((4,), 32, dtype=torch.int32))
    assert_same_statistics(actual, expected)


def test_a_crashed_rank_leaves_no_cache_entry(setup, tmp_path):
    """Rank 1 dies at its first collective of the statistics: rank 0 must not write anything."""
    (tmp_path / "sitecustomize.py").write_text(
        "import os\n"
        "if os.environ.get('RANK') == '1':\n"
        "    import torch.distributed\n"
        "    torch.distributed.all_reduce = lambda *args, **kwargs: os._exit(3)\n"
    )
    result = torchrun(setup, ranks=2, nsamples=5, path=(tmp_path,), check=False)
    assert result.returncode != 0
    cache = StatsCache(setup[0])
    assert not any(entry.get("key", {}).get("nsamples") == 5 for entry in cache.entries())
    # rank 0 may be killed (torchrun's SIGTERM) before the collective's error reaches it, mid-write: its staging folder
    # then stays, as after any kill, and the next write removes it (atomic_folder's contract); nothing else may be left
    leftovers = [path for path in cache.stats_dir.glob("*") if not path.name.isalnum()]
    assert all(staging_owner(path) is not None for path in leftovers), leftovers
    clean_stale_staging(cache.stats_dir)
    assert not [path for path in cache.stats_dir.glob("*") if not path.name.isalnum()]  # no half-written folder either
    assert re.search(r"rank\s*:\s*1\b[^\n]*\n[^\n]*exitcode\s*:\s*3\b", result.stderr), result.stderr[-2000:]  # the planned crash
