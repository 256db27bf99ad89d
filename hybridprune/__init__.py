"""hybridprune: prune decoder-only LLMs with Wanda (attention) + NeuronRank (MLP)."""

import os

__version__ = "0.1.0"

# Nothing should hang waiting for a hub that cannot be reached; HYBRIDPRUNE_ONLINE=1 opts back in.
if os.environ.get("HYBRIDPRUNE_ONLINE", "0") != "1":
    for _name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ.setdefault(_name, "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def network_allowed() -> bool:
    """True when the user opted in to hub downloads (HYBRIDPRUNE_ONLINE=1 or HF_HUB_OFFLINE=0)."""
    return os.environ.get("HF_HUB_OFFLINE", "1") in ("0", "false", "False", "")


_API = ("calibrate", "score", "prune", "evaluate")
__all__ = ["__version__", "network_allowed", *_API]


def __getattr__(name: str):
    """`hybridprune.prune(...)` and friends (hybridprune/api.py), imported on first use so that
    `import hybridprune` stays light."""
    if name in _API:
        from hybridprune import api

        return getattr(api, name)
    raise AttributeError(f"module 'hybridprune' has no attribute {name!r}")
