"""Text for calibration and evaluation: sources, token ids and windows.

Typical use: `ids = tokenize(load_text("wiki-vital", "calibration"), tokenizer, cache_dir)`,
then `sample_windows(ids, 32, 512, seed=0)` for calibration or `eval_windows(ids, 512, 64)`.
"""

from __future__ import annotations

from hybridprune.data.sources import SPLITS, WIKI_CODE, WIKI_VITAL, TextSource, load_text
from hybridprune.data.tokens import encode_text, tokenize, tokenizer_fingerprint
from hybridprune.data.windows import eval_windows, sample_windows

__all__ = [
    "SPLITS",
    "WIKI_CODE",
    "WIKI_VITAL",
    "TextSource",
    "encode_text",
    "eval_windows",
    "load_text",
    "sample_windows",
    "tokenize",
    "tokenizer_fingerprint",
]
