"""Shared machinery of the reliability tests (test_interruption, test_concurrency, test_cache,
test_fsutil, test_hostile_input): a fork server that runs real hybridprune processes, a tiny
world (model + text), uninterrupted reference results, and the fault table.

The kill tests run real processes: `tests/forkserver.py` imports hybridprune once and forks one
process per command, each running exactly what `python -m hybridprune ARGV` runs (one test also
goes through `python -m hybridprune` itself). Each command is killed (SIGKILL or SIGINT) at a
seeded random point within its measured duration; HYBRIDPRUNE_TEST_SLOW_LAYER_S (a test-only
sleep after each calibration batch) stretches the calibration so the points land in it too.
After every kill: no cache entry, score file or output folder may exist unless it is complete
and equal to an uninterrupted run's; the input model folder is unchanged; the next run succeeds,
gives the uninterrupted result and leaves no temporary folder behind.

Set HYBRIDPRUNE_FAULT_TABLE=FILE to get the table of faults tried and what happened (all files).
The fixtures are session-scoped and registered in conftest.py, so the reference runs happen once.
"""


from __future__ import annotations

import hashlib
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from helpers import TRAINING_TEXT, make_tiny_model_folder
from hybridprune.cache import KEY_PATTERN, StatsCache, StatsKey
from hybridprune.calibration.session import HESSIAN_MODE
from hybridprune.fsutil import staging_owner

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


@pytest.fixture(scope="session", autouse=True)
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


@pytest.fixture(scope="session")
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


@pytest.fixture(scope="session")
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


def entry_tensors(entry: Path) -> dict[str, torch.Tensor]:
    """A cache entry's every tensor: its main file and its layer files."""
    tensors = tensors_of(entry / "stats.safetensors")
    for layer_file in sorted(entry.glob("layer-*.safetensors")):
        tensors.update(tensors_of(layer_file))
    return tensors


def same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[name], b[name]) for name in a)


def all_entries(cache: Path) -> list[Path]:
    stats = cache / "stats"
    return sorted(p for p in stats.iterdir() if KEY_PATTERN.fullmatch(p.name)) if stats.is_dir() else []


def _second_order(entry: Path) -> bool:
    return json.loads((entry / "manifest.json").read_text())["key"]["mode"] == HESSIAN_MODE


def entries(cache: Path) -> list[Path]:
    """The calibration statistics entries (what `calibrate` writes)."""
    return [entry for entry in all_entries(cache) if not _second_order(entry)]


def second_order_entries(cache: Path) -> list[Path]:
    """The second-order entries (what the default's --refine and --update need; `prune` collects them)."""
    return [entry for entry in all_entries(cache) if _second_order(entry)]


def hidden_staging(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if staging_owner(p)] if folder.is_dir() else []


@dataclass
class Reference:
    stats: dict[str, torch.Tensor]
    scores: dict[str, torch.Tensor]
    pruned: dict[str, torch.Tensor]
    sweep: dict[str, dict[str, torch.Tensor]]
    seconds: dict[str, float]
    second_order: dict[str, torch.Tensor] | None = None  # the default prune's second-order entry


SWEEP = ("--sparsity", "0.3,0.6")


@pytest.fixture(scope="session")
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
    second = second_order_entries(base / "cache-prune")
    (scores,) = (base / "cache-score" / "scores").glob("*.safetensors")
    sweep = {p.name: tensors_of(p / "model.safetensors") for p in sorted((base / "sweep-out").iterdir()) if p.is_dir()}
    assert len(sweep) == 2
    return Reference(
        stats=entry_tensors(entry),
        scores=tensors_of(scores),
        pruned=tensors_of(base / "prune-out" / "model.safetensors"),
        sweep=sweep,
        seconds=seconds,
        second_order=entry_tensors(second[0]) if second else None,
    )


def check_cache(cache: Path, reference: Reference, *, must_exist: bool) -> None:
    """Every entry present is complete, verifies, and equals the uninterrupted one; nothing else is visible."""
    found, second = entries(cache), second_order_entries(cache)
    assert len(found) <= 1 and len(second) <= 1
    if must_exist:
        assert found, "no cache entry after a complete run"
    for entry, expected in [*((e, reference.stats) for e in found), *((e, reference.second_order) for e in second)]:
        manifest = json.loads((entry / "manifest.json").read_text())
        stats = StatsCache(cache).load(StatsKey(**manifest["key"]))
        assert expected is not None and same_tensors(stats.all_tensors(), expected)
    stats_dir = cache / "stats"
    if stats_dir.is_dir():
        for path in stats_dir.iterdir():
            assert KEY_PATTERN.fullmatch(path.name) or staging_owner(path), f"unexpected {path.name} in the cache"
    listed = sorted(json.dumps(manifest, sort_keys=True) for manifest in StatsCache(cache).entries())
    assert listed == sorted(json.dumps(json.loads((e / "manifest.json").read_text()), sort_keys=True) for e in all_entries(cache))


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



# --- shared by the corruption and hostile-input tests ----------------------------------------


def _flip_a_bit(entry: Path, name: str = "stats.safetensors") -> None:
    data = bytearray((entry / name).read_bytes())
    data[len(data) // 2] ^= 0x10
    (entry / name).write_bytes(bytes(data))


def _truncate(entry: Path, name: str = "stats.safetensors") -> None:
    path = entry / name
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
    "truncated layer file": (lambda e: _truncate(e, "layer-00001.safetensors"), "incomplete"),
    "bit-flipped layer file": (lambda e: _flip_a_bit(e, "layer-00001.safetensors"), "checksum"),
    "hand-edited manifest (tokens)": (_edit_manifest(lambda m: m.update(tokens=m["tokens"] + 1)), "token count"),
    "hand-edited manifest (key field)": (_edit_manifest(lambda m: m["key"].update(seqlen=64)), "other inputs"),
    "hand-edited manifest (broken JSON)": (lambda e: (e / "manifest.json").write_text("{\"schema\": 1,"), "unreadable manifest"),
    "manifest of another schema version": (_edit_manifest(lambda m: m.update(schema=99)), "schema 99"),
    "another model's entry under the right key": (_other_model, "other inputs"),
}


@pytest.fixture(scope="session")
def good_entry(reference: Reference, world: World) -> Path:
    """The uninterrupted calibration's cache (copy it before damaging it)."""
    return world.root / "reference" / "cache-calibrate"




@pytest.fixture(scope="session")
def tiny_model_copy(world: World, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    def copy(name: str) -> Path:
        target = tmp_path_factory.mktemp("models") / name
        shutil.copytree(world.model, target)
        return target

    return copy

