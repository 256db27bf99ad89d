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


# --- tiny random models -------------------------------------------------------------------

TINY_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text")
"""Every model_type hybridprune supports, each with a tiny config below."""

TINY_SLIDING_WINDOW = 8
"""Shorter than the test windows, so sliding-window layers really differ from full attention."""


def _tiny_config(family: str, vocab_size: int, token_id: int, overrides: dict):  # type: ignore[no-untyped-def]
    """A tiny config of `family` (transformers 5.x argument names), `overrides` applied last."""
    import transformers

    common = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=token_id,
        eos_token_id=token_id,
        pad_token_id=token_id,
        tie_word_embeddings=False,
    )
    mixed = ["sliding_attention", "full_attention"]
    specific: dict[str, tuple[str, dict]] = {
        "llama": ("LlamaConfig", {}),
        "mistral": ("MistralConfig", {"sliding_window": TINY_SLIDING_WINDOW}),
        "qwen2": (
            "Qwen2Config",
            {"use_sliding_window": True, "sliding_window": TINY_SLIDING_WINDOW, "layer_types": mixed},
        ),
        "qwen3": (
            "Qwen3Config",
            {
                "head_dim": 16,
                "use_sliding_window": True,
                "sliding_window": TINY_SLIDING_WINDOW,
                "layer_types": mixed,
            },
        ),
        "gemma2": (
            "Gemma2Config",
            {
                "head_dim": 16,
                "query_pre_attn_scalar": 16,
                "sliding_window": TINY_SLIDING_WINDOW,
                "layer_types": mixed,
                "attn_logit_softcapping": 50.0,
                "final_logit_softcapping": 30.0,
            },
        ),
        "gemma3_text": (
            "Gemma3TextConfig",
            {
                "head_dim": 16,
                "query_pre_attn_scalar": 16,
                "sliding_window": TINY_SLIDING_WINDOW,
                "layer_types": mixed,
            },
        ),
    }
    if family not in specific:
        raise ValueError(f"no tiny config for {family!r}; known: {', '.join(TINY_FAMILIES)}")
    class_name, extra = specific[family]
    return getattr(transformers, class_name)(**{**common, **extra, **overrides})


def make_tiny_model_folder(folder: Path, family: str = "llama", seed: int = 0, **overrides) -> Path:  # type: ignore[no-untyped-def]
    """Save a tiny random `family` model (safetensors) plus the tiny tokenizer into `folder`.

    Hidden 64, 2 layers, 4 heads / 2 KV heads, intermediate 128, max positions 256, vocab
    the tiny tokenizer's size. Families with sliding windows get a window of
    TINY_SLIDING_WINDOW tokens (alternating with full attention where the family allows).
    `overrides` replace config arguments. The weights depend only on `seed`.
    """
    import torch
    from transformers import AutoModelForCausalLM

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = make_tiny_tokenizer(folder)
    token_id = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    config = _tiny_config(family, len(tokenizer), token_id, overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(folder, safe_serialization=True)
    return folder


def correlated_inputs(tokens: int = 512, features: int = 24, rank: int = 6, seed: int = 0):
    """Float64 [tokens, features] inputs of low rank plus noise: correlated channels, as a real layer's."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(tokens, rank, generator=generator) @ torch.randn(rank, features, generator=generator)
            + 0.1 * torch.randn(tokens, features, generator=generator)).double()
