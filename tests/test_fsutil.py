"""fsutil: atomic writes, full disks, output folders; nothing the user had is ever lost."""

from __future__ import annotations

from pathlib import Path

import pytest
from reliability import (
    ForkServer,
    Reference,
    World,
    check_cache,
    check_model_folder,
    entries,
    hidden_staging,
    record,
    tree_hash,
)

from hybridprune.cache import StatsCache
from hybridprune.errors import UserError
from hybridprune.fsutil import atomic_folder

# --- 5. nothing lost: full disk, --out rules -----------------------------------------------


def test_full_disk_leaves_the_previous_state(server: ForkServer, world: World, reference: Reference, tmp_path: Path):
    cache, out = tmp_path / "cache", tmp_path / "out"
    assert server.run(world.args("prune", "--sparsity", "0.3", "--out", str(out)), cache).rc == 0
    old_out, (entry,) = tree_hash(out), entries(cache)
    old_entry = tree_hash(entry)

    failed = server.run(world.args("prune", "--out", str(out), "--overwrite"), cache, fsize=100_000)
    assert failed.rc == 2 and "could not write" in failed.message and "\n" not in failed.message, failed.message
    assert tree_hash(out) == old_out and hidden_staging(tmp_path) == []
    record("full disk (RLIMIT_FSIZE) while `prune --out --overwrite` saves", "exit 2, one line; previous output intact")

    failed = server.run(world.args("calibrate", "--force"), cache, fsize=8_000)
    assert failed.rc == 2 and "could not write" in failed.message, failed.message
    assert tree_hash(entry) == old_entry and hidden_staging(cache / "stats") == []
    check_cache(cache, reference, must_exist=True)
    record("full disk (RLIMIT_FSIZE) while `calibrate --force` replaces an entry", "exit 2, one line; previous entry intact")


class FailingWrite(OSError):
    pass


def test_failing_writer_in_process_keeps_previous_state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    final = tmp_path / "target"
    final.mkdir()
    (final / "old.txt").write_text("previous")
    before = tree_hash(final)
    for point in ("first file", "later file"):
        with pytest.raises(UserError, match="could not write .*No space left.*previous content is intact"):
            with atomic_folder(final, replace=True) as staging:
                (staging / "a.bin").write_bytes(b"x" * 1000)
                if point == "later file":
                    (staging / "b.bin").write_bytes(b"y" * 1000)
                raise FailingWrite(28, "No space left on device")
        assert tree_hash(final) == before and hidden_staging(tmp_path) == []
        record(f"writer fails with ENOSPC at the {point} (in process)", "UserError; previous folder intact, no leftovers")


def test_replace_without_renameat2_and_cleanup_spares_live_writers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    import hybridprune.fsutil as fsutil

    final = tmp_path / "target"
    final.mkdir()
    (final / "old.txt").write_text("previous")
    monkeypatch.setattr(fsutil, "_exchange", lambda first, second: False)
    with atomic_folder(final, replace=True) as staging:
        (staging / "new.txt").write_text("new")
    assert [p.name for p in final.iterdir()] == ["new.txt"] and hidden_staging(tmp_path) == []

    cache = StatsCache(tmp_path / "cache")
    dead = cache.stats_dir / f".{'c' * 20}.tmp-999999999-abc"  # a pid that cannot exist: its writer is gone
    dead.mkdir(parents=True)
    with atomic_folder(cache.stats_dir / ("d" * 20)) as live:
        (live / "manifest.json").write_text("{}")
        assert cache.entries() == [] and cache.clear() == 0
        assert live.is_dir() and not dead.exists()  # the live writer's folder is spared, the dead one's removed
    assert (cache.stats_dir / ("d" * 20) / "manifest.json").is_file()
    record("`cache clear` while another process writes an entry", "live staging spared, dead one removed")


def test_out_over_a_non_empty_folder(server: ForkServer, world: World, reference: Reference, tmp_path: Path):
    cache, out = tmp_path / "cache", tmp_path / "out"
    out.mkdir()
    (out / "keep-me.txt").write_text("user data")
    refused = server.run(world.args("prune", "--out", str(out)), cache)
    assert refused.rc == 2 and "--overwrite" in refused.message
    assert (out / "keep-me.txt").read_text() == "user data"
    done = server.run(world.args("prune", "--out", str(out), "--overwrite"), cache)
    assert done.rc == 0, done.message
    check_model_folder(out, reference.pruned)
    assert not (out / "keep-me.txt").exists() and hidden_staging(tmp_path) == []
    record("`--out` over a non-empty folder", "refused without --overwrite; replaced whole with it")



def test_output_paths_cannot_hit_the_model_or_escape(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from hybridprune.saving import check_output_folder

    model = tmp_path / "model"
    (model / "sub").mkdir(parents=True)
    (model / "config.json").write_text("{}")
    link = tmp_path / "link"
    link.symlink_to(model)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out_link = tmp_path / "out-link"
    out_link.symlink_to(elsewhere)
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    monkeypatch.chdir(tmp_path / "model" / "sub")
    refused = {
        "model folder": model,
        "inside the model folder": model / "sub" / "out",
        "model folder through `..`": tmp_path / "elsewhere" / ".." / "model",
        "model folder through a symlink": link / "out",
        "parent of the model folder": tmp_path,
        "a symlink": out_link,
        "a file": a_file,
        "the current folder": Path("."),
        "the current folder, relative `..`": Path("../sub/"),
    }
    for what, out in refused.items():
        with pytest.raises(UserError):
            check_output_folder(out, model, overwrite=True)
        record(f"--out is {what}", "refused")
    assert check_output_folder(tmp_path / "new", model, overwrite=False) == tmp_path / "new"


def test_atomic_file_replaces_whole_or_not_at_all(tmp_path: Path):
    from hybridprune.fsutil import atomic_file, atomic_write_text

    target = tmp_path / "sub" / "file.txt"
    atomic_write_text(target, "first")
    assert target.read_text() == "first"
    with pytest.raises(RuntimeError):
        with atomic_file(target) as temporary:
            temporary.write_text("half")
            raise RuntimeError("killed mid-write")
    assert target.read_text() == "first"
    assert sorted(p.name for p in target.parent.iterdir()) == ["file.txt"]  # no temporary left behind
    atomic_write_text(target, "second")
    assert target.read_text() == "second" and oct(target.stat().st_mode & 0o777) != "0o600"


def test_file_lock_excludes_another_process(tmp_path: Path):
    import multiprocessing

    from hybridprune.fsutil import file_lock

    lock = tmp_path / "locks" / "a.lock"
    with file_lock(lock):
        child = multiprocessing.get_context("spawn").Process(target=_try_lock, args=(str(lock),))
        child.start()
        child.join(timeout=60)
        assert child.exitcode == 3  # the child found the lock held
    with file_lock(lock):
        pass


def _try_lock(path: str) -> None:
    from filelock import FileLock, Timeout

    try:
        FileLock(path, timeout=0.2).acquire()
    except Timeout:
        raise SystemExit(3) from None
    raise SystemExit(0)
