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
    """Process-wide settings for the heavy work (HYBRIDPRUNE_THREADS caps the CPU threads)."""
    import torch

    threads = os.environ.get("HYBRIDPRUNE_THREADS")
    if threads:
        torch.set_num_threads(int(threads))


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
