"""Streaming: decoder layers are read from the checkpoint one at a time and released after use.

The model is a skeleton on the meta device; only the tensors outside the decoder layers that a
forward pass over the trunk needs (embeddings, final norm, buffers) are real. Calibration and
pruning then hold about one layer's weights plus the activations, whatever the model's size,
and a pruned model is written layer by layer as a sharded safetensors folder.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from hybridprune.models.adapters import FamilyAdapter
from hybridprune.models.weights import (
    SAFETENSORS_DTYPES,
    load_into,
    read_header,
    safetensors_files,
)

MEMORY_HEADROOM = 0.8
"""Streaming is chosen automatically when the weights would take more than this share of free memory."""


def weight_bytes(folder: Path, dtype: torch.dtype) -> int:
    """Bytes the checkpoint's floating-point tensors take at `dtype` (from the safetensors headers only)."""
    from hybridprune.export import LEGACY_VALUES, PARTS, compression_format

    fmt = compression_format(folder)
    total = 0
    for path in safetensors_files(folder):
        header = read_header(path)[0]
        for name, info in header.items():
            if fmt is not None and name.rsplit(".", 1)[-1] in (*PARTS[fmt], LEGACY_VALUES) and f"{name.rsplit('.', 1)[0]}.bitmask" in header:
                if name.endswith(".bitmask"):  # a compressed weight: its dense size (8 weights per mask byte)
                    total += info["shape"][0] * info["shape"][1] * 8 * dtype.itemsize
                continue
            stored = SAFETENSORS_DTYPES[info["dtype"]]
            count = (info["data_offsets"][1] - info["data_offsets"][0]) // stored.itemsize
            total += count * (dtype.itemsize if stored.is_floating_point else stored.itemsize)
    return total


def available_memory(device: torch.device) -> int | None:
    """Free bytes on the device: MemAvailable for the CPU, the CUDA allocator's free memory for a GPU."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    import psutil

    return int(psutil.virtual_memory().available)


def should_stream(folder: Path, dtype: torch.dtype, device: torch.device) -> tuple[bool, str]:
    """Whether the model needs streaming to fit, and the one line that tells the user why."""
    needed, free = weight_bytes(folder, dtype), available_memory(device)
    if free is None or needed <= MEMORY_HEADROOM * free:
        return False, ""
    return True, (
        f"streaming one layer at a time (--offload): the weights ({needed / 2**30:.1f} GiB) do not fit in "
        f"free {device.type} memory ({free / 2**30:.1f} GiB)"
    )


class LayerStream:
    """Loads one decoder layer's weights on demand and sends them back to the meta device after."""

    def __init__(self, model: nn.Module, adapter: FamilyAdapter, folder: Path, dtype: torch.dtype, device: torch.device):
        self.model, self.adapter, self.folder, self.dtype, self.device = model, adapter, folder, dtype, device

    def names(self, index: int) -> set[str]:
        layer = self.adapter.layers(self.model)[index]
        return {f"{self.adapter.layers_path}.{index}.{name}" for name in layer.state_dict()}

    def materialize(self, index: int, layer: nn.Module) -> None:
        load_into(self.model, self.folder, self.dtype, self.device, names=self.names(index))

    def release(self, index: int, layer: nn.Module) -> None:
        """Parameters only: a layer's own buffers (none in most families) stay as the skeleton made them."""
        from accelerate.utils import set_module_tensor_to_device

        for name, _ in list(layer.named_parameters()):
            set_module_tensor_to_device(layer, name, "meta")

    def release_trunk(self) -> None:
        """Send the parameters outside the decoder layers to the meta device too (once they are written)."""
        from accelerate.utils import set_module_tensor_to_device

        parameters = dict(self.model.named_parameters())
        for name in outside_layer_names(self.model, self.adapter):
            if name in parameters:
                set_module_tensor_to_device(self.model, name, "meta")

    @contextlib.contextmanager
    def resident(self, index: int) -> Iterator[nn.Module]:
        """The layer with real weights for the block's duration."""
        layer = self.adapter.layers(self.model)[index]
        self.materialize(index, layer)
        try:
            yield layer
        finally:
            self.release(index, layer)


def outside_layer_names(model: nn.Module, adapter: FamilyAdapter) -> list[str]:
    """State-dict names outside the decoder layers, a tied tensor once (as save_pretrained writes them)."""
    seen: set[int] = set()
    names = []
    for name, tensor in model.state_dict(keep_vars=True).items():
        if name.startswith(adapter.layers_path + ".") or id(tensor) in seen:
            continue
        seen.add(id(tensor))
        names.append(name)
    return names


def parameter_name(model: nn.Module, parameter: nn.Parameter) -> str:
    """The first name of a parameter (a tied one answers with the name it is saved under)."""
    return next(name for name, candidate in model.named_parameters(remove_duplicate=False) if candidate is parameter)


def open_streaming(model: nn.Module, adapter: FamilyAdapter, folder: Path, dtype: torch.dtype, device: torch.device) -> LayerStream:
    """Make the skeleton's trunk runnable (all tensors outside the layers but an untied LM head) and return its stream."""
    from accelerate.utils import set_module_tensor_to_device

    head = model.get_output_embeddings()
    tied = head is None or head.weight is model.get_input_embeddings().weight
    skip = set() if tied else {name for name, p in model.named_parameters() if p is head.weight}
    load_into(model, folder, dtype, device, names=set(outside_layer_names(model, adapter)) - skip)
    model.tie_weights()  # loading replaced the embedding's Parameter; a tied head must follow it
    for name, buffer in list(model.named_buffers()):
        set_module_tensor_to_device(model, name, device, value=buffer)
    return LayerStream(model, adapter, folder, dtype, device)


class ShardWriter:
    """Writes a model folder's weights one shard at a time: the standard sharded safetensors layout."""

    def __init__(self, folder: Path, shards: int):
        self.folder, self.shards = folder, shards
        self.weight_map: dict[str, str] = {}
        self.total_size = 0
        self.written = 0

    def write(self, tensors: dict[str, torch.Tensor]) -> None:
        """One shard (model-0000i-of-0000n.safetensors) holding `tensors`, contiguous on the CPU."""
        from safetensors.torch import save_file

        self.written += 1
        name = f"model-{self.written:05d}-of-{self.shards:05d}.safetensors"
        plain = {key: value.detach().to("cpu").contiguous() for key, value in tensors.items()}
        save_file(plain, self.folder / name, metadata={"format": "pt"})
        self.weight_map.update(dict.fromkeys(plain, name))
        self.total_size += sum(value.numel() * value.element_size() for value in plain.values())

    def finish(self) -> None:
        if self.written != self.shards:
            raise RuntimeError(f"{self.written} shards written, {self.shards} announced")
        index = {"metadata": {"total_size": self.total_size}, "weight_map": dict(sorted(self.weight_map.items()))}
        (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
