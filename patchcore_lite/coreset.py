"""Coreset subsampling of the memory bank (PatchCore, Roth et al. 2022, Sec. 3.2, Algorithm 1).

Algorithm 1 (greedy coreset selection) projects the patch features with a random
linear map psi (Johnson-Lindenstrauss) and then runs greedy k-center: each step
adds the point farthest from the current coreset,

    m_i = argmax_{m in M - M_C} min_{n in M_C} ||psi(m) - psi(n)||_2,

so the coreset covers the bank with a small radius (minimax facility location).

Two implementations return the *same indices*:

* ``greedy_coreset_reference`` (``greedy_coreset(fast=False)``): the plain loop,
  line by line as Algorithm 1. Each step streams the whole bank once to get the
  distances to the new pick and takes an in-place minimum. Memory-bound.
* ``greedy_coreset`` (``fast=True``, the default, at every bank size: no size
  threshold): the same greedy choices with far fewer bytes moved
  (``_LazyGreedy``). Only the "hot" points, whose min-distance is near the top,
  are updated after each pick, by the plain loop's own product over a
  cache-sized matrix. Every other point keeps a stale min-distance, an upper
  bound below the hot threshold, so it cannot be the next pick. When the hot set
  runs dry the threshold drops and the points above it catch up with the picks
  they missed, newest first, in windows of doubling width, until they fall below
  it (most do, early): a matrix product (compute-bound, not memory-bound)
  filters the (point, pick) pairs with a proven rounding margin, and only the
  pairs that may lower a min-distance are recomputed with the plain arithmetic.
  Points that end far below the coverage radius are never touched again. The
  selected indices are identical, ties included (lowest index wins). The hot
  set holds ``min(_HOT, max(64, N // 8))`` points (``_HOT`` = 16384: 8 MB at
  d = 128, cache-sized), so below about ``8 * _HOT`` points it is an eighth of
  the bank; if the BLAS fails ``_kernels_match``, the plain loop runs instead.

Distances are squared Euclidean distances ``|x|^2 - 2 x.c + |c|^2`` (clamped at
0) of mean-centred features; squaring does not change any argmax or minimum.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

STARTS = ("official", "single")
METHODS = ("greedy", "random")
_UNIT = 2.0**-24  # float32 unit roundoff
# A picked point's min-distance: below every distance, so with exact duplicates
# (all remaining distances 0) no point is picked twice.
_PICKED = -1.0
_HOT = 16384  # fast path: points kept up to date per pick (about 8 MB at d = 128)
_COMPACT_EVERY = 32  # picks between checks whether the hot set can shrink
_LAG_RATIO = 1.25  # catch-up groups points whose missed-pick counts differ by < 25%
_FILTER_ELEMS = 1 << 21  # entries of one filter matrix product (8 MB)
_FIRST_WINDOW = 128  # catch-up: the newest 128 missed picks first, then 256, 512, ...


def jl_dimension(n: int, eps: float) -> int:
    """Smallest dimension for a Johnson-Lindenstrauss embedding of ``n`` points with distortion ``eps``.

    ``4 ln(n) / (eps^2/2 - eps^3/3)``, the bound of Dasgupta and Gupta used by
    ``sklearn.random_projection.johnson_lindenstrauss_min_dim`` (same rounding down).
    """
    if n < 1:
        raise ValueError(f"need at least one point, got n={n}")
    if not 0 < eps < 1:
        raise ValueError(f"eps must be in (0, 1), got {eps}")
    return int(4 * math.log(n) / (eps**2 / 2 - eps**3 / 3))


def random_projection(features: Tensor, dim: int = 128, eps: float | None = None, seed: int = 0) -> Tensor:
    """Algorithm 1's psi: features (N, D) times a random Gaussian matrix (D, d), entries N(0, 1/d).

    N(0, 1/d) entries keep squared distances unbiased (E|psi(x)|^2 = |x|^2), so
    the JL guarantee applies as stated. The official code uses the default init
    of ``torch.nn.Linear(D, 128, bias=False)``, uniform U(-1/sqrt(D), 1/sqrt(D));
    that only rescales all distances, which greedy selection ignores. With
    ``eps`` the dimension is ``jl_dimension(N, eps)`` (anomalib: eps = 0.9,
    sparse projection). If d >= D the features are returned unchanged: a
    projection could not make the search cheaper.
    """
    _check_features(features)
    n, big_d = features.shape
    d = max(1, jl_dimension(n, eps)) if eps is not None else dim
    if d < 1:
        raise ValueError(f"projection dimension must be >= 1, got {d}")
    if d >= big_d:
        return features
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(big_d, d, generator=g) / math.sqrt(d)
    return features.float() @ w


def random_coreset(n: int, n_select: int, seed: int = 0) -> Tensor:
    """Baseline: ``n_select`` distinct indices drawn uniformly from ``range(n)``."""
    _check_n_select(n, n_select)
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(n, generator=g)[:n_select]


def coreset_radius(projected: Tensor, indices: Tensor) -> float:
    """Coverage radius ``max_m min_{n in coreset} ||m - n||_2`` (the k-center objective of Algorithm 1).

    The last value of ``coverage_curve``, computed directly: float64, in chunks of at most
    2^22 distances (no N x N matrix).
    """
    return worst_covered(projected, indices)[1]


def worst_covered(projected: Tensor, indices: Tensor) -> tuple[int, float]:
    """The bank element farthest from the coreset, and its distance (the coverage radius).

    ``argmax_m min_{n in coreset} ||m - n||_2`` and that maximum: the point Algorithm 1
    picks next (with the single start, up to float rounding of near-ties); the lowest index wins
    a tie. Float64, in chunks of at most 2^22 distances (no N x N matrix).
    """
    _check_features(projected)
    sel = projected[indices].double()
    if len(sel) == 0:
        raise ValueError("the coreset is empty")
    worst, radius, offset = 0, -1.0, 0
    for chunk in projected.split(max(1, 2**22 // len(sel))):
        nearest = torch.cdist(chunk.double(), sel).amin(dim=1)
        j = int(torch.argmax(nearest))
        if nearest[j].item() > radius:
            worst, radius = offset + j, nearest[j].item()
        offset += len(chunk)
    return worst, radius


def coverage_curve(points: Tensor, order: Tensor, block: int = 256) -> np.ndarray:
    """Coverage radius of every prefix of a pick order: ``r_k = max_m min_{first k picks c} ||m - c||``.

    ``r_k`` is Algorithm 1's k-center objective for the first k picks (k = 1 .. len(order)).
    Greedy picks are nested (the first k picks of a longer run are the k-pick run), so one
    curve gives the radius of every coreset ratio. Works on ``block`` picks and about
    2^22 / ``block`` points at a time, with a running minimum along the picks: never N x N.
    In float64 for float64 points, else in float32.
    """
    _check_features(points)
    order = torch.as_tensor(order, dtype=torch.long)
    if len(order) == 0:
        raise ValueError("the coreset is empty")
    x = points if points.dtype == torch.float64 else points.float()
    x = x - x.mean(dim=0)  # distances are translation invariant; centring keeps the products accurate
    curve = torch.zeros(len(order), dtype=x.dtype)
    for rows in x.split(max(1, 2**22 // block)):
        nearest = torch.full((len(rows), 1), math.inf, dtype=x.dtype)  # distance to the nearest pick so far
        for start, chunk in zip(range(0, len(order), block), order.split(block)):
            running = torch.minimum(torch.cdist(rows, x[chunk]).cummin(dim=1).values, nearest)
            part = curve[start : start + len(chunk)]
            torch.maximum(part, running.amax(dim=0), out=part)
            nearest = running[:, -1:]
    return curve.double().numpy()


def greedy_coreset(
    projected: Tensor,
    n_select: int,
    start: str = "official",
    num_starts: int = 10,
    seed: int = 0,
    progress: bool = False,
    fast: bool = True,
) -> Tensor:
    """Algorithm 1: exact greedy k-center on (already projected) features (N, d); returns (n_select,) int64.

    ``start="official"``: ``num_starts`` random points initialise each point's
    min-distance to its *mean* distance to them; they are not selected (the
    official ``ApproximateGreedyCoresetSampler``). ``start="single"``: one random
    point is the first pick (textbook k-center, anomalib). Ties pick the lowest
    index. ``fast=False`` runs ``greedy_coreset_reference``, the plain loop;
    ``fast=True`` makes the same choices with ``_LazyGreedy`` at every bank size
    (there is no size threshold), unless this machine's BLAS fails the exactness
    check ``_kernels_match`` (then the plain loop runs). ``fast`` only changes the
    speed, never the result.
    """
    if not fast:
        return greedy_coreset_reference(projected, n_select, None, start, num_starts, seed, progress)
    x, xt, xsq, picks, mindist, rng = _greedy_start(projected, n_select, start, num_starts, seed)
    if not _kernels_match(x, xt, xsq, rng):
        return greedy_coreset_reference(projected, n_select, None, start, num_starts, seed, progress)
    del xt  # the fast path never scans the whole bank
    bar = tqdm(total=n_select, initial=len(picks), desc="greedy coreset", disable=not progress, leave=False)
    with torch.no_grad(), bar:
        _LazyGreedy(x, xsq, picks, mindist, n_select).run(bar)
    return torch.tensor(picks, dtype=torch.long)


@torch.no_grad()
def greedy_coreset_reference(
    features: Tensor,
    n_select: int,
    projection_dim: int | None = 128,
    start: str = "official",
    num_starts: int = 10,
    seed: int = 0,
    progress: bool = False,
) -> Tensor:
    """Algorithm 1 of Roth et al. 2022 as the paper writes it: the plain loop; indices (n_select,) int64.

    psi is ``random_projection`` to ``projection_dim`` (None: ``features`` are
    already projected), as in ``select_coreset``. The paper starts from an empty
    coreset, where ``min_{n in M_C}`` is undefined; ``start`` says what stands in
    for it (see ``greedy_coreset``). ``min_dist`` holds each point's squared
    distance to the coreset: squaring changes no argmax. Each pick scans the whole
    bank once (memory-bound); ``greedy_coreset`` picks the same indices faster.
    """
    psi = features if projection_dim is None else random_projection(features, projection_dim, seed=seed)
    x, xt, xsq, coreset, min_dist, _ = _greedy_start(psi, n_select, start, num_starts, seed)
    for _ in tqdm(range(len(coreset), n_select), desc="greedy coreset", disable=not progress, leave=False):
        m = int(torch.argmax(min_dist))  # m_i = argmax_{m in M - M_C} min_{n in M_C} ||psi(m) - psi(n)||
        coreset.append(m)  # M_C = M_C + {m_i}; the lowest index wins a tie
        torch.minimum(min_dist, _distances_to(x, xt, xsq, m), out=min_dist)  # min over M_C, now with m_i
        min_dist[m] = _PICKED  # m_i has left M - M_C
    return torch.tensor(coreset, dtype=torch.long)


def select_coreset(
    features: Tensor,
    ratio: float = 0.1,
    method: str = "greedy",
    projection_dim: int = 128,
    eps: float | None = None,
    start: str = "official",
    seed: int = 0,
    progress: bool = False,
) -> Tensor:
    """Indices (int64) of the memory-bank coreset: ``max(1, int(N * ratio))`` of the N features.

    ``int`` rounds down, as the official code; ``max(1, .)`` keeps a tiny bank
    non-empty. ``ratio=1`` returns every index in order. ``method="greedy"`` is
    Algorithm 1 (random projection to ``projection_dim``, or the JL dimension
    for ``eps``, then greedy k-center); ``"random"`` is the paper's baseline.
    """
    _check_features(features)
    if not 0 < ratio <= 1:
        raise ValueError(f"coreset ratio must be in (0, 1], got {ratio}")
    if method not in METHODS:
        raise ValueError(f"coreset method must be one of {METHODS}, got {method!r}")
    n = len(features)
    n_select = max(1, int(n * ratio))
    if n_select == n:
        return torch.arange(n)
    if method == "random":
        return random_coreset(n, n_select, seed)
    projected = random_projection(features, projection_dim, eps, seed)
    return greedy_coreset(projected, n_select, start, seed=seed, progress=progress)


# ---- checks -------------------------------------------------------------------


def _check_features(features: Tensor) -> None:
    if not isinstance(features, Tensor) or features.dim() != 2 or len(features) == 0:
        shape = tuple(features.shape) if isinstance(features, Tensor) else type(features).__name__
        raise ValueError(f"features must be a non-empty (N, D) tensor, got {shape}")
    if not torch.isfinite(features).all():
        raise ValueError("features contain NaN or infinite values")


def _check_n_select(n: int, n_select: int) -> None:
    if not 1 <= n_select <= n:
        raise ValueError(f"n_select must be in [1, {n}], got {n_select}")


# ---- shared arithmetic ---------------------------------------------------------


def _finish(dots: Tensor, xsq: Tensor, csq: Tensor) -> Tensor:
    """Squared distances from dot products: (|x|^2 - 2 x.c) + |c|^2, clamped at 0.

    Both paths call this on the same floats, so only the dot products could differ.
    """
    return (xsq - 2 * dots).add_(csq).clamp_min_(0)


def _distances_to(x: Tensor, xt: Tensor, xsq: Tensor, i: int) -> Tensor:
    """Squared distances from point ``i`` to the columns of ``xt``: one matrix-vector product."""
    return _finish(x[i] @ xt, xsq, xsq[i])


def _pair_distances(c: Tensor, csq: Tensor, p: Tensor, psq: Tensor) -> Tensor:
    """Squared distances of row pairs (c[k], p[k]): a batch of (1 x d) @ (d x 1) products.

    Each is a one-row matrix-vector product, summed in the order ``x[i] @ xt``
    sums (``_kernels_match`` checks this on the machine at hand).
    """
    return _finish(torch.bmm(c.unsqueeze(1), p.unsqueeze(2)).view(-1), psq, csq)


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
        full = _distances_to(x, xt, xsq, i)[cols]
        pair = _pair_distances(x[[i]].expand(len(cols), -1), xsq[i].expand(len(cols)), x[cols], xsq[cols])
        part = _finish(x[i] @ sub, xsq[cols], xsq[i])
        if not (torch.equal(full, pair) and torch.equal(full, part)):
            warnings.warn("this BLAS sums dot products differently in batched and matrix-vector products: "
                          "using the plain greedy loop (same result, slower)", RuntimeWarning, stacklevel=3)
            return False
    return True


def _greedy_start(
    projected: Tensor, n_select: int, start: str, num_starts: int, seed: int
) -> tuple[Tensor, Tensor, Tensor, list[int], Tensor, np.random.Generator]:
    """Checked, mean-centred points x, x^T and |x|^2, the start's picks and min-distances, and the rng after them.

    Distances are translation invariant; centring keeps |x|^2 - 2x.c + |c|^2 accurate.
    """
    _check_features(projected)
    n = len(projected)
    _check_n_select(n, n_select)
    if start not in STARTS:
        raise ValueError(f"start must be one of {STARTS}, got {start!r}")
    if num_starts < 1:
        raise ValueError(f"num_starts must be >= 1, got {num_starts}")
    x = projected.float()
    x = (x - x.double().mean(dim=0).float()).contiguous()
    xsq = (x * x).sum(dim=1)
    xt = x.T.contiguous()  # (d, N): x[i] @ xt reads the bank contiguously
    rng = np.random.default_rng(seed)
    if start == "single":
        picks = [int(rng.integers(n))]
        mindist = _distances_to(x, xt, xsq, picks[0])
        mindist[picks[0]] = _PICKED
    else:
        starts = rng.choice(n, size=min(num_starts, n), replace=False)
        picks, mindist = [], _mean_start_distance(x, xt, xsq, starts)
    return x, xt, xsq, picks, mindist, rng


def _mean_start_distance(x: Tensor, xt: Tensor, xsq: Tensor, starts: np.ndarray) -> Tensor:
    """Official initialisation: (mean Euclidean distance to the starting points)^2, shape (N,)."""
    total = torch.zeros(len(x), dtype=torch.float64)
    for i in starts.tolist():
        total += _distances_to(x, xt, xsq, i).sqrt()
    return (total / len(starts)).square().float()


# ---- fast path -----------------------------------------------------------------


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
                 hot_size: int | None = None):
        n, d = x.shape
        self.x, self.xsq, self.picks, self.mindist = x, xsq, picks, mindist
        self.seen = torch.full((n,), len(picks), dtype=torch.long)  # picks applied to each point
        # Row p . [c, |c|^2, 1] = |x_p|^2 - 2 x_p.c + |c|^2: catching up is one matrix product.
        self.aug = torch.cat([-2 * x, torch.ones(n, 1), xsq[:, None]], dim=1)
        self.pick_rows = torch.ones(n_select, d + 2)  # [c, |c|^2, 1], filled up to n_rows
        self.n_rows = 0
        self.hot_size = hot_size or min(_HOT, max(64, n // 8))
        self.tau = math.inf
        self.hot = torch.empty(0, dtype=torch.long)
        # Filter and plain arithmetic each give a squared distance within
        # (d + 4) u (|x| + |c|)^2 of the exact one (sums of d + 2 terms); 2x margin.
        self.kappa = 4 * (d + 4) * _UNIT

    def run(self, bar: tqdm) -> None:
        n_select = len(self.pick_rows)
        while len(self.picks) < n_select:
            self._refill()
            self._pick_hot(n_select, bar)

    def _pick_hot(self, n_select: int, bar: tqdm) -> None:
        """Greedy picks from the hot set while its maximum is >= tau; writes the hot values back."""
        x, xsq, picks, tau = self.x, self.xsq, self.picks, self.tau
        ids = self.hot
        xt, sq, r = x[ids].T.contiguous(), xsq[ids], self.mindist[ids]
        ids_list = ids.tolist()
        while len(picks) < n_select and len(ids_list):
            value, j = torch.max(r, dim=0)  # first maximum, as argmax
            if value.item() < tau:
                break
            i = ids_list[j.item()]
            picks.append(i)
            torch.minimum(r, _finish(x[i] @ xt, sq, xsq[i]), out=r)
            r[j] = _PICKED
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
        new = torch.tensor(self.picks[self.n_rows : t], dtype=torch.long)
        self.pick_rows[self.n_rows : t, :-2] = self.x[new]
        self.pick_rows[self.n_rows : t, -2] = self.xsq[new]
        self.n_rows = t
        k = min(self.hot_size, len(self.mindist))
        self.tau = torch.topk(self.mindist, k, sorted=False).values.min().item()
        above = self.mindist >= self.tau
        self._catch_up(torch.nonzero(above & (self.seen < t)).view(-1), t)
        self.hot = torch.nonzero(self.mindist >= self.tau).view(-1)  # ascending: ties -> lowest index

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
            while len(members) and end > first:
                start = max(first, end - width)
                for chunk in members.split(max(1, _FILTER_ELEMS // (end - start))):
                    self._apply(chunk, start, end)
                members = members[self.mindist[members] >= self.tau]
                end, width = start, 2 * width
            self.seen[members] = t

    def _apply(self, ids: Tensor, first: int, t: int) -> None:
        d = self.x.shape[1]
        pending = self.pick_rows[first:t]
        approx = self.aug[ids] @ pending.T  # (n, m) squared distances, a filter only
        low = approx.amin(dim=1)
        r = self.mindist[ids]
        norm = self.xsq[ids].max().sqrt() + pending[:, -2].max().sqrt()
        tol = self.kappa * norm.item() ** 2
        cand = torch.nonzero(low < r + tol).view(-1)
        if len(cand) == 0:
            return
        # Pairs that may lower a min-distance and may be the minimum: recompute exactly.
        thr = torch.minimum(r[cand] + tol, low[cand] + 2 * tol)
        pi, pj = torch.nonzero(approx[cand] <= thr[:, None], as_tuple=True)
        pts, cs = ids[cand[pi]], pending[pj]
        exact = _pair_distances(cs[:, :d], cs[:, d], self.x[pts], self.xsq[pts])
        self.mindist.scatter_reduce_(0, pts, exact, "amin")
