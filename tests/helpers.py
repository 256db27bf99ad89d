"""Shared test fixtures that need no network: a tiny real tokenizer built on the spot."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

_SENTENCES = (
    "The quick brown fox jumps over the lazy dog.",
    "Pruning removes weights that matter least to the model's output.",
    "Wanda scores each weight by its magnitude times the norm of its input activation.",
    "In 1884, Georges Seurat began painting on the island of La Grande Jatte.",
    "Calibration windows are drawn at random; evaluation windows follow one another.",
    "Numbers such as 0, 1, 42 and 3.14159 appear in text too!",
    "Sparse models can run faster when whole neurons are removed from the MLP.",
    "A shirt is a cloth garment for the upper body. Łódź and İzmir are cities.",
)
TRAINING_TEXT = "\n\n".join(" ".join(_SENTENCES[i:] + _SENTENCES[:i]) for i in range(len(_SENTENCES)))
"""About 4 KB of text, also handy as a small corpus in tests."""


def make_tiny_tokenizer(folder: Path, vocab_size: int = 400) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE (GPT-2 split pattern, like SmolLM2) and save it to `folder`.

    Every byte is in the alphabet, so any text encodes; the folder loads with
    `AutoTokenizer.from_pretrained(folder)`, and the returned tokenizer is that reloaded one.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator([TRAINING_TEXT], trainer=trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<|endoftext|>", eos_token="<|endoftext|>", model_max_length=2048
    )
    folder = Path(folder)
    wrapped.save_pretrained(folder)
    return AutoTokenizer.from_pretrained(folder)
