"""Nearest-neighbour search (eq. 6): backends agree with brute force; approximate indexes are reproducible."""

import numpy as np
import pytest
import torch

from patchcore_lite.knn import NearestNeighbors


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _clustered(n: int, d: int, k: int, seed: int) -> torch.Tensor:
    g = _gen(seed)
    centers = 3 * torch.randn(k, d, generator=g)
    return centers[torch.randint(k, (n,), generator=g)] + 0.3 * torch.randn(n, d, generator=g)


def test_torch_and_faiss_flat_agree():
    bank, q = torch.randn(1000, 48, generator=_gen(0)), torch.randn(200, 48, generator=_gen(1))
    d1, i1 = NearestNeighbors(bank, "faiss").search(q, k=4)
    d2, i2 = NearestNeighbors(bank, "torch").search(q, k=4)
    torch.testing.assert_close(d1, d2, rtol=1e-4, atol=1e-5)
    assert torch.equal(i1, i2)  # random data: no exact ties
    assert d1.dtype == torch.float32 and i1.dtype == torch.int64


@pytest.mark.parametrize("backend", ["exact", "faiss", "torch"])
def test_brute_force(backend):
    bank, q = torch.randn(10, 3, generator=_gen(2)), torch.randn(4, 3, generator=_gen(3))
    dist, idx = NearestNeighbors(bank, backend).search(q, k=3)
    full = torch.cdist(q.double(), bank.double())
    expected = full.argsort(dim=1)[:, :3]
    assert torch.equal(idx, expected)
    torch.testing.assert_close(dist.double(), full.gather(1, expected), rtol=1e-5, atol=1e-6)
    assert (dist[:, 1:] >= dist[:, :-1]).all()


def test_query_in_bank_has_distance_zero():
    bank = torch.randn(50, 8, generator=_gen(4))
    for backend in ("exact", "faiss", "torch"):
        dist, idx = NearestNeighbors(bank, backend).search(bank[[7, 3]])
        assert idx[:, 0].tolist() == [7, 3] and dist.max().item() < 1e-3


@pytest.mark.parametrize(("chunk", "tile", "k"), [(7, 3, 5), (7, 64, 1), (100, 499, 5), (10_000, 10_000, 5), (33, 1, 1)])
def test_chunks_and_tiles_do_not_change_results(chunk, tile, k):
    """Tiles smaller than k, tiles that do not divide the bank, one tile: all equal brute force."""
    bank, q = torch.randn(500, 16, generator=_gen(5)), torch.randn(100, 16, generator=_gen(6))
    dist, idx = NearestNeighbors(bank, "torch", chunk_size=chunk, tile_size=tile).search(q, k=k)
    full = torch.cdist(q.double(), bank.double())
    expected = full.argsort(dim=1)[:, :k]
    assert torch.equal(idx, expected)  # random data: no exact ties
    torch.testing.assert_close(dist.double(), full.gather(1, expected), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("index", "min_recall"), [("ivf", 0.95), ("ivfpq", 0.8)])
def test_approximate_indexes_deterministic_and_accurate(index, min_recall):
    bank = _clustered(3000, 16, 20, 7)
    q = bank[:300] + 0.05 * torch.randn(300, 16, generator=_gen(8))
    exact = NearestNeighbors(bank, "torch").search(q)[1]
    a = NearestNeighbors(bank, "faiss", index, seed=3).search(q)
    b = NearestNeighbors(bank, "faiss", index, seed=3).search(q)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert (a[1] == exact).float().mean().item() >= min_recall


def test_ivf_short_lists_fall_back_to_exact():
    bank = _clustered(400, 8, 10, 9)  # ~40 vectors per list, fewer than k = 60
    q = torch.randn(20, 8, generator=_gen(10))
    dist, idx = NearestNeighbors(bank, "faiss", "ivf", nlist=10, nprobe=1).search(q, k=60)
    exact = NearestNeighbors(bank, "torch").search(q, k=60)
    assert (idx >= 0).all()
    torch.testing.assert_close(dist, exact[0], rtol=1e-4, atol=1e-4)


def test_numpy_bank_and_bank_property():
    bank = np.random.default_rng(0).standard_normal((30, 5)).astype(np.float64)
    nn = NearestNeighbors(bank, "torch")
    assert nn.bank.dtype == torch.float32 and nn.bank.shape == (30, 5) and len(nn) == 30
    assert nn.search(bank[:2])[1][:, 0].tolist() == [0, 1]


def test_errors():
    bank = torch.randn(20, 4)
    with pytest.raises(ValueError, match="non-empty"):
        NearestNeighbors(torch.empty(0, 4))
    with pytest.raises(ValueError, match="non-empty"):
        NearestNeighbors(torch.randn(5))
    with pytest.raises(ValueError, match=r"\(N, 4\)"):
        NearestNeighbors(bank).search(torch.randn(3, 5))
    with pytest.raises(ValueError, match="k must"):
        NearestNeighbors(bank).search(torch.randn(3, 4), k=21)
    with pytest.raises(ValueError, match="backend"):
        NearestNeighbors(bank, "annoy")
    with pytest.raises(ValueError, match="exact"):
        NearestNeighbors(bank, "torch", "ivf")
    with pytest.raises(ValueError, match="divide"):
        NearestNeighbors(torch.randn(300, 6), "faiss", "ivfpq", m=4)
    with pytest.raises(ValueError, match="NaN"):
        NearestNeighbors(torch.tensor([[0.0, float("inf")]]))
