"""Read safetensors weights straight into a model's parameters, one tensor at a time.

`from_pretrained` memory-maps the whole checkpoint and copies it, so for a moment the process
holds the file's pages and the parameters (about 2x the weights in resident memory). Reading
each tensor with plain file reads into its final storage keeps the peak at about 1x, and is the
same path the streaming mode uses to load one decoder layer at a time. Nothing is unpickled.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from hybridprune.export import compression_format, dense_names, read_decompressed
from hybridprune.models.safetensors_io import SAFETENSORS_DTYPES, iter_tensors, read_header, safetensors_files

__all__ = ["SAFETENSORS_DTYPES", "iter_tensors", "read_header", "safetensors_files", "checkpoint_names", "read_tensors", "load_into",
           "plan_direct_load"]


def checkpoint_names(folder: Path) -> set[str]:
    """The (dense) tensor names of the folder's checkpoint; a compressed folder's weights count under their dense names."""
    names = {name for path in safetensors_files(folder) for name in read_header(path)[0]}
    fmt = compression_format(folder)
    return dense_names(names, fmt) if fmt else names


def read_tensors(folder: Path, dtype: torch.dtype, names: set[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for the folder's safetensors tensors (all, or only `names`), floating ones as `dtype`.

    A folder stored in a sparse bitmask format (hybridprune/export.py) is decompressed on the fly.
    """
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
