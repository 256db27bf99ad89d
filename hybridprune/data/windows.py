"""Cut a token stream into model inputs: random calibration windows and consecutive eval windows."""

from __future__ import annotations

import random
from typing import TYPE_CHECKING

from hybridprune.errors import UserError

if TYPE_CHECKING:
    import torch


def _as_ids(ids: torch.Tensor) -> torch.Tensor:
    import torch  # deferred: importing hybridprune.data should not cost a torch import

    ids = torch.as_tensor(ids, dtype=torch.long)
    if ids.dim() != 1:
        raise ValueError(f"expected a 1-D tensor of token ids, got shape {tuple(ids.shape)}")
    return ids


def sample_windows(ids: torch.Tensor, nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """`nsamples` windows of `seqlen` tokens, [nsamples, seqlen], at random starts.

    Starts follow the Wanda code exactly (`randint(0, T - seqlen - 1)` per window, here on a
    private `random.Random(seed)` so global state is untouched), so the same seed picks the
    same windows as the reference implementation. Windows may overlap.
    """
    ids = _as_ids(ids)
    if nsamples <= 0 or seqlen <= 0:
        raise UserError(f"calibration needs at least one window of at least one token (got {nsamples} x {seqlen})")
    if len(ids) < seqlen + 1:
        raise UserError(
            f"the calibration text has {len(ids)} tokens but windows of {seqlen} need at least {seqlen + 1}: "
            "use a longer text or a shorter sequence length"
        )
    import torch

    rng = random.Random(seed)
    starts = torch.tensor([rng.randint(0, len(ids) - seqlen - 1) for _ in range(nsamples)], dtype=torch.long)
    return ids[starts[:, None] + torch.arange(seqlen)]


def eval_windows(ids: torch.Tensor, seqlen: int, windows: int | None) -> torch.Tensor:
    """The first `windows` non-overlapping windows of `seqlen` tokens from the start, [W, seqlen].

    `None` means every complete window; the incomplete tail is dropped. Asking for more
    windows than the text holds is an error rather than a silent shortfall, so a reported
    perplexity always covers the number of windows that was asked for.
    """
    ids = _as_ids(ids)
    if seqlen <= 0:
        raise UserError(f"the sequence length must be positive (got {seqlen})")
    if windows is not None and windows <= 0:
        raise UserError(f"the number of eval windows must be positive or 'all' (got {windows})")
    available = len(ids) // seqlen
    if available == 0:
        raise UserError(
            f"the eval text has {len(ids)} tokens, too few for one window of {seqlen}: "
            "use a longer text or a shorter sequence length"
        )
    if windows is not None and windows > available:
        raise UserError(
            f"asked for {windows} eval windows of {seqlen} tokens but the text has {len(ids)} tokens "
            f"({available} complete windows): ask for at most {available}, or 'all'"
        )
    count = available if windows is None else windows
    return ids[: count * seqlen].reshape(count, seqlen)
