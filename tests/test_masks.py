"""Masks: exact counts, valid patterns, determinism and stable tie-breaking."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hybridprune.masks import (
    Pattern,
    allocate_sparsity,
    mask_n_m,
    mask_rows,
    mask_unstructured,
    neuron_keep_mask,
    parse_pattern,
    prune_counts,
)

FAST = settings(max_examples=60, deadline=None)

sparsities = st.floats(min_value=0.0, max_value=1.0, exclude_max=True)
seeds = st.integers(min_value=0, max_value=2**31 - 1)
dims = st.integers(min_value=1, max_value=24)


def random_metric(rows: int, cols: int, seed: int, with_ties: bool = False) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    if with_ties:
        return torch.randint(0, 3, (rows, cols), generator=generator).to(torch.float32)
    return torch.rand(rows, cols, generator=generator)


def assert_pruned_never_beat_kept(metric: torch.Tensor, mask: torch.Tensor) -> None:
    """Within each row, every pruned entry is <= every kept entry."""
    for row_metric, row_mask in zip(metric, mask):
        if row_mask.any() and (~row_mask).any():
            assert row_metric[~row_mask].max() <= row_metric[row_mask].min()


# prune_counts ---------------------------------------------------------------------------


@FAST
@given(
    sizes=st.lists(st.integers(min_value=0, max_value=50), min_size=1, max_size=20),
    rates=st.lists(sparsities, min_size=20, max_size=20),
)
def test_prune_counts_total_exact_and_each_unit_floor_or_ceil(sizes: list[int], rates: list[float]) -> None:
    size_tensor = torch.tensor(sizes)
    rate_tensor = torch.tensor(rates[: len(sizes)], dtype=torch.float64)
    counts = prune_counts(size_tensor, rate_tensor)
    shares = size_tensor.double() * rate_tensor
    assert counts.dtype == torch.long
    assert int(counts.sum()) == round(float(shares.sum()))
    assert bool((counts >= shares.floor()).all()) and bool((counts <= shares.ceil()).all())
    assert bool((counts >= 0).all()) and bool((counts <= size_tensor).all())


def test_prune_counts_gives_leftover_to_lower_index_on_ties() -> None:
    assert prune_counts(torch.tensor([5, 5, 5, 5]), 0.5).tolist() == [3, 3, 2, 2]


def test_prune_counts_rejects_bad_sparsity() -> None:
    with pytest.raises(ValueError):
        prune_counts(torch.tensor([4]), 1.5)
    with pytest.raises(ValueError):
        prune_counts(torch.tensor([4, 4]), torch.tensor([0.1, 0.2, 0.3]))


# unstructured ---------------------------------------------------------------------------


@FAST
@given(rows=dims, cols=dims, sparsity=sparsities, seed=seeds, with_ties=st.booleans())
def test_row_group_exact_per_row_and_total(
    rows: int, cols: int, sparsity: float, seed: int, with_ties: bool
) -> None:
    metric = random_metric(rows, cols, seed, with_ties)
    mask = mask_unstructured(metric, sparsity, "row")
    assert mask.dtype == torch.bool and mask.shape == metric.shape
    pruned_per_row = (~mask).sum(dim=1)
    share = cols * sparsity
    assert int(pruned_per_row.sum()) == round(rows * share)
    assert bool((pruned_per_row >= math.floor(share)).all())
    assert bool((pruned_per_row <= math.ceil(share)).all())
    assert_pruned_never_beat_kept(metric, mask)
    assert torch.equal(mask, mask_unstructured(metric.clone(), sparsity, "row"))


@FAST
@given(rows=dims, cols=dims, sparsity=sparsities, seed=seeds, with_ties=st.booleans())
def test_matrix_group_exact_total(rows: int, cols: int, sparsity: float, seed: int, with_ties: bool) -> None:
    metric = random_metric(rows, cols, seed, with_ties)
    mask = mask_unstructured(metric, sparsity, "matrix")
    assert int((~mask).sum()) == round(rows * cols * sparsity)
    assert_pruned_never_beat_kept(metric.reshape(1, -1), mask.reshape(1, -1))
    assert torch.equal(mask, mask_unstructured(metric, sparsity, "matrix"))


def test_ties_prune_lower_index_first() -> None:
    metric = torch.ones(2, 6)
    mask = mask_unstructured(metric, 0.5)
    assert mask.tolist() == [[False, False, False, True, True, True]] * 2
    assert neuron_keep_mask(torch.zeros(4), 0.5).tolist() == [False, False, True, True]


def test_row_and_matrix_groups_differ() -> None:
    metric = torch.tensor([[1.0, 2.0, 3.0, 4.0], [10.0, 20.0, 30.0, 40.0]])
    assert (~mask_unstructured(metric, 0.5, "row")).sum(dim=1).tolist() == [2, 2]
    assert (~mask_unstructured(metric, 0.5, "matrix")).sum(dim=1).tolist() == [4, 0]


def test_unstructured_rejects_nan_and_unknown_group() -> None:
    with pytest.raises(ValueError, match="NaN"):
        mask_unstructured(torch.tensor([[1.0, float("nan")]]), 0.5)
    with pytest.raises(ValueError, match="group"):
        mask_unstructured(torch.rand(2, 2), 0.5, "column")  # type: ignore[arg-type]


@FAST
@given(rows=dims, cols=dims, seed=seeds, data=st.data())
def test_mask_rows_follows_each_rows_sparsity(rows: int, cols: int, seed: int, data: st.DataObject) -> None:
    row_sparsity = torch.tensor(
        data.draw(st.lists(sparsities, min_size=rows, max_size=rows)), dtype=torch.float64
    )
    metric = random_metric(rows, cols, seed)
    mask = mask_rows(metric, row_sparsity)
    pruned_per_row = (~mask).sum(dim=1)
    shares = cols * row_sparsity
    assert int(pruned_per_row.sum()) == round(float(shares.sum()))
    assert bool((pruned_per_row >= shares.floor()).all()) and bool((pruned_per_row <= shares.ceil()).all())
    assert_pruned_never_beat_kept(metric, mask)


@FAST
@given(rows=dims, cols=dims, seed=seeds, data=st.data())
def test_selection_equals_a_stable_sort(rows: int, cols: int, seed: int, data: st.DataObject) -> None:
    """The kthvalue selection gives exactly the mask of a stable argsort, ties included."""
    row_sparsity = torch.tensor(data.draw(st.lists(sparsities, min_size=rows, max_size=rows)), dtype=torch.float64)
    metric = random_metric(rows, cols, seed, with_ties=data.draw(st.booleans()))
    metric[0, 0] = data.draw(st.sampled_from([0.0, -0.0, float("inf"), float("-inf")]))
    counts = prune_counts(torch.full((rows,), cols, dtype=torch.long), row_sparsity)
    assert torch.equal(mask_rows(metric, row_sparsity), stable_sort_mask(metric, counts))


def stable_sort_mask(metric: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    order = torch.argsort(metric, dim=1, stable=True)
    reference = torch.arange(metric.shape[1]).unsqueeze(0) >= counts.unsqueeze(1)
    return torch.empty_like(reference).scatter_(1, order, reference)


@FAST
@given(cols=st.integers(min_value=65, max_value=400), seed=seeds, sparsity=sparsities, data=st.data())
def test_a_wide_row_bracketed_from_a_sample_equals_a_stable_sort(cols, seed, sparsity, data) -> None:
    """A matrix as one group (one row wider than WIDE_ROW): the sample's bracket, or the whole row when the bracket
    misses, gives the stable sort's mask, ties and infinities included."""
    with pytest.MonkeyPatch.context() as patch:
        from hybridprune import masks

        patch.setattr(masks, "WIDE_ROW", 64)
        patch.setattr(masks, "WIDE_SAMPLE", 16)
        check_wide_row(cols, seed, sparsity, data)


def check_wide_row(cols, seed, sparsity, data) -> None:
    metric = random_metric(1, cols, seed, with_ties=data.draw(st.booleans()))
    metric[0, 0] = data.draw(st.sampled_from([0.0, float("inf"), float("-inf")]))
    if data.draw(st.booleans()):  # every sampled entry the smallest value: the bracket misses, the whole row decides
        metric[0, :: max(1, cols // 16)] = -1.0
    counts = prune_counts(torch.tensor([cols]), sparsity)
    assert torch.equal(mask_unstructured(metric, sparsity, group="matrix"), stable_sort_mask(metric, counts))


def test_rows_of_many_counts_each_get_their_own_threshold_and_a_row_of_none_keeps_everything() -> None:
    metric = random_metric(40, 30, seed=5, with_ties=True)
    metric[3, 4] = float("-inf")
    metric[7, 2] = float("inf")
    counts = torch.arange(40) % 31  # 0 (keep all) to 30 (prune all)
    from hybridprune.masks import _keep_all_but_lowest

    assert torch.equal(_keep_all_but_lowest(metric, counts), stable_sort_mask(metric, counts))


# patterns -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("unstructured", Pattern("unstructured")),
        ("Structured", Pattern("structured")),
        ("2:4", Pattern("nm", 2, 4)),
        (" 4 : 8 ", Pattern("nm", 4, 8)),
    ],
)
def test_parse_pattern_accepts(text: str, expected: Pattern) -> None:
    assert parse_pattern(text) == expected


@pytest.mark.parametrize("text", ["5:4", "2:0", "0:4", "4:4", "a:b", "2:", "2:4:8", "", "dense"])
def test_parse_pattern_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="pattern"):
        parse_pattern(text)


def test_pattern_sparsity_and_text() -> None:
    assert parse_pattern("2:4").sparsity == 0.5
    assert parse_pattern("4:8").sparsity == 0.5
    assert parse_pattern("1:4").sparsity == 0.25
    assert parse_pattern("unstructured").sparsity is None
    assert str(parse_pattern("4:8")) == "4:8"
    assert str(parse_pattern("structured")) == "structured"


@FAST
@given(
    rows=dims,
    blocks=st.integers(min_value=1, max_value=6),
    n_m=st.sampled_from([(1, 2), (2, 4), (1, 4), (3, 4), (4, 8), (2, 8)]),
    seed=seeds,
    with_ties=st.booleans(),
)
def test_n_m_every_block_valid(
    rows: int, blocks: int, n_m: tuple[int, int], seed: int, with_ties: bool
) -> None:
    n, m = n_m
    metric = random_metric(rows, blocks * m, seed, with_ties)
    mask = mask_n_m(metric, n, m)
    block_mask = mask.reshape(-1, m)
    assert bool(((~block_mask).sum(dim=1) == n).all())
    assert_pruned_never_beat_kept(metric.reshape(-1, m), block_mask)
    assert torch.equal(mask, mask_n_m(metric, n, m))


def test_n_m_rejects_bad_shapes_and_values() -> None:
    with pytest.raises(ValueError, match="multiple"):
        mask_n_m(torch.rand(2, 6), 2, 4)
    with pytest.raises(ValueError):
        mask_n_m(torch.rand(2, 8), 4, 4)


# neurons and allocation -----------------------------------------------------------------


@FAST
@given(neurons=st.integers(min_value=1, max_value=200), sparsity=sparsities, seed=seeds)
def test_neuron_keep_mask_keeps_best(neurons: int, sparsity: float, seed: int) -> None:
    scores = torch.rand(neurons, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    keep = neuron_keep_mask(scores, sparsity)
    assert int(keep.sum()) == neurons - round(sparsity * neurons)
    assert_pruned_never_beat_kept(scores.unsqueeze(0), keep.unsqueeze(0))


@FAST
@given(
    units=st.integers(min_value=1, max_value=40),
    target=st.floats(min_value=0.0, max_value=0.95),
    spread=st.floats(min_value=0.0, max_value=0.5),
    seed=seeds,
)
def test_allocate_sparsity_keeps_weighted_mean_and_order(
    units: int, target: float, spread: float, seed: int
) -> None:
    generator = torch.Generator().manual_seed(seed)
    importance = torch.randint(0, 10, (units,), generator=generator).to(torch.float64)
    sizes = torch.randint(1, 1000, (units,), generator=generator)
    allocation = allocate_sparsity(importance, sizes, target, spread)
    assert allocation.dtype == torch.float64
    weighted_mean = float((allocation * sizes).sum() / sizes.sum())
    assert abs(weighted_mean - target) <= 1e-9
    assert bool((allocation >= 0).all()) and bool((allocation <= 0.95).all())
    order = torch.argsort(importance)
    assert bool((allocation[order].diff() <= 1e-12).all()), "less important units must get more"
    same = importance.unsqueeze(0) == importance.unsqueeze(1)
    assert bool(((allocation.unsqueeze(0) - allocation.unsqueeze(1)).abs()[same] <= 1e-12).all())


def test_allocate_sparsity_spread_zero_is_uniform_and_spread_moves_it() -> None:
    importance = torch.tensor([3.0, 1.0, 2.0])
    sizes = torch.tensor([10, 10, 10])
    assert allocate_sparsity(importance, sizes, 0.5, 0.0).tolist() == [0.5, 0.5, 0.5]
    spread = allocate_sparsity(importance, sizes, 0.5, 0.2)
    assert torch.allclose(spread, torch.tensor([0.3, 0.7, 0.5], dtype=torch.float64))


def test_allocate_sparsity_shifts_after_clipping() -> None:
    allocation = allocate_sparsity(torch.tensor([0.0, 1.0]), torch.tensor([1, 3]), 0.9, 0.5)
    assert float(allocation.max()) <= 0.95
    assert abs(float((allocation * torch.tensor([1, 3])).sum()) / 4 - 0.9) <= 1e-9


@pytest.mark.parametrize("target", [-0.1, 0.96, 1.5])
def test_allocate_sparsity_rejects_infeasible_target(target: float) -> None:
    with pytest.raises(ValueError, match="infeasible"):
        allocate_sparsity(torch.rand(3), torch.tensor([1, 1, 1]), target, 0.1)


@settings(max_examples=40, deadline=None)
@given(
    hidden_blocks=st.integers(min_value=1, max_value=4),
    neurons_blocks=st.integers(min_value=1, max_value=6),
    sparsity=st.floats(min_value=0.0, max_value=0.95),
    pattern=st.sampled_from(["unstructured", "2:4", "1:4", "4:8", "structured"]),
    method=st.sampled_from(["hybrid", "wanda", "magnitude"]),
    seed=st.integers(min_value=0, max_value=2**31 - 1),
)
def test_layer_masks_exact_valid_deterministic(
    hidden_blocks: int, neurons_blocks: int, sparsity: float, pattern: str, method: str, seed: int
) -> None:
    """layer_masks for any shape and sparsity: exact counts, valid N:M blocks, whole neurons, same output twice."""
    from hybridprune.masks import parse_pattern, prune_counts
    from hybridprune.methods.hybrid import LayerPlan, layer_masks

    generator = torch.Generator().manual_seed(seed)
    hidden, neurons = 8 * hidden_blocks, 8 * neurons_blocks
    shapes = {"q": (hidden, hidden), "o": (hidden, hidden), "gate": (neurons, hidden), "up": (neurons, hidden), "down": (hidden, neurons)}
    weights = {name: torch.randn(shape, generator=generator) for name, shape in shapes.items()}
    sumsq = {name: torch.rand(shape[1], generator=generator, dtype=torch.float64) for name, shape in shapes.items()}
    score = torch.rand(neurons, generator=generator, dtype=torch.float64) + 1e-3
    mlp_method = "neuronrank" if method == "hybrid" else method
    plan = LayerPlan(method if method != "hybrid" else "wanda", mlp_method, sparsity, sparsity, pattern)
    masks = layer_masks(weights, sumsq, ("q", "o"), ("gate", "up", "down"), plan, score if method == "hybrid" else None)
    again = layer_masks(weights, sumsq, ("q", "o"), ("gate", "up", "down"), plan, score if method == "hybrid" else None)
    assert masks.keys() == again.keys() and all(torch.equal(masks[k], again[k]) for k in masks)
    parsed = parse_pattern(pattern)
    for name, mask in masks.items():
        assert mask.dtype == torch.bool
        if name == "neurons":
            assert int((~mask).sum()) == int(prune_counts(torch.tensor([neurons]), sparsity)[0])
        elif parsed.kind == "nm":
            assert bool(((~mask.reshape(-1, parsed.m)).sum(dim=1) == parsed.n).all())
        else:
            rows, cols = mask.shape
            expected = int(prune_counts(torch.full((rows,), cols), sparsity).sum())
            assert int((~mask).sum()) == expected, (name, pattern, sparsity)
    if sparsity > 0:
        expected_keys = {"q", "o", "neurons"} if parsed.kind == "structured" else set(shapes)
        assert set(masks) == expected_keys
