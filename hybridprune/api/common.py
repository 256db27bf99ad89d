"""Steps the API commands share: torch settings, the cache folder, calibration inputs, streaming."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from hybridprune.config import CALIBRATION_FIELDS, CalibrationRequest
from hybridprune.presets import Preset
from hybridprune.reporting import Reporter

PathLike = str | os.PathLike[str]


def configure_torch() -> None:
    """Process-wide settings for the heavy work (HYBRIDPRUNE_THREADS caps the CPU threads; freed memory is kept
    for reuse unless HYBRIDPRUNE_MALLOC=system, see keep_freed_memory)."""
    import torch

    threads = os.environ.get("HYBRIDPRUNE_THREADS")
    if threads:
        torch.set_num_threads(int(threads))
    keep_freed_memory()


M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc's mallopt parameter numbers (malloc.h)


def keep_freed_memory() -> bool:
    """Have glibc's malloc serve large blocks from the heap and keep freed ones for the next tensor of the run.

    By default glibc maps every block over 32 MB afresh and unmaps it when freed, so each large temporary tensor
    (a layer's [rows, inputs] metric, a refine step's per-weight terms) is page-faulted in again, and on the VMs
    measured that costs more than the arithmetic: a fresh 4096 x 4096 float32 addcmul result 0.049 s, the same
    with this setting 0.022 s (2 cores, 2026-12-06, `python benchmarks/refine_step.py`). Freed blocks stay in the
    process (up to 2 GB of free heap top is kept, the rest returned), so the resident size stays at its peak
    instead of falling between layers; the peak itself does not grow with depth (tests/test_memory.py).
    A preloaded allocator (jemalloc, tcmalloc) would do the same, but cannot be switched on from inside Python.
    HYBRIDPRUNE_MALLOC=system leaves glibc's defaults. Returns whether the setting was made (glibc on Linux only)."""
    import ctypes
    import sys

    if os.environ.get("HYBRIDPRUNE_MALLOC", "").lower() == "system" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018 (glibc only: musl has neither these parameters nor this symbol)
    except (OSError, AttributeError):
        return False
    return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1))


def cache_folder(cache_dir: PathLike | None) -> Path:
    from hybridprune.fsutil import cache_root, ensure_writable_dir

    return ensure_writable_dir(cache_root(cache_dir), "cache folder")


def as_path(value: PathLike | None) -> Path | None:
    return Path(value).expanduser() if value is not None else None


def calibration_request(preset: Preset | None, arguments: dict[str, Any]) -> CalibrationRequest:
    """Calibration inputs from a command's options (read by the CalibrationRequest field names):
    explicit value (not None) > preset > CalibrationRequest's default."""
    explicit = {name: value for name, value in arguments.items() if name in CALIBRATION_FIELDS and value is not None}
    return CalibrationRequest(**{**(preset.calibration if preset else {}), **explicit}).validate()


def choose_streaming(
    offload: bool | None, model: str | None, dtype: str, device: str, root: Path, reporter: Reporter, layerwise: bool = False
) -> bool | None:
    """--offload / --no-offload as given. Unset, a `layerwise` job (one that never needs the whole model,
    such as calibration) streams whenever the checkpoint allows it (None: load_model decides); any other
    streams when the weights do not fit in free memory (said in one line)."""
    if offload is not None:
        return offload
    if layerwise:
        return None
    from hybridprune.models.loading import model_folder, resolve_device, resolve_dtype
    from hybridprune.models.streaming import should_stream

    stream, reason = should_stream(model_folder(model, root), resolve_dtype(dtype), resolve_device(device))
    if stream:
        reporter.note(reason)
    return stream


def entry_bytes(entry: Path) -> int:
    return sum(path.stat().st_size for path in entry.iterdir()) if entry.is_dir() else 0
