"""Second-order statistics: the Gram H = sum_t x_t x_t^T per input group, collected and stored compactly.

What the pruning needs: refine needs the damped Gram G = H + damping, the update needs the upper Cholesky
factor of G^-1 (SparseGPT's sweep). G serves both (the factor is one factorization away, and every preset
that updates shrinks G's off-diagonal first, so it refactorized anyway), so G is what is stored:

  <group>.gram_diag  [n]            float64  H_jj = sum_t x_tj^2 (exact; 0 marks a dead input channel)
  <group>.gram_corr  [n (n-1) / 2]  float16  H_ij / sqrt(H_ii H_jj) for i < j, row by row

The correlations lie in [-1, 1], where float16 keeps 11 significant bits (5e-4 relative): 2 bytes per
entry instead of 4 (float32) for a matrix that is as large as the weights at 8B-70B. Both the packing and
the unpacking run row by row (never an index tensor of n^2 entries: at 70B that alone would be 13 GB).

Collection accumulates H in float32 and computes only the upper blocks (H is symmetric): half the flops.
"""

from __future__ import annotations

import torch
from torch import Tensor

DAMPING = 0.01
"""G = H + DAMPING * mean(diag H) I (dead channels' diagonal set to 1 first), as SparseGPT damps."""
BLOCK = 1024
"""Columns per block of the upper-triangular accumulation and of the (un)packing."""
BFLOAT16_PRODUCTS = True
"""bfloat16 inputs are multiplied in bfloat16 (see GramAccumulator; benchmarks/second_order_storage.py
`--compare products` sets it off for its reference)."""
BUFFER_BYTES = 1 << 30
"""Most bytes of inputs one input group buffers before it multiplies them (see GramAccumulator)."""
CORRELATION_DTYPE = torch.float16
"""Storage of the correlations (benchmarks/second_order_storage.py compares it with float32)."""


class GramAccumulator:
    """The upper triangle (and diagonal) of sum_t x_t x_t^T over batches, in float32.

    float32 inputs: addmm_ on each batch. bfloat16 inputs (the dtype large models are pruned in) are
    multiplied in bfloat16, 2.7x float32's speed on this CPU (AMX), and buffered, transposed, until they hold
    as many tokens as the group has inputs (at most BUFFER_BYTES), then multiplied at once: adding a bfloat16
    product into the float32 total costs n^2 memory traffic whatever the tokens, as much as the matmul itself
    for one batch of 2048 tokens at n = 14336 (the Llama-3.1-8B down_proj); and x^T x with a strided x^T ran
    at half a Linear's speed, x^T stored contiguous at a Linear's. The products of
    bfloat16 values are exact in the float32 accumulation inside the matmul, and only each block sum is
    rounded to bfloat16 (2^-9 relative) before it is added to the float32 total; the diagonal is kept exact
    from float32 sums of squares. float16 inputs go through float32: their sums can overflow float16.
    At the Llama-3.1-8B shape and 16384 tokens this took the collection from 3.6x to 2.0x a forward pass
    (benchmarks/scale.py). Its cost in quality, SmolLM2 in bfloat16 on the five validation halves
    (benchmarks/second_order_storage.py --compare products): 3.3e-4 of the mask entries differ from float32
    products' (float16 storage alone: 8.4e-5), perplexity moves by 0.30% (balanced) and 0.45% (quality) at
    most, in both directions (lower on 7 of the 10 domain-preset pairs), within the 0.5% that the storage
    was held to.
    """

    def __init__(self) -> None:
        self._upper: Tensor | None = None
        self._diag: Tensor | None = None
        self._buffer: Tensor | None = None  # [n, capacity] the pending inputs, transposed
        self._used = 0

    def add(self, x: Tensor) -> None:
        flat = x.detach().reshape(-1, x.shape[-1])
        if flat.dtype != torch.bfloat16 or not BFLOAT16_PRODUCTS:
            flat = flat.to(torch.float32)
        tokens, width = flat.shape
        if self._upper is None:
            self._upper = torch.zeros(width, width, dtype=torch.float32, device=flat.device)
        if flat.dtype == torch.float32:  # addmm_ adds in place: buffering or transposing only slowed it down here
            for start in range(0, width, BLOCK):
                end = min(start + BLOCK, width)
                self._upper[start:end, start:].addmm_(flat[:, start:end].T, flat[:, start:])
            return
        if self._buffer is None:
            capacity = max(1, min(width, BUFFER_BYTES // (width * flat.element_size())))
            self._buffer = torch.empty(width, capacity, dtype=flat.dtype, device=flat.device)
        squares = flat.to(torch.float32).square_().sum(0)
        self._diag = squares if self._diag is None else self._diag.add_(squares)
        if self._used + tokens > self._buffer.shape[1]:
            self._flush()
        if tokens >= self._buffer.shape[1]:
            self._multiply(flat.T.contiguous())
            return
        # transposed contiguous first: copy_ from the strided transpose ran at half this speed here
        self._buffer[:, self._used : self._used + tokens] = flat.T.contiguous()
        self._used += tokens

    def _flush(self) -> None:
        if self._buffer is not None and self._used:
            pending = self._buffer[:, : self._used]
            # a partly filled buffer is copied contiguous first: on the strided slice the products ran at half
            # speed (n = 28672, 4096 of 18724 tokens: 5.3 s against 2.8 s)
            self._multiply(pending if self._used == self._buffer.shape[1] else pending.contiguous())
            self._used = 0

    def _multiply(self, transposed: Tensor) -> None:
        """Add x^T x (upper blocks) of the bfloat16 inputs x = transposed^T [tokens, n]."""
        assert self._upper is not None
        width = transposed.shape[0]
        for start in range(0, width, BLOCK):
            end = min(start + BLOCK, width)
            self._upper[start:end, start:].add_(transposed[start:end] @ transposed[start:].T)

    @property
    def gram(self) -> Tensor | None:
        """The accumulated upper triangle (diagonal included; below it is undefined), or None before any batch."""
        self._flush()
        if self._upper is not None and self._diag is not None:
            self._upper.diagonal().copy_(self._diag)
        return self._upper


def pack_gram(upper: Tensor) -> dict[str, Tensor]:
    """{"gram_diag", "gram_corr"} of a Gram whose upper triangle (diagonal included) is filled (see module doc)."""
    width = upper.shape[0]
    diag = upper.diagonal().to(torch.float64).cpu().clone()
    scale = diag.sqrt()
    inverse = torch.where(scale > 0, 1.0 / scale, torch.zeros_like(scale)).to(torch.float32).to(upper.device)
    corr = torch.empty(width * (width - 1) // 2, dtype=CORRELATION_DTYPE)
    offset = 0
    for start in range(0, width, BLOCK):
        end = min(start + BLOCK, width)
        rows = (upper[start:end, start:].to(torch.float32) * inverse[start:end, None] * inverse[None, start:]).clamp_(-1.0, 1.0)
        rows = rows.to(CORRELATION_DTYPE).cpu()
        for local in range(end - start):
            length = width - (start + local) - 1
            corr[offset : offset + length] = rows[local, local + 1 :]
            offset += length
    return {"gram_diag": diag, "gram_corr": corr}


def unpack_gram(diag: Tensor, corr: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """The symmetric Gram H [n, n] that pack_gram packed (its diagonal exact)."""
    width = diag.shape[0]
    if corr.numel() != width * (width - 1) // 2:
        raise ValueError(f"{corr.numel()} correlations do not fit {width} inputs")
    gram = torch.empty(width, width, dtype=dtype)
    offset = 0
    for row in range(width):
        length = width - row - 1
        gram[row, row + 1 :] = corr[offset : offset + length]
        offset += length
    for start in range(0, width, BLOCK):  # the lower triangle from the upper, a block of rows at a time
        end = min(start + BLOCK, width)
        gram[start:end, :start] = gram[:start, start:end].T
        upper = torch.triu(gram[start:end, start:end], 1)
        gram[start:end, start:end] = upper + upper.T
    scale = diag.sqrt().to(dtype)
    for start in range(0, width, BLOCK):  # s_i s_j is one rounding, the same both ways: G stays exactly symmetric
        end = min(start + BLOCK, width)
        gram[start:end].mul_(scale[start:end, None] * scale[None, :])
    gram.diagonal().copy_(diag.to(dtype))
    return gram


def damped_gram(diag: Tensor, corr: Tensor, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """(G = H + damping, dead-channel mask [n]) from the packed entries: dead channels get diagonal 1 first."""
    gram = unpack_gram(diag, corr, dtype)
    dead = diag == 0
    diagonal = gram.diagonal()
    diagonal[dead] = 1.0
    diagonal.add_(DAMPING * diagonal.mean())
    return gram, dead


def entry_bytes(widths: list[int]) -> int:
    """Bytes of one layer's stored second-order entries for its input groups' widths (see module doc)."""
    size = torch.finfo(CORRELATION_DTYPE).bits // 8
    return sum(8 * n + size * (n * (n - 1) // 2) for n in widths)
