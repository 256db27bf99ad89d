"""Compressed storage of pruned models: a sparse bitmask layout that only hybridprune reads.

A pruned Linear keeps its zeros in a dense folder, so the folder is as large as the dense model.
The `sparse-bitmask` layout (compressed-tensors' bit layout) stores for each targeted weight
`<module>.weight` (the non-zero values, row-major, 1-D), `<module>.bitmask` (one bit per weight,
numpy.packbits(bitorder="little") per row, uint8 [rows, ceil(cols/8)]), `<module>.shape` and
`<module>.row_offsets` (int64, where each row starts in the values). Its 2:4 variant
`sparse-24-bitmask` stores the values as [rows, cols/2] (exactly half of each row), `bitmask` the
same way and `shape` as [2, 1]; no row offsets.

No maintained loader reads such folders in 2026 (compressed-tensors 0.15 removed its sparse
compressors, transformers 5.10+ its sparsity path, vLLM its 2:4 sparse models), and one that
half-understands them loads random weights. So a compressed folder must never look loadable:
- config.json's `model_type` is COMPRESSED_MODEL_TYPE, which names `hybridprune decompress`:
  AutoConfig / AutoModel* (any transformers, with or without compressed-tensors) and vLLM refuse it
  with that name in the message; the real model_type and the format sit in `hybridprune_compressed`;
- the values are stored under the weight's own name with another shape, so loading with a model
  class directly (LlamaForCausalLM.from_pretrained) stops on a size mismatch, never on random weights.
hybridprune's own loader (models/loading.py, models/weights.py) reads the folder back, and
`hybridprune decompress` (decompress_folder) writes a plain dense folder that anything loads.
Folders of earlier versions (compressed-tensors `quantization_config`, values under `.compressed`)
are still read.

Everything here streams tensor by tensor: `compress_folder` rewrites each safetensors file in two
passes (sizes, then data) with a hand-written safetensors header, so the peak memory is about one
tensor, whatever the model's size; the per-layer shards of a streamed prune are handled the same way.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy
import torch

from hybridprune.errors import UserError
from hybridprune.fsutil import atomic_write_text
from hybridprune.models.safetensors_io import SAFETENSORS_DTYPES, iter_tensors, read_header, safetensors_files

BITMASK = "sparse-bitmask"
BITMASK_24 = "sparse-24-bitmask"
FORMATS = (BITMASK, BITMASK_24)
PARTS = {BITMASK: ("shape", "weight", "bitmask", "row_offsets"), BITMASK_24: ("shape", "weight", "bitmask")}
LEGACY_VALUES = "compressed"  # where folders of earlier versions keep the values
CONFIG_KEY = "hybridprune_compressed"
COMPRESSED_MODEL_TYPE = "hybridprune-compressed: run `hybridprune decompress FOLDER --out DENSE` for a plain folder"
"""config.json's model_type in a compressed folder: what transformers and vLLM quote when they refuse it."""
DEFAULT_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
INDEX_FILE = "model.safetensors.index.json"
_DTYPE_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}


@dataclass(frozen=True)
class CompressionResult:
    format: str
    bytes_before: int  # safetensors bytes of the source folder
    bytes_after: int
    weights_compressed: int
    global_sparsity: float  # zeros / weights over the compressed weights

    @property
    def ratio(self) -> float:
        return self.bytes_after / max(self.bytes_before, 1)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ratio": self.ratio}


# --- one tensor --------------------------------------------------------------------------


def pack_bitmask(mask: torch.Tensor) -> torch.Tensor:
    """bool [rows, cols] -> uint8 [rows, ceil(cols/8)], bit j of byte k is column 8k+j (numpy little bit order)."""
    return torch.from_numpy(numpy.packbits(mask.cpu().numpy(), axis=-1, bitorder="little"))


def unpack_bitmask(packed: torch.Tensor, shape: list[int]) -> torch.Tensor:
    bits = numpy.unpackbits(packed.cpu().numpy(), axis=-1, count=shape[-1], bitorder="little")
    return torch.from_numpy(bits.reshape(shape).astype(bool))


def follows_24(weight: torch.Tensor) -> bool:
    """At least 2 zeros in every block of 4 consecutive inputs of every row (the N:M pattern of masks.py)."""
    if weight.dim() != 2 or weight.shape[1] % 4:
        return False
    return bool((_nonzero_mask(weight).numpy().reshape(-1, 4).sum(axis=1) <= 2).all())


def _mask_24(weight: torch.Tensor) -> torch.Tensor:
    """Exactly 2 kept positions per block of 4: the non-zeros, padded with the first zero positions where a block has fewer."""
    nonzero = _nonzero_mask(weight).numpy().reshape(-1, 4)
    missing = 2 - nonzero.sum(axis=1, keepdims=True)
    zero = ~nonzero
    keep = nonzero | (zero & (numpy.cumsum(zero, axis=1) <= missing))
    return torch.from_numpy(keep.reshape(weight.shape))


_INT_VIEWS = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _raw(tensor: torch.Tensor) -> numpy.ndarray:
    """The tensor's bits as a numpy integer array (numpy has no bfloat16; selecting bits is exact for every dtype)."""
    return tensor.contiguous().view(_INT_VIEWS[tensor.element_size()]).numpy()


def _select(weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """weight[mask] as a 1-D tensor of weight's dtype (numpy boolean indexing: several times faster than torch's)."""
    return torch.from_numpy(_raw(weight)[mask.numpy()]).view(weight.dtype)


def _nonzero_mask(weight: torch.Tensor) -> torch.Tensor:
    """weight != 0 (for floats: -0.0 counts as zero), computed on the raw bits with numpy."""
    raw = _raw(weight)
    if weight.is_floating_point():
        raw = raw & numpy.array((1 << (8 * weight.element_size() - 1)) - 1, dtype=raw.dtype)
    return torch.from_numpy(raw != 0)


def compress_weight(prefix: str, weight: torch.Tensor, fmt: str) -> dict[str, torch.Tensor]:
    """The stored tensors of one weight [out, in] under `prefix` (the module path, without `.weight`)."""
    weight = weight.detach().cpu()
    if fmt == BITMASK:
        mask = _nonzero_mask(weight)
        counts = torch.from_numpy(mask.numpy().sum(axis=1, dtype=numpy.int64))
        return {
            f"{prefix}.shape": torch.tensor(list(weight.shape), dtype=torch.int64),
            f"{prefix}.weight": _select(weight, mask),
            f"{prefix}.bitmask": pack_bitmask(mask),
            f"{prefix}.row_offsets": (torch.cumsum(counts, 0) - counts).to(torch.int64),
        }
    if fmt == BITMASK_24:
        if not follows_24(weight):
            raise ValueError(f"{prefix} is not 2:4 sparse: use {BITMASK}")
        mask = _mask_24(weight)
        return {
            f"{prefix}.shape": torch.tensor(list(weight.shape), dtype=torch.int64).reshape(-1, 1),
            f"{prefix}.weight": _select(weight, mask).reshape(weight.shape[0], weight.shape[1] // 2),
            f"{prefix}.bitmask": pack_bitmask(mask),
        }
    raise ValueError(f"unknown compression format {fmt!r}: use one of {', '.join(FORMATS)}")


def compressed_spec(prefix: str, weight: torch.Tensor, fmt: str) -> list[tuple[str, str, list[int], int]]:
    """The (name, dtype, shape, bytes) entries compress_weight will produce, from the non-zero count alone."""
    rows, columns = weight.shape
    dtype, size = _DTYPE_NAMES[weight.dtype], weight.element_size()
    packed = [rows, (columns + 7) // 8]
    if fmt == BITMASK:
        count = int(numpy.count_nonzero(_nonzero_mask(weight).numpy()))
        return [
            (f"{prefix}.shape", "I64", [2], 16),
            (f"{prefix}.weight", dtype, [count], count * size),
            (f"{prefix}.bitmask", "U8", packed, packed[0] * packed[1]),
            (f"{prefix}.row_offsets", "I64", [rows], rows * 8),
        ]
    return [
        (f"{prefix}.shape", "I64", [2, 1], 16),
        (f"{prefix}.weight", dtype, [rows, columns // 2], rows * columns // 2 * size),
        (f"{prefix}.bitmask", "U8", packed, packed[0] * packed[1]),
    ]


def decompress_weight(parts: dict[str, torch.Tensor], fmt: str) -> torch.Tensor:
    """The dense weight from its stored tensors (keyed by part name: shape, weight (the values), bitmask[, row_offsets])."""
    shape = [int(v) for v in parts["shape"].flatten().tolist()]
    values = parts["weight"].reshape(-1)
    mask = numpy.unpackbits(parts["bitmask"].numpy(), axis=-1, count=shape[-1], bitorder="little").view(bool)
    dense = numpy.zeros(shape, dtype=_raw(values[:0]).dtype)
    dense[mask] = _raw(values)
    return torch.from_numpy(dense).view(values.dtype)


# --- folders -----------------------------------------------------------------------------


def compression_format(folder: Path) -> str | None:
    """The sparse format a folder's config.json declares, or None for a dense folder."""
    try:
        config = json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    if isinstance(config.get(CONFIG_KEY), dict):
        fmt = config[CONFIG_KEY].get("format")
    else:  # an earlier version's folder: compressed-tensors' quantization_config
        quantization = config.get("quantization_config") or {}
        if quantization.get("quant_method") != "compressed-tensors":
            return None
        if quantization.get("config_groups"):
            raise UserError(f"'{folder}' is quantized as well as sparse: hybridprune reads sparse-only folders")
        fmt = (quantization.get("sparsity_config") or {}).get("format")
    if fmt in (None, "dense"):
        return None
    if fmt not in FORMATS:
        raise UserError(f"'{folder}' is stored as '{fmt}', which hybridprune cannot read")
    return fmt


def dense_config(config: dict[str, Any]) -> dict[str, Any]:
    """A compressed folder's config.json as the dense model's: its own model_type back, the marks removed."""
    config = dict(config)
    marks = config.pop(CONFIG_KEY, None)
    if isinstance(marks, dict) and "dense_model_type" in marks:
        config["model_type"] = marks["dense_model_type"]
    if (config.get("quantization_config") or {}).get("quant_method") == "compressed-tensors":
        config.pop("quantization_config")
    return config


def _is_target(name: str, modules: tuple[str, ...]) -> bool:
    return bool(re.search(r"\.(" + "|".join(map(re.escape, modules)) + r")\.weight$", name))


def _spec(tensor: torch.Tensor) -> tuple[str, list[int], int]:
    return _DTYPE_NAMES[tensor.dtype], list(tensor.shape), tensor.numel() * tensor.element_size()


def write_safetensors_streaming(path: Path, specs: list[tuple[str, str, list[int], int]], tensors: Iterator[tuple[str, torch.Tensor]]) -> int:
    """Write a safetensors file whose header is known up front (`specs`: name, dtype, shape, bytes, in order)
    from tensors produced one at a time in the same order. Returns the file size."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, dtype, shape, size in specs:
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    expected = iter(specs)
    with open(path, "wb") as handle:
        handle.write(len(encoded).to_bytes(8, "little"))
        handle.write(encoded)
        for name, tensor in tensors:
            spec = next(expected)
            if spec[0] != name or _spec(tensor)[2] != spec[3]:
                raise RuntimeError(f"safetensors writer: {name} does not match its planned entry {spec[0]}")
            handle.write(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        handle.flush()
        os.fsync(handle.fileno())
    return 8 + len(encoded) + offset


def _compressed_stream(path: Path, fmt: str, modules: tuple[str, ...], stats: dict[str, int]) -> Iterator[tuple[str, torch.Tensor]]:
    for name, tensor in iter_tensors(path):
        if _is_target(name, modules) and tensor.dim() == 2 and tensor.is_floating_point():
            stats["weights"] += tensor.numel()
            stats["zeros"] += int((tensor == 0).sum())
            stats["count"] += 1
            yield from compress_weight(name[: -len(".weight")], tensor, fmt).items()
        else:
            yield name, tensor


def _compressed_specs(path: Path, fmt: str, modules: tuple[str, ...]) -> Iterator[tuple[str, str, list[int], int]]:
    for name, tensor in iter_tensors(path):
        if _is_target(name, modules) and tensor.dim() == 2 and tensor.is_floating_point():
            yield from compressed_spec(name[: -len(".weight")], tensor, fmt)
        else:
            yield (name, *_spec(tensor))


def detect_format(folder: Path, modules: tuple[str, ...] = DEFAULT_MODULES) -> str:
    """sparse-24-bitmask when every targeted weight follows 2:4, sparse-bitmask otherwise (one pass, tensor by tensor)."""
    for path in safetensors_files(folder):
        for name, tensor in iter_tensors(path):
            if _is_target(name, modules) and not follows_24(tensor):
                return BITMASK
    return BITMASK_24


def compress_folder(
    source: Path, target: Path | None = None, fmt: str = "auto", modules: tuple[str, ...] = DEFAULT_MODULES
) -> CompressionResult:
    """Rewrite a dense-format model folder (one file or sharded, e.g. a streamed prune) in a sparse bitmask format.

    `target` None rewrites `source` in place (for a staging folder that is renamed into place afterwards:
    each file is replaced atomically, config.json last). Otherwise `target` (new or empty) gets the
    compressed weights plus copies of every other file. Reads and writes tensor by tensor.
    """
    source = Path(source)
    target = source if target is None else Path(target)
    if compression_format(source) is not None:
        raise UserError(f"'{source}' is already compressed")
    files = safetensors_files(source)
    if not files:
        raise UserError(f"'{source}' has no safetensors weights to compress")
    if fmt == "auto":
        fmt = detect_format(source, modules)
    if fmt not in FORMATS:
        raise UserError(f"unknown --compress format '{fmt}': use auto, {', '.join(FORMATS)}")
    if target != source:
        target.mkdir(parents=True, exist_ok=True)
        for path in source.iterdir():
            if path.is_file() and path.suffix != ".safetensors" and path.name != INDEX_FILE:
                shutil.copy2(path, target / path.name)
    before = after = 0
    stats = {"weights": 0, "zeros": 0, "count": 0}
    weight_map: dict[str, str] = {}
    for path in files:
        before += path.stat().st_size
        specs = list(_compressed_specs(path, fmt, modules))
        temporary = target / f".{path.name}.compressing"
        after += write_safetensors_streaming(temporary, specs, _compressed_stream(path, fmt, modules, stats))
        os.replace(temporary, target / path.name)
        weight_map.update({spec[0]: path.name for spec in specs})
    if (source / INDEX_FILE).is_file() or len(files) > 1:
        index = {"metadata": {"total_size": after}, "weight_map": dict(sorted(weight_map.items()))}
        _write_json(target / INDEX_FILE, index)
    sparsity = stats["zeros"] / max(stats["weights"], 1)
    _write_compression_config(target, fmt, sparsity)
    return CompressionResult(fmt, before, after, stats["count"], sparsity)


def _write_compression_config(folder: Path, fmt: str | None, sparsity: float = 0.0) -> None:
    """Mark config.json as compressed (`fmt`) or dense again (None)."""
    path = folder / "config.json"
    config = dense_config(json.loads(path.read_text(encoding="utf-8")))
    if fmt is not None:
        config[CONFIG_KEY] = {
            # not "model_type": transformers' config classes would take a nested dict with their model_type as the config
            "format": fmt, "dense_model_type": config.get("model_type"), "global_sparsity": round(float(sparsity), 6),
            "sparsity_structure": "2:4" if fmt == BITMASK_24 else "unstructured",
            "load_with": "hybridprune (eval, prune --model), or `hybridprune decompress FOLDER --out DENSE` for any other loader",
        }
        config["model_type"] = COMPRESSED_MODEL_TYPE
    _write_json(path, config)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def save_compressed(model: torch.nn.Module, folder: Path, fmt: str = "auto", tokenizer: Any = None) -> CompressionResult:
    """model.save_pretrained into `folder` (a new or staging folder), then compressed in place."""
    folder = Path(folder)
    model.save_pretrained(folder, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return compress_folder(folder, None, fmt)


# --- reading back ------------------------------------------------------------------------


def dense_names(names: Iterable[str], fmt: str) -> set[str]:
    """The dense tensor names a compressed folder's stored names stand for."""
    suffixes = tuple("." + part for part in (*PARTS[fmt], LEGACY_VALUES))
    dense = set()
    for name in names:
        if name.endswith(suffixes):
            dense.add(name.rsplit(".", 1)[0] + ".weight")
        else:
            dense.add(name)
    return dense


def read_decompressed(
    folder: Path, fmt: str, dtype: torch.dtype, names: set[str] | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """(dense name, tensor) for a compressed folder, floating tensors as `dtype`; only `names` when given."""
    for path in safetensors_files(folder):
        for name, tensor in _read_file_decompressed(path, fmt, names):
            yield name, tensor.to(dtype) if tensor.is_floating_point() else tensor


def decompress_folder(source: Path, target: Path) -> int:
    """Write a plain dense folder (that any transformers loads) from a compressed one; returns bytes written."""
    source, target = Path(source), Path(target)
    fmt = compression_format(source)
    if fmt is None:
        raise UserError(f"'{source}' is not a compressed folder")
    target.mkdir(parents=True, exist_ok=True)
    for path in source.iterdir():
        if path.is_file() and path.suffix != ".safetensors" and path.name != INDEX_FILE:
            shutil.copy2(path, target / path.name)
    total, weight_map = 0, {}
    for path in safetensors_files(source):
        specs = [(name, *_spec(tensor)) for name, tensor in _read_file_decompressed(path, fmt)]
        total += write_safetensors_streaming(target / path.name, specs, _read_file_decompressed(path, fmt))
        weight_map.update({spec[0]: path.name for spec in specs})
    if (source / INDEX_FILE).is_file():
        _write_json(target / INDEX_FILE, {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))})
    _write_compression_config(target, None)
    return total


def _read_file_decompressed(path: Path, fmt: str, names: set[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """One file's tensors with compressed weights rebuilt (all, or only the dense `names`). A weight is compressed
    when its module has a bitmask; its values are `<module>.weight` (or `.compressed` in earlier versions' folders)."""
    parts_of = PARTS[fmt]
    stored = set(read_header(path)[0])
    wanted = None
    if names is not None:
        wanted = set()
        for name in names:
            if name.endswith(".weight") and f"{name[:-7]}.bitmask" in stored:
                wanted.update(f"{name[:-7]}.{part}" for part in (*parts_of, LEGACY_VALUES))
            elif name in stored:
                wanted.add(name)
    wanted = wanted & stored if wanted is not None else None
    pending: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in iter_tensors(path, wanted):
        prefix, _, part = name.rpartition(".")
        if f"{prefix}.bitmask" in stored and part in (*parts_of, LEGACY_VALUES):
            bucket = pending.setdefault(prefix, {})
            bucket["weight" if part == LEGACY_VALUES else part] = tensor
            if len(bucket) == len(parts_of):
                yield f"{prefix}.weight", decompress_weight(pending.pop(prefix), fmt)
        else:
            yield name, tensor
    if pending:
        raise ValueError(f"{path.name}: incomplete compressed weights {', '.join(sorted(pending))}")
