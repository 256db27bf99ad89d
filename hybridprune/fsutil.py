"""Crash-safe file-system primitives shared by the cache, the model conversion and `prune --out`.

Everything the tool writes appears all at once or not at all: it is written into a hidden
temporary sibling and renamed into place, so an interrupted run never leaves something a
later run could mistake for complete. The hidden siblings a killed run leaves behind
(`.NAME.tmp-PID-*`) are never read, and the next write of NAME removes them.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import functools
import hashlib
import os
import re
import shutil
import tempfile
import time
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

    With `replace`, an existing `final` is swapped with the new content in one atomic step
    (renameat2 RENAME_EXCHANGE; two renames where the file system lacks it), so a failure or a
    kill at any point leaves the previous state or the new one, never a mix. Without `replace`
    only an empty `final` may be replaced. The staging folder is named `.NAME.tmp-PID-*` and
    flock-ed while in use; leftovers of killed runs are removed by the next write of the same
    name (see clean_stale_staging). A write error (full disk, quota) becomes a UserError.
    """
    final = Path(final)
    staging: Path | None = None
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        clean_stale_staging(final.parent, final.name)
        staging, owner = _staging_dir(final, "tmp")
        try:
            yield staging
            _fsync_tree(staging)
            if not (final.exists() or final.is_symlink()):
                os.replace(staging, final)
            elif not replace:
                try:
                    os.replace(staging, final)  # succeeds only onto an empty folder
                except OSError as err:
                    if err.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
                        raise
                    raise UserError(f"'{final}' exists and is not empty: nothing was replaced") from None
            elif _exchange(staging, final):
                _delete(staging)  # staging now holds the previous content
            else:
                _replace_in_two_steps(staging, final)
            _fsync_dir(final.parent)
        finally:
            os.close(owner)
    except BaseException as err:
        if staging is not None:
            _delete(staging)
        if _is_write_error(err):
            reason = getattr(err, "strerror", None) or str(err).split(":")[-1].strip() or type(err).__name__
            intact = "the previous content is intact" if final.exists() else "nothing was written"
            raise UserError(
                f"could not write '{final}' ({reason}): {intact}; check free space and permissions, or choose another folder"
            ) from None
        raise


def _delete(path: Path) -> None:
    """Remove a folder tree, or a file or symbolic link (never following it); errors are ignored."""
    if path.is_symlink() or path.is_file():
        with contextlib.suppress(OSError):
            path.unlink()
    else:
        shutil.rmtree(path, ignore_errors=True)


def _is_write_error(err: BaseException) -> bool:
    """OSError, or safetensors' own I/O error (it does not subclass OSError)."""
    return isinstance(err, OSError) or (type(err).__name__ == "SafetensorError" and "I/O error" in str(err))


def _staging_dir(final: Path, kind: str) -> tuple[Path, int]:
    """A new hidden sibling `.NAME.KIND-PID-*` and an flock on it that marks it in use until we exit."""
    folder = Path(tempfile.mkdtemp(prefix=f".{final.name}.{kind}-{os.getpid()}-", dir=final.parent))
    owner = os.open(folder, os.O_RDONLY)
    fcntl.flock(owner, fcntl.LOCK_EX)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(folder, 0o777 & ~umask)  # mkdtemp's 0700 would surprise users of the result
    return folder, owner


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(first: Path, second: Path) -> bool:
    """Atomically swap two paths (Linux renameat2); False where the system or file system lacks it."""
    renameat2 = getattr(_libc(), "renameat2", None)
    if renameat2 is None:
        return False
    result = renameat2(_AT_FDCWD, os.fsencode(first), _AT_FDCWD, os.fsencode(second), _RENAME_EXCHANGE)
    if result == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM):
        return False
    raise OSError(code, os.strerror(code), str(second))


@functools.lru_cache(maxsize=1)
def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


def _replace_in_two_steps(staging: Path, final: Path) -> None:
    """Fallback of _exchange: the previous content waits in `.NAME.old-PID-*/content` between the two
    renames; if a kill lands between them, clean_stale_staging moves it back into place."""
    retired, owner = _staging_dir(final, "old")
    try:
        os.replace(final, retired / "content")
        os.replace(staging, final)
    finally:
        os.close(owner)
    _delete(retired)


_STAGING_NAME = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<pid>\d+)-[^/]+$")
STALE_AFTER_S = 600.0
"""A staging folder whose owner process cannot be checked (another host, a reused pid) counts as
abandoned once it is unlocked and this old."""


def staging_owner(path: Path) -> tuple[str, str, int] | None:
    """(name, kind, pid) for a staging folder name written by atomic_folder, else None."""
    match = _STAGING_NAME.match(path.name)
    return (match["name"], match["kind"], int(match["pid"])) if match else None


def clean_stale_staging(parent: Path, name: str | None = None) -> int:
    """Remove the staging folders that killed runs left in `parent` (only those of `name` if given).

    A folder is stale when no process holds its flock and its owner is gone (or it is older than
    STALE_AFTER_S). A stale `.NAME.old-*` whose NAME is missing holds the previous content of an
    interrupted two-step replace: it is moved back into place rather than deleted.
    Returns the number of folders cleaned.
    """
    cleaned = 0
    try:
        children = list(Path(parent).iterdir())
    except OSError:
        return 0
    for path in children:
        owner = staging_owner(path)
        if owner is None or (name is not None and owner[0] != name) or not _is_stale(path, owner[2]):
            continue
        final = path.parent / owner[0]
        if owner[1] == "old" and (path / "content").is_dir() and not (final.exists() or final.is_symlink()):
            with contextlib.suppress(OSError):
                os.replace(path / "content", final)
        _delete(path)
        cleaned += 1
    return cleaned


def _is_stale(path: Path, pid: int) -> bool:
    try:
        handle = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False  # a live process is writing it
    finally:
        os.close(handle)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:
        pass  # alive, owned by another user
    try:
        return time.time() - path.stat().st_mtime > STALE_AFTER_S
    except OSError:
        return False


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):
        handle = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(handle)
        finally:
            os.close(handle)


def _fsync_tree(folder: Path) -> None:
    """Flush every file, and give files the user's usual permissions (some writers create them 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    for path in folder.rglob("*"):
        if path.is_file():
            os.chmod(path, 0o666 & ~umask)
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive inter-process lock held for the block (filelock: flock on POSIX, released if the process dies)."""
    from filelock import FileLock

    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(path):
        yield


@contextlib.contextmanager
def atomic_file(final: Path) -> Iterator[Path]:
    """Yield a temporary sibling path to write; it replaces `final` only when the block finishes.

    The one temp-file-then-rename of the tool for single files (scores, token cache, presets, memos):
    a reader sees the old file or the new one, never a part; the temporary is removed on failure.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp")
    os.close(handle)
    temporary = Path(name)
    try:
        yield temporary
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temporary, 0o666 & ~umask)  # mkstemp's 0600 would surprise other users of the cache
        with open(temporary, "rb") as written:
            os.fsync(written.fileno())
        os.replace(temporary, final)
    except BaseException:
        with contextlib.suppress(OSError):
            temporary.unlink()
        raise


def atomic_write_text(final: Path, text: str) -> None:
    with atomic_file(final) as temporary:
        temporary.write_text(text, encoding="utf-8")


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()
