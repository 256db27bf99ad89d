"""The package's version and its network defaults (the lowest room: imports nothing of hybridprune).

Importing it sets the offline defaults: nothing should hang waiting for a hub that cannot be reached;
HYBRIDPRUNE_ONLINE=1 opts back in."""

import os

__version__ = "0.1.0"

if os.environ.get("HYBRIDPRUNE_ONLINE", "0") != "1":
    for _name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ.setdefault(_name, "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# torch's CPU allocator backs allocations of 2 MB and more with transparent huge pages when this is set. torch reads
# it once, at its first allocation: it holds where hybridprune is imported before torch (the CLI; an API user may
# set it in the shell). The first touch of a fresh 16384 x 4096 float32 buffer took 0.07-0.39 s without it, 0.03 s
# with it; a Llama-3.1-8B layer's `balanced` 65.2 s without, 56.3 s with; Qwen2.5-1.5B's the same either way (2 cores,
# THP "madvise", 2026-12-07, docs/results.md): the refine allocates several such buffers per chunk.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")


def network_allowed() -> bool:
    """True when the user opted in to hub downloads (HYBRIDPRUNE_ONLINE=1 or HF_HUB_OFFLINE=0)."""
    return os.environ.get("HF_HUB_OFFLINE", "1") in ("0", "false", "False", "")
