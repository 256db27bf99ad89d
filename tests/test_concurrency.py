"""Concurrency: runs sharing a cache or a key never interfere (see reliability.py)."""

from __future__ import annotations

import json
from pathlib import Path

from reliability import (
    SWEEP,
    ForkServer,
    Reference,
    World,
    check_cache,
    check_model_folder,
    record,
)

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
