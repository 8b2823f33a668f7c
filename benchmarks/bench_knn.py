"""Nearest-neighbour search for eq. 6: faiss flat / ivf / ivfpq vs exact torch, per test image.

    python benchmarks/bench_knn.py                      # 16,385-vector banks, D = 152, 1024, 1536
    python benchmarks/bench_knn.py --dims 152 --images 16 --k 9

A test image has 784 patches (28 x 28). Bank: a Gaussian mixture (200 components,
like clustered patch features); queries: bank vectors plus noise (test patches
resemble normal ones). recall@1 is the fraction of queries whose nearest bank
index equals the exact torch search's.
"""

from __future__ import annotations

import argparse
import time

import torch

from patchcore_lite.knn import NearestNeighbors

PATCHES = 784


def make_data(m: int, dim: int, n_query: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(200, dim, generator=g)
    bank = centers[torch.randint(200, (m,), generator=g)] + 0.3 * torch.randn(m, dim, generator=g)
    queries = bank[torch.randint(m, (n_query,), generator=g)] + 0.1 * torch.randn(n_query, dim, generator=g)
    return bank, queries


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bank", type=int, default=16_385, help="bank size (10%% coreset of MVTec bottle)")
    p.add_argument("--dims", type=int, nargs="+", default=[152, 1024, 1536])
    p.add_argument("--images", type=int, default=8, help="test images of 784 patches each")
    p.add_argument("--k", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    configs = [("torch", "flat"), ("faiss", "flat"), ("faiss", "ivf"), ("faiss", "ivfpq")]
    for dim in args.dims:
        bank, queries = make_data(args.bank, dim, PATCHES * args.images, args.seed)
        print(f"\n== bank {args.bank} x {dim}, {args.images} images x {PATCHES} patches, k={args.k}")
        exact = None
        for backend, index in configs:
            t = time.perf_counter()
            nn = NearestNeighbors(bank, backend, index, seed=args.seed)
            build = time.perf_counter() - t
            nn.search(queries[:PATCHES], args.k)  # warm-up
            t = time.perf_counter()
            _, idx = nn.search(queries, args.k)
            per_image = 1e3 * (time.perf_counter() - t) / args.images
            exact = idx[:, 0] if exact is None else exact
            recall = (idx[:, 0] == exact).float().mean().item()
            print(f"{backend:5s} {index:5s}: build {build:6.2f} s  {per_image:7.1f} ms/image  recall@1 {recall:.3f}")


if __name__ == "__main__":
    main()
