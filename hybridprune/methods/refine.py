"""Swap refinement of masks under the calibration Gram (mask only), and the Gram shrunk toward its diagonal.

Pure tensor code (tensors in, tensors out). Each row's error (w - w*keep)^T G (w - w*keep) is lowered by swapping
one kept and one pruned weight at a time (several per step with `batch`), keeping every row's count (and, under
N:M, every group's); the weight update that may follow is methods/reconstruct.py's, the masks chosen inside the
OBS sweep are methods/obs.py's.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from hybridprune.masks import row_counts


def shrink_offdiagonal(gram: Tensor, offdiag: float, inplace: bool = False) -> Tensor:
    """diag(G) + offdiag * (G - diag(G)): the Gram shrunk toward its diagonal (Ledoit-Wolf style).

    The off-diagonal part (how input channels co-vary) is what is most specific to the calibration
    text; its diagonal is Wanda's ||x_j||^2. offdiag 1 keeps G; 0 makes the objectives separable per
    weight: swap refinement then keeps Wanda's masks and the OBS update changes nothing. `inplace`: G itself is
    scaled (a Gram just unpacked for this use: 0.03 s against 0.25 s for a new 14336^2 copy).
    """
    if not 0.0 <= offdiag <= 1.0:
        raise ValueError(f"offdiag must be in [0, 1], got {offdiag}")
    return scale_offdiagonal(gram, offdiag, inplace)


def scale_offdiagonal(gram: Tensor, factor: float, inplace: bool = False) -> Tensor:
    """diag(G) + factor * (G - diag(G)) for any factor >= 0: a Gram shrunk by a is reweighted to b by factor b / a
    (in place: the Gram the refine chose masks under becomes the update's without a second n x n copy)."""
    if factor < 0:
        raise ValueError(f"factor must be >= 0, got {factor}")
    if factor == 1.0:
        return gram
    diagonal = gram.diagonal().clone()
    # the same values as diag + a (G - diag), without two more n x n temporaries
    scaled = gram.mul_(factor) if inplace else gram * factor
    scaled.diagonal().copy_(diagonal)
    return scaled


def reweight_residual(residual: Tensor, pruned: Tensor, diagonal: Tensor, factor: float) -> Tensor:
    """p G_b from the residual p G_a (p = w * ~keep [rows, n], in place) for Grams that differ only in their
    off-diagonal's weight, G_x = diag + x (G - diag), factor = b / a (a > 0): (b / a) p G_a + (1 - b / a) p * diag.
    Elementwise: the refine's residual becomes the right-hand side of an update under another weight."""
    return residual.mul_(factor).add_(pruned * diagonal.to(residual.dtype), alpha=1.0 - factor)


def reconstruction_error(weight: Tensor, keep: Tensor, gram: Tensor) -> Tensor:
    """Per row, (w - w*keep)^T G (w - w*keep) = ||(W - W_masked) x||^2 summed over the calibration tokens."""
    pruned = (weight.to(torch.float64) * (~keep))
    return ((pruned @ gram.to(torch.float64)) * pruned).sum(1)


def refine_swaps(
    weight: Tensor,
    keep: Tensor,
    gram: Tensor,
    *,
    steps: int = 100,
    nm: tuple[int, int] | None = None,
    candidates: int = 16,
    batch: int = 1,
    with_residual: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Improve a keep-mask row by row under the Gram matrix G: swap one kept and one pruned weight of a row
    when that lowers the row's error (w - w*keep)^T G (w - w*keep) (SparseSwaps-like, mask only).

    Every row keeps its count (and, with `nm`, every group of M its N:M count: swaps stay inside a group).
    At most `steps` swaps per row; each accepted swap lowers the row's error by its exact amount, so the
    error never increases. Unstructured: the `candidates` best single moves on each side are paired
    exactly (the cross term included), found among every weight every REFRESH steps and among the pool of
    block maxima kept from then in between (POOL); N:M: every (pruned, kept) pair inside every group is
    evaluated at every step.
    `batch` > 1: a step may also make several swaps at once (the best pairs of distinct weights, or of
    distinct N:M groups), taking the prefix of them whose exact joint change, cross terms included, is lowest.
    `with_residual`: also return (w * ~keep) G for the refined masks ([rows, columns], float32 or float64 as the
    refine runs), kept up to date by the refine anyway: the least-squares update's right-hand side.
    """
    rows, columns = weight.shape
    device = weight.device
    # float64 weights are refined in float64 (tests); float32 in float32 with the residual recomputed
    # every `RESYNC` steps and only clear improvements accepted (tolerance below).
    dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    g = gram.to(device, dtype).contiguous()  # read through its flat view (_entries)
    keep_all = keep.clone().to(device)
    # the state of the rows still refining (a row whose full search finds no improving swap leaves: nothing left)
    rows_left = torch.arange(rows, device=device)
    w = weight.detach().to(dtype)
    keep_now = keep_all.clone()
    squared = w * w * g.diagonal()
    # accept a swap only if it lowers the error by more than rounding could explain
    tolerance = squared.max(1).values * (1e-12 if dtype == torch.float64 else 1e-5)
    search = (_NMSearch(w, keep_now, squared, g, nm) if nm is not None
              else _Search(w, keep_now, squared, g.diagonal(), candidates))
    del squared  # the searches keep what they need of it

    residual = torch.empty_like(w)

    def resync() -> None:  # r = G delta per row (G symmetric), in the refine's dtype, into the residual's memory
        scratch = search.scratch(residual.shape[0])
        torch.mul(w, ~keep_now, out=scratch)
        torch.matmul(scratch, g, out=residual)

    resync()
    # with_residual: every row's residual, written back as rows leave (a row that leaves changes no more)
    residual_all = residual if with_residual else None
    step, synced = 0, 0
    while step < steps:
        if step - synced >= RESYNC:
            resync()
            synced = step
        full = search.full(step)
        delta, revive, prune = search.best(w, keep_now, residual, g, batch, full)
        accept = delta < -tolerance
        if not bool(accept.any()):
            if full:
                break
            # no row has an improving swap in its pool: each one idles until the next full search (nothing in it
            # changes before), so the steps up to it are skipped, for every row alike
            step = search.next_full(step)
            continue
        step += 1
        r = torch.nonzero(accept).squeeze(1)
        if revive.dim() == 1:
            revive, prune = revive.unsqueeze(1), prune.unsqueeze(1)
        # revive/prune [rows, swaps], -1 = none. Cost of pruning kept j: 2 w_j r_j + w_j^2 G_jj; gain of reviving
        # pruned i: 2 w_i r_i - w_i^2 G_ii; a pair also has the cross term -2 w_i w_j G_ij (all in the searches).
        i, j = revive[r], prune[r]
        used = i >= 0
        local = r.unsqueeze(1).expand_as(i)[used]
        keep_now[local, i[used]] = True
        keep_now[local, j[used]] = False
        search.swapped(w, r, i, j)
        _add_rows_of_g(residual, g, w, r, i, j, used)
        # a row without an improving swap in a full search has none later either (nothing in it changes; after a
        # pooled search it may have one outside the pool, so it stays): the rows still refining are gathered into
        # smaller tensors once an eighth have stopped, not at every step one stops (each gathering copies the
        # whole search state; at 2:4 that took 6% of a run)
        if full and len(r) * 8 <= 7 * len(rows_left):
            done = torch.nonzero(~accept).squeeze(1)
            keep_all[rows_left[done]] = keep_now[done]
            if residual_all is not None and residual is not residual_all:
                residual_all[rows_left[done]] = residual[done]
            rows_left, residual, keep_now = rows_left[r], residual[r], keep_now[r]  # one copy each, then reused
            w, tolerance = w[r], tolerance[r]
            search.keep_rows(r)
    keep_all[rows_left] = keep_now
    if residual_all is None:
        return keep_all
    if residual is not residual_all:
        residual_all[rows_left] = residual
    return keep_all, residual_all


REFRESH = 4
POOL = 128
"""The unstructured search's candidate pool: every weight of a row is scored only every REFRESH steps, in a full
search that keeps a pool of each side's moves (kept, pruned): each row's columns cut into POOL contiguous blocks, the
best move of each block; the searches between score the pool alone with the current residual (every accepted swap
still lowers the error by its exact amount), and a row whose pool has no improving swap waits for the next full
search (only a full search that finds none ends a row). REFRESH = 1 is the exact search (the `candidates` best of
each side among every weight at every step).

Scoring every weight (two [rows, columns] fused products and the selection) is most of a step. The block maxima
(one max over [rows, POOL, columns / POOL]) take 74 ms per 16384 x 4096 matrix where the best 64 by topk took 184 ms
(2 threads, 2026-12-07). On 32 real layer groups of both models at 50% and 70% (`python benchmarks/refine_pool.py
real`) the pool's refined error is the exact search's within +0.00006 / -0.00007 of the unrefined error (at most
0.07% of the refine's gain lost); 64 blocks lost up to 0.27%, the best 64 by topk 0.13%; refreshed every 8 steps,
pools ran dry on Qwen's down_proj (up to 8% lost)."""
RESYNC = 100
"""Steps between recomputations of the residual G delta (each a [rows, columns] x [columns, columns] product: for
Qwen2.5-1.5B's down_proj 1.9 s in float32 on one thread, 3.0 s in float64, against 0.3 s for a whole step). Its
float32 updates drift little: 50 steps without a recomputation changed 94 of 13.8M mask entries of a 1536 x 8960
layer and the refined error by 1e-7 relative (measured at 42b96cd, 2026-12-01); the product's 50 steps need none."""


class _Search:
    """Unstructured refine search state: per weight, the error added if it is pruned (when kept) and removed if
    it is revived (when pruned) are 2 w r +- w^2 G_jj; the masked constant parts are kept here and changed
    only where a swap happened. (Recomputing them with a mask each step took 4 ms per 1536 x 576 matrix
    against 0.5 ms for the fused product; torch.where and masked_fill alike.)

    Both per-weight terms are written into buffers kept across steps: a fresh [rows, columns] result at every step
    made the kernel page-fault its memory in, 0.53 s per 16384 x 4096 float32 addcmul against 0.04 s into a kept
    buffer (2 cores, 2026-12-06: `python benchmarks/refine_step.py`). The cost is kept negated, so that both
    searches take the largest (topk: 0.095 s against 0.108 s for the smallest at that size); the values are the
    same up to their sign, bit for bit. Between full searches the pool keeps its own copies of its weights and base
    terms ([rows, POOL] each): the steps between gather only the residual there."""

    def __init__(self, w: Tensor, keep: Tensor, squared: Tensor, diagonal: Tensor, candidates: int) -> None:
        self.candidates = candidates
        self.diagonal = diagonal
        self.neg_base_cost = torch.where(keep, -squared, -torch.inf)  # - 2 w r: minus the added error; -inf where pruned
        self.base_gain = torch.where(keep, -torch.inf, -squared)  # + 2 w r: the removed error; -inf where kept
        # per row; a swap changes neither
        self.kept = row_counts(keep)
        self.pruned = keep.shape[1] - self.kept
        # every weight scored every REFRESH steps, the pool of block maxima in between (REFRESH 1: the exact search)
        self.refresh = REFRESH
        rows, columns = w.shape
        self.pool_size = min(max(POOL, candidates) if self.refresh > 1 else candidates, columns)
        # the block width; the buffers' columns padded to whole blocks with no-moves (-inf), which stay
        self.width = -(-columns // self.pool_size) if self.refresh > 1 else 1
        padded = self.width * -(-columns // self.width)
        self.buffers = tuple(torch.full((rows, padded), -torch.inf, dtype=w.dtype, device=w.device) for _ in range(2))
        # per side (kept, pruned): the pool's columns, their weights and base terms (-inf: no move)
        self.pool: list[Tensor] | None = None

    def scratch(self, rows: int) -> Tensor:
        """A [rows, columns] buffer free between searches (the residual's recomputation uses it)."""
        return self.buffers[0][:rows, :self.neg_base_cost.shape[1]]

    def full(self, step: int) -> bool:
        """Whether the search at `step` scores every weight (the others score the pool it keeps)."""
        return step % self.refresh == 0

    def next_full(self, step: int) -> int:
        return (step // self.refresh + 1) * self.refresh

    def best(self, w, keep, residual, g, batch, full=True):
        counts = (int(self.kept.max()), int(self.pruned.max()))
        k_keep, k_pruned = min(self.candidates, counts[0]), min(self.candidates, counts[1])
        if k_keep == 0 or k_pruned == 0:
            empty = torch.zeros(w.shape[0], dtype=torch.long, device=w.device)
            return torch.zeros(w.shape[0], dtype=w.dtype, device=w.device), empty, empty
        if full:  # every weight scored; the best of each side kept for the next steps
            rows, columns = w.shape
            neg_cost = torch.addcmul(self.neg_base_cost, w, residual, value=-2, out=self.buffers[0][:rows, :columns])
            gain = torch.addcmul(self.base_gain, w, residual, value=2, out=self.buffers[1][:rows, :columns])
            if self.refresh > 1:  # the best move of each block of columns (a block without one gives -inf)
                neg_pool, pool_keep = self.buffers[0][:rows].view(rows, -1, self.width).max(2)
                gain_pool, pool_pruned = self.buffers[1][:rows].view(rows, -1, self.width).max(2)
                offsets = torch.arange(0, neg_pool.shape[1] * self.width, self.width, device=w.device)
                pool_keep = pool_keep.add_(offsets).clamp_max_(columns - 1)
                pool_pruned = pool_pruned.add_(offsets).clamp_max_(columns - 1)
            else:  # the exact search: the best of each side
                # the pool's size is not the rows' counts: a row's pool must not depend on the other rows
                neg_pool, pool_keep = torch.topk(neg_cost, self.pool_size, dim=1)
                gain_pool, pool_pruned = torch.topk(gain, self.pool_size, dim=1)
            # a row with fewer moves than the pool pads it with no-moves, which stay none until the next refresh
            w_keep, w_pruned = w.gather(1, pool_keep), w.gather(1, pool_pruned)
            self.pool = [pool_keep, pool_pruned, w_keep, w_pruned,
                         self.neg_base_cost.gather(1, pool_keep).masked_fill_(torch.isinf(neg_pool), -torch.inf),
                         self.base_gain.gather(1, pool_pruned).masked_fill_(torch.isinf(gain_pool), -torch.inf)]
        else:  # only the pool scored, with the current residual; a weight swapped since is no move (each one is
            # swapped at most once between full searches: one pruned is not in the pruned pool until the next)
            pool_keep, pool_pruned, w_keep, w_pruned, base_keep, base_pruned = self.pool
            neg_pool = torch.addcmul(base_keep, w_keep, residual.gather(1, pool_keep), value=-2)
            neg_pool.masked_fill_(~keep.gather(1, pool_keep), -torch.inf)
            gain_pool = torch.addcmul(base_pruned, w_pruned, residual.gather(1, pool_pruned), value=2)
            gain_pool.masked_fill_(keep.gather(1, pool_pruned), -torch.inf)
        neg_j_cost, j_at = torch.topk(neg_pool, min(k_keep, neg_pool.shape[1]), dim=1)
        i_gain, i_at = torch.topk(gain_pool, min(k_pruned, gain_pool.shape[1]), dim=1)
        return _best_pair(w, neg_j_cost.neg_(), pool_keep.gather(1, j_at), i_gain, pool_pruned.gather(1, i_at),
                          residual, g, batch, w_keep.gather(1, j_at), w_pruned.gather(1, i_at))

    def swapped(self, w: Tensor, r: Tensor, revive: Tensor, prune: Tensor) -> None:
        """A step's swaps (rows `r` local, [len(r), T] columns revived and pruned, -1 = none): the base terms of both
        weights."""
        used = revive >= 0
        rows, revived, pruned = r.unsqueeze(1).expand_as(revive)[used], revive[used], prune[used]
        w_revived, w_pruned = w[rows, revived], w[rows, pruned]
        self.neg_base_cost[rows, revived] = -(w_revived * w_revived * self.diagonal[revived])  # as squared is made
        self.base_gain[rows, revived] = -torch.inf
        self.neg_base_cost[rows, pruned] = -torch.inf
        self.base_gain[rows, pruned] = -(w_pruned * w_pruned * self.diagonal[pruned])

    def keep_rows(self, r: Tensor) -> None:
        self.neg_base_cost, self.base_gain = self.neg_base_cost[r], self.base_gain[r]
        self.kept, self.pruned = self.kept[r], self.pruned[r]
        if self.pool is not None:
            self.pool = [part[r] for part in self.pool]


class _NMSearch:
    """N:M refine search state: per row and group, the offsets of its kept weights (first M - N) and pruned ones
    (N), so a step evaluates only the N (M - N) possible swaps of a group, not all M^2 pairs (a quarter at 2:4).
    A swap's change is const + 2 w_k r_k - 2 w_p r_p, const = w_k^2 G_kk + w_p^2 G_pp - 2 w_p w_k G_pk: the
    constant parts are kept per (row, group) and recomputed only for the groups a step changed (this search took
    0.59 of a 2:4 `balanced` run while it gathered them every step; kept, the refine takes 0.71x the time with
    identical masks: benchmarks/refine_search_state.py at 5946eb9, measured at b25c2a5, 2026-12-01)."""

    def __init__(self, w: Tensor, keep: Tensor, squared: Tensor, g: Tensor, nm: tuple[int, int]) -> None:
        rows, columns = w.shape
        self.m = nm[1]
        self.n = nm[1] - nm[0]  # kept per group (N:M prunes N)
        index = torch.arange(columns, device=w.device).reshape(columns // self.m, self.m)
        self.g_blocks = g[index.unsqueeze(2), index.unsqueeze(1)]  # G inside each group [groups, m, m]
        self.w3 = w.reshape(rows, -1, self.m)
        self.sq3 = squared.reshape(rows, -1, self.m)
        # stable: each part in increasing offset order, like the full M x M search's (pruned, kept) pairs
        self.order = torch.sort((~keep).reshape(rows, -1, self.m).to(torch.uint8), dim=2, stable=True).indices
        groups = self.order.shape[1]
        self.twice_w_kept, self.twice_w_pruned, self.const = self._terms(
            self.w3, self.sq3, self.order, self.g_blocks.unsqueeze(0).expand(rows, groups, self.m, self.m))
        # per-step results written into buffers kept across steps (fresh ones page-fault in: see _Search)
        self.buffers: dict[str, Tensor] = {}

    def _buffer(self, name: str, shape: tuple[int, ...], like: Tensor, dtype: torch.dtype | None = None) -> Tensor:
        """A buffer of `shape` (its first dimension the rows left) reused across steps: the first rows of one allocated once."""
        size = 1
        for extent in shape:
            size *= extent
        buffer = self.buffers.get(name)
        if buffer is None or buffer.numel() < size:
            buffer = self.buffers[name] = torch.empty(size, dtype=dtype or like.dtype, device=like.device)
        return buffer[:size].view(shape)

    def scratch(self, rows: int) -> Tensor:
        """A [rows, columns] buffer free between searches (the residual's recomputation uses it)."""
        return self._buffer("delta", (rows, self.w3.shape[1] * self.m), self.w3)

    def _terms(self, w3: Tensor, sq3: Tensor, order: Tensor, blocks: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """For [..., m] groups in `order` (kept offsets first) with their G blocks [..., m, m]: 2 w of the kept
        [..., M - N] and of the pruned [..., N], and the constant part of every (pruned, kept) swap [..., N, M - N]."""
        n = self.n
        kept_at, pruned_at = order[..., :n], order[..., n:]
        w_kept, w_pruned = w3.gather(-1, kept_at), w3.gather(-1, pruned_at)
        rows_of_pruned = blocks.gather(-2, pruned_at.unsqueeze(-1).expand(*pruned_at.shape, self.m))
        cross = rows_of_pruned.gather(-1, kept_at.unsqueeze(-2).expand(*pruned_at.shape, n))  # G[p, k]
        const = (sq3.gather(-1, kept_at).unsqueeze(-2) + sq3.gather(-1, pruned_at).unsqueeze(-1)
                 - 2 * w_pruned.unsqueeze(-1) * w_kept.unsqueeze(-2) * cross)
        return 2 * w_kept, 2 * w_pruned, const

    def full(self, step: int) -> bool:
        return True  # every group is searched at every step

    def next_full(self, step: int) -> int:
        return step + 1

    def best(self, w, keep, residual, g, batch, full=True):
        rows, columns = w.shape
        n, m = self.n, self.m
        groups = columns // m
        kept_at, pruned_at = self.order[..., :n], self.order[..., n:]
        r3 = residual.reshape(rows, groups, m)
        kept_term = torch.gather(r3, 2, kept_at, out=self._buffer("kept", (rows, groups, n), w))
        kept_term.mul_(self.twice_w_kept)  # [rows, groups, kept]
        pruned_term = torch.gather(r3, 2, pruned_at, out=self._buffer("pruned", (rows, groups, m - n), w))
        pruned_term.mul_(self.twice_w_pruned)  # [rows, groups, pruned]
        delta = torch.add(self.const, kept_term.unsqueeze(2), out=self._buffer("delta", self.const.shape, w))
        delta.sub_(pruned_term.unsqueeze(3))  # [rows, groups, pruned, kept]
        per_group, within = torch.min(delta.reshape(rows, groups, -1), 2, out=(
            self._buffer("per_group", (rows, groups), w), self._buffer("within", (rows, groups), w, torch.long)))
        count = min(batch, groups)
        group_delta, group = torch.topk(per_group, count, dim=1, largest=False)
        within = within.gather(1, group)
        revive = group * m + pruned_at.gather(1, group.unsqueeze(2).expand(-1, -1, m - n)).gather(2, (within // n).unsqueeze(2)).squeeze(2)
        prune = group * m + kept_at.gather(1, group.unsqueeze(2).expand(-1, -1, n)).gather(2, (within % n).unsqueeze(2)).squeeze(2)
        if count <= 1:
            return group_delta[:, 0], revive[:, 0], prune[:, 0]
        # several groups at once (distinct groups: distinct weights), best prefix by the exact joint change
        return _choose(group_delta[:, 0], revive[:, 0], prune[:, 0], w, residual, g, revive, prune)

    def swapped(self, w: Tensor, r: Tensor, revive: Tensor, prune: Tensor) -> None:
        """A step's swaps (rows `r` local, [len(r), T] columns revived and pruned, -1 = none; one per (row, group)):
        the offsets change places, the group's terms anew."""
        used = revive >= 0
        rows, revived, pruned = r.unsqueeze(1).expand_as(revive)[used], revive[used], prune[used]
        group, m = revived // self.m, self.m
        offsets = self.order[rows, group]  # [swaps, m]: the revived offset moves to the kept part and back
        a, b = (revived % m).unsqueeze(1), (pruned % m).unsqueeze(1)
        order = torch.where(offsets == a, b, torch.where(offsets == b, a, offsets))
        self.order[rows, group] = order
        kept, pruned_terms, const = self._terms(self.w3[rows, group], self.sq3[rows, group], order, self.g_blocks[group])
        self.twice_w_kept[rows, group], self.twice_w_pruned[rows, group], self.const[rows, group] = kept, pruned_terms, const

    def keep_rows(self, r: Tensor) -> None:
        self.order, self.w3, self.sq3 = self.order[r], self.w3[r], self.sq3[r]
        self.twice_w_kept, self.twice_w_pruned, self.const = self.twice_w_kept[r], self.twice_w_pruned[r], self.const[r]


def _add_rows_of_g(residual: Tensor, g: Tensor, w: Tensor, r: Tensor, revive: Tensor, prune: Tensor, used: Tensor) -> None:
    """Add to `residual` (r = G delta, one row per row of `w`) the change of a step's swaps: for each row of `r`,
    the sum over its swaps of (w_j G[j] - w_i G[i]) (j pruned, i revived; slots where `used` is False are none).

    As a sparse (CSR, only the used slots) times dense product added in place (addmm_): it reads the rows of G it
    needs without materialising them per row (index_select + bmm made a [rows, 2T, columns] copy: for Qwen's
    down_proj 0.32 s against 0.09 s, measured at 2d43f06) and writes no [rows, columns] result (`csr @ g` into a
    fresh result, then index_add_: 0.20 + 0.02 s per 16384 x 4096 step, up to 1 s when the fresh result's pages
    fault in slowly; addmm_ into the residual 0.07 s: `python benchmarks/refine_step.py`).
    """
    rows_of_w = r.unsqueeze(1)
    columns = torch.cat([revive, prune], 1)
    values = torch.cat([-w[rows_of_w, revive.clamp_min(0)], w[rows_of_w, prune.clamp_min(0)]], 1)
    keep = torch.cat([used, used], 1)
    counts = torch.zeros(residual.shape[0], dtype=torch.long, device=w.device)
    counts[r] = keep.sum(1)  # rows without an accepted swap get empty CSR rows
    crow = torch.zeros(residual.shape[0] + 1, dtype=torch.long, device=w.device)
    crow[1:] = counts.cumsum(0)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")
        change = torch.sparse_csr_tensor(crow, columns[keep], values[keep], size=(residual.shape[0], g.shape[0]),
                                         check_invariants=False)
    residual.addmm_(change, g)


def _entries(g: Tensor, rows: Tensor, columns: Tensor) -> Tensor:
    """G[rows, columns] for broadcastable index tensors, read through G's flat view: the same values as advanced
    indexing, in 0.44x its time for [16384, 16, 16] random entries of a 4096^2 G (one thread; the rows the refine
    pairs are scattered over G, so each entry is a cache miss either way)."""
    flat = rows * g.shape[1] + columns
    return g.reshape(-1).index_select(0, flat.reshape(-1)).view(flat.shape)


def _prefix_deltas(w: Tensor, residual: Tensor, g: Tensor, revive: Tensor, prune: Tensor) -> Tensor:
    """Exact change of each row's error [rows, T] after the first t swaps (revive[:, :t], prune[:, :t]),
    all weights distinct: 2 v^T r + v^T G v with v = -w at the revived, +w at the pruned positions."""
    rows, count = revive.shape
    idx = torch.stack([revive, prune], 2).reshape(rows, 2 * count)
    sign = torch.tensor([-1.0, 1.0], dtype=w.dtype, device=w.device).repeat(count)
    v = torch.gather(w, 1, idx) * sign
    linear = (2 * v * torch.gather(residual, 1, idx)).cumsum(1)
    quad = (v.unsqueeze(2) * v.unsqueeze(1) * _entries(g, idx.unsqueeze(2), idx.unsqueeze(1))).cumsum(1).cumsum(2)
    ends = torch.arange(1, 2 * count, 2, device=w.device)
    return linear[:, ends] + quad[:, ends, ends]


def _choose(single: Tensor, revive1: Tensor, prune1: Tensor, w, residual, g, revive: Tensor, prune: Tensor,
            valid: Tensor | None = None):
    """The better of the best single swap and the best prefix of several: (delta, revive [rows, T], prune [rows, T]).
    `valid` [rows, T]: False where a slot is no real move (a row with fewer kept or pruned weights than T); a prefix
    that reaches such a slot is not taken."""
    deltas = _prefix_deltas(w, residual, g, revive, prune)
    if valid is not None:
        deltas = deltas.masked_fill(~valid.to(torch.uint8).cummin(1).values.bool(), torch.inf)
    best_prefix, length = deltas.min(1)
    use_prefix = best_prefix < single
    count = torch.where(use_prefix, length + 1, torch.ones_like(length))
    slots = torch.arange(revive.shape[1], device=w.device).unsqueeze(0)
    chosen_revive = torch.where(use_prefix.unsqueeze(1), revive, revive1.unsqueeze(1).expand_as(revive))
    chosen_prune = torch.where(use_prefix.unsqueeze(1), prune, prune1.unsqueeze(1).expand_as(prune))
    unused = slots >= count.unsqueeze(1)
    chosen_revive = chosen_revive.masked_fill(unused, -1)
    chosen_prune = chosen_prune.masked_fill(unused, -1)
    return torch.minimum(best_prefix, single), chosen_revive, chosen_prune


def _best_pair(w: Tensor, j_cost: Tensor, j_index: Tensor, i_gain: Tensor, i_index: Tensor, residual: Tensor,
               g: Tensor, batch: int, w_j: Tensor | None = None, w_i: Tensor | None = None):
    """The best swap per row from candidate prunings (`j_cost` [rows, k]: what pruning weight `j_index` adds, +inf
    where no such move) and revivals (`i_gain`: what reviving `i_index` removes, -inf where none), both in order,
    best first: every pair exact, its cross term included; with `batch` > 1 also the best prefix of several."""
    rows = w.shape[0]
    k_keep = j_index.shape[1]
    cross = _entries(g, i_index.unsqueeze(2), j_index.unsqueeze(1))  # G[i, j]: [rows, k_pruned, k_keep]
    cross.mul_((torch.gather(w, 1, j_index) if w_j is None else w_j).unsqueeze(1))
    # c_j - g_i - 2 w_i w_j G_ij
    w_i = torch.gather(w, 1, i_index) if w_i is None else w_i
    delta = torch.sub(j_cost.unsqueeze(1), i_gain.unsqueeze(2)).addcmul_(w_i.unsqueeze(2), cross, value=-2)
    best = delta.reshape(rows, -1).argmin(1)
    flat_delta = delta.reshape(rows, -1).gather(1, best.unsqueeze(1)).squeeze(1)
    revive = i_index.gather(1, (best // k_keep).unsqueeze(1)).squeeze(1)
    prune = j_index.gather(1, (best % k_keep).unsqueeze(1)).squeeze(1)
    count = min(batch, k_keep, i_index.shape[1])
    if count <= 1:
        return flat_delta, revive, prune
    # several at once: the t best revivals paired in order with the t cheapest prunings
    valid = torch.isfinite(i_gain[:, :count]) & torch.isfinite(j_cost[:, :count])
    return _choose(flat_delta, revive, prune, w, residual, g, i_index[:, :count], j_index[:, :count], valid)
