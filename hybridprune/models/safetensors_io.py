"""Safetensors files read by hand: the header, and tensors one at a time into fresh memory (nothing unpickled,
no memory map). The lowest room of the weight I/O: models/weights.py and export.py build on it."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}


def safetensors_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors"))


def read_header(path: Path) -> tuple[dict, int]:
    """The safetensors JSON header and the byte offset where tensor data starts."""
    with open(path, "rb") as handle:
        length = int.from_bytes(handle.read(8), "little")
        if length > path.stat().st_size - 8:
            raise ValueError(f"{path.name} is truncated or not a safetensors file (its header runs past the end)")
        header = json.loads(handle.read(length))
    if not isinstance(header, dict):
        raise ValueError(f"{path.name} is not a safetensors file (its header is not a table)")
    header.pop("__metadata__", None)
    return header, 8 + length


def iter_tensors(path: Path, names: Iterable[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for the tensors of one file (all, or only `names`), each read into fresh memory."""
    header, base = read_header(path)
    wanted = set(header) if names is None else set(names) & set(header)
    with open(path, "rb", buffering=0) as handle:
        for name in sorted(wanted, key=lambda n: header[n]["data_offsets"][0]):
            info = header[name]
            start, end = info["data_offsets"]
            raw = torch.empty(end - start, dtype=torch.uint8)
            handle.seek(base + start)
            view = memoryview(raw.numpy())
            filled = 0
            while filled < len(view):
                got = handle.readinto(view[filled:])
                if not got:
                    raise ValueError(f"{path.name} is truncated: tensor '{name}' runs past the end of the file")
                filled += got
            yield name, raw.view(SAFETENSORS_DTYPES[info["dtype"]]).reshape(info["shape"])
