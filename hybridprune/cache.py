"""The statistics cache: one folder per key holding `stats.safetensors` and `manifest.json`.

Layout under the cache root (see fsutil.cache_root):
  stats/<key>/stats.safetensors   the reduced sums (calibration/stats.py names them)
  stats/<key>/manifest.json       schema, key fields, tool version, creation time, tokens,
                                  layers, byte size and sha256 of stats.safetensors
  locks/<key>.lock                flock held while an entry is being computed
  stats/<key>/layer-00000.safetensors ...  one file per decoder layer, written as that layer finishes and
                                  read one at a time (safetensors safe_open), each with its own size and
                                  sha256 in the manifest ("layer_files"); stats.safetensors then holds only
                                  the token count. (First-order entries written before 2026-12-06 hold every
                                  layer in stats.safetensors, without layer files: they load as they are.)
A partial entry (`calibrate --shard i/N`) holds one shard's windows; its key is the full key
plus the shard fields, its manifest names the full key, and `calibration.shards.merge_shard_entries` joins the N
shards into the entry one process would have written (calibration/shards.py).
An entry is written to a temporary folder and renamed into place, so a reader sees a
complete entry or none. Loading re-checks the manifest against the requested key and the
file's checksum (a layer file's when that layer is first read), and refuses anything that does not match.
Nothing is ever unpickled.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hybridprune.env import __version__
from hybridprune.errors import UserError
from hybridprune.fsutil import atomic_folder, clean_stale_staging, ensure_writable_dir, file_lock, sha256_file

if TYPE_CHECKING:
    from torch import Tensor

    from hybridprune.calibration.stats import CalibrationStats

SCHEMA_VERSION = 2  # 2: block-influence sums per layer (structured.py)
KEY_PATTERN = re.compile(r"^[0-9a-f]{20}$")
STATS_FILE = "stats.safetensors"
MANIFEST_FILE = "manifest.json"
LAYER_FILE = "layer-{:05d}.safetensors"
LAYER_NAME = re.compile(r"layer\.(\d+)\.")


@dataclass(frozen=True)
class StatsKey:
    """Everything that changes the statistics, and nothing else (sparsity, exponents, pattern are not here)."""

    model_fingerprint: str
    dtype: str
    tokenizer_fingerprint: str
    text_name: str
    text_split: str
    text_fingerprint: str
    nsamples: int
    seqlen: int
    seed: int
    topics: int
    q_active: float
    mode: str = "dense"  # "dense", or "sequential:<digest of the pruning configuration>"
    schema: int = SCHEMA_VERSION
    #     # A partial entry (`calibrate --shard i/N`): the windows of one shard, fitted on an anchor batch
    # of `anchor_windows` windows. None in a full entry, and then absent from fields() and the digest.
    shard_index: int | None = None
    shard_count: int | None = None
    anchor_windows: int | None = None

    def fields(self) -> dict[str, Any]:
        return {name: value for name, value in dataclasses.asdict(self).items() if value is not None}

    def full(self) -> StatsKey:
        """The key of the entry that all shards together make."""
        return dataclasses.replace(self, shard_index=None, shard_count=None, anchor_windows=None)

    def for_shard(self, index: int, count: int, anchor_windows: int) -> StatsKey:
        return dataclasses.replace(self, shard_index=index, shard_count=count, anchor_windows=anchor_windows)

    @property
    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.fields(), sort_keys=True).encode()).hexdigest()[:20]


def check_key(key: str) -> str:
    """Cache keys come from users too (`cache show KEY`): only plain hex names, never a path."""
    if not isinstance(key, str) or not KEY_PATTERN.fullmatch(key):
        raise UserError(f"'{key}' is not a cache key (20 hex characters): see `hybridprune cache list`")
    return key


class CorruptEntry(UserError):
    """A cache entry that fails verification; never used silently."""


def fix_hint(key: str) -> str:
    return f"rerun with --force or run `hybridprune cache clear {key}`"


class StatsCache:
    """Save, find, verify and remove statistics entries under one cache root."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.stats_dir = self.root / "stats"

    def entry_dir(self, key: str) -> Path:
        return self.stats_dir / check_key(key)

    @contextmanager
    def lock(self, key: StatsKey) -> Iterator[None]:
        """Held while an entry is computed, so a second process waits and then reuses it."""
        ensure_writable_dir(self.root, "cache folder")
        with file_lock(self.root / "locks" / f"{key.digest}.lock"):
            yield

    def has(self, key: StatsKey) -> bool:
        return (self.entry_dir(key.digest) / MANIFEST_FILE).is_file()

    def load(self, key: StatsKey) -> CalibrationStats:
        """The verified statistics of `key`; a mismatch or corruption raises CorruptEntry naming the fix."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        from hybridprune.calibration.stats import CalibrationStats

        folder = self.entry_dir(key.digest)
        manifest = self.read_manifest(key.digest)
        fix = fix_hint(key.digest)
        if manifest.get("schema") != SCHEMA_VERSION:
            raise CorruptEntry(
                f"cache entry {key.digest} has schema {manifest.get('schema')}, this tool reads {SCHEMA_VERSION}: {fix}"
            )
        if manifest.get("key") != key.fields() or manifest.get("digest") != key.digest:
            raise CorruptEntry(f"cache entry {key.digest} was made for other inputs (manifest differs): {fix}")
        stats_path = folder / STATS_FILE
        if not stats_path.is_file() or stats_path.stat().st_size != manifest.get("bytes"):
            raise CorruptEntry(f"cache entry {key.digest} is incomplete (stats file missing or truncated): {fix}")
        if sha256_file(stats_path) != manifest.get("sha256"):
            raise CorruptEntry(f"cache entry {key.digest} is corrupt (checksum mismatch): {fix}")
        try:
            tensors = load_file(stats_path)
        except (SafetensorError, OSError) as err:
            raise CorruptEntry(f"cache entry {key.digest} cannot be read ({err}): {fix}") from None
        layer_files = manifest.get("layer_files")
        stats = CalibrationStats(tensors, LayerShards(folder, layer_files, key.digest) if layer_files is not None else None)
        if stats.num_layers != manifest.get("layers"):
            raise CorruptEntry(f"cache entry {key.digest} has {stats.num_layers} layers, manifest says otherwise: {fix}")
        if "tokens" not in stats.tensors or stats.tokens != manifest.get("tokens"):
            raise CorruptEntry(f"cache entry {key.digest} does not hold the token count its manifest says: {fix}")
        return stats

    def read_manifest(self, key: str) -> dict[str, Any]:
        path = self.entry_dir(key) / MANIFEST_FILE
        try:
            manifest = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise UserError(f"no cache entry {key}: see `hybridprune cache list`") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise CorruptEntry(f"cache entry {key} has an unreadable manifest ({err}): {fix_hint(key)}") from None
        if not isinstance(manifest, dict):
            raise CorruptEntry(f"cache entry {key} has a malformed manifest: {fix_hint(key)}")
        return manifest

    def save(self, key: StatsKey, stats: CalibrationStats, info: dict[str, Any]) -> Path:
        """Write the entry atomically (replacing an older one only once the new one is complete)."""
        with self.writer(key) as writer:
            writer.finish(stats, info)
        return self.entry_dir(key.digest)

    @contextmanager
    def writer(self, key: StatsKey) -> Iterator[EntryWriter]:
        """An entry written layer by layer: `add_layer` as each layer finishes, then `finish`. The entry appears
        only when the block ends without error (a temporary folder renamed into place); hold `lock(key)`."""
        final = self.entry_dir(key.digest)
        clean_stale_staging(self.stats_dir)  # what killed runs left, whatever their key
        with atomic_folder(final, replace=True) as staging:
            writer = EntryWriter(staging, key)
            yield writer
            if not writer.finished:
                raise RuntimeError(f"cache entry {key.digest} was not finished")

    def entries(self) -> list[dict[str, Any]]:
        """Manifests of all complete entries, newest first (temporary folders are not entries)."""
        if not self.stats_dir.is_dir():
            return []
        found = []
        for folder in self.stats_dir.iterdir():
            if KEY_PATTERN.fullmatch(folder.name) and (folder / MANIFEST_FILE).is_file():
                try:
                    found.append(self.read_manifest(folder.name))
                except UserError:
                    found.append({"digest": folder.name, "corrupt": True})
        return sorted(found, key=lambda manifest: str(manifest.get("created", "")), reverse=True)

    def remove(self, key: str) -> None:
        folder = self.entry_dir(key)
        if not (folder.exists() or folder.is_symlink()):
            raise UserError(f"no cache entry {key}: see `hybridprune cache list`")
        _remove(folder)

    def clear(self) -> int:
        """Remove every entry and the temporary folders of killed runs (not those of live ones).

        Returns the number of entries removed."""
        if not self.stats_dir.is_dir():
            return 0
        removed = 0
        for folder in self.stats_dir.iterdir():
            if KEY_PATTERN.fullmatch(folder.name):
                _remove(folder)
                removed += 1
        clean_stale_staging(self.stats_dir)
        return removed


class EntryWriter:
    """Writes one entry's files into its staging folder (see StatsCache.writer)."""

    def __init__(self, staging: Path, key: StatsKey) -> None:
        self.staging, self.key = staging, key
        self.layer_files: dict[str, dict[str, Any]] = {}
        self.finished = False

    def add_layer(self, index: int, tensors: dict[str, Tensor]) -> None:
        """One decoder layer's entries, into their own file (then they can leave memory)."""
        from safetensors.torch import save_file

        path = self.staging / LAYER_FILE.format(index)
        save_file({name: tensor.contiguous() for name, tensor in tensors.items()}, str(path))
        self.layer_files[path.name] = {"layer": index, "bytes": path.stat().st_size, "sha256": sha256_file(path)}

    def finish(self, stats: CalibrationStats, info: dict[str, Any]) -> None:
        """The layers still held in memory (`stats.tensors`), each into its file, then the manifest."""
        from safetensors.torch import save_file

        held: dict[int, dict[str, Tensor]] = {}
        rest: dict[str, Tensor] = {}
        for name, tensor in stats.tensors.items():
            match = LAYER_NAME.match(name)
            if match:
                held.setdefault(int(match.group(1)), {})[name] = tensor
            else:
                rest[name] = tensor
        for index in sorted(held):
            if LAYER_FILE.format(index) in self.layer_files:
                raise ValueError(f"layer {index} was written already")
            self.add_layer(index, held[index])
        stats_path = self.staging / STATS_FILE
        save_file({name: tensor.contiguous() for name, tensor in rest.items()}, str(stats_path))
        layers = len(self.layer_files)
        manifest = {
            "schema": SCHEMA_VERSION,
            "digest": self.key.digest,
            "key": self.key.fields(),
            "tool_version": __version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "tokens": stats.tokens,
            "layers": layers,
            "bytes": stats_path.stat().st_size,
            "sha256": sha256_file(stats_path),
            "layer_files": self.layer_files,
            "layer_bytes": sum(f["bytes"] for f in self.layer_files.values()),
            **info,
        }
        (self.staging / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2))
        self.finished = True


class LayerShards:
    """An entry's per-layer files, read one layer at a time (safe_open), each checked against its manifest
    size and sha256 the first time it is read. Only the layer read last stays in memory."""

    def __init__(self, folder: Path, layer_files: Any, digest: str) -> None:
        self.folder, self.digest = folder, digest
        fix = fix_hint(digest)
        if not isinstance(layer_files, dict):
            raise CorruptEntry(f"cache entry {digest} has a malformed list of layer files: {fix}")
        self.files: dict[int, tuple[Path, dict[str, Any]]] = {}
        for name, record in layer_files.items():
            if not (isinstance(record, dict) and isinstance(record.get("layer"), int) and name == LAYER_FILE.format(record["layer"])):
                raise CorruptEntry(f"cache entry {digest} names an unexpected layer file '{name}': {fix}")
            path = folder / name
            if not path.is_file() or path.stat().st_size != record.get("bytes"):
                raise CorruptEntry(f"cache entry {digest} is incomplete ({name} missing or truncated): {fix}")
            self.files[record["layer"]] = (path, record)
        self.num_layers = len(self.files)
        self._current: tuple[int, dict[str, Tensor]] | None = None
        self._verified: set[int] = set()  # a pass over all layers (planning, then pruning) hashes each file once

    def layer(self, index: int) -> dict[str, Tensor]:
        from safetensors import SafetensorError, safe_open

        if self._current is not None and self._current[0] == index:
            return self._current[1]
        self._current = None  # the previous layer's tensors go before the next ones are read
        if index not in self.files:
            raise CorruptEntry(f"cache entry {self.digest} has no file for layer {index}: {fix_hint(self.digest)}")
        path, record = self.files[index]
        if index not in self._verified:
            if sha256_file(path) != record.get("sha256"):
                raise CorruptEntry(f"cache entry {self.digest} is corrupt ({path.name}: checksum mismatch): {fix_hint(self.digest)}")
            self._verified.add(index)
        try:
            with safe_open(str(path), framework="pt") as handle:
                tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118 (safe_open has no __iter__)
        except (SafetensorError, OSError) as err:
            raise CorruptEntry(f"cache entry {self.digest} cannot be read ({path.name}: {err}): {fix_hint(self.digest)}") from None
        self._current = (index, tensors)
        return tensors


def _remove(folder: Path) -> None:
    """Delete an entry; a symbolic link is unlinked, never followed."""
    if folder.is_symlink() or not folder.is_dir():
        folder.unlink()
    else:
        shutil.rmtree(folder)
