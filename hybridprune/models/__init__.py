"""Model loading and per-family adapters."""

from hybridprune.models.adapters import ADAPTERS, FamilyAdapter, adapter_for, supported_families
from hybridprune.models.loading import LoadedModel, embedded_folder, load_model, model_folder

__all__ = [
    "ADAPTERS",
    "FamilyAdapter",
    "LoadedModel",
    "adapter_for",
    "embedded_folder",
    "load_model",
    "model_folder",
    "supported_families",
]
