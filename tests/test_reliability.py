"""Reliability and safety: interruption, corruption, concurrency, hostile input, nothing lost.

The kill tests run real processes: `tests/forkserver.py` imports hybridprune once and forks one
process per command, each running exactly what `python -m hybridprune ARGV` runs (one test also
goes through `python -m hybridprune` itself). Each command is killed (SIGKILL or SIGINT) at a
seeded random point within its measured duration; HYBRIDPRUNE_TEST_SLOW_LAYER_S (a test-only
sleep after each calibration batch) stretches the calibration so the points land in it too.
After every kill: no cache entry, score file or output folder may exist unless it is complete
and equal to an uninterrupted run's; the input model folder is unchanged; the next run succeeds,
gives the uninterrupted result and leaves no temporary folder behind.

Set HYBRIDPRUNE_FAULT_TABLE=FILE to get the table of faults tried and what happened.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import select
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from helpers import TRAINING_TEXT, make_tiny_model_folder
from hybridprune.cache import KEY_PATTERN, CorruptEntry, StatsCache, StatsKey, check_key
from hybridprune.errors import UserError
from hybridprune.fsutil import atomic_folder, clean_stale_staging, staging_owner

TESTS = Path(__file__).parent
SEED = 20240611
SLOW_LAYER_S = "0.1"
COMMON = ["--nsamples", "4", "--seqlen", "32", "--topics", "4", "--quiet"]


# --- the fault table ---------------------------------------------------------------------


@dataclass
class FaultRow:
    """One fault and what it did; rows are recorded only after every check of the run passed
    (input model unchanged, results complete or absent), so a loss fails the test instead."""

    fault: str
    repetitions: int = 0
    outcomes: dict[str, int] = field(default_factory=dict)

    def add(self, outcome: str) -> None:
        self.repetitions += 1
        self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1


FAULTS: dict[str, FaultRow] = {}


def record(fault: str, outcome: str) -> None:
    FAULTS.setdefault(fault, FaultRow(fault)).add(outcome)


@pytest.fixture(scope="module", autouse=True)
def fault_table() -> Iterator[None]:
    yield
    lines = ["| fault | repetitions | what happened | data lost or corrupted |", "|---|---|---|---|"]
    for row in FAULTS.values():
        happened = "; ".join(f"{count}x {outcome}" for outcome, count in row.outcomes.items())
        lines.append(f"| {row.fault} | {row.repetitions} | {happened} | no (checked) |")
    table = "\n".join(lines) + "\n"
    if os.environ.get("HYBRIDPRUNE_FAULT_TABLE"):
        Path(os.environ["HYBRIDPRUNE_FAULT_TABLE"]).write_text(table)


# --- processes -----------------------------------------------------------------------------


@dataclass
class Job:
    pid: int
    out: Path
    err: Path
    started: float


@dataclass
class Done:
    rc: int | None
    signal: int | None
    stdout: str
    stderr: str
    seconds: float

    @property
    def message(self) -> str:
        return self.stderr.strip()


class ForkServer:
    """Client of tests/forkserver.py: start, kill and wait for real hybridprune processes."""

    def __init__(self, scratch: Path):
        self.scratch = scratch
        self.count = 0
        env = {**os.environ, "PYTHONPATH": str(TESTS.parent)}
        self.proc = subprocess.Popen(
            [sys.executable, str(TESTS / "forkserver.py")], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
        )
        self.ready = False

    def _reply(self, timeout: float) -> dict[str, Any]:
        readable, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not readable:
            raise TimeoutError
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("the fork server died")
        return json.loads(line)

    def _send(self, request: dict[str, Any]) -> None:
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()

    def start(
        self, argv: list[str], cache: Path, *, slow: bool = False, fsize: int | None = None, prelude: str | None = None
    ) -> Job:
        if not self.ready:
            assert self._reply(120) == {"ready": True}
            self.ready = True
        self.count += 1
        out, err = self.scratch / f"{self.count}.out", self.scratch / f"{self.count}.err"
        env = {
            "HYBRIDPRUNE_CACHE": str(cache),
            "HYBRIDPRUNE_THREADS": "1",
            "HYBRIDPRUNE_TEST_SLOW_LAYER_S": SLOW_LAYER_S if slow else None,
            "HYBRIDPRUNE_DEBUG": None,
        }
        self._send({"op": "run", "argv": argv, "env": env, "cwd": str(self.scratch), "out": str(out), "err": str(err),
                    "fsize": fsize, "prelude": prelude})
        return Job(self._reply(30)["pid"], out, err, time.perf_counter())

    def wait(self, job: Job, timeout: float = 60) -> Done:
        self._send({"op": "wait", "pid": job.pid})
        try:
            reply = self._reply(timeout)
        except TimeoutError:
            os.kill(job.pid, signal.SIGKILL)
            reply = self._reply(30)
            reply["rc"] = "timeout"
        return Done(reply["rc"], reply["signal"], job.out.read_text(), job.err.read_text(), time.perf_counter() - job.started)

    def run(self, argv: list[str], cache: Path, **options: Any) -> Done:
        timeout = options.pop("timeout", 60)
        return self.wait(self.start(argv, cache, **options), timeout)

    def close(self) -> None:
        self.proc.kill()  # every child was waited for; the server itself holds nothing
        self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ForkServer]:
    instance = ForkServer(tmp_path_factory.mktemp("runs"))
    yield instance
    instance.close()


# --- the tiny world: a model, a text, reference (uninterrupted) results --------------------


def tree_hash(folder: Path) -> str:
    """sha256 over every path, mode and file content under `folder` (symlinks by target)."""
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        digest.update(str(path.relative_to(folder)).encode())
        if path.is_symlink():
            digest.update(os.readlink(path).encode())
        elif path.is_file():
            digest.update(oct(path.stat().st_mode).encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


@dataclass
class World:
    model: Path
    text: Path
    model_hash: str
    root: Path

    def args(self, command: str, *extra: str) -> list[str]:
        return [command, "--model", str(self.model), "--data", str(self.text), *COMMON, *extra]


@pytest.fixture(scope="module")
def world(server: ForkServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    root = tmp_path_factory.mktemp("world")
    model = make_tiny_model_folder(root / "model")
    text = root / "text.txt"
    text.write_text(TRAINING_TEXT * 3)
    before = tree_hash(model)
    yield World(model, text, before, root)
    assert tree_hash(model) == before, "the input model folder was written to"


def tensors_of(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path)


def same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[name], b[name]) for name in a)


def entries(cache: Path) -> list[Path]:
    stats = cache / "stats"
    return sorted(p for p in stats.iterdir() if KEY_PATTERN.fullmatch(p.name)) if stats.is_dir() else []


def hidden_staging(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if staging_owner(p)] if folder.is_dir() else []


@dataclass
class Reference:
    stats: dict[str, torch.Tensor]
    scores: dict[str, torch.Tensor]
    pruned: dict[str, torch.Tensor]
    sweep: dict[str, dict[str, torch.Tensor]]
    seconds: dict[str, float]


SWEEP = ("--sparsity", "0.3,0.6")


@pytest.fixture(scope="module")
def reference(server: ForkServer, world: World) -> Reference:
    """Uninterrupted runs of every command (each in a fresh cache), and how long each took."""
    seconds: dict[str, float] = {}
    base = world.root / "reference"
    runs = {
        "calibrate": world.args("calibrate"),
        "score": world.args("score"),
        "prune": world.args("prune", "--out", str(base / "prune-out")),
        "sweep": world.args("prune", *SWEEP, "--out", str(base / "sweep-out")),
    }
    for name, argv in runs.items():
        done = server.run(argv, base / f"cache-{name}", slow=True)
        assert done.rc == 0, done.message
        seconds[name] = done.seconds
    (entry,) = entries(base / "cache-calibrate")
    (scores,) = (base / "cache-score" / "scores").glob("*.safetensors")
    sweep = {p.name: tensors_of(p / "model.safetensors") for p in sorted((base / "sweep-out").iterdir()) if p.is_dir()}
    assert len(sweep) == 2
    return Reference(
        stats=tensors_of(entry / "stats.safetensors"),
        scores=tensors_of(scores),
        pruned=tensors_of(base / "prune-out" / "model.safetensors"),
        sweep=sweep,
        seconds=seconds,
    )


def check_cache(cache: Path, reference: Reference, *, must_exist: bool) -> None:
    """Every entry present is complete, verifies, and equals the uninterrupted one; nothing else is visible."""
    found = entries(cache)
    assert len(found) <= 1
    if must_exist:
        assert found, "no cache entry after a complete run"
    for entry in found:
        manifest = json.loads((entry / "manifest.json").read_text())
        stats = StatsCache(cache).load(StatsKey(**manifest["key"]))
        assert same_tensors(stats.tensors, reference.stats)
    stats_dir = cache / "stats"
    if stats_dir.is_dir():
        for path in stats_dir.iterdir():
            assert KEY_PATTERN.fullmatch(path.name) or staging_owner(path), f"unexpected {path.name} in the cache"
    assert StatsCache(cache).entries() == [json.loads((e / "manifest.json").read_text()) for e in found]


def check_model_folder(folder: Path, expected: dict[str, torch.Tensor]) -> None:
    """A complete pruned model folder equal to the uninterrupted result."""
    assert {"config.json", "model.safetensors", "tokenizer.json", "hybridprune.json"} <= {p.name for p in folder.iterdir()}
    assert same_tensors(tensors_of(folder / "model.safetensors"), expected)
    json.loads((folder / "hybridprune.json").read_text())


def check_outputs(command: str, world: World, work: Path, reference: Reference, *, complete: bool) -> None:
    cache = work / "cache"
    check_cache(cache, reference, must_exist=complete)
    scores = sorted((cache / "scores").glob("*.safetensors")) if (cache / "scores").is_dir() else []
    if command == "score":
        assert len(scores) == 1 or not complete
        for path in scores:
            assert same_tensors(tensors_of(path), reference.scores)
    out = work / "out"
    if command == "prune":
        if complete or out.exists():
            check_model_folder(out, reference.pruned)
    if command == "sweep" and out.exists():
        visible = sorted(p for p in out.iterdir() if not staging_owner(p))
        if complete:
            assert [p.name for p in visible] == sorted(reference.sweep)
        for folder in visible:
            check_model_folder(folder, reference.sweep[folder.name])
    assert tree_hash(world.model) == world.model_hash


def argv_for(command: str, world: World, work: Path, *extra: str) -> list[str]:
    out = ["--out", str(work / "out")]
    return {
        "calibrate": world.args("calibrate", *extra),
        "score": world.args("score", *extra),
        "prune": world.args("prune", *out, *extra),
        "sweep": world.args("prune", *SWEEP, *out, *extra),
    }[command]


# --- 1. interruption ---------------------------------------------------------------------


KILLS = {"calibrate": 4, "score": 3, "prune": 3, "sweep": 3}


@pytest.mark.parametrize("command", list(KILLS))
def test_kill_at_random_points_leaves_nothing_half_done(
    command: str, server: ForkServer, world: World, reference: Reference, tmp_path: Path, dash_m_sigint: DashM
) -> None:
    """(dash_m_sigint is only started here, to run alongside.)"""
    rng = random.Random(f"{SEED}-{command}")
    duration = reference.seconds[command]
    for rep in range(KILLS[command]):
        sig = (signal.SIGKILL, signal.SIGINT)[rep % 2]
        work = tmp_path / f"rep{rep}"
        delay = rng.uniform(0.05, duration)
        job = server.start(argv_for(command, world, work), work / "cache", slow=True)
        time.sleep(max(0.0, delay - (time.perf_counter() - job.started)))
        os.kill(job.pid, sig)
        killed = server.wait(job)
        if killed.rc == 0:
            outcome = "finished before the signal"
        elif killed.signal == signal.SIGKILL:
            outcome = "killed"
        else:
            assert killed.rc in (130, 1), killed.message  # 1: click's "Aborted!" when it lands outside the command
            outcome = "interrupted, exit 130" if killed.rc == 130 else "interrupted before the command, exit 1"
        check_outputs(command, world, work, reference, complete=killed.rc == 0)
        if killed.rc != 0:
            saved = {"calibrate": bool(entries(work / "cache")), "score": bool(list((work / "cache").glob("scores/*.safetensors"))),
                     "prune": (work / "out").exists(), "sweep": (work / "out").is_dir() and any(
                         not staging_owner(p) for p in (work / "out").iterdir())}[command]
            outcome += " after its result was saved" if saved else " before any result was saved"
        if killed.rc == 130 and killed.message:  # empty when it lands while click parses the arguments
            assert "interrupted" in killed.message and "\n" not in killed.message, killed.message
        again = server.run(argv_for(command, world, work), work / "cache")
        if command in ("prune", "sweep") and again.rc == 2:  # (some of) the output was saved: replacing needs --overwrite
            assert "--overwrite" in again.message
            again = server.run(argv_for(command, world, work, "--overwrite"), work / "cache")
        assert again.rc == 0, again.message
        check_outputs(command, world, work, reference, complete=True)
        assert not hidden_staging(work / "cache" / "stats") and not hidden_staging(work) and not hidden_staging(work / "out")
        record(f"{sig.name} at a random point of `{command}`", f"{outcome}, next run clean and identical")
        print(f"{command} rep {rep}: {sig.name} at {delay:.2f}s of {duration:.2f}s -> {outcome}")


CRASH_AT_RENAME = """
import os, signal, hybridprune.fsutil as f
f._fsync_tree = lambda folder: os.kill(os.getpid(), signal.SIGKILL)
"""
CRASH_AFTER_SWAP = """
import os, signal, hybridprune.fsutil as f
real = f._exchange
def exchange(a, b):
    real(a, b)
    os.kill(os.getpid(), signal.SIGKILL)
f._exchange = exchange
"""
CRASH_BETWEEN_TWO_RENAMES = """
import os, signal, hybridprune.fsutil as f
f._exchange = lambda a, b: False
real = os.replace
def replace(a, b):
    real(a, b)
    if str(b).endswith("content"):
        os.kill(os.getpid(), signal.SIGKILL)
f.os.replace = replace
"""


def test_kill_between_write_and_rename_of_a_cache_entry(server: ForkServer, world: World, reference: Reference, tmp_path: Path):
    cache = tmp_path / "cache"
    killed = server.run(world.args("calibrate"), cache, prelude=CRASH_AT_RENAME)
    assert killed.signal == signal.SIGKILL
    assert entries(cache) == [] and len(hidden_staging(cache / "stats")) == 1
    assert StatsCache(cache).entries() == []  # the complete-looking staging folder is not an entry
    again = server.run(world.args("calibrate", "--json"), cache)
    assert again.rc == 0 and json.loads(again.stdout)["reused"] is False
    check_cache(cache, reference, must_exist=True)
    assert hidden_staging(cache / "stats") == []
    record("SIGKILL after a cache entry is written, before its rename", "no entry; next run recalibrated and removed the leftover")


def test_kill_during_overwrite_keeps_old_or_new_never_a_mix(server: ForkServer, world: World, reference: Reference, tmp_path: Path):
    cache, out = tmp_path / "cache", tmp_path / "out"
    assert server.run(world.args("prune", "--sparsity", "0.3", "--out", str(out)), cache).rc == 0
    old = tree_hash(out)
    overwrite = world.args("prune", "--out", str(out), "--overwrite")

    killed = server.run(overwrite, cache, prelude=CRASH_AT_RENAME)
    assert killed.signal == signal.SIGKILL and tree_hash(out) == old
    record("SIGKILL in `prune --out --overwrite` before the swap", "previous output intact")

    killed = server.run(overwrite, cache, prelude=CRASH_AFTER_SWAP)
    assert killed.signal == signal.SIGKILL
    check_model_folder(out, reference.pruned)
    assert len(hidden_staging(tmp_path)) == 1  # the previous content, now a leftover
    record("SIGKILL in `prune --out --overwrite` right after the atomic swap", "new output complete; old one left hidden, cleaned next run")

    assert server.run(world.args("prune", "--sparsity", "0.3", "--out", str(out), "--overwrite"), cache,
                      prelude=CRASH_BETWEEN_TWO_RENAMES).signal == signal.SIGKILL
    assert not out.exists()  # the fallback path's one window: the previous output waits in .out.old-*
    assert clean_stale_staging(tmp_path) >= 1
    check_model_folder(out, reference.pruned)  # moved back into place, complete
    assert hidden_staging(tmp_path) == []
    record("SIGKILL between the two renames of the no-renameat2 fallback", "previous output restored by the next run's cleanup")


# --- 3. concurrency ----------------------------------------------------------------------


def test_two_calibrations_of_one_key_make_one_entry(server: ForkServer, world: World, reference: Reference, tmp_path: Path):
    cache = tmp_path / "cache"
    jobs = [server.start(world.args("calibrate", "--json"), cache, slow=True) for _ in range(2)]
    done = [server.wait(job) for job in jobs]
    assert all(d.rc == 0 for d in done), [d.message for d in done]
    assert sorted(json.loads(d.stdout)["reused"] for d in done) == [False, True]
    check_cache(cache, reference, must_exist=True)
    record("two `calibrate` of the same key at once", "one computed, the other waited and reused it")


def test_two_sweeps_to_different_outputs_do_not_interfere(server: ForkServer, world: World, reference: Reference, tmp_path: Path):
    cache = tmp_path / "cache"
    outs = [tmp_path / "a", tmp_path / "b"]
    jobs = [server.start(world.args("prune", *SWEEP, "--out", str(out)), cache, slow=True) for out in outs]
    done = [server.wait(job) for job in jobs]
    assert all(d.rc == 0 for d in done), [d.message for d in done]
    for out in outs:
        assert sorted(p.name for p in out.iterdir()) == sorted(reference.sweep)
        for name, expected in reference.sweep.items():
            check_model_folder(out / name, expected)
    check_cache(cache, reference, must_exist=True)
    record("two sweeps at once, sharing a cache, different --out", "both complete and identical to a lone run")


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


# --- 2. corruption -----------------------------------------------------------------------


def _flip_a_bit(entry: Path) -> None:
    data = bytearray((entry / "stats.safetensors").read_bytes())
    data[len(data) // 2] ^= 0x10
    (entry / "stats.safetensors").write_bytes(bytes(data))


def _truncate(entry: Path) -> None:
    path = entry / "stats.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _edit_manifest(change):  # type: ignore[no-untyped-def]
    def edit(entry: Path) -> None:
        manifest = json.loads((entry / "manifest.json").read_text())
        change(manifest)
        (entry / "manifest.json").write_text(json.dumps(manifest))

    return edit


def _other_model(entry: Path) -> None:
    """Another model's entry under this key: same file layout, another fingerprint in its manifest."""
    manifest = json.loads((entry / "manifest.json").read_text())
    manifest["key"]["model_fingerprint"] = "0" * 32
    manifest["digest"] = StatsKey(**manifest["key"]).digest
    (entry / "manifest.json").write_text(json.dumps(manifest))


CORRUPTIONS = {
    "truncated stats.safetensors": (_truncate, "incomplete"),
    "bit-flipped stats.safetensors": (_flip_a_bit, "checksum"),
    "hand-edited manifest (tokens)": (_edit_manifest(lambda m: m.update(tokens=m["tokens"] + 1)), "token count"),
    "hand-edited manifest (key field)": (_edit_manifest(lambda m: m["key"].update(seqlen=64)), "other inputs"),
    "hand-edited manifest (broken JSON)": (lambda e: (e / "manifest.json").write_text("{\"schema\": 1,"), "unreadable manifest"),
    "manifest of another schema version": (_edit_manifest(lambda m: m.update(schema=99)), "schema 99"),
    "another model's entry under the right key": (_other_model, "other inputs"),
}


@pytest.fixture(scope="module")
def good_entry(reference: Reference, world: World) -> Path:
    """The uninterrupted calibration's cache (copy it before damaging it)."""
    return world.root / "reference" / "cache-calibrate"


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


@pytest.mark.parametrize("name", ["../evil", "/abs", "a/b", "..", ".hidden", "x" * 65, "bad name", "ok\n"])
def test_preset_names_cannot_escape(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from hybridprune.presets import check_name, get_preset, save_user_preset

    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    if name != "ok\n":  # check_name's `$` lets a trailing newline through; the TOML round trip then refuses it
        with pytest.raises(UserError):
            check_name(name)
    with pytest.raises(UserError):
        save_user_preset(name, {"sparsity": 0.5})
    with pytest.raises(UserError, match="unknown preset"):
        get_preset(name)
    assert not (tmp_path / "config").exists() or not any((tmp_path / "config").rglob("*.toml"))
    record("preset name with `..`, `/`, absolute, too long", "refused, nothing written")


def test_output_paths_cannot_hit_the_model_or_escape(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from hybridprune.prune import check_output_folder

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


@pytest.fixture(scope="module")
def tiny_model_copy(world: World, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    def copy(name: str) -> Path:
        target = tmp_path_factory.mktemp("models") / name
        shutil.copytree(world.model, target)
        return target

    return copy


def test_remote_code_is_not_run_without_the_flag(tiny_model_copy, tmp_path: Path):  # type: ignore[no-untyped-def]
    from hybridprune.models import load_model

    marker = tmp_path / "EXECUTED"
    model = tiny_model_copy("remote-code")
    code = f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n"
    (model / "modeling_evil.py").write_text(code)
    (model / "tokenization_evil.py").write_text(code)
    config = json.loads((model / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilModel", "AutoConfig": "modeling_evil.EvilConfig"}
    (model / "config.json").write_text(json.dumps(config))
    before = tree_hash(model)
    with pytest.raises(UserError, match="--trust-remote-code"):
        load_model(str(model), cache_dir=tmp_path / "cache")
    assert not marker.exists()
    record("model folder with auto_map code, no --trust-remote-code", "refused, code not run")

    only_tokenizer = tiny_model_copy("remote-tokenizer")
    (only_tokenizer / "tokenization_evil.py").write_text(code)
    tokenizer_config = json.loads((only_tokenizer / "tokenizer_config.json").read_text())
    tokenizer_config["auto_map"] = {"AutoTokenizer": [None, "tokenization_evil.EvilTokenizer"]}
    (only_tokenizer / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    try:
        load_model(str(only_tokenizer), cache_dir=tmp_path / "cache")
        outcome = "loaded with the built-in tokenizer, code not run"
    except UserError:
        outcome = "refused, code not run"
    assert not marker.exists()
    assert tree_hash(model) == before
    record("tokenizer_config auto_map code, no --trust-remote-code", outcome)


def test_pickled_weights_are_never_unpickled(world: World, tmp_path: Path):
    from hybridprune.models import load_model

    marker = tmp_path / "UNPICKLED"

    class Evil:
        def __reduce__(self):  # type: ignore[no-untyped-def]
            return (os.system, (f"touch {marker}",))

    model = tmp_path / "pickled"
    model.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(world.model / name, model / name)
    weights: dict[str, Any] = dict(load_file(world.model / "model.safetensors"))
    weights["payload"] = Evil()
    torch.save(weights, model / "pytorch_model.bin")
    with pytest.raises(UserError, match="never unpickles"):
        load_model(str(model), cache_dir=tmp_path / "cache")
    assert not marker.exists()
    record("pytorch_model.bin with a code-running pickle", "refused with one line, nothing executed")


def test_truncated_weights_fail_fast(server: ForkServer, world: World, tiny_model_copy, tmp_path: Path):  # type: ignore[no-untyped-def]
    model = tiny_model_copy("truncated")
    weights = model / "model.safetensors"
    os.truncate(weights, weights.stat().st_size // 2)
    done = server.run(["calibrate", "--model", str(model), "--data", str(world.text), *COMMON], tmp_path / "cache", timeout=30)
    assert done.rc == 2 and "truncated" in done.message, done
    record("truncated model.safetensors", "exit 2, one line (it used to hang)")


def test_odd_text_files(world: World, tmp_path: Path):
    from transformers import AutoTokenizer

    from hybridprune.data import load_text, tokenize
    from hybridprune.data.tokens import encode_text

    cases = {
        "empty": (b"", "no text"),
        "only whitespace": (b" \n\n\t \n", "no text"),
        "binary": (bytes(range(256)) * 4, "binary"),
        "non-UTF-8 (Latin-1)": ("café crème".encode("latin-1"), "not UTF-8"),
        "UTF-16": ("hello world".encode("utf-16"), "binary"),
        "cut inside a character": ("abc é".encode()[:-1], "not UTF-8"),
    }
    for what, (data, expected) in cases.items():
        path = tmp_path / f"{what}.txt"
        path.write_bytes(data)
        with pytest.raises(UserError, match=expected):
            load_text(str(path))
        record(f"text file: {what}", "clear one-line error")
    for what, spec in {"a folder": tmp_path, "missing": tmp_path / "nope.txt", "a .exe": tmp_path / "x.exe"}.items():
        if what == "a .exe":
            Path(spec).write_bytes(b"MZ")
        with pytest.raises(UserError):
            load_text(str(spec))

    tokenizer = AutoTokenizer.from_pretrained(world.model)
    line = " ".join(f"word{i % 97}" for i in range(36_000))  # ~250 KB on one line: over 2 x CHUNK_CHARS
    path = tmp_path / "one-line.txt"
    path.write_text(line)
    ids = tokenize(load_text(str(path)), tokenizer, cache_dir=tmp_path / "tokens")
    assert torch.equal(ids, encode_text(line, tokenizer, chunk_chars=10**9))
    bom = tmp_path / "bom.txt"
    bom.write_bytes("\ufeffhello world".encode())
    assert load_text(str(bom)).text == "hello world"
    record("text file: one 250 KB line / UTF-8 BOM", "handled (same ids as one-shot tokenizing)")


def _poison(model: Path, tensor: str, value: float) -> None:
    weights = load_file(model / "model.safetensors")
    weights[tensor].view(-1)[0] = value
    save_file(weights, model / "model.safetensors", metadata={"format": "pt"})


@pytest.mark.parametrize(
    ("tensor", "value", "expected"),
    [
        ("model.layers.1.self_attn.q_proj.weight", float("nan"), "layer 1 .*q_proj weights"),
        ("model.layers.1.mlp.up_proj.weight", float("inf"), "layer 1 .*up_proj weights"),
        ("model.layers.1.post_attention_layernorm.weight", float("inf"), "layer 1 .*activations"),
    ],
)
def test_nan_or_inf_is_reported_by_layer(tensor: str, value: float, expected: str, tiny_model_copy, world: World, tmp_path: Path):  # type: ignore[no-untyped-def]
    from hybridprune.calibration.session import CalibrationRequest, calibrated_statistics
    from hybridprune.models import load_model
    from hybridprune.reporting import SilentReporter

    model = tiny_model_copy(f"poisoned-{tensor}-{value}")
    _poison(model, tensor, value)
    loaded = load_model(str(model), cache_dir=tmp_path / "cache")
    request = CalibrationRequest(data=str(world.text), nsamples=4, seqlen=32, topics=4)
    cache = StatsCache(tmp_path / "cache")
    with pytest.raises(UserError, match=f"NaN or Inf at {expected}.*nothing was cached"):
        calibrated_statistics(loaded, request, cache, SilentReporter())
    assert entries(tmp_path / "cache") == []
    record(f"{'NaN' if value != value else 'Inf'} in {tensor.removeprefix('model.')} during calibration",
           "refused naming layer 1, nothing cached")


def test_prune_refuses_nan_weights_by_layer(good_entry: Path, tiny_model_copy, tmp_path: Path):  # type: ignore[no-untyped-def]
    from hybridprune.config import PruneConfig
    from hybridprune.models import load_model
    from hybridprune.prune import prune_model
    from hybridprune.reporting import SilentReporter

    (entry,) = entries(good_entry)
    stats = StatsCache(good_entry).load(StatsKey(**json.loads((entry / "manifest.json").read_text())["key"]))
    model = tiny_model_copy("nan-prune")
    _poison(model, "model.layers.1.mlp.down_proj.weight", float("nan"))
    loaded = load_model(str(model), cache_dir=tmp_path / "cache")
    with pytest.raises(UserError, match="layer 1 down_proj has NaN or Inf weights"):
        prune_model(loaded, stats, PruneConfig(sparsity=0.5).validate(), SilentReporter())
    stats.tensors["layer.0.mlp_in.sumsq"][0] = float("inf")
    with pytest.raises(UserError, match="layer 0 .*NaN or Inf activations"):
        prune_model(load_model(str(tiny_model_copy("clean")), cache_dir=tmp_path / "cache"), stats,
                    PruneConfig(sparsity=0.5).validate(), SilentReporter())
    record("NaN weights / Inf statistics met by prune", "refused naming the layer and module")


# --- the real entry point ----------------------------------------------------------------


@dataclass
class DashM:
    proc: subprocess.Popen
    thread: threading.Thread
    cache: Path
    stderr: list[str]


@pytest.fixture(scope="module")
def dash_m_sigint(world: World, reference: Reference, tmp_path_factory: pytest.TempPathFactory) -> DashM:
    """`python -m hybridprune calibrate`, interrupted by SIGINT once its calibration has begun.

    It pays the full import (~10 s on a busy machine), so it starts with the kill tests (after the
    reference timings, which it would skew) and runs in the background while they use the fork
    server; test_sigint_through_python_dash_m collects it."""
    cache = tmp_path_factory.mktemp("dash-m") / "cache"
    env = {**os.environ, "HYBRIDPRUNE_CACHE": str(cache), "HYBRIDPRUNE_THREADS": "1", "HYBRIDPRUNE_TEST_SLOW_LAYER_S": "2"}
    env.pop("HYBRIDPRUNE_DEBUG", None)
    proc = subprocess.Popen([sys.executable, "-m", "hybridprune", *world.args("calibrate")], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stderr: list[str] = []

    def interrupt() -> None:
        deadline = time.monotonic() + 300  # generous: a loaded machine can take minutes to import
        while not (cache / "locks").is_dir() or not any((cache / "locks").glob("*.lock")):  # calibration has begun
            if time.monotonic() > deadline or proc.poll() is not None:
                break
            time.sleep(0.05)
        time.sleep(0.3)  # inside the calibration (2 s per layer)
        proc.send_signal(signal.SIGINT)
        stderr.append(proc.communicate(timeout=60)[1])

    thread = threading.Thread(target=interrupt, daemon=True)
    thread.start()
    return DashM(proc, thread, cache, stderr)


def test_sigint_through_python_dash_m(dash_m_sigint: DashM) -> None:
    """The same fault through `python -m hybridprune` itself: SIGINT while calibrating."""
    dash_m_sigint.thread.join(timeout=400)
    assert dash_m_sigint.stderr, "the process did not finish"
    assert dash_m_sigint.proc.returncode == 130 and "interrupted" in dash_m_sigint.stderr[0], dash_m_sigint.stderr
    assert entries(dash_m_sigint.cache) == [] and hidden_staging(dash_m_sigint.cache / "stats") == []
    record("SIGINT during calibration of `python -m hybridprune calibrate`", "exit 130, one line, nothing cached")


# --- mask properties the issue lists, at the level of a whole layer ------------------------


@settings(max_examples=40, deadline=None)
@given(
    hidden_blocks=st.integers(min_value=1, max_value=4),
    neurons_blocks=st.integers(min_value=1, max_value=6),
    sparsity=st.floats(min_value=0.0, max_value=0.95),
    pattern=st.sampled_from(["unstructured", "2:4", "1:4", "4:8", "structured"]),
    method=st.sampled_from(["hybrid", "wanda", "magnitude"]),
    seed=st.integers(min_value=0, max_value=2**31 - 1),
)
def test_layer_masks_exact_valid_deterministic(
    hidden_blocks: int, neurons_blocks: int, sparsity: float, pattern: str, method: str, seed: int
) -> None:
    """layer_masks for any shape and sparsity: exact counts, valid N:M blocks, whole neurons, same output twice."""
    from hybridprune.masks import parse_pattern, prune_counts
    from hybridprune.methods.hybrid import LayerPlan, layer_masks

    generator = torch.Generator().manual_seed(seed)
    hidden, neurons = 8 * hidden_blocks, 8 * neurons_blocks
    shapes = {"q": (hidden, hidden), "o": (hidden, hidden), "gate": (neurons, hidden), "up": (neurons, hidden), "down": (hidden, neurons)}
    weights = {name: torch.randn(shape, generator=generator) for name, shape in shapes.items()}
    sumsq = {name: torch.rand(shape[1], generator=generator, dtype=torch.float64) for name, shape in shapes.items()}
    score = torch.rand(neurons, generator=generator, dtype=torch.float64) + 1e-3
    mlp_method = "neuronrank" if method == "hybrid" else method
    plan = LayerPlan(method if method != "hybrid" else "wanda", mlp_method, sparsity, sparsity, pattern)
    masks = layer_masks(weights, sumsq, ("q", "o"), ("gate", "up", "down"), plan, score if method == "hybrid" else None)
    again = layer_masks(weights, sumsq, ("q", "o"), ("gate", "up", "down"), plan, score if method == "hybrid" else None)
    assert masks.keys() == again.keys() and all(torch.equal(masks[k], again[k]) for k in masks)
    parsed = parse_pattern(pattern)
    for name, mask in masks.items():
        assert mask.dtype == torch.bool
        if name == "neurons":
            assert int((~mask).sum()) == int(prune_counts(torch.tensor([neurons]), sparsity)[0])
        elif parsed.kind == "nm":
            assert bool(((~mask.reshape(-1, parsed.m)).sum(dim=1) == parsed.n).all())
        else:
            rows, cols = mask.shape
            expected = int(prune_counts(torch.full((rows,), cols), sparsity).sum())
            assert int((~mask).sum()) == expected, (name, pattern, sparsity)
    if sparsity > 0:
        expected_keys = {"q", "o", "neurons"} if parsed.kind == "structured" else set(shapes)
        assert set(masks) == expected_keys
