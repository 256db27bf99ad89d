"""Turn a TextSource into one stream of token ids, memoized on disk as safetensors.

Tokenizing is done in chunks of about CHUNK_CHARS characters so that the tokenizer's
intermediate memory (offsets, encodings) stays small for multi-megabyte texts. Each cut is
placed just before a run of whitespace that contains "\\n\\n" (a document or paragraph break),
so a chunk ends on a non-space character and the next one starts with the whole run. For
byte-level BPE with the GPT-2 split pattern (SmolLM2, GPT-2 and the test tokenizer) pieces
never span such a cut, so the ids equal one-shot tokenization; this was checked on every
wiki-vital split with the SmolLM2 tokenizer. Patterns that glue newlines to preceding
punctuation (Llama-3, Qwen2) may differ by a token at a cut, i.e. at most one per ~100k characters
(not measured: no such tokenizer is available offline).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from hybridprune.errors import UserError
from hybridprune.fsutil import atomic_file

if TYPE_CHECKING:
    import torch

    from hybridprune.data.sources import TextSource

CHUNK_CHARS = 100_000
_BREAK = "\n\n"


def _chunks(text: str, size: int) -> Iterator[str]:
    """Pieces of `text` of about `size` characters, each cut just before a whitespace run with "\\n\\n"."""
    start = 0
    while len(text) - start > size:
        cut = text.find(_BREAK, start + size)
        while cut > start and text[cut - 1].isspace():
            cut -= 1
        if cut <= start:
            break
        yield text[start:cut]
        start = cut
    yield text[start:]


def encode_text(text: str, tokenizer: Any, chunk_chars: int = CHUNK_CHARS) -> torch.Tensor:
    """All ids of `text` (no special tokens) as a 1-D LongTensor, tokenized chunk by chunk."""
    import torch

    parts = [
        torch.tensor(tokenizer(chunk, add_special_tokens=False, verbose=False)["input_ids"], dtype=torch.long)
        for chunk in _chunks(text, chunk_chars)
    ]
    return torch.cat(parts)


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A sha256 of what decides the ids: the backend JSON (fast tokenizers) or the vocabulary."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        blob = backend.to_str()
    else:
        blob = type(tokenizer).__name__ + json.dumps(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def tokenize(source: TextSource, tokenizer: Any, cache_dir: Path | None = None) -> torch.Tensor:
    """The token ids of `source` as a 1-D LongTensor; memoized in `cache_dir` when given.

    The cache file name is derived from the source fingerprint and the tokenizer fingerprint,
    so a changed text or tokenizer never reuses stale ids. A damaged cache file is re-made.
    """
    if cache_dir is None:
        return encode_text(source.text, tokenizer)
    from safetensors.torch import load_file, save_file

    key = hashlib.sha256(f"{source.fingerprint}:{tokenizer_fingerprint(tokenizer)}".encode()).hexdigest()
    path = Path(cache_dir) / f"tokens-{key[:32]}.safetensors"
    if path.is_file():
        try:
            return load_file(path)["ids"]
        except Exception:  # truncated or foreign file: tokenize again and overwrite it
            pass
    ids = encode_text(source.text, tokenizer)
    try:
        metadata = {"source": source.name, "split": source.split, "fingerprint": source.fingerprint}
        with atomic_file(path) as temporary:
            save_file({"ids": ids}, str(temporary), metadata=metadata)
    except OSError as exc:
        reason = exc.strerror or exc
        raise UserError(f"cannot write the token cache in {path.parent}: {reason}; choose a writable folder") from None
    return ids
