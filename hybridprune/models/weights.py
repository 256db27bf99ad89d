"""Read safetensors weights straight into a model's parameters, one tensor at a time.

`from_pretrained` memory-maps the whole checkpoint and copies it, so for a moment the process
holds the file's pages and the parameters (about 2x the weights in resident memory). Reading
each tensor with plain file reads into its final storage keeps the peak at about 1x, and is the
same path the streaming mode uses to load one decoder layer at a time. Nothing is unpickled.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from torch import nn

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


def checkpoint_names(folder: Path) -> set[str]:
    """The (dense) tensor names of the folder's checkpoint; a compressed folder's weights count under their dense names."""
    from hybridprune.export import compression_format, dense_names

    names = {name for path in safetensors_files(folder) for name in read_header(path)[0]}
    fmt = compression_format(folder)
    return dense_names(names, fmt) if fmt else names


def read_tensors(folder: Path, dtype: torch.dtype, names: set[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for the folder's safetensors tensors (all, or only `names`), floating ones as `dtype`.

    A folder stored in a sparse bitmask format (hybridprune/export.py) is decompressed on the fly.
    """
    from hybridprune.export import compression_format, read_decompressed

    fmt = compression_format(folder)
    if fmt is not None:
        yield from read_decompressed(folder, fmt, dtype, names)
        return
    for path in safetensors_files(folder):
        for name, tensor in iter_tensors(path, names):
            yield name, tensor.to(dtype) if tensor.is_floating_point() else tensor


def load_into(model: nn.Module, folder: Path, dtype: torch.dtype, device: torch.device, names: set[str] | None = None) -> None:
    """Materialize `model`'s (meta) parameters from the folder's safetensors, converted to dtype/device."""
    from accelerate.utils import set_module_tensor_to_device

    for name, value in read_tensors(folder, dtype, names):
        set_module_tensor_to_device(model, name, device, value=value)


def plan_direct_load(model: nn.Module, folder: Path) -> bool:
    """True when the checkpoint names cover every parameter (tied ones aside), so load_into can fill it."""
    stored = checkpoint_names(folder) if safetensors_files(folder) else set()
    needed = {name for name, _ in model.named_parameters()}  # named_parameters lists tied tensors once
    return bool(stored) and needed <= stored and stored <= {name for name, _ in model.named_parameters(remove_duplicate=False)}
