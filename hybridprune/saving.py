"""Save a pruned model: the output folder's checks, the Hugging Face folder, hybridprune.json and the run record."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from hybridprune.config import PruneConfig
from hybridprune.env import __version__
from hybridprune.errors import UserError
from hybridprune.fsutil import atomic_folder, clean_stale_staging
from hybridprune.models.loading import LoadedModel
from hybridprune.reporting import Reporter
from hybridprune.sparsity import SparsityReport

METADATA_FILE = "hybridprune.json"
SAVE_FORMATS = {"dense": None, "compressed": "auto"}
"""--save-format: the `compress` argument of save_pruned (None: plain safetensors with the zeros stored;
"auto": compressed-tensors' sparse bitmask, its 2:4 variant when every weight follows 2:4)."""


def check_output_folder(out: Path, model_folder: Path, overwrite: bool) -> Path:
    """Refuse an --out that would lose data: the input model folder, or a non-empty folder without --overwrite."""
    out = Path(out).expanduser()
    resolved, source = out.resolve(), model_folder.resolve()
    if resolved == source or source in resolved.parents or resolved in source.parents:
        raise UserError(f"--out '{out}' overlaps the input model folder '{model_folder}': choose another folder")
    for keep, what in ((Path.cwd(), "the current folder"), (Path("~").expanduser(), "your home folder")):
        if resolved == keep.resolve() or resolved in keep.resolve().parents:
            raise UserError(f"--out '{out}' is or contains {what}, which a save would replace: choose a new folder")
    if out.is_symlink():
        raise UserError(f"--out '{out}' is a symbolic link: pass a real folder path")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out '{out}' exists and is not a folder")
    if out.is_dir():
        clean_stale_staging(out)  # what a killed sweep left inside does not make the folder non-empty
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UserError(f"--out '{out}' exists and is not empty: pass --overwrite to replace it, or choose another folder")
    return out


def save_pruned(
    loaded: LoadedModel, out: Path, overwrite: bool, metadata: dict[str, Any], compress: str | None = None
) -> Path:
    """A standard Hugging Face folder (safetensors, config, tokenizer) plus hybridprune.json, written atomically.

    `compress` ("auto", "sparse-bitmask", "sparse-24-bitmask") stores the weights in compressed-tensors'
    sparse bitmask format (hybridprune/export.py) before the folder is renamed into place. A streamed
    prune (prune_streaming + write_extras into a staging folder) gets the same with export.compress_folder(staging).
    """
    from hybridprune.export import compress_folder

    with atomic_folder(out, replace=overwrite) as staging:
        loaded.model.save_pretrained(staging, safe_serialization=True)
        write_extras(loaded, staging, metadata)
        if compress:
            compress_folder(staging, None, compress)
    return out


def write_extras(loaded: LoadedModel, folder: Path, metadata: dict[str, Any]) -> None:
    """Tokenizer and hybridprune.json; with a streamed model (weights already written) also the config."""
    if loaded.stream is not None:
        loaded.model.config.architectures = [type(loaded.model).__name__]
        loaded.model.config.save_pretrained(folder)
        if loaded.model.can_generate() and loaded.model.generation_config is not None:
            loaded.model.generation_config.save_pretrained(folder)
    loaded.tokenizer.save_pretrained(folder)
    (folder / METADATA_FILE).write_text(json.dumps({"tool": "hybridprune", "version": __version__, **metadata}, indent=2))


def read_metadata(folder: Path, reporter: Reporter | None = None) -> dict[str, Any]:
    """A folder's hybridprune.json (written by save_pruned / write_extras), or {} for any other model."""
    path = Path(folder) / METADATA_FILE
    if not path.is_file():
        return {}
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        if reporter is not None:
            reporter.note(f"[yellow]warning:[/] ignoring unreadable {path} ({err})")
        return {}
    return document if isinstance(document, dict) else {}


def run_record(
    config: PruneConfig,
    preset: str,
    calibration: Any,
    report: SparsityReport,
    source: str,
    dense_width: int,
    second_order: Any | None,
) -> dict[str, Any]:
    """What one pruning run did (`calibration`, `second_order`: session.CalibrationResult): saved as
    hybridprune.json, printed by --json, read back by `eval` (read_metadata)."""
    used = config.needs_second_order and second_order is not None  # --update and --refine both read it
    entry = {"key": second_order.key.digest, "reused": second_order.reused} if used else None
    return {
        "method": config.method_label(),
        "sparsity": config.sparsity,
        "pattern": config.pattern,
        "config": config.to_dict(),
        "preset": preset,
        "statistics_key": calibration.key.digest,
        "statistics_reused": calibration.reused,
        "calibration": calibration.key.fields(),
        "achieved": report.to_dict(),
        "source_model": source,
        "dense_intermediate_size": dense_width,
        **({"second_order_statistics": entry} if entry else {}),
    }
