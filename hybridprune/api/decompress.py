"""`decompress`: a compressed folder back to plain safetensors."""

from __future__ import annotations

from pathlib import Path

from hybridprune.api.common import PathLike
from hybridprune.errors import UserError


def decompress(folder: PathLike, out: PathLike, *, overwrite: bool = False) -> int:
    """A `--save-format compressed` folder rewritten as plain safetensors (bytes written), atomically.

    No other loader reads such a folder (it is marked so that they refuse it: hybridprune/export.py); this
    makes a copy that anything loads.
    """
    from hybridprune.export import compression_format, decompress_folder
    from hybridprune.fsutil import atomic_folder
    from hybridprune.saving import check_output_folder

    source = Path(folder).expanduser()
    if not source.is_dir() or compression_format(source) is None:
        raise UserError(f"'{source}' is not a compressed model folder (written with `prune --save-format compressed`)")
    target = check_output_folder(Path(out), source, overwrite)
    with atomic_folder(target, replace=overwrite) as staging:
        return decompress_folder(source, staging)
