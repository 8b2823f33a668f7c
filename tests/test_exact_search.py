"""Try to break the exact search (exact_search.py): every case must equal the brute-force definition
bit for bit, on every path (int16 AVX2 kernel, torch ops, PCA and full-space filters, bf16)."""

from fractions import Fraction

import numpy as np
import pytest
import torch

from patchcore_lite import exact_search
from patchcore_lite.datasets import list_images
from patchcore_lite.exact_search import ExactKNN, _round_to_f32, exact_sq, reference_search
from patchcore_lite.knn import NearestNeighbors

VARIANTS = [  # (reduce_dim, precision, fused[, coarse_dim]); fused falls back to torch ops where the kernel cannot run
    (None, "fp32", True), (None, "fp32", False), (4, "fp32", True), (4, "fp32", True, 2), (4, "fp32", False),
    (4, "bf16", False), (None, "bf16", False),
]


def check(bank: torch.Tensor, queries: torch.Tensor, k: int, variants=VARIANTS, **kw) -> None:
    ref_d, ref_i = reference_search(bank, queries, k)
    assert torch.all(ref_d[:, 1:] >= ref_d[:, :-1])
    for red, prec, fused, *coarse in variants:
        index = ExactKNN(bank, red, prec, fused=fused, **kw, **dict(zip(["coarse_dim"], coarse)))
        d, i = index.search(queries, k)
        assert d.dtype == torch.float32 and i.dtype == torch.int64 and d.shape == (len(queries), k)
        assert torch.equal(i, ref_i), (red, prec, fused, coarse, index.describe())
        assert torch.equal(d, ref_d), (red, prec, fused, coarse, index.describe())


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---- the reference distance itself -------------------------------------------------


def nearest_f32(x: Fraction) -> float:
    """The float32 nearest to an exact rational, ties to even (by Fractions: slow, trusted)."""
    lo = np.float32(float(x))
    cands = [np.nextafter(lo, np.float32(-np.inf)), lo, np.nextafter(lo, np.float32(np.inf))]
    return float(min(cands, key=lambda c: (abs(Fraction(float(c)) - x), int(np.float32(c).view(np.int32)) & 1)))


def test_exact_sq_midpoints_and_double_rounding():
    one, zero = torch.tensor([[1.0, 2.0**-12, 0.0]]), torch.zeros(1, 3)
    assert exact_sq(one, zero).item() == 1.0  # exactly the midpoint 1 + 2^-24: ties to even
    # 1 + 2^-24 + 2^-80: float64 rounds it to the midpoint, fl32 of that would give 1.0 (wrong)
    above = torch.tensor([[1.0, 2.0**-12, 2.0**-40]])
    assert exact_sq(above, zero).item() == 1.0 + 2.0**-23
    assert float(np.float32(np.float64(1.0) + 2.0**-24 + 2.0**-80)) == 1.0  # the trap it avoids
    near = torch.tensor([[1.0 - 2.0**-24, 2.0**-12, 0.0]])  # 1 - 2^-24 + 2^-48: just above an fp32 value
    assert exact_sq(near, zero).item() == 1.0 - 2.0**-24


@pytest.mark.parametrize("scale", [1e-30, 1e-6, 1.0, 1e15])
def test_exact_sq_matches_fractions(scale):
    g = gen(1)
    q = (torch.randn(100, 7, generator=g) * scale).float()
    m = (q + torch.randn(100, 7, generator=g) * scale * 1e-4).float()
    m[::7] = q[::7]  # zero distances
    m[1::7, 0] = -q[1::7, 0] * 2.0**-30  # far-apart exponents: inexact differences in double
    for a, b, v in zip(q, m, exact_sq(q, m).tolist()):
        assert v == nearest_f32(sum((Fraction(float(x)) - Fraction(float(y))) ** 2 for x, y in zip(a, b)))


def test_round_to_f32_random_integers():
    rng = np.random.default_rng(0)
    for _ in range(500):
        t = int(rng.integers(1, 2**62)) << int(rng.integers(0, 40))
        exp = int(rng.integers(-400, -40))
        assert _round_to_f32(t, exp) == nearest_f32(Fraction(t) * Fraction(2) ** exp)


# ---- search equals the reference ----------------------------------------------------


@pytest.mark.parametrize("m,d,k", [(1, 5, 1), (2, 3, 2), (37, 9, 1), (500, 16, 1), (700, 40, 3), (300, 8, 300)])
def test_random_banks(m, d, k):
    g = gen(m * 7 + d)
    bank = torch.randn(m, d, generator=g) * torch.rand(m, 1, generator=g)
    check(bank, torch.randn(60, d, generator=g), k)


def test_k_equals_m_and_single_vector_bank():
    g = gen(2)
    bank = torch.randn(25, 6, generator=g)
    check(bank, torch.randn(10, 6, generator=g), 25)
    check(bank[:1], torch.randn(10, 6, generator=g), 1)


def test_exact_ties_on_an_integer_lattice():
    """Integer coordinates: many exactly equal distances; the lowest index must win every tie."""
    g = gen(3)
    bank = torch.randint(-2, 3, (400, 6), generator=g).float()
    queries = torch.randint(-2, 3, (80, 6), generator=g).float() + 0.5 * (torch.arange(6) % 2)
    check(bank, queries, 1)
    check(bank, queries, 5)


def test_duplicate_vectors_and_queries_on_the_bank():
    g = gen(4)
    base = torch.randn(50, 12, generator=g)
    bank = torch.cat([base, base.flip(0), base[:10], base[:10]])  # every vector 2-4 times
    queries = torch.cat([base[:20], base[:20] + 1e-7, torch.randn(20, 12, generator=g)])
    check(bank, queries, 1)
    check(bank, queries, 4)


def test_near_ties_one_ulp_apart():
    g = gen(5)
    base = torch.randn(200, 10, generator=g)
    nudged = torch.nextafter(base, torch.full_like(base, np.inf))
    bank = torch.stack([base, nudged], 1).flatten(0, 1)  # pairs differing by 1 ulp in each coordinate
    queries = base[:60] + torch.randn(60, 10, generator=g) * 0.3
    check(bank, queries, 1)
    check(bank, queries, 3)


@pytest.mark.parametrize("scale", [1e-6, 1e6])
def test_uniform_scaling(scale):
    g = gen(6)
    bank = torch.randn(600, 20, generator=g) * scale
    check(bank, torch.randn(50, 20, generator=g) * scale, 1)


def test_mixed_norms_from_1e_minus6_to_1e6():
    g = gen(7)
    bank = torch.randn(600, 20, generator=g) * 10.0 ** torch.empty(600, 1).uniform_(-6, 6, generator=g)
    queries = torch.randn(60, 20, generator=g) * 10.0 ** torch.empty(60, 1).uniform_(-6, 6, generator=g)
    check(bank, queries, 1)
    check(bank, queries, 2)


def test_queries_far_from_the_bank():
    """Defects: far queries make the PCA bound weak; the full-space re-filter keeps them exact."""
    g = gen(8)
    bank = torch.randn(800, 24, generator=g)
    check(bank, torch.randn(40, 24, generator=g) + 1e3, 1)
    check(bank, torch.randn(40, 24, generator=g) * 1e4, 2)


def test_heavy_path_forced():
    """A tiny heavy_fraction sends every query through the second (full-space) filter."""
    g = gen(9)
    bank = torch.randn(500, 30, generator=g)
    check(bank, torch.randn(50, 30, generator=g), 1,
          variants=[(8, "fp32", True), (8, "fp32", True, 4), (8, "fp32", False)], heavy_fraction=1e-9)
    check(bank, torch.randn(50, 30, generator=g), 3, variants=[(8, "fp32", False)], heavy_fraction=1e-9)


def test_int16_rows_are_exact_and_within_range():
    """The kernel's rows, per stage (full, coarse): a = step a^ + residual, |residual| <= delta, |a^|^2 as
    stated and <= 2^28 for every row fits() admits; the layout's padding is zero."""
    g = gen(16)
    bank = torch.randn(400, 24, generator=g) * torch.rand(400, 1, generator=g) * 3
    index = ExactKNN(bank, 8, coarse_dim=4)
    assert (index.reduced.r1, index.full.r1) == (4, 0)
    for f in (index.reduced, index.full):
        assert f.step == 2.0 ** round(np.log2(f.step)) and f.a_max / f.step <= 2**13
        queries = torch.randn(300, 24, generator=g) * torch.linspace(0, 30, 300)[:, None]  # up to 10x the bank
        fit = f.fits((queries.double() - f.mu).norm(dim=1))
        assert fit[:50].all() and not fit[-50:].all()  # the limit lies inside this range
        a, _, _ = f.project(queries[fit], coarse=True)
        rows, nq, delta = f.quantize(a)
        kk, r1 = f.k_cols, f.r1
        layout = list(range(r1)) + [kk, None] + list(range(r1, kk)) if r1 else list(range(kk))  # column of a
        assert rows.shape[1] == 2 * ((len(layout) + 1) // 2)
        assert not rows[:, [i for i in range(rows.shape[1]) if i >= len(layout) or layout[i] is None]].any()
        stages = (list(range(kk)), list(range(r1)) + [kk] if r1 else list(range(kk)))
        for stage, cols in enumerate(stages):
            grid = rows[:, [layout.index(col) for col in cols]].double()
            resid = a.double()[:, cols] - f.step * grid
            assert torch.all(resid.norm(dim=1) <= delta[:, stage])
            assert torch.all(delta[:, stage] <= f.step * np.sqrt(len(cols)) / 2 * 1.001)
            assert torch.equal(nq[:, stage], (grid**2).sum(dim=1)) and nq.max() <= 2**28


def test_kernel_integer_sums_at_the_range_limit():
    """Queries out along the bank's longest vector, up to the int16 limit: the largest dot products the
    kernel can meet (an int32 overflow would lose the nearest, that very vector); beyond the limit the
    torch ops take over, in the same call."""
    g = gen(17)
    bank = torch.randn(600, 32, generator=g)
    far = int((bank - bank.double().mean(0).float()).norm(dim=1).argmax())
    index = ExactKNN(bank, 8)
    mu = index.full.mu.float()
    queries = mu + (bank[far] - mu) * torch.linspace(1.0, 3.0, 81)[:, None]
    fit = torch.stack([f.fits((queries.double() - f.mu).norm(dim=1)) for f in (index.reduced, index.full)]).all(0)
    assert fit[:20].all() and not fit.all()  # both routes in one search
    d, i = index.search(queries)
    assert torch.all(i[:, 0] == far)
    check(bank, queries, 1, variants=[(8, "fp32", True), (8, "fp32", True, 4), (None, "fp32", True)])


def test_kernel_probe_rows_are_kept_or_redone():
    """From 256 queries the kernel first filters 1/32 of them as a probe: kept when the PCA bound works
    (near queries), redone in full space when most probe rows are heavy (far queries)."""
    g = gen(18)
    bank = torch.randn(3000, 6, generator=g) @ torch.randn(6, 40, generator=g)  # near a 6-d subspace:
    bank += 0.5 * torch.randn(3000, 40, generator=g)  # the PCA-8 bound works there, not far out
    near = bank[torch.randperm(3000, generator=g)[:320]] + 0.05 * torch.randn(320, 40, generator=g)
    index = ExactKNN(bank, 8)
    index.search(near)
    assert index.stats.heavy < 320
    far = torch.randn(320, 40, generator=g) * 8
    index.search(far)
    assert index.stats.heavy == 320  # the whole chunk went to the full-space filter
    for queries in (near, far, torch.cat([near[:200], far[:100]])):
        check(bank, queries, 1, variants=[(8, "fp32", True), (8, "fp32", True, 4)])


def test_queries_beyond_fp32_squares():
    """|q| near 1e30: the filter could overflow, so those rows take the brute-force route; still exact."""
    g = gen(11)
    bank = torch.randn(200, 8, generator=g)
    queries = torch.cat([torch.randn(5, 8, generator=g) * 1e30, torch.randn(5, 8, generator=g)])
    check(bank, queries, 2, variants=[(4, "fp32", True), (None, "fp32", False)])


def test_empty_queries_and_bad_input():
    index = ExactKNN(torch.randn(10, 4), 2, "fp32")
    d, i = index.search(torch.empty(0, 4), 2)
    assert d.shape == (0, 2) and i.shape == (0, 2)
    with pytest.raises(ValueError):
        ExactKNN(torch.tensor([[float("nan"), 1.0]]))
    with pytest.raises(ValueError):
        index.search(torch.randn(3, 5))
    with pytest.raises(ValueError):
        index.search(torch.randn(3, 4), 11)


def test_refuses_reduced_precision_matmul():
    """TF32/bf16 "fp32" products would break the rounding bound: the index refuses to run."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("medium")
    try:
        with pytest.raises(RuntimeError, match="highest"):
            ExactKNN(torch.randn(10, 4))
    finally:
        torch.set_float32_matmul_precision(previous)


# ---- real PatchCore features: hazelnut bank, hazelnut (near) and transistor (far) queries ------


@pytest.fixture(scope="module")
def real_features(mvtec_reduced):
    from patchcore_lite.model import PatchCore

    model = PatchCore(resize=128, crop=128)  # the real backbone, small images: 16 x 16 patches each
    hazelnut, transistor = mvtec_reduced("hazelnut"), mvtec_reduced("transistor")
    train = list_images([hazelnut / "train" / "good"])[:4]
    test = list_images([hazelnut / "test" / "crack"])[:1] + list_images([transistor / "test"])[:1]
    queries = model.extract_all(test, False, "").flatten(0, 2)[torch.randperm(512, generator=gen(10))[:128]]
    return model.extract_all(train, False, "").flatten(0, 2), queries


@pytest.mark.parametrize("k", [1, 3])
def test_real_features(real_features, k):
    bank, queries = real_features
    check(bank, queries, k, variants=[(32, "fp32", True), (32, "fp32", True, 16), (32, "fp32", False),
                                      (None, "fp32", True), (32, "bf16", False)])


# ---- CPU detection, the kernel and its fallback ---------------------------------------------


def test_cpu_detection_agrees_with_torch():
    support = exact_search.cpu_support()
    assert support["avx2"] == (torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"))
    assert set(support) == {"avx2", "avx512", "avx512_bf16", "amx_tile", "vnni"}


@pytest.mark.parametrize("cause", ["no avx2", "no compiler"])
def test_fallback_warns_once_and_stays_exact(monkeypatch, cause):
    """Without AVX2 or a compiler: one warning line, the torch-ops path, the same results."""
    monkeypatch.setattr(exact_search, "_KERNEL", {})
    if cause == "no avx2":
        monkeypatch.setattr(exact_search, "cpu_support", lambda: {"avx2": False, "avx512": False,
                                                                  "avx512_bf16": False, "amx_tile": False, "vnni": False})
    else:
        def no_compiler(*args, **kwargs):
            raise RuntimeError("Error building extension\nc++: command not found")

        monkeypatch.setattr("torch.utils.cpp_extension.load", no_compiler)
        monkeypatch.setattr("torch.utils.cpp_extension.get_default_build_root", lambda: "/nonexistent")
    bank, queries = torch.randn(300, 12, generator=gen(12)), torch.randn(40, 12, generator=gen(13))
    with pytest.warns(RuntimeWarning, match="kernel unavailable") as caught:
        index = NearestNeighbors(bank, "exact")
        NearestNeighbors(bank, "exact")  # the second index does not warn again
    assert len(caught) == 1 and "\n" not in str(caught[0].message)
    assert ("needs AVX2" if cause == "no avx2" else "could not be compiled: RuntimeError: c++") in str(caught[0].message)
    assert "torch ops (no kernel)" in index.describe()
    assert all(torch.equal(a, b) for a, b in zip(index.search(queries), reference_search(bank, queries)))


def test_describe_names_the_path_that_runs():
    index = NearestNeighbors(torch.randn(200, 100, generator=gen(14)), "exact")
    kernel = exact_search.fused_kernel() is not None
    assert index.describe().startswith("exact: certified PCA-64 filter + exact re-rank: ")
    assert ("int16 AVX2 kernel (k=1), fp32 torch ops (k>1)" in index.describe()) == kernel
    assert NearestNeighbors(torch.randn(20, 4), "faiss").describe() == "faiss IndexFlatL2 (exact)"


def test_faiss_flat_differs_only_by_rounding():
    """faiss's |q|^2 - 2 q.m + |m|^2 rounds; on random data (no near-ties) it finds the same neighbours."""
    g = gen(15)
    bank, queries = torch.randn(2000, 48, generator=g), torch.randn(300, 48, generator=g)
    d_exact, i_exact = NearestNeighbors(bank, "exact").search(queries, 4)
    d_faiss, i_faiss = NearestNeighbors(bank, "faiss").search(queries, 4)
    assert torch.equal(i_exact, i_faiss)
    torch.testing.assert_close(d_faiss, d_exact, rtol=2e-5, atol=0)
