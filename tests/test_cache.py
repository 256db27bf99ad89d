"""The statistics cache: corruption refused with the fix named, keys that cannot escape, symlinks not followed."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from reliability import (
    CORRUPTIONS,
    ForkServer,
    Reference,
    World,
    _flip_a_bit,
    _truncate,
    check_cache,
    entries,
    record,
)

from hybridprune.cache import CorruptEntry, StatsCache, StatsKey, check_key
from hybridprune.errors import UserError


@pytest.mark.parametrize("damage", list(CORRUPTIONS))
def test_corrupt_entry_is_refused_with_its_key_and_the_fix(damage: str, good_entry: Path, tmp_path: Path):
    cache = tmp_path / "cache"
    shutil.copytree(good_entry, cache)
    (entry,) = entries(cache)
    key = StatsKey(**json.loads((entry / "manifest.json").read_text())["key"])
    assert StatsCache(cache).load(key).num_layers == 2
    corrupt, expected = CORRUPTIONS[damage]
    corrupt(entry)
    with pytest.raises(CorruptEntry) as error:
        StatsCache(cache).load(key).all_tensors()  # a layer file is verified when it is first read
    message = str(error.value)
    assert expected in message and key.digest in message
    assert "--force" in message and f"hybridprune cache clear {key.digest}" in message
    record(f"cache entry: {damage}", "refused on load, entry and fix named")


def test_corrupt_entry_through_the_cli(server: ForkServer, world: World, reference: Reference, good_entry: Path, tmp_path: Path):
    cache = tmp_path / "cache"
    shutil.copytree(good_entry, cache)
    (entry,) = entries(cache)
    _flip_a_bit(entry)
    for command in ("calibrate", "score", "prune"):
        refused = server.run(world.args(command), cache)
        assert refused.rc == 2 and "\n" not in refused.message, refused.message
        assert entry.name in refused.message and "--force" in refused.message and "cache clear" in refused.message
    fixed = server.run(world.args("calibrate", "--force"), cache)
    assert fixed.rc == 0, fixed.message
    check_cache(cache, reference, must_exist=True)
    _flip_a_bit(entry, "layer-00001.safetensors")  # read when the pruning reaches that layer
    refused = server.run(world.args("prune", "--out", str(tmp_path / "out")), cache)
    assert refused.rc == 2 and "\n" not in refused.message and "checksum" in refused.message, refused.message
    assert entry.name in refused.message and "cache clear" in refused.message and not (tmp_path / "out").exists()
    _truncate(entry)
    assert server.run(["cache", "clear", entry.name], cache).rc == 0 and entries(cache) == []
    record("corrupt entry met by calibrate / score / prune", "exit 2 naming entry and fix; --force and `cache clear KEY` repair it")



# --- 4. hostile and odd input ---------------------------------------------------------------


@pytest.mark.parametrize(
    "key",
    ["../../etc", "/etc/passwd", "..", "0123456789abcdef0123\n", "0123456789ABCDEF0123", "0123456789abcdef012/", ""],
)
def test_cache_keys_cannot_escape(key: str, tmp_path: Path):
    with pytest.raises(UserError, match="not a cache key"):
        check_key(key)
    with pytest.raises(UserError):
        StatsCache(tmp_path).remove(key)
    record("cache key with `..`, `/`, newline, upper case", "refused")


def test_cache_commands_refuse_a_path_key(server: ForkServer, tmp_path: Path):
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "file").write_text("x")
    for command in ("show", "clear"):
        done = server.run(["cache", command, "../../victim"], tmp_path / "cache")
        assert done.rc == 2 and "not a cache key" in done.message
    assert (victim / "file").read_text() == "x"


def test_a_symlinked_entry_is_unlinked_not_followed(tmp_path: Path):
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "file").write_text("x")
    stats = tmp_path / "cache" / "stats"
    stats.mkdir(parents=True)
    (stats / ("a" * 20)).symlink_to(victim)
    (stats / ("b" * 20)).symlink_to(victim)
    StatsCache(tmp_path / "cache").remove("a" * 20)
    assert StatsCache(tmp_path / "cache").clear() == 1
    assert (victim / "file").read_text() == "x" and not any(stats.iterdir())
    record("cache entry that is a symlink to a user folder, then `cache clear`", "link removed, target untouched")


def test_second_order_entry_is_one_verified_file_per_layer(tiny_llama_folder: Path, tmp_path: Path):
    """Written layer by layer, listed in the manifest with size and checksum; a damaged layer file is refused
    when that layer is read (a truncated or missing one already on load), naming the entry and the fix."""
    import torch

    from helpers import TRAINING_TEXT
    from hybridprune import api
    from hybridprune.calibration.session import second_order_key

    text = tmp_path / "text.txt"
    text.write_text(TRAINING_TEXT * 20)
    result = api.calibrate(model=str(tiny_llama_folder), data=str(text), nsamples=4, seqlen=32, topics=4,
                           cache_dir=tmp_path / "cache", hessians=True)
    assert result.hessians is not None
    entry = Path(result.hessians["entry"])
    manifest = json.loads((entry / "manifest.json").read_text())
    files = sorted(path.name for path in entry.glob("layer-*.safetensors"))
    assert files == ["layer-00000.safetensors", "layer-00001.safetensors"] == sorted(manifest["layer_files"])
    assert manifest["layers"] == 2 and manifest["layer_bytes"] == sum((entry / name).stat().st_size for name in files)
    key = second_order_key(StatsKey(**result.inputs))
    stats = StatsCache(tmp_path / "cache").load(key)
    gram, dead = stats.gram(1, "down_in")
    assert gram.shape[0] == gram.shape[1] == dead.shape[0] and torch.isfinite(gram).all()

    data = bytearray((entry / files[1]).read_bytes())
    data[len(data) // 2] ^= 0x10  # same size, in the tensor data: found only when layer 1 is read
    (entry / files[1]).write_bytes(bytes(data))
    damaged = StatsCache(tmp_path / "cache").load(key)
    damaged.gram(0, "down_in")
    with pytest.raises(CorruptEntry, match=f"{key.digest} is corrupt \\(layer-00001.safetensors: checksum mismatch\\)"):
        damaged.gram(1, "down_in")
    (entry / files[0]).write_bytes((entry / files[0]).read_bytes()[:100])
    with pytest.raises(CorruptEntry, match="layer-00000.safetensors missing or truncated"):
        StatsCache(tmp_path / "cache").load(key)


def test_first_order_entry_is_written_and_read_one_layer_at_a_time(tiny_llama_folder: Path, tmp_path: Path):
    """The first-order entry too: each layer's sums in their own file as the layer finishes (the main file holds
    the token count alone), read back one layer at a time, with the same values a whole in-memory pass gives."""
    import torch
    from safetensors.torch import load_file

    from helpers import TRAINING_TEXT
    from hybridprune import api
    from hybridprune.calibration.collect import CollectionOptions, collect_statistics
    from hybridprune.models import load_model

    text = tmp_path / "text.txt"
    text.write_text(TRAINING_TEXT * 20)
    result = api.calibrate(model=str(tiny_llama_folder), data=str(text), nsamples=4, seqlen=32, topics=4,
                           cache_dir=tmp_path / "cache")
    entry = Path(result.entry)
    manifest = json.loads((entry / "manifest.json").read_text())
    assert sorted(manifest["layer_files"]) == ["layer-00000.safetensors", "layer-00001.safetensors"]
    assert set(load_file(entry / "stats.safetensors")) == {"tokens"}
    assert all(name.startswith("layer.1.") for name in load_file(entry / "layer-00001.safetensors"))

    stats = StatsCache(tmp_path / "cache").load(StatsKey(**result.inputs))
    assert stats.shards is not None and set(stats.tensors) == {"tokens"} and stats.num_layers == 2
    stats.sumsq(0, "mlp_in")
    stats.tau(1)
    assert stats.shards._current is not None and stats.shards._current[0] == 1  # layer 0 has left memory

    # the same values as one pass held whole in memory (no sink), read in one piece
    from hybridprune.calibration.session import calibration_windows
    from hybridprune.config import CalibrationRequest

    loaded = load_model(str(tiny_llama_folder), device="cpu")
    windows, _key = calibration_windows(loaded, CalibrationRequest(data=str(text), nsamples=4, seqlen=32, topics=4),
                                        tmp_path / "cache")
    whole = collect_statistics(loaded.model, loaded.adapter, windows, CollectionOptions(topics=4), batch_size=4)
    read = stats.all_tensors()
    assert read.keys() == whole.tensors.keys()
    for name, tensor in whole.tensors.items():
        assert torch.equal(read[name], tensor), name
