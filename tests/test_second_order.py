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
    exact = x.double().T @ x.double()
    assert accumulator.gram is not None
    upper = torch.triu(torch.ones_like(exact, dtype=torch.bool))
    error = (accumulator.gram.double() - exact).abs()[upper] / exact.abs().max()
    assert float(error.max()) < 1e-6


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
