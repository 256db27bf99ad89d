"""Crash-safe file-system primitives shared by the cache, the model conversion and `prune --out`.

Everything the tool writes appears all at once or not at all: it is written into a hidden
temporary sibling and renamed into place, so an interrupted run never leaves something a
later run could mistake for complete.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from hybridprune.errors import UserError


def cache_root(cache_dir: Path | str | None = None) -> Path:
    """The tool's cache folder: --cache-dir, else $HYBRIDPRUNE_CACHE, else the user cache folder."""
    if cache_dir:
        return Path(cache_dir).expanduser()
    if os.environ.get("HYBRIDPRUNE_CACHE"):
        return Path(os.environ["HYBRIDPRUNE_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "hybridprune"


def ensure_writable_dir(folder: Path, what: str) -> Path:
    """Create `folder` if needed and prove it is writable, or refuse with one clear line."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".probe-"):
            pass
    except OSError as err:
        raise UserError(
            f"{what} '{folder}' is not writable ({err.strerror or err}): choose another with --cache-dir "
            "or HYBRIDPRUNE_CACHE"
        ) from None
    return folder


@contextlib.contextmanager
def atomic_folder(final: Path, replace: bool = False) -> Iterator[Path]:
    """Yield a temporary folder that becomes `final` only when the block finishes without error.

    With `replace`, an existing `final` is swapped out only after the new content is complete,
    so a failure at any point leaves the previous state intact.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(staging, 0o777 & ~umask)  # mkdtemp's 0700 would surprise users of the result
    try:
        yield staging
        _fsync_tree(staging)
        if final.exists() and replace:
            retired = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
            os.replace(final, retired / "content")
            os.replace(staging, final)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            if final.exists():
                final.rmdir()  # only an empty folder may be replaced without `replace`
            os.replace(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _fsync_tree(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive inter-process lock (flock) held for the block; released if the process dies."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()
