"""Coreset subsampling of the memory bank (PatchCore, Roth et al. 2022, Sec. 3.2, Algorithm 1).

Algorithm 1 (greedy coreset selection), on the patch features M of the training images:

    M_C = {}
    for i in 1 .. l:
        m_i = argmax_{m in M - M_C} min_{n in M_C} ||psi(m) - psi(n)||_2
        M_C = M_C + {m_i}

psi is a random linear projection (Johnson-Lindenstrauss) that makes each distance cheaper;
each step adds the point farthest from the current coreset, so the coreset covers the bank
with a small radius (greedy k-center, minimax facility location). ``greedy_coreset`` below is
that loop, line by line: each step streams the whole bank once to get the distances to the new
pick and takes an in-place minimum (memory-bound).

``select_coreset`` is what ``PatchCore.fit`` calls: psi, then Algorithm 1 through
``lazy_greedy.lazy_greedy_coreset``, which returns *identical* indices with far fewer bytes moved
(that module says how it stays identical; ``select_coreset(fast=False)`` runs the loop below instead).

Distances are squared Euclidean distances ``|x|^2 - 2 x.c + |c|^2`` (clamped at 0) of
mean-centred features; squaring does not change any argmax or minimum. Ties pick the lowest index.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

STARTS = ("official", "single")
METHODS = ("greedy", "random")
# A picked point's min-distance: below every distance, so with exact duplicates
# (all remaining distances 0) no point is picked twice.
PICKED = -1.0


@torch.no_grad()
def greedy_coreset(
    projected: Tensor,
    n_select: int,
    start: str = "official",
    num_starts: int = 10,
    seed: int = 0,
    progress: bool = False,
) -> Tensor:
    """Algorithm 1 as the paper writes it, on projected features psi(M) (N, d): indices (n_select,) int64.

    The paper starts from an empty coreset, where ``min_{n in M_C}`` is undefined; ``start``
    says what stands in for it. ``"official"``: ``num_starts`` random points initialise each
    point's min-distance to its *mean* distance to them; they are not selected (the official
    ``ApproximateGreedyCoresetSampler``). ``"single"``: one random point is the first pick
    (textbook k-center, anomalib). ``min_dist`` holds each point's squared distance to the
    coreset: squaring changes no argmax.
    """
    x, xt, xsq, coreset, min_dist, _ = greedy_start(projected, n_select, start, num_starts, seed)
    for _ in tqdm(range(len(coreset), n_select), desc="greedy coreset", disable=not progress, leave=False):
        m = int(torch.argmax(min_dist))  # m_i = argmax_{m in M - M_C} min_{n in M_C} ||psi(m) - psi(n)||
        coreset.append(m)  # M_C = M_C + {m_i}; the lowest index wins a tie
        torch.minimum(min_dist, distances_to(x, xt, xsq, m), out=min_dist)  # min over M_C, now with m_i
        min_dist[m] = PICKED  # m_i has left M - M_C
    return torch.tensor(coreset, dtype=torch.long)


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
    check_features(features)
    n, big_d = features.shape
    d = max(1, jl_dimension(n, eps)) if eps is not None else dim
    if d < 1:
        raise ValueError(f"projection dimension must be >= 1, got {d}")
    if d >= big_d:
        return features
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(big_d, d, generator=g) / math.sqrt(d)
    return features.float() @ w


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


def random_coreset(n: int, n_select: int, seed: int = 0) -> Tensor:
    """Baseline: ``n_select`` distinct indices drawn uniformly from ``range(n)``."""
    _check_n_select(n, n_select)
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(n, generator=g)[:n_select]


def select_coreset(
    features: Tensor,
    ratio: float = 0.1,
    method: str = "greedy",
    projection_dim: int = 128,
    eps: float | None = None,
    start: str = "official",
    seed: int = 0,
    progress: bool = False,
    fast: bool = True,
) -> Tensor:
    """Indices (int64) of the memory-bank coreset: ``max(1, int(N * ratio))`` of the N features.

    ``int`` rounds down, as the official code; ``max(1, .)`` keeps a tiny bank
    non-empty. ``ratio=1`` returns every index in order. ``method="greedy"`` is
    Algorithm 1 (random projection to ``projection_dim``, or the JL dimension
    for ``eps``, then greedy k-center); ``"random"`` is the paper's baseline.
    ``fast`` (default) runs Algorithm 1 as ``lazy_greedy.lazy_greedy_coreset``, ``False``
    as ``greedy_coreset``: the same indices either way, only the time differs.
    """
    # Imported here: the fast path builds on this module's arithmetic (greedy_start, distances_to).
    from .lazy_greedy import lazy_greedy_coreset

    check_features(features)
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
    greedy = lazy_greedy_coreset if fast else greedy_coreset
    return greedy(projected, n_select, start, seed=seed, progress=progress)


# ---- checks -------------------------------------------------------------------


def check_features(features: Tensor) -> None:
    """Refuse anything but a non-empty (N, D) tensor of finite values (ValueError)."""
    if not isinstance(features, Tensor) or features.dim() != 2 or len(features) == 0:
        shape = tuple(features.shape) if isinstance(features, Tensor) else type(features).__name__
        raise ValueError(f"features must be a non-empty (N, D) tensor, got {shape}")
    # The extremes are finite iff every value is (NaN propagates): one pass, no mask (25x isfinite().all()).
    if features.is_floating_point() and features.numel() and not all(map(torch.isfinite, torch.aminmax(features))):
        raise ValueError("features contain NaN or infinite values")


def _check_n_select(n: int, n_select: int) -> None:
    if not 1 <= n_select <= n:
        raise ValueError(f"n_select must be in [1, {n}], got {n_select}")


# ---- the arithmetic both implementations share ---------------------------------------


def finish(dots: Tensor, xsq: Tensor, csq: Tensor) -> Tensor:
    """Squared distances from dot products: (|x|^2 - 2 x.c) + |c|^2, clamped at 0.

    Both paths call this on the same floats, so only the dot products could differ.
    """
    return (xsq - 2 * dots).add_(csq).clamp_min_(0)


def distances_to(x: Tensor, xt: Tensor, xsq: Tensor, i: int) -> Tensor:
    """Squared distances from point ``i`` to the columns of ``xt``: one matrix-vector product."""
    return finish(x[i] @ xt, xsq, xsq[i])


def greedy_start(
    projected: Tensor, n_select: int, start: str, num_starts: int, seed: int
) -> tuple[Tensor, Tensor, Tensor, list[int], Tensor, np.random.Generator]:
    """Checked, mean-centred points x, x^T and |x|^2, the start's picks and min-distances, and the rng after them.

    Distances are translation invariant; centring keeps |x|^2 - 2x.c + |c|^2 accurate.
    """
    check_features(projected)
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
        mindist = distances_to(x, xt, xsq, picks[0])
        mindist[picks[0]] = PICKED
    else:
        starts = rng.choice(n, size=min(num_starts, n), replace=False)
        picks, mindist = [], _mean_start_distance(x, xt, xsq, starts)
    return x, xt, xsq, picks, mindist, rng


def _mean_start_distance(x: Tensor, xt: Tensor, xsq: Tensor, starts: np.ndarray) -> Tensor:
    """Official initialisation: (mean Euclidean distance to the starting points)^2, shape (N,)."""
    total = torch.zeros(len(x), dtype=torch.float64)
    for i in starts.tolist():
        total += distances_to(x, xt, xsq, i).sqrt()
    return (total / len(starts)).square().float()
