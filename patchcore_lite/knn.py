"""Nearest-neighbour search in the memory bank (PatchCore, Roth et al. 2022, Sec. 3.3, eq. 6-7).

Eq. 6 scores a test patch by its distance to the nearest memory-bank patch,
``min_m ||m_test - m||_2``; eq. 7 also needs the neighbours of that bank patch.
Backends:

* ``faiss`` ``flat``: exact ``IndexFlatL2``, as the official code.
* ``faiss`` ``ivf`` / ``ivfpq``: inverted lists (and product quantisation, the
  paper's approximate-search ablation): faster on big banks, approximate; ivfpq
  distances are those of the quantised bank vectors.
* ``torch``: exact, ``|q|^2 - 2 q.b + |b|^2`` over chunks of queries, so memory
  stays at ``chunk_size x M`` floats (anomalib's approach).

All return Euclidean distances (faiss works with squared ones), ascending.
"""

from __future__ import annotations

import math

import faiss
import numpy as np
import torch
from torch import Tensor

BACKENDS = ("faiss", "torch")
INDEXES = ("flat", "ivf", "ivfpq")


class NearestNeighbors:
    """k-nearest-neighbour index over a memory bank (M, D).

    ``nlist`` (inverted lists, default ``min(4 sqrt(M), M / 39)``: faiss wants
    39 training points per list), ``m`` (PQ sub-quantisers, default the largest
    divisor of D up to D / 4 and 64) and ``nprobe`` only matter for ``ivf`` and
    ``ivfpq``; their k-means uses ``seed``, so an index is reproducible.
    """

    def __init__(
        self,
        bank: Tensor | np.ndarray,
        backend: str = "faiss",
        index: str = "flat",
        nlist: int | None = None,
        m: int | None = None,
        nprobe: int = 8,
        seed: int = 0,
        chunk_size: int = 4096,
    ):
        bank = torch.as_tensor(bank).float().contiguous()
        if bank.dim() != 2 or bank.shape[0] == 0 or bank.shape[1] == 0:
            raise ValueError(f"memory bank must be a non-empty (M, D) array, got shape {tuple(bank.shape)}")
        if not torch.isfinite(bank).all():
            raise ValueError("memory bank contains NaN or infinite values")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if index not in INDEXES:
            raise ValueError(f"index must be one of {INDEXES}, got {index!r}")
        if backend == "torch" and index != "flat":
            raise ValueError("the torch backend is exact: use index='flat' (or backend='faiss')")
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        self._bank, self.backend, self.index_type, self.chunk_size = bank, backend, index, chunk_size
        if backend == "torch":
            self._bank_sq = (bank * bank).sum(dim=1)
        else:
            self._index = _faiss_index(bank.numpy(), index, nlist, m, nprobe, seed)

    @property
    def bank(self) -> Tensor:
        """The memory bank (M, D), float32."""
        return self._bank

    def search(self, queries: Tensor | np.ndarray, k: int = 1) -> tuple[Tensor, Tensor]:
        """Distances (N, k) float32 (Euclidean, ascending) and bank indices (N, k) int64."""
        queries = torch.as_tensor(queries).float().contiguous()
        if queries.dim() != 2 or queries.shape[1] != self._bank.shape[1]:
            raise ValueError(f"queries must be (N, {self._bank.shape[1]}), got shape {tuple(queries.shape)}")
        if not 1 <= k <= len(self._bank):
            raise ValueError(f"k must be in [1, {len(self._bank)}], got {k}")
        if len(queries) == 0:
            return torch.empty(0, k), torch.empty(0, k, dtype=torch.long)
        if self.backend == "torch":
            return self._search_torch(queries, k)
        sq, idx = self._index.search(queries.numpy(), k)
        missing = (idx < 0).any(axis=1)  # ivf: the probed lists held fewer than k vectors
        dist, idx = torch.from_numpy(sq).clamp_min_(0).sqrt_(), torch.from_numpy(idx)
        if missing.any():
            rows = torch.from_numpy(np.flatnonzero(missing))
            dist[rows], idx[rows] = _exact(queries[rows], self._bank, (self._bank**2).sum(dim=1), k)
        return dist, idx

    def _search_torch(self, queries: Tensor, k: int) -> tuple[Tensor, Tensor]:
        parts = [_exact(chunk, self._bank, self._bank_sq, k) for chunk in queries.split(self.chunk_size)]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    def __len__(self) -> int:
        return len(self._bank)


def _exact(queries: Tensor, bank: Tensor, bank_sq: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """k smallest Euclidean distances by |q|^2 - 2 q.b + |b|^2 (one (n, M) matrix, updated in place)."""
    d2 = torch.addmm(bank_sq, queries, bank.T, alpha=-2)
    d2.add_((queries * queries).sum(dim=1, keepdim=True)).clamp_min_(0)
    sq, idx = torch.topk(d2, k, dim=1, largest=False, sorted=True)
    return sq.sqrt_(), idx


def _faiss_index(bank: np.ndarray, kind: str, nlist: int | None, m: int | None, nprobe: int,
                 seed: int) -> faiss.Index:
    n, d = bank.shape
    if kind == "flat":
        index = faiss.IndexFlatL2(d)
        index.add(bank)
        return index
    nlist = nlist or max(1, min(int(4 * math.sqrt(n)), n // 39))
    if not 1 <= nlist <= n:
        raise ValueError(f"nlist must be in [1, {n}] (number of bank vectors), got {nlist}")
    quantizer = faiss.IndexFlatL2(d)
    if kind == "ivf":
        index = faiss.IndexIVFFlat(quantizer, d, nlist)
    else:
        m = m or max(q for q in range(1, min(64, max(1, d // 4)) + 1) if d % q == 0)
        if d % m:
            raise ValueError(f"m (PQ sub-quantisers) must divide the feature dimension {d}, got {m}")
        if n < 2:
            raise ValueError("ivfpq needs at least 2 bank vectors")
        nbits = max(1, min(8, int(math.log2(n / 39))))  # faiss wants 39 training vectors per codeword
        index = faiss.IndexIVFPQ(quantizer, d, nlist, m, nbits)
        index.pq.cp.seed = seed
    index.cp.seed = seed
    index.train(bank)
    index.add(bank)
    index.nprobe = nprobe
    return index
