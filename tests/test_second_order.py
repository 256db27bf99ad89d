"""The second-order entry's storage (calibration/second_order.py): accumulation, packing, factorization."""

from __future__ import annotations

import pytest
import torch

from hybridprune.calibration import second_order
from hybridprune.calibration.second_order import (
    GramAccumulator,
    damped_gram,
    entry_bytes,
    pack_gram,
    unpack_gram,
)
from hybridprune.methods import reconstruct
from hybridprune.methods.reconstruct import inverse_factor


def inputs(tokens: int = 400, features: int = 70, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(tokens, 5, generator=generator) @ torch.randn(5, features, generator=generator)
    x = base + 0.3 * torch.randn(tokens, features, generator=generator)
    x = x * torch.logspace(-2, 2, features)  # channels of very different scales, as activations have
    x[:, 3] = 0.0  # a dead channel
    return x


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(second_order, "BLOCK", 16)  # several blocks, and a partial last one, on small matrices


def test_accumulator_holds_the_upper_triangle_of_the_gram_over_batches():
    x = inputs()
    accumulator = GramAccumulator()
    for part in x.split(150):
        accumulator.add(part.reshape(1, -1, x.shape[1]))
    accumulator.add(x[:30].reshape(1, -1, x.shape[1]))  # a batch of fewer tokens than inputs
    x = torch.cat([x, x[:30]])
    exact = x.double().T @ x.double()
    assert accumulator.gram is not None
    upper = torch.triu(torch.ones_like(exact, dtype=torch.bool))
    error = (accumulator.gram.double() - exact).abs()[upper] / exact.abs().max()
    assert float(error.max()) < 1e-6


def test_bfloat16_inputs_keep_the_diagonal_exact_and_the_correlations_to_bfloat16_rounding():
    x = inputs().to(torch.bfloat16)
    accumulator = GramAccumulator()
    for part in x.split(25):  # batches of fewer tokens than inputs are buffered and multiplied together
        accumulator.add(part.reshape(1, -1, x.shape[1]))
    exact = x.double().T @ x.double()  # bfloat16 values are exact in float64
    assert accumulator.gram is not None and accumulator.gram.dtype == torch.float32
    gram = accumulator.gram.double()
    # the diagonal from float32 sums of squares: exact to float32
    assert torch.allclose(gram.diagonal(), exact.diagonal(), rtol=1e-6, atol=0.0)
    # off the diagonal: each flush's block sum rounded to bfloat16 once (2^-9 relative), a few flushes
    scale = exact.diagonal().sqrt()
    outer = torch.outer(scale, scale)
    upper = torch.triu(outer > 0, 1)
    relative = (gram - exact).abs()[upper] / outer[upper]
    assert float(relative.max()) < 4 * 2.0**-9
    assert float(relative.max()) > 0.0  # it did take the bfloat16 path
    float16 = GramAccumulator()
    float16.add(x.to(torch.float16).reshape(1, -1, x.shape[1]))  # float16 block sums could overflow: float32
    assert float16.gram is not None
    assert float(((float16.gram.double() - exact).abs()[upper] / outer[upper]).max()) < 1e-5


def test_packing_keeps_the_diagonal_exactly_and_the_correlations_to_float16():
    x = inputs()
    exact = x.double().T @ x.double()
    packed = pack_gram(exact.float())
    n = exact.shape[0]
    assert packed["gram_diag"].dtype == torch.float64 and packed["gram_corr"].dtype == torch.float16
    assert packed["gram_corr"].numel() == n * (n - 1) // 2
    assert sum(t.numel() * t.element_size() for t in packed.values()) == entry_bytes([n])
    gram = unpack_gram(packed["gram_diag"], packed["gram_corr"])
    assert torch.equal(gram, gram.T)
    assert torch.equal(gram.diagonal(), exact.diagonal().float())
    scale = exact.diagonal().sqrt()
    outer = torch.outer(scale, scale)
    live = outer > 0
    relative = (gram.double() - exact).abs()[live] / outer[live]
    assert float(relative.max()) < 6e-4  # float16: 11 significant bits
    assert float(gram[3].abs().max()) == 0.0  # a dead channel stays zero


def test_damped_gram_marks_dead_channels_and_damps_like_sparsegpt():
    x = inputs()
    exact = x.double().T @ x.double()
    packed = pack_gram(exact.float())
    gram, dead = damped_gram(packed["gram_diag"], packed["gram_corr"])
    assert dead.tolist() == [index == 3 for index in range(exact.shape[0])]
    diagonal = exact.diagonal().clone()
    diagonal[3] = 1.0
    expected = diagonal + second_order.DAMPING * diagonal.mean()
    torch.testing.assert_close(gram.diagonal().double(), expected, rtol=1e-6, atol=0)


@pytest.mark.parametrize("float64", [True, False])
def test_inverse_factor_is_the_upper_factor_of_the_inverse(monkeypatch: pytest.MonkeyPatch, float64: bool):
    """float64 where it fits the memory bound, float32 (SparseGPT's precision) above: both factor G^-1."""
    monkeypatch.setattr(reconstruct, "FLOAT64_BYTES", 2**40 if float64 else 0)
    x = inputs()
    packed = pack_gram((x.double().T @ x.double()).float())
    gram, _ = damped_gram(packed["gram_diag"], packed["gram_corr"])
    reference = gram.double().clone()
    factor = inverse_factor(gram)
    assert factor.dtype == torch.float32 and torch.equal(factor, factor.triu())
    product = (factor.double().T @ factor.double()) @ reference
    torch.testing.assert_close(product, torch.eye(reference.shape[0], dtype=torch.float64), rtol=0, atol=1e-5 if float64 else 2e-3)


def test_unpack_refuses_a_wrong_size():
    with pytest.raises(ValueError, match="do not fit"):
        unpack_gram(torch.ones(4, dtype=torch.float64), torch.zeros(5, dtype=torch.float16))
