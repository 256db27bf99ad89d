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
        StatsCache(cache).load(key)
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
