"""Algorithm 1 fast: the greedy coreset of ``coreset.greedy_coreset``, the same indices, far fewer bytes moved.

``coreset.greedy_coreset`` (the plain loop) streams the whole bank once per pick. Most of that
work cannot change the next pick: only the points whose min-distance is near the top can be
chosen. ``lazy_greedy_coreset`` keeps just those "hot" points up to date after each pick, with
the plain loop's own product over a cache-sized matrix. Every other point keeps a stale
min-distance, an upper bound below the hot threshold, so it cannot be the next pick. When the hot
set runs dry the threshold drops and the points above it catch up with the picks they missed,
newest first, in windows of doubling width, until they fall below it (most do, early): a matrix
product (compute-bound, not memory-bound) filters the (point, pick) pairs with a proven rounding
margin, and only the pairs that may lower a min-distance are recomputed with the plain arithmetic.
Points that end far below the coverage radius are never touched again.

How it stays identical to the plain loop, ties included (lowest index wins):

* every min-distance that decides a pick is computed by the plain loop's arithmetic
  (``coreset.finish`` on a dot product summed the same way), so it is the same float;
* the filter's rounding error is bounded (``kappa``), and every pair it cannot rule out is
  recomputed exactly; ``_kernels_match`` checks on the machine at hand that the BLAS sums each
  dot product the same way in the batched and matrix-vector products (if not, the plain loop runs).

On banks of ``NATIVE_MIN`` points or more the filter runs compiled (``lazy_greedy.cpp``, built with
the exact search's kernel, ``exact_search.fused_kernel``). At d >= 2 x ``BOUND_DIMS`` (the default
projection, d = 128) a certified lower bound in the bank's ``BOUND_DIMS`` = 32 leading principal
components (``_LowBound``, 34 numbers a pair instead of 130) is computed first, in registers, and
the full filter only for the pairs it cannot rule out (1% on a bottle-size bank); below that the
compiled pass reads the full product once (the same pairs as the torch ops' four passes). Either
way every pair that may lower a min-distance is still recomputed with the plain arithmetic, so the
picks do not change. The per-pick loop over the hot set runs compiled too (``hot_picks``: the same
torch ops in the same order, without Python between them). On the 288 default's bottle-size bank
(270,864 points, 27,086 picks) the whole coreset takes 6.5 s against 13.0 s with the torch ops
(RESULTS.md). Smaller banks use the torch ops, so a first small fit never waits for the compiler.

The hot set holds ``min(HOT, max(64, N // 8))`` points (``HOT`` = 16384: 8 MiB at d = 128,
cache-sized), so below about ``8 * HOT`` points it is an eighth of the bank. ``tests/test_coreset.py``
checks the indices against the plain loop on random and clustered banks, near-ties and duplicates.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from .coreset import PICKED, distances_to, finish, greedy_coreset, greedy_start
from .exact_search import fused_kernel

_UNIT = 2.0**-24  # float32 unit roundoff
HOT = 16384  # points kept up to date per pick (8 MiB of float32 at d = 128)
_COMPACT_EVERY = 32  # picks between checks whether the hot set can shrink
_LAG_RATIO = 1.25  # catch-up groups points whose missed-pick counts differ by < 25%
_FILTER_ELEMS = 1 << 21  # entries of one filter matrix product (8 MiB of float32)
_BOUND_PAIRS = 1 << 24  # pairs per call of the fused bound pass (it stores no product: fewer, larger calls)
_FIRST_WINDOW = 128  # catch-up: the newest 128 missed picks first, then 256, 512, ...
NATIVE_MIN = 100_000  # banks from this size use the compiled kernels (2x the torch ops at 270k points)
BOUND_DIMS = 32  # principal components of the compiled path's lower-bound pass (used when d >= 2 x this)


def lazy_greedy_coreset(
    projected: Tensor,
    n_select: int,
    start: str = "official",
    num_starts: int = 10,
    seed: int = 0,
    progress: bool = False,
) -> Tensor:
    """``coreset.greedy_coreset``'s indices (Algorithm 1, same arguments), computed lazily.

    There is no size threshold: it runs at every bank size, unless this machine's BLAS fails
    ``_kernels_match``, and then the plain loop runs (same result, slower). From ``NATIVE_MIN``
    points the filter is compiled (``_filter_pairs``, same pairs; with ``_LowBound`` first where
    d >= 2 x ``BOUND_DIMS``).
    """
    x, xt, xsq, picks, mindist, rng = greedy_start(projected, n_select, start, num_starts, seed)
    if not _kernels_match(x, xt, xsq, rng):
        return greedy_coreset(projected, n_select, start, num_starts, seed, progress)
    del xt  # the fast path never scans the whole bank
    native = fused_kernel() if len(x) >= NATIVE_MIN else None
    bar = tqdm(total=n_select, initial=len(picks), desc="greedy coreset", disable=not progress, leave=False)
    with torch.no_grad(), bar:
        _LazyGreedy(x, xsq, picks, mindist, n_select, native=native).run(bar)
    return torch.tensor(picks, dtype=torch.long)


def _pair_distances(c: Tensor, csq: Tensor, p: Tensor, psq: Tensor) -> Tensor:
    """Squared distances of row pairs (c[k], p[k]): a batch of (1 x d) @ (d x 1) products.

    Each is a one-row matrix-vector product, summed in the order ``x[i] @ xt``
    sums (``_kernels_match`` checks this on the machine at hand).
    """
    return finish(torch.bmm(c.unsqueeze(1), p.unsqueeze(2)).view(-1), psq, csq)


def _kernels_match(x: Tensor, xt: Tensor, xsq: Tensor, rng: np.random.Generator) -> bool:
    """True if the fast path's distance calls reproduce the plain loop's bit for bit on a sample.

    The plain loop computes ``x[i] @ xt`` over the whole bank; the fast path
    uses the same product on a gathered subset of columns and ``_pair_distances``.
    Exactness needs the BLAS to sum each dot product the same way in all three;
    if it does not, the plain loop runs instead (same result, slower).
    """
    n = len(x)
    cols = torch.from_numpy(rng.choice(n, size=min(n, 256), replace=False))
    sub = xt[:, cols].contiguous()
    for i in rng.integers(n, size=2).tolist():
        full = distances_to(x, xt, xsq, i)[cols]
        pair = _pair_distances(x[[i]].expand(len(cols), -1), xsq[i].expand(len(cols)), x[cols], xsq[cols])
        part = finish(x[i] @ sub, xsq[cols], xsq[i])
        if not (torch.equal(full, pair) and torch.equal(full, part)):
            warnings.warn("this BLAS sums dot products differently in batched and matrix-vector products: "
                          "using the plain greedy loop (same result, slower)", RuntimeWarning, stacklevel=3)
            return False
    return True


class _LazyGreedy:
    """Greedy k-center that only keeps the points near the top up to date.

    Invariant: every point outside the hot set has ``mindist < tau`` (an upper
    bound of its true min-distance: it may not have seen the latest picks), and
    every hot point is up to date. While the hot maximum is >= tau it is the
    global maximum, so a pick only needs a matrix-vector product over the hot
    set (plain arithmetic, a cache-sized scan). When the hot set runs dry, tau is
    lowered to the ``hot_size``-th largest bound and the points above it catch
    up with every pick they missed at once: a matrix product filters the pairs
    (with a proven rounding margin) and the few pairs that may lower a
    min-distance are recomputed with the plain arithmetic. Points that end up
    far below the coverage radius are never touched again.
    """

    def __init__(self, x: Tensor, xsq: Tensor, picks: list[int], mindist: Tensor, n_select: int,
                 hot_size: int | None = None, native: object | None = None):
        n, d = x.shape
        self.native = native  # the compiled extension (exact_search.fused_kernel), or None: torch ops
        self.x, self.xsq, self.picks, self.mindist = x, xsq, picks, mindist
        self.seen = torch.full((n,), len(picks), dtype=torch.long)  # picks applied to each point
        # Row p . [c, |c|^2, 1] = |x_p|^2 - 2 x_p.c + |c|^2: catching up is one matrix product.
        self.aug = torch.cat([-2 * x, torch.ones(n, 1), xsq[:, None]], dim=1)
        self.pick_rows = torch.ones(n_select, d + 2)  # [c, |c|^2, 1], filled up to n_rows
        self.n_rows = 0
        self.hot_size = hot_size or min(HOT, max(64, n // 8))
        self.tau = math.inf
        self.hot = torch.empty(0, dtype=torch.long)
        # Filter and plain arithmetic each give a squared distance within
        # (d + 4) u (|x| + |c|)^2 of the exact one (sums of d + 2 terms); 2x margin.
        self.kappa = 4 * (d + 4) * _UNIT
        self.low = _LowBound(x, n_select, BOUND_DIMS) if native is not None and d >= 2 * BOUND_DIMS else None

    def run(self, bar: tqdm) -> None:
        n_select = len(self.pick_rows)
        while len(self.picks) < n_select:
            self._refill()
            self._pick_hot(n_select, bar)

    def _pick_hot(self, n_select: int, bar: tqdm) -> None:
        """Greedy picks from the hot set while its maximum is >= tau; writes the hot values back.

        With the compiled extension the same loop runs in C++ (``hot_picks``: the same torch ops in
        the same order, without Python between them: 0.9 s instead of 1.6-2.0 s on a bottle-size bank)."""
        x, xsq, picks, tau = self.x, self.xsq, self.picks, self.tau
        if self.native is not None:
            out, before = torch.empty(n_select, dtype=torch.long), len(picks)
            count = self.native.hot_picks(x, xsq, self.hot, self.mindist, self.seen, out, before, tau,
                                          _COMPACT_EVERY, PICKED)
            picks.extend(out[before:count].tolist())
            bar.update(count - before)
            return
        ids = self.hot
        xt, sq, r = x.index_select(0, ids).T.contiguous(), xsq[ids], self.mindist[ids]
        ids_list = ids.tolist()
        while len(picks) < n_select and len(ids_list):
            value, j = torch.max(r, dim=0)  # first maximum, as argmax
            if value.item() < tau:
                break
            i = ids_list[j.item()]
            picks.append(i)
            torch.minimum(r, finish(x[i] @ xt, sq, xsq[i]), out=r)
            r[j] = PICKED
            bar.update()
            if len(picks) % _COMPACT_EVERY == 0:
                keep = r >= tau
                if 2 * int(keep.sum()) < len(ids_list):  # most are done: shrink the scan
                    self._write_back(ids[~keep], r[~keep])
                    ids, xt, sq, r = ids[keep], xt[:, keep], sq[keep], r[keep]
                    ids_list = ids.tolist()
        self._write_back(ids, r)

    def _write_back(self, ids: Tensor, r: Tensor) -> None:
        self.mindist[ids] = r
        self.seen[ids] = len(self.picks)

    def _refill(self) -> None:
        """Lower tau to the hot_size-th largest bound; bring every point above it up to date."""
        t = len(self.picks)
        self._add_pick_rows()
        k = min(self.hot_size, len(self.mindist))
        self.tau = torch.topk(self.mindist, k, sorted=False).values.min().item()
        above = self.mindist >= self.tau
        self._catch_up(torch.nonzero(above & (self.seen < t)).view(-1), t)
        self.hot = torch.nonzero(self.mindist >= self.tau).view(-1)  # ascending: ties -> lowest index

    def _add_pick_rows(self) -> None:
        """The filters' rows of the picks made since the last call (pick_rows, and the bound's columns)."""
        t = len(self.picks)
        new = torch.tensor(self.picks[self.n_rows : t], dtype=torch.long)
        self.pick_rows[self.n_rows : t, :-2] = self.x[new]
        self.pick_rows[self.n_rows : t, -2] = self.xsq[new]
        if self.low is not None:
            self.low.picks_t[:, self.n_rows : t] = self.low.rows.index_select(0, new).T
        self.n_rows = t

    def _catch_up(self, ids: Tensor, t: int) -> None:
        """Apply the picks each point of ``ids`` missed (exact), newest first, until it drops below tau.

        Windows of missed picks double in width, newest first. A point whose
        min-distance falls below tau leaves: its value is still an upper bound
        below tau, all the invariant asks, and it keeps its ``seen``, so a later
        catch-up re-applies what it skipped and what it saw (a minimum does not
        mind repeats). On real features about 96% of the points caught up end
        below tau, most after a few windows. The points left after every window
        are up to date.
        """
        if len(ids) == 0:
            return
        seen = self.seen[ids]
        # Buckets of similar lag; re-applying a pick a point has seen changes nothing.
        bucket = torch.log((t - seen).double()).div_(math.log(_LAG_RATIO)).long()
        for b in torch.unique(bucket).tolist():
            members = ids[bucket == b]
            first, end, width = int(self.seen[members].min()), t, _FIRST_WINDOW
            pairs = _BOUND_PAIRS if self.low is not None else _FILTER_ELEMS
            while len(members) and end > first:
                start = max(first, end - width)
                for chunk in members.split(max(1, pairs // (end - start))):
                    self._apply(chunk, start, end)
                members = members[self.mindist[members] >= self.tau]
                end, width = start, 2 * width
            self.seen[members] = t

    def _apply(self, ids: Tensor, first: int, t: int) -> None:
        d = self.x.shape[1]
        pending = self.pick_rows[first:t]
        norm = self.xsq.index_select(0, ids).max().sqrt() + pending[:, -2].max().sqrt()
        tol = self.kappa * norm.item() ** 2
        r = self.mindist.index_select(0, ids)
        # Row gathers by index_select: 3-6x faster than x[ids] here, the same copies.
        if self.low is None:
            approx = self.aug.index_select(0, ids) @ pending.T  # (n, m) squared distances, a filter only
            rows, cols = _filter_pairs(approx, r, tol, self.native)
        else:  # a bound in BOUND_DIMS dimensions first; the full filter only where it cannot rule out
            bound_tol = tol + self.low.kappa * norm.item() ** 2
            rows, cols = self.native.pruned_pairs(self.low.aug, self.low.picks_t, self.aug, self.pick_rows, ids, r,
                                                  first, t, bound_tol, tol)
        if len(rows) == 0:
            return
        pts, cs = ids.index_select(0, rows), pending.index_select(0, cols)  # may lower a min-distance: recompute
        exact = _pair_distances(cs[:, :d], cs[:, d], self.x.index_select(0, pts), self.xsq.index_select(0, pts))
        self.mindist.scatter_reduce_(0, pts, exact, "amin")


class _LowBound:
    """A lower bound of the squared distances in k dimensions, for the compiled catch-up's first pass.

    With V the bank's k leading principal directions (orthonormal, so ``|V^T z| <= |z|``), the
    projections y = V^T x give ``|y_p - y_c|^2 <= |x_p - x_c|^2``. The pass computes the left side
    as the filter computes distances, ``|y_p|^2 - 2 y_p.y_c + |y_c|^2`` (rows ``aug`` and columns
    ``picks_t``, in any summation order), so within the filter's error for k + 2 terms,
    ``(k + 4) u N^2`` (N = |x_p| + |x_c|, u the unit roundoff); rounding y to float32 moves
    |y_p - y_c| by at most u N, its square by at most 3 u N^2 (as |x_p - x_c| <= N). ``kappa`` takes
    each term with the filter's margins: ``4 (k + 4) u + 6 u``. So a pair whose computed bound exceeds
    ``r + tol + kappa N^2`` has a squared distance above ``r + tol``, hence a plain-arithmetic
    distance above r (that one is within tol of the exact value): it cannot lower r.
    On the 288 default's 270,864 x 128 bank, k = 32 leaves 1.1% of the pairs (RESULTS.md).
    """

    def __init__(self, x: Tensor, n_select: int, k: int):
        xd = x.double()
        vecs = torch.linalg.eigh(xd.T @ xd).eigenvectors[:, -k:]  # x is centred: the covariance's top k
        vecs /= torch.linalg.matrix_norm(vecs, ord=2)  # a contraction, to float64 rounding (far inside kappa)
        y = (xd @ vecs).float()
        ysq = (y * y).sum(dim=1, keepdim=True)
        ones = torch.ones(len(x), 1)
        self.aug = torch.cat([-2 * y, ones, ysq], dim=1)  # row p . [y_c, |y_c|^2, 1]
        self.rows = torch.cat([y, ysq, ones], dim=1)
        self.picks_t = torch.empty(k + 2, n_select)  # columns: the picks so far, filled as pick_rows
        self.kappa = (4 * (k + 4) + 6) * _UNIT


def _filter_pairs(approx: Tensor, r: Tensor, tol: float, native: object | None = None) -> tuple[Tensor, Tensor]:
    """(row, column) entries of the filter product that may lower row's min-distance ``r`` and may be
    its minimum: rows whose smallest entry ``low`` is below ``r + tol``, and in them every entry up to
    ``min(r + tol, low + 2 tol)`` (an entry above ``low + 2 tol`` is, exactly, above the exact distance
    of the row's smallest). ``native``: the same selection by ``lazy_greedy.cpp``, in one pass."""
    if native is not None:
        return tuple(native.catch_up_pairs(approx, r, tol))
    low = approx.amin(dim=1)
    cand = torch.nonzero(low < r + tol).view(-1)
    thr = torch.minimum(r[cand] + tol, low[cand] + 2 * tol)
    pi, pj = torch.nonzero(approx[cand] <= thr[:, None], as_tuple=True)
    return cand[pi], pj
