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


def network_allowed() -> bool:
    """True when the user opted in to hub downloads (HYBRIDPRUNE_ONLINE=1 or HF_HUB_OFFLINE=0)."""
    return os.environ.get("HF_HUB_OFFLINE", "1") in ("0", "false", "False", "")
