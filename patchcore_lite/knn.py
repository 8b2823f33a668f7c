"""Nearest-neighbour search in the memory bank (PatchCore, Roth et al. 2022, Sec. 3.3, eq. 6-7).

Eq. 6 scores a test patch by its distance to the nearest memory-bank patch,
``min_m ||m_test - m||_2``; eq. 7 also needs the neighbours of that bank patch.
Backends:

* ``faiss`` ``flat`` (the default): exact ``IndexFlatL2``, as the official code. Its fp32
  ``|q|^2 - 2 q.b + |b|^2`` rounds: distances differ from ``exact`` by about 1e-5 relative, and on
  near-ties it may return the other neighbour.
* ``exact`` ``flat``: exact search by a certified filter
  (``exact_search``): a lower bound of every distance from the bank's 64 leading principal
  components and a residual norm (24 of them first), then an exact re-rank of the few vectors it
  cannot rule out. Exact by an implementation-independent definition (the float32 nearest to the
  true squared distance, ties to the lowest index). Opt-in (``knn_backend="exact"``, ``--knn exact``):
  its int16 AVX2 kernel, compiled at first use, measured 0.31-0.38x faiss's time on a bottle-size
  bank (benchmarks/RESULTS.md), but the gain depends on the data and the CPU; without a C++
  compiler the same stages run as torch ops (same results, slower).
* ``faiss`` ``ivf`` / ``ivfpq``: inverted lists (and product quantisation, the
  paper's approximate-search ablation): faster on big banks, approximate; ivfpq
  distances are those of the quantised bank vectors.
* ``torch``: exact, ``|q|^2 - 2 q.b + |b|^2`` as one matrix product per chunk of
  queries and tile of the bank, keeping a running top-k: memory stays at
  ``chunk_size x tile_size`` floats, and each tile is reduced while it is still in
  the CPU cache (anomalib forms the whole ``N x M`` matrix instead).

Exact search by matrix products costs ``2 N M D`` flops (N queries, M bank vectors of D
dimensions); the ``exact`` backend's filter rules most of them out, an approximate index (``ivf``)
skips most of the bank; ``benchmarks/bench_knn.py`` measures all.

All return Euclidean distances, ascending: the root of faiss's squared L2 distances.
The official code keeps faiss's squared distances as its scores. Exact ties go to the lowest
bank index (faiss does so; the torch backend sorts stably), so a bank split into shards and
merged by (squared distance, index) gives the very same neighbours (``tools.distributed``).

On a GPU (``device="cuda"``) the exact search runs there: faiss's GPU index when faiss was
built with GPU support, else the torch backend's tiled search on the device. Its distances
equal the CPU's within float32 rounding of a different summation order (tested to 1e-4
relative); the indices are the same unless two bank vectors lie within that rounding.
"""

from __future__ import annotations

import math

import faiss
import numpy as np
import torch
from torch import Tensor

from .errors import check_choice, check_setting
from .exact_search import ExactKNN

BACKENDS = ("exact", "faiss", "torch")
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
        chunk_size: int = 1024,
        tile_size: int = 1024,
        device: str | torch.device = "cpu",
    ):
        bank = torch.as_tensor(bank).float().contiguous()
        if bank.dim() != 2 or bank.shape[0] == 0 or bank.shape[1] == 0:
            raise ValueError(f"memory bank must be a non-empty (M, D) array, got shape {tuple(bank.shape)}")
        if not torch.isfinite(bank).all():
            raise ValueError("memory bank contains NaN or infinite values")
        check_search(backend, index)
        if nprobe < 1:
            raise ValueError(f"nprobe must be >= 1, got {nprobe}")
        if chunk_size < 1 or tile_size < 1:
            raise ValueError(f"chunk_size and tile_size must be >= 1, got {chunk_size}, {tile_size}")
        self._bank, self.backend, self.index_type = bank, backend, index
        self.chunk_size, self.tile_size, self.device = chunk_size, tile_size, torch.device(device)
        if backend == "faiss" and self.device.type == "cuda" and not _faiss_gpus():
            self.backend = "torch"  # exact on the GPU either way; faiss-cpu cannot use it
        if self.backend == "torch":
            self._search_bank = bank.to(self.device)
            self._bank_sq = (self._search_bank * self._search_bank).sum(dim=1)
        elif backend == "exact":  # a CPU algorithm (its AVX2 kernel): it searches on the CPU on any device
            self._exact = ExactKNN(bank)
        else:
            self._index = _faiss_index(bank.numpy(), index, nlist, m, nprobe, seed)
            if self.device.type == "cuda":  # the resources must outlive the index
                self._gpu = faiss.StandardGpuResources()
                self._index = faiss.index_cpu_to_gpu(self._gpu, self.device.index or 0, self._index)

    @property
    def bank(self) -> Tensor:
        """The memory bank (M, D), float32."""
        return self._bank

    def search(self, queries: Tensor | np.ndarray, k: int = 1) -> tuple[Tensor, Tensor]:
        """Distances (N, k) float32 (Euclidean, ascending) and bank indices (N, k) int64."""
        sq, idx = self.search_squared(queries, k)
        return sq.clamp_min_(0).sqrt_(), idx

    def search_squared(self, queries: Tensor | np.ndarray, k: int = 1) -> tuple[Tensor, Tensor]:
        """``search`` before its root: squared distances (N, k), which may round below 0, and indices.

        Shards of a bank are merged on these: two different squares can share a float32 root."""
        queries = torch.as_tensor(queries).float().contiguous()
        if queries.dim() != 2 or queries.shape[1] != self._bank.shape[1]:
            raise ValueError(f"queries must be (N, {self._bank.shape[1]}), got shape {tuple(queries.shape)}")
        if not 1 <= k <= len(self._bank):
            raise ValueError(f"k must be in [1, {len(self._bank)}], got {k}")
        if len(queries) == 0:
            return torch.empty(0, k), torch.empty(0, k, dtype=torch.long)
        if self.backend == "torch":
            return self._search_torch(queries, k)
        if self.backend == "exact":
            return self._exact.search(queries, k, squared=True)
        sq, idx = self._index.search(queries.numpy(), k)
        missing = (idx < 0).any(axis=1)  # ivf: the probed lists held fewer than k vectors
        sq, idx = torch.from_numpy(sq), torch.from_numpy(idx)
        if missing.any():
            rows = torch.from_numpy(np.flatnonzero(missing))
            sq[rows], idx[rows] = _exact(queries[rows], self._bank, (self._bank**2).sum(dim=1), k, self.tile_size)
        return sq, idx

    def describe(self) -> str:
        """Which search runs, in words (printed by the command line and the benchmarks, saved with a model)."""
        if self.backend == "exact":
            return self._exact.describe()
        if self.backend == "torch":
            return "exact: torch flat (fp32 matrix products, running top-k)"
        kind = {"flat": "IndexFlatL2 (exact)", "ivf": "IndexIVFFlat (approximate)", "ivfpq": "IndexIVFPQ (approximate)"}
        return f"faiss {kind[self.index_type]}"

    def _search_torch(self, queries: Tensor, k: int) -> tuple[Tensor, Tensor]:
        parts = [_exact(c.to(self.device), self._search_bank, self._bank_sq, k, self.tile_size)
                 for c in queries.split(self.chunk_size)]
        return torch.cat([p[0] for p in parts]).cpu(), torch.cat([p[1] for p in parts]).cpu()

    def __len__(self) -> int:
        return len(self._bank)


def check_search(backend: str, index: str) -> None:
    """Refuse an unknown backend or index, or an approximate index on the exact torch backend (ConfigError)."""
    check_choice("knn_backend", backend, BACKENDS)
    check_choice("knn_index", index, INDEXES)
    check_setting(backend == "faiss" or index == "flat", "knn_index", index,
                  f"'flat' with knn_backend='{backend}': the {backend} backend is exact (ivf, ivfpq need faiss)")


def _exact(queries: Tensor, bank: Tensor, bank_sq: Tensor, k: int, tile: int) -> tuple[Tensor, Tensor]:
    """k smallest squared distances by |q|^2 - 2 q.b + |b|^2, the bank taken ``tile`` rows at a time.

    Each tile's (n, tile) matrix is reduced to its k smallest at once and merged
    with the best so far, so memory is n x (tile + k), never n x M. Ties go to the lowest
    index: ``min`` returns the first minimum, and for k > 1 a stable sort replaces
    ``topk``, whose order among equal values is unspecified.
    """
    tile = max(tile, k)
    best_sq = best_idx = None
    for start in range(0, len(bank), tile):
        d2 = torch.addmm(bank_sq[start : start + tile], queries, bank[start : start + tile].T, alpha=-2)
        if k == 1:  # eq. 6's case: a minimum is cheaper than a top-k
            sq, idx = d2.min(dim=1, keepdim=True)
        else:
            sq, idx = _smallest(d2, torch.arange(d2.shape[1], device=d2.device).expand_as(d2), k)
        idx += start
        if best_sq is not None and k == 1:  # merge with the best of the earlier tiles
            closer = sq < best_sq
            sq, idx = torch.where(closer, sq, best_sq), torch.where(closer, idx, best_idx)
        elif best_sq is not None:  # the earlier tiles' indices are lower: first among equals
            sq, idx = _smallest(torch.cat([best_sq, sq], 1), torch.cat([best_idx, idx], 1), k)
        best_sq, best_idx = sq, idx
    assert best_sq is not None and best_idx is not None
    return best_sq + (queries * queries).sum(dim=1, keepdim=True), best_idx


def _smallest(sq: Tensor, idx: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The k smallest of each row of ``sq`` with their ``idx``; equal values keep their column order."""
    sq, pos = torch.sort(sq, dim=1, stable=True)
    return sq[:, :k], idx.gather(1, pos[:, :k])


def _faiss_gpus() -> int:
    """GPUs faiss can use: 0 with faiss-cpu."""
    return faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0


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
