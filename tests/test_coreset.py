"""Greedy coreset (Algorithm 1): the plain loop's k-center properties, projection, random subsampling, selection.

The fast path (``lazy_greedy``) is checked against the plain loop in ``test_lazy_greedy.py``."""

import itertools

import numpy as np
import pytest
import torch
from banks import clustered, gen

from patchcore_lite.coreset import (
    check_features,
    greedy_coreset,
    jl_dimension,
    random_coreset,
    random_projection,
    select_coreset,
)
from patchcore_lite.teaching.measures import (
    coreset_radius,
    coverage_curve,
    worst_covered,
)
from patchcore_lite.teaching.synthetic import toy_point_cloud


def test_ties_pick_lowest_index():
    # All points are starts: every mean distance is 1, so index 0 goes first; then 1 and 3
    # tie at distance 1 (1 wins); then only zeros are left among 2 and 3 (2 wins).
    x = torch.tensor([[-1.0], [1.0], [-1.0], [1.0]])
    assert greedy_coreset(x, 3, num_starts=4).tolist() == [0, 1, 2]


def _min_dist(points: torch.Tensor, centers: torch.Tensor) -> torch.Tensor:
    return torch.cdist(points, centers).amin(dim=1)


def test_k_center_radius_is_next_pick_distance():
    """Single start: radius after k picks = distance of pick k+1 to the first k, non-increasing."""
    x = clustered(400, 8, 10, 1, spread=0.4).double()
    picks = greedy_coreset(x.float(), 40, start="single", seed=3).tolist()
    radii = [coreset_radius(x, torch.tensor(picks[:k])) for k in range(1, 40)]
    next_dist = [_min_dist(x[[p]], x[picks[:k]]).item() for k, p in enumerate(picks[1:], start=1)]
    np.testing.assert_allclose(radii, next_dist, rtol=1e-4)
    assert all(b <= a * (1 + 1e-5) for a, b in zip(radii, radii[1:]))
    assert (_min_dist(x, x[picks]) <= radii[-1] * (1 + 1e-5)).all()


@pytest.mark.parametrize("seed", range(5))
def test_greedy_within_twice_optimal(seed):
    x = torch.randn(12, 2, generator=gen(seed), dtype=torch.float64)
    optimal = min(coreset_radius(x, torch.tensor(s)) for s in itertools.combinations(range(12), 3))
    greedy = coreset_radius(x, greedy_coreset(x.float(), 3, start="single", seed=seed))
    assert greedy <= 2 * optimal + 1e-9


def test_greedy_covers_clusters_better_than_random():
    x = clustered(3000, 16, 40, 0, spread=0.05)
    greedy = coreset_radius(x, select_coreset(x, 0.02, "greedy", projection_dim=8))
    rand = coreset_radius(x, select_coreset(x, 0.02, "random"))
    assert greedy < 0.5 * rand


def test_coreset_radius_brute_force():
    x = torch.randn(50, 3, generator=gen(2))
    sel = torch.tensor([0, 7, 9])
    assert coreset_radius(x, sel) == pytest.approx(torch.cdist(x.double(), x[sel].double()).amin(1).max().item())


def test_worst_covered_is_the_farthest_point_and_the_next_greedy_pick():
    # Analytic: picks at 0 and 10 on a line; 4 is 4 from its nearest pick, 7 is 3, 13 is 3.
    line = torch.tensor([[0.0], [4.0], [7.0], [10.0], [13.0]])
    assert worst_covered(line, torch.tensor([0, 3])) == (1, pytest.approx(4.0))
    assert worst_covered(torch.tensor([[0.0], [2.0], [-2.0]]), torch.tensor([0])) == (1, 2.0)  # tie: lowest index
    # Chunked like coreset_radius (a chunk per 2^22 / k rows): the same point when it lies in a later chunk.
    many = torch.zeros(2**21 + 3, 1)
    many[-2] = 5.0
    assert worst_covered(many, torch.arange(2)) == (2**21 + 1, 5.0)
    # Single start: Algorithm 1 picks the worst-covered point at every step, at the coverage radius.
    points = toy_point_cloud(300, seed=1)
    order = greedy_coreset(points, 25, start="single", seed=1)
    for k in (1, 2, 10, 24):
        worst, radius = worst_covered(points, order[:k])
        assert worst == order[k] and radius == pytest.approx(coreset_radius(points, order[:k]))
    with pytest.raises(ValueError, match="empty"):
        worst_covered(points, torch.tensor([], dtype=torch.long))


def test_coverage_curve_equals_the_radius_of_every_prefix():
    points = toy_point_cloud(300, seed=2)
    order = random_coreset(len(points), 40, seed=3)
    curve = coverage_curve(points, order, block=16)  # several blocks
    assert curve.shape == (40,)
    for k in (1, 7, 16, 17, 40):
        assert curve[k - 1] == pytest.approx(coreset_radius(points, order[:k]), rel=1e-5)
    assert (np.diff(curve) <= 1e-6).all()  # adding a point never uncovers anything
    # Point chunks of 2^22 / block rows: with block=2^21 each chunk holds two points.
    np.testing.assert_allclose(coverage_curve(points, order, block=2**21), curve, rtol=1e-6)
    with pytest.raises(ValueError, match="empty"):
        coverage_curve(points, torch.tensor([], dtype=torch.long))


def test_greedy_covers_the_toy_cloud_within_twice_the_optimum():
    points = toy_point_cloud(400, seed=0)
    order = greedy_coreset(points, 30, start="single", seed=0)
    curve = coverage_curve(points, order)
    # The first k+1 greedy picks are pairwise >= r_k apart (each was the farthest point when picked).
    for k in (5, 29):
        picks = points[order[: k + 1]]
        pairwise = torch.cdist(picks, picks) + torch.eye(k + 1) * 1e9
        assert pairwise.min() >= curve[k - 1] - 1e-5
    assert curve[-1] < coverage_curve(points, random_coreset(400, 30, seed=0))[-1]

# ---- projection -----------------------------------------------------------------


def test_jl_dimension_matches_sklearn_values():
    assert jl_dimension(10**6, 0.5) == 663  # sklearn's documented examples
    assert jl_dimension(10**6, 0.1) == 11841
    assert jl_dimension(163_856, 0.9) == 296  # anomalib's dimension for MVTec bottle
    for eps in (0, 1, 1.5):
        with pytest.raises(ValueError):
            jl_dimension(100, eps)


def test_projection_shape_and_determinism():
    x = torch.randn(300, 64, generator=gen(0))
    a = random_projection(x, 16, seed=1)
    assert a.shape == (300, 16) and a.dtype == torch.float32
    assert torch.equal(a, random_projection(x, 16, seed=1))
    assert not torch.equal(a, random_projection(x, 16, seed=2))
    assert random_projection(x, 64) is x and random_projection(x, 100) is x  # d >= D: unchanged


def test_projection_preserves_distances_within_jl_eps():
    eps = 0.5
    x = torch.randn(200, 1000, generator=gen(4))
    y = random_projection(x, eps=eps, seed=0)
    assert y.shape[1] == jl_dimension(200, eps)
    iu = torch.triu_indices(200, 200, 1)
    ratio = (torch.cdist(y, y) ** 2 / torch.cdist(x, x) ** 2)[iu[0], iu[1]]
    assert ((ratio > 1 - eps) & (ratio < 1 + eps)).float().mean() >= 0.95
    assert ratio.mean().item() == pytest.approx(1.0, abs=0.05)  # N(0, 1/d): unbiased


# ---- select_coreset -------------------------------------------------------------


@pytest.mark.parametrize(("n", "ratio", "expected"), [(1000, 0.1, 100), (999, 0.1, 99), (5, 0.1, 1), (7, 0.5, 3)])
def test_select_coreset_rounding(n, ratio, expected):
    x = torch.randn(n, 4, generator=gen(n))
    for method in ("greedy", "random"):
        picks = select_coreset(x, ratio, method)
        assert picks.dtype == torch.long and len(picks) == expected == len(picks.unique())


def test_select_coreset_ratio_one_returns_everything():
    assert torch.equal(select_coreset(torch.randn(17, 3), 1.0), torch.arange(17))


def test_random_coreset_deterministic():
    assert torch.equal(random_coreset(100, 10, seed=3), random_coreset(100, 10, seed=3))
    assert not torch.equal(random_coreset(100, 10, seed=3), random_coreset(100, 10, seed=4))
    assert len(random_coreset(100, 100).unique()) == 100


def test_select_coreset_projects_with_jl_eps():
    x = torch.randn(400, 512, generator=gen(5))
    projected = random_projection(x, eps=0.9)
    assert projected.shape[1] == jl_dimension(400, 0.9) != 128  # eps, not projection_dim, sets psi
    assert torch.equal(select_coreset(x, 0.05, eps=0.9), greedy_coreset(projected, 20))


@pytest.mark.parametrize("ratio", [0, -0.1, 1.5])
def test_bad_ratio(ratio):
    with pytest.raises(ValueError, match="ratio"):
        select_coreset(torch.randn(10, 3), ratio)


def test_bad_arguments():
    x = torch.randn(10, 3)
    with pytest.raises(ValueError, match="method"):
        select_coreset(x, 0.5, "kmeans")
    with pytest.raises(ValueError, match="start"):
        greedy_coreset(x, 2, start="centre")
    with pytest.raises(ValueError, match="n_select"):
        greedy_coreset(x, 11)
    with pytest.raises(ValueError, match="n_select"):
        random_coreset(10, 0)
    with pytest.raises(ValueError, match="non-empty"):
        select_coreset(torch.empty(0, 3))
    with pytest.raises(ValueError, match="NaN"):
        select_coreset(torch.tensor([[0.0, float("nan")]] * 3), 0.5)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_a_single_non_finite_value_is_refused_anywhere(bad, dtype):
    """check_features finds one NaN or infinity at any position (first, last, inside a SIMD block), any float type."""
    for pos in [(0, 0), (299, 16), (150, 7), (31, 16)]:
        x = torch.randn(300, 17, generator=gen(0)).to(dtype)
        x[pos] = bad
        with pytest.raises(ValueError, match="NaN or infinite"):
            check_features(x)
    check_features(torch.randn(300, 17, generator=gen(0)).to(dtype))  # and finite values pass
