"""`hybridprune cache list|show|clear`: see and remove statistics entries."""

from __future__ import annotations

from typing import Annotated

import typer

from hybridprune import ui
from hybridprune.cache import StatsCache, check_key
from hybridprune.cli.common import CacheDirOpt, JsonOpt, handle_errors, setup_output
from hybridprune.fsutil import cache_root

app = typer.Typer(help="List, inspect and remove cached statistics.", no_args_is_help=True)


@app.command("list")
@handle_errors
def list_entries(cache_dir: CacheDirOpt = None, json_output: JsonOpt = False) -> None:
    """All cached statistics entries, newest first."""
    setup_output(json_output, False)
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
                key.get("mode", "?"),
                f"{entry.get('bytes', 0) / 1e6:.1f} MB",
                entry.get("created", "?"),
            ]
        )
    ui.console.print(ui.table(f"Cached statistics in {cache.root}", ["key", "model", "text", "windows", "mode", "size", "created"], rows))


@app.command("show")
@handle_errors
def show_entry(key: Annotated[str, typer.Argument(help="The entry's key.")], cache_dir: CacheDirOpt = None, json_output: JsonOpt = False) -> None:
    """The manifest of one entry."""
    setup_output(json_output, False)
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
    setup_output(json_output, False)
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
