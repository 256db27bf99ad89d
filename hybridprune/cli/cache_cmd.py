"""`hybridprune cache list|show|clear|merge`: see, remove and merge statistics entries."""

from __future__ import annotations

from typing import Annotated

import typer

from hybridprune import ui
from hybridprune.cache import StatsCache, check_key
from hybridprune.cli.common import CacheDirOpt, JsonOpt, handle_errors
from hybridprune.cli.output import Output
from hybridprune.errors import UserError
from hybridprune.fsutil import cache_root

app = typer.Typer(help="List, inspect, remove and merge cached statistics.", no_args_is_help=True)


@app.command("list")
@handle_errors
def list_entries(cache_dir: CacheDirOpt = None, json_output: JsonOpt = False) -> None:
    """All cached statistics entries, newest first."""
    Output(json_output)
    cache = StatsCache(cache_root(cache_dir))
    entries = cache.entries()
    if json_output:
        ui.emit_json(entries)
        return
    if not entries:
        ui.console.print(f"no cached statistics under {cache.root}")
        return
    rows = []
    for entry in entries:
        key = entry.get("key", {})
        rows.append(
            [
                entry.get("digest"),
                "CORRUPT" if entry.get("corrupt") else entry.get("model_source", "?"),
                f"{key.get('text_name', '?')}[{key.get('text_split', '?')}]",
                f"{key.get('nsamples', '?')}x{key.get('seqlen', '?')}",
                key.get("mode", "?") + (f" shard {key['shard_index']}/{key['shard_count']}" if "shard_index" in key else ""),
                f"{(entry.get('bytes', 0) + entry.get('layer_bytes', 0)) / 1e6:.1f} MB",  # main file + layer files
                entry.get("created", "?"),
            ]
        )
    ui.console.print(ui.table(f"Cached statistics in {cache.root}", ["key", "model", "text", "windows", "mode", "size", "created"], rows))


@app.command("show")
@handle_errors
def show_entry(key: Annotated[str, typer.Argument(help="The entry's key.")], cache_dir: CacheDirOpt = None, json_output: JsonOpt = False) -> None:
    """The manifest of one entry."""
    Output(json_output)
    manifest = StatsCache(cache_root(cache_dir)).read_manifest(check_key(key))
    if json_output:
        ui.emit_json(manifest)
    else:
        ui.console.print_json(data=manifest)


@app.command("clear")
@handle_errors
def clear_entries(
    key: Annotated[str | None, typer.Argument(help="Remove only this entry.")] = None,
    cache_dir: CacheDirOpt = None,
    json_output: JsonOpt = False,
) -> None:
    """Remove one entry, or all of them."""
    Output(json_output)
    cache = StatsCache(cache_root(cache_dir))
    if key is None:
        removed = cache.clear()
    else:
        cache.remove(check_key(key))
        removed = 1
    if json_output:
        ui.emit_json({"removed": removed})
    else:
        ui.console.print(f"removed {removed} cache entr{'y' if removed == 1 else 'ies'}")


@app.command("merge")
@handle_errors
def merge_entries(
    keys: Annotated[list[str] | None, typer.Argument(help="The partial entries of every shard (from calibrate --shard).")] = None,
    all_shards: Annotated[
        str | None, typer.Option("--all-shards", help="Merge every cached shard of this full key instead.")
    ] = None,
    cache_dir: CacheDirOpt = None,
    json_output: JsonOpt = False,
) -> None:
    """Join the N shards of a sharded calibration into the entry one process would have written."""
    from hybridprune.calibration.shards import merge_shard_entries, shard_entries

    Output(json_output)
    cache = StatsCache(cache_root(cache_dir))
    if bool(keys) == (all_shards is not None):
        raise UserError("give either the shard entries' keys or --all-shards FULLKEY")
    digests = shard_entries(cache, all_shards) if all_shards is not None else list(keys or [])
    if all_shards is not None and not digests:
        raise UserError(f"no cached shards of {all_shards}: calibrate them with --shard i/N first")
    key, entry = merge_shard_entries(cache, digests)
    if json_output:
        ui.emit_json({"key": key.digest, "entry": str(entry), "merged_from": digests})
    else:
        ui.console.print(f"merged {len(digests)} shards into statistics [bold]{key.digest}[/] at {entry}")
