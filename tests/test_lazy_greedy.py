"""The fast path of Algorithm 1 (``lazy_greedy``) picks exactly what the plain loop (``coreset.greedy_coreset``) picks."""

import warnings

import pytest
import torch
from banks import clustered, gen

from patchcore_lite import lazy_greedy as lg
from patchcore_lite.coreset import (
    STARTS,
    distances_to,
    greedy_coreset,
    greedy_start,
    random_projection,
    select_coreset,
)
from patchcore_lite.exact_search import fused_kernel
from patchcore_lite.lazy_greedy import _filter_pairs, _LazyGreedy, _LowBound, lazy_greedy_coreset


@pytest.fixture(params=["torch ops", "compiled", "bound + compiled"])
def filter_pass(request, monkeypatch):
    """The three implementations of the catch-up filter, the compiled ones (lazy_greedy.cpp) at every bank
    size; "bound + compiled" (a lower bound in BOUND_DIMS principal components first) from d = 4."""
    if request.param == "torch ops":
        monkeypatch.setattr(lg, "NATIVE_MIN", 2**62)
        return request.param
    if fused_kernel() is None:
        pytest.skip("no compiled kernel on this machine (no AVX2 or no C++ compiler): the torch ops run")
    monkeypatch.setattr(lg, "NATIVE_MIN", 0)
    monkeypatch.setattr(lg, "BOUND_DIMS", 2 if request.param == "bound + compiled" else 2**62)
    return request.param


def _case(seed: int) -> tuple[torch.Tensor, int]:
    """Random bank of one of six kinds (ties, duplicates, clusters, offsets) and a pick count."""
    g = gen(seed)
    n = [1, 2, 3000][seed] if seed < 3 else int(torch.randint(1, 3001, (1,), generator=g))
    d = int(torch.randint(1, 40, (1,), generator=g))
    kind = seed % 6
    if kind == 0:
        x = torch.randn(n, d, generator=g)
    elif kind == 1:  # integer grid: many exactly equal distances
        x = torch.randint(0, 3, (n, d), generator=g).float()
    elif kind == 2:  # every point several times
        x = torch.randn(max(1, n // 4), d, generator=g).repeat(4, 1)[:n]
    elif kind == 3:
        x = clustered(n, d, 12, seed)
    elif kind == 4:  # all identical
        x = torch.full((n, d), 0.7)
    else:  # far from the origin, small spread: the |x|^2 - 2x.c + |c|^2 form loses digits
        x = 100 + 0.01 * torch.randn(n, d, generator=g)
    few = min(n, 300)  # keeps the plain loop quick; n <= 300 also covers n_select = N
    choices = [1, few, max(1, n // 20), int(torch.randint(1, few + 1, (1,), generator=g))]
    return x, choices[seed % 4]


@pytest.mark.parametrize("start", ["official", "single"])
@pytest.mark.parametrize("seed", range(30))
def test_fast_equals_plain(seed, start, filter_pass):
    x, k = _case(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the fast path must really run here
        fast = lazy_greedy_coreset(x, k, start=start, seed=seed)
    plain = greedy_coreset(x, k, start=start, seed=seed)
    assert torch.equal(fast, plain)
    assert len(fast.unique()) == k  # no point picked twice, duplicates included


@pytest.mark.parametrize("window", [1, 3])
@pytest.mark.parametrize("seed", range(4))
def test_fast_equals_plain_tiny_hot_set(monkeypatch, seed, window, filter_pass):
    """Tiny hot set, catch-up windows, filter chunks and compaction period: every branch runs often."""
    monkeypatch.setattr(lg, "HOT", 8)
    monkeypatch.setattr(lg, "_FILTER_ELEMS", 2048)
    monkeypatch.setattr(lg, "_BOUND_PAIRS", 2048)
    monkeypatch.setattr(lg, "_COMPACT_EVERY", 2)
    monkeypatch.setattr(lg, "_FIRST_WINDOW", window)
    x = clustered(600, 6, 30, seed, spread=0.3) if seed % 2 else torch.randint(0, 4, (600, 5)).float()
    for start in ("official", "single"):
        fast = lazy_greedy_coreset(x, 120, start=start, seed=seed)
        assert torch.equal(fast, greedy_coreset(x, 120, start=start, seed=seed))


@pytest.mark.parametrize(
    ("n", "d", "kind", "seed"),
    [(2000, 200, "clusters", 0), (1600, 160, "duplicates", 1), (800, 64, "grid", 2), (3000, 256, "grid", 3)],
)
def test_reference_loop_picks_what_the_default_path_picks(n, d, kind, seed):
    """The readable Algorithm 1 loop on the projected features equals select_coreset (projection + fast
    path) and the fast path on the projected features, for both start rules; d = 64 < 128 is not projected."""
    g = gen(seed)
    if kind == "clusters":
        x = clustered(n, d, 12, seed)
    elif kind == "duplicates":  # every point four times
        x = torch.randn(n // 4, d, generator=g).repeat(4, 1)
    else:  # integer grid: many exactly equal distances
        x = torch.randint(0, 3, (n, d), generator=g).float()
    k = n // 10
    projected = random_projection(x, 128, seed=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the fast path must really run here
        for start in STARTS:
            expected = greedy_coreset(projected, k, start, seed=seed)
            assert len(expected.unique()) == k
            assert torch.equal(lazy_greedy_coreset(projected, k, start, seed=seed), expected)
            assert torch.equal(select_coreset(x, 0.1, start=start, seed=seed), expected)
            assert torch.equal(select_coreset(x, 0.1, start=start, seed=seed, fast=False), expected)


def test_fast_path_falls_back_when_kernels_differ(monkeypatch):
    exact = lg._pair_distances
    monkeypatch.setattr(lg, "_pair_distances", lambda *a: exact(*a) * (1 + 2**-20))
    x = torch.randn(500, 8, generator=gen(0))
    with pytest.warns(RuntimeWarning, match="plain greedy loop"):
        fast = lazy_greedy_coreset(x, 50)
    assert torch.equal(fast, greedy_coreset(x, 50))


def test_ties_pick_lowest_index_like_the_plain_loop():
    x = torch.tensor([[-1.0], [1.0], [-1.0], [1.0]])
    assert lazy_greedy_coreset(x, 3, num_starts=4).tolist() == greedy_coreset(x, 3, num_starts=4).tolist() == [0, 1, 2]


def _filter_cases():
    """Filter products with exact ties, entries equal to a threshold, +inf, and widths around the 8 lanes."""
    g = gen(7)
    for n, m in [(1, 1), (2, 7), (5, 8), (9, 9), (40, 17), (300, 130), (64, 1000)]:
        a = torch.randint(0, 40, (n, m), generator=g).float() / 8  # many equal values
        r = torch.randint(0, 40, (n,), generator=g).float() / 8
        a[:, ::5] = a[:, :1].clone()  # ties with the first column
        if m > 3:
            a[0, 3] = float("inf")
        yield a, r, 0.0  # entries equal to r + tol or low + 2 tol: on the boundary
        yield a, r, 0.125
        yield a + torch.rand(n, m, generator=g) * 1e-6, r, 1e-6  # near-ties within the margin


@pytest.mark.parametrize("case", range(21))
def test_compiled_filter_pass_selects_the_same_pairs(case):
    """lazy_greedy.cpp's single pass returns the torch ops' (row, column) pairs, in the same order."""
    if fused_kernel() is None:
        pytest.skip("no compiled kernel on this machine (no AVX2 or no C++ compiler): the torch ops run")
    approx, r, tol = list(_filter_cases())[case]
    expected = _filter_pairs(approx, r, tol)
    got = _filter_pairs(approx, r, tol, fused_kernel())
    assert all(torch.equal(a, b) for a, b in zip(got, expected))
    rows, cols = expected  # and the selection is the documented one
    low = approx.amin(dim=1)
    keep = (low < r + tol)[:, None] & (approx <= torch.minimum(r + tol, low + 2 * tol)[:, None])
    assert torch.equal(torch.stack([rows, cols]), torch.nonzero(keep).T)


def _bound_banks():
    """Centred banks with ties, duplicates, huge and tiny norms and an offset that costs digits."""
    for seed, (n, d, kind) in enumerate([(300, 16, "normal"), (200, 8, "grid"), (240, 12, "duplicates"),
                                         (300, 16, "huge"), (300, 16, "tiny"), (200, 10, "offset")]):
        g = gen(seed)
        x = {"grid": lambda: torch.randint(0, 3, (n, d), generator=g).float(),
             "duplicates": lambda: torch.randn(n // 4, d, generator=g).repeat(4, 1),
             "huge": lambda: 1e6 * torch.randn(n, d, generator=g),
             "tiny": lambda: 1e-6 * torch.randn(n, d, generator=g),
             "offset": lambda: 100 + 0.01 * torch.randn(n, d, generator=g)}.get(kind, lambda: torch.randn(n, d, generator=g))()
        yield greedy_start(x, 1, "official", 10, seed)[0], seed


@pytest.mark.parametrize("case", range(6))
def test_low_bound_never_exceeds_a_distance(case):
    """_LowBound's product minus its margin is below every exact squared distance (float64), pick rows included."""
    x, seed = list(_bound_banks())[case]
    low = _LowBound(x, len(x), 3)
    bound = (low.aug @ low.rows.T).double()
    norms = x.double().norm(dim=1)
    margin = low.kappa * (norms[:, None] + norms[None, :]) ** 2
    exact = torch.cdist(x.double(), x.double()) ** 2
    assert (bound - margin <= exact).all()
    # and a bound worth computing: the 3 leading components hold at least their share of the spread
    assert bound.sum() >= 0.99 * 3 / x.shape[1] * exact.sum()


@pytest.mark.parametrize("case", range(6))
def test_pruned_pass_lowers_every_min_distance_it_must(case):
    """lazy_greedy.cpp's pruned_pairs keeps, for every point, every pick that lowers its min-distance (by the plain
    arithmetic) and the one that sets it: applying its pairs gives the plain loop's minimum, exactly; windows of
    picks of every width around the 16-column blocks, and rows around the 4-row blocks."""
    if fused_kernel() is None:
        pytest.skip("no compiled kernel on this machine (no AVX2 or no C++ compiler): the torch ops run")
    x, seed = list(_bound_banks())[case]
    g = gen(seed)
    xsq = (x * x).sum(dim=1)
    picks = torch.randperm(len(x), generator=g)[:120].tolist()
    state = _LazyGreedy(x, xsq, picks, torch.zeros(len(x)), len(picks), native=fused_kernel())
    state.low = _LowBound(x, len(picks), 3)
    state._add_pick_rows()
    plain = torch.stack([distances_to(x, x.T.contiguous(), xsq, i) for i in picks], dim=1)  # (N, picks)
    for n, first, end in [(1, 0, 1), (3, 5, 20), (4, 0, 16), (5, 3, 36), (9, 0, 120), (64, 7, 120)]:
        ids = torch.randperm(len(x), generator=g)[:n]
        best = plain[ids, first:end].amin(dim=1)
        r = torch.where(torch.rand(n, generator=g) < 0.5, best * 1.5 + 1e-30, best * 0.9)  # some rows cannot drop
        state.mindist[ids] = r
        state._apply(ids, first, end)
        assert torch.equal(state.mindist[ids], torch.minimum(r, best))


@pytest.mark.parametrize(("n", "m", "first"), [(1, 1, 0), (3, 15, 2), (4, 16, 0), (5, 17, 1), (9, 33, 0),
                                             (40, 600, 5), (200, 40, 0)])
def test_pruned_pairs_selects_what_the_full_filter_selects(n, m, first):
    """Given bounds as the kernel's contract allows (bound <= full value + bound_tol - tol: a lower bound of the
    exact distance, whose own error bound_tol covers), lazy_greedy.cpp's pruned_pairs returns exactly the full
    filter's selection (_filter_pairs on the whole product), whatever it skips. Small integers make every dot
    product exact, so both see the same values; many ties, bounds from 3 below the value to the contract's
    limit above it; rows and columns around the 4 x 16 blocks, the 512-column tiles and the 96-row panels."""
    if fused_kernel() is None:
        pytest.skip("no compiled kernel on this machine (no AVX2 or no C++ compiler): the torch ops run")
    g = gen(n * 1000 + m)
    rows, picks = torch.randint(-2, 3, (n, 6), generator=g).float(), torch.randint(-2, 3, (first + m, 6), generator=g).float()
    full = rows @ picks[first:].T
    for tol in (0.0, 1.0):
        bound_tol = tol + 3
        low_t = torch.zeros(n, first + m)
        low_t[:, first:] = full + torch.randint(-3, 4, (n, m), generator=g).float()  # up to bound_tol - tol above
        r = full.amin(dim=1) + torch.randint(-2, 3, (n,), generator=g).float()  # rows that can and cannot drop
        got = fused_kernel().pruned_pairs(torch.eye(n), low_t, rows, picks, torch.arange(n), r, first, first + m,
                                          bound_tol, tol)
        expected = _filter_pairs(full, r, tol)
        key = lambda pairs: sorted(zip(*(t.tolist() for t in pairs)))  # noqa: E731
        assert key(got) == key(expected)


def test_only_large_banks_wait_for_the_compiler(monkeypatch):
    """Banks of NATIVE_MIN points or more ask for the compiled pass; a first small fit never builds it."""
    asked = []
    monkeypatch.setattr(lg, "fused_kernel", lambda: asked.append(True))  # None: the torch ops run
    monkeypatch.setattr(lg, "NATIVE_MIN", 400)
    x = torch.randn(500, 8, generator=gen(3))
    assert torch.equal(lazy_greedy_coreset(x[:399], 40), greedy_coreset(x[:399], 40)) and not asked
    assert torch.equal(lazy_greedy_coreset(x, 40), greedy_coreset(x, 40)) and asked == [True]
