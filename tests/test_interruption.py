"""Interruption: SIGKILL / SIGINT at random points of every command leaves nothing half done (see reliability.py)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from reliability import (
    SEED,
    ForkServer,
    Reference,
    World,
    argv_for,
    check_cache,
    check_model_folder,
    check_outputs,
    entries,
    hidden_staging,
    record,
    tree_hash,
)

from hybridprune.cache import StatsCache
from hybridprune.fsutil import clean_stale_staging, staging_owner

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
    # SIG_DFL first: a test run started in the background inherits SIGINT ignored, and Python then never
    # installs its KeyboardInterrupt handler in the child
    proc = subprocess.Popen([sys.executable, "-m", "hybridprune", *world.args("calibrate")], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
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
