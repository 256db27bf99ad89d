"""Session-wide fixtures: tiny random models of every supported family, built once per run.

The folders are shared by many tests: a test that changes a folder must copy it first
(`shutil.copytree`).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from helpers import make_tiny_model_folder


def pytest_configure(config: pytest.Config) -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # "Loading weights" / "Writing model shards" bars are noise in tests


@pytest.fixture(scope="session")
def tiny_model_factory(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """`factory(family)` -> the folder of a tiny random model of that family (seed 0), made once."""
    made: dict[str, Path] = {}

    def factory(family: str = "llama") -> Path:
        if family not in made:
            made[family] = make_tiny_model_folder(tmp_path_factory.mktemp(f"tiny-{family}"), family)
        return made[family]

    return factory


@pytest.fixture(scope="session")
def tiny_llama_folder(tiny_model_factory: Callable[[str], Path]) -> Path:
    """A tiny random LLaMA folder (read-only by convention: copy it before changing it)."""
    return tiny_model_factory("llama")


@pytest.fixture(scope="session")
def tiny_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache folder for the session, so tests never write into the user's cache."""
    return tmp_path_factory.mktemp("hybridprune-cache")


# The reliability tests' session fixtures (tests/reliability.py): one fork server, one tiny world and
# one set of uninterrupted reference runs for test_interruption, test_concurrency, test_cache,
# test_fsutil and test_hostile_input together.
from reliability import fault_table, good_entry, reference, server, tiny_model_copy, world  # noqa: E402, F401
