"""`hybridprune decompress`: a compressed (sparse bitmask) folder back to plain safetensors that any transformers loads."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from hybridprune import api
from hybridprune.cli.common import JsonOpt, handle_errors
from hybridprune.cli.output import Output


@handle_errors
def decompress(
    folder: Annotated[Path, typer.Argument(help="A folder written with `prune --save-format compressed`.")],
    out: Annotated[Path, typer.Option("--out", help="Where the dense folder goes (new or empty).")],
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a non-empty --out (atomically).")] = False,
    json_output: JsonOpt = False,
) -> None:
    """Rewrite a compressed folder as a plain dense one (transformers 5.x cannot read sparse bitmask folders itself)."""
    output = Output(json_output)
    written = api.decompress(folder, out, overwrite=overwrite)
    output.result({"out": str(out), "bytes": written}, lambda: output.show(f"[green]✓[/] wrote {out} ({written / 1e6:.1f} MB)"))
