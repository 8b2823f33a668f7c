"""Nearest-neighbour search in the memory bank (PatchCore eq. 6 needs min_m ||m_test - m||_2).

Backends: ``faiss`` (IndexFlatL2, exact, as the official code; IVF-Flat and IVF-PQ as in
the paper's ablation) and ``torch`` (exact, chunked over queries so memory stays bounded).
Distances are Euclidean, not squared.
"""

from __future__ import annotations

import numpy as np
import torch


class NearestNeighbors:
    """Exact or approximate k-nearest-neighbour search over a fixed bank (M, D)."""

    def __init__(
        self,
        bank: torch.Tensor | np.ndarray,
        backend: str = "faiss",
        index: str = "flat",
        nlist: int | None = None,
        m: int | None = None,
        nprobe: int = 8,
        seed: int = 0,
        chunk_size: int = 4096,
    ) -> None:
        bank = torch.as_tensor(bank, dtype=torch.float32).contiguous()
        if bank.ndim != 2 or len(bank) == 0:
            raise ValueError(f"the memory bank must be a non-empty (M, D) matrix, got shape {tuple(bank.shape)}")
        if backend not in ("faiss", "torch") or index not in ("flat", "ivf", "ivfpq"):
            raise ValueError(f"unknown search {backend!r}/{index!r}: backend faiss|torch, index flat|ivf|ivfpq")
        if backend == "torch" and index != "flat":
            raise ValueError("the torch backend is exact only: use index='flat'")
        self.bank, self.backend, self.chunk_size = bank, backend, chunk_size
        self._faiss = _faiss_index(bank.numpy(), index, nlist, m, nprobe, seed) if backend == "faiss" else None
        self._bank_sq = (bank * bank).sum(dim=1)

    def search(self, queries: torch.Tensor | np.ndarray, k: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """Distances (N, k) ascending and bank indices (N, k) of the k nearest bank vectors."""
        queries = torch.as_tensor(queries, dtype=torch.float32)
        if queries.ndim != 2 or queries.shape[1] != self.bank.shape[1]:
            raise ValueError(f"queries must be (N, {self.bank.shape[1]}), got {tuple(queries.shape)}")
        k = min(k, len(self.bank))
        if self._faiss is not None:
            sq, idx = self._faiss.search(np.ascontiguousarray(queries.numpy()), k)
            return torch.from_numpy(sq).clamp_min_(0).sqrt_(), torch.from_numpy(idx)
        parts = [self._torch_search(chunk, k) for chunk in queries.split(self.chunk_size)]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    def _torch_search(self, q: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        sq = (q * q).sum(dim=1, keepdim=True) - 2 * q @ self.bank.T + self._bank_sq
        dist, idx = torch.topk(sq, k, dim=1, largest=False)
        return dist.clamp_min_(0).sqrt_(), idx


def _faiss_index(bank: np.ndarray, kind: str, nlist: int | None, m: int | None, nprobe: int, seed: int):
    import faiss

    d = bank.shape[1]
    if kind == "flat":
        index = faiss.IndexFlatL2(d)
    else:
        nlist = nlist or max(1, int(4 * np.sqrt(len(bank))))
        quantizer = faiss.IndexFlatL2(d)
        if kind == "ivf":
            index = faiss.IndexIVFFlat(quantizer, d, nlist)
        else:
            m = m or next(c for c in (16, 8, 4, 2, 1) if d % c == 0)
            index = faiss.IndexIVFPQ(quantizer, d, nlist, m, 8)
        index.cp.seed = seed  # k-means initialisation: deterministic training
        index.train(bank)
        index.nprobe = nprobe
    index.add(bank)
    return index
