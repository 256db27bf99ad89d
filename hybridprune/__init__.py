"""hybridprune: prune decoder-only LLMs with Wanda (attention) + NeuronRank (MLP)."""

from hybridprune.env import __version__, network_allowed

_API = ("calibrate", "score", "prune", "evaluate")
__all__ = ["__version__", "network_allowed", *_API]


def __getattr__(name: str):
    """`hybridprune.prune(...)` and friends (hybridprune/api), imported on first use so that
    `import hybridprune` stays light. Modules of the package import from `hybridprune.env`, never from here."""
    if name in _API:
        from hybridprune import api

        return getattr(api, name)
    raise AttributeError(f"module 'hybridprune' has no attribute {name!r}")
