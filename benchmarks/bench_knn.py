"""Nearest-neighbour search for eq. 6: every backend against the straightforward search, per test image.

    python benchmarks/bench_knn.py                       # synthetic 16,385-vector banks, D = 152, 1024, 1536
    python benchmarks/bench_knn.py --dataset $PATCHCORE_DATA/magnetic_tile --train-images 209 --evaluate

Synthetic: a Gaussian mixture bank (200 components) and queries near bank vectors;
easy for approximate search. ``--dataset``: real features. PatchCore (defaults) is fit
on the first ``--train-images`` training images (209 images = MVTec bottle's training set: at the
288 default, 209 x 1,296 = 270,864 patches, a 10% bank of 27,086), queries are the patches of
``--images`` seeded test images, anomalies included. Patches per image come from the model
(a default PatchCore's grid in the synthetic mode). ``--evaluate`` also scores the whole test set with each
search and prints image AUROC, pixel AUROC and AUPRO.

"straightforward" is one (N, M) distance matrix per 8 images (``torch.cdist``, as
anomalib). recall@1: queries whose nearest bank index equals the straightforward one; rel. error:
(found - straightforward) / straightforward distance, mean and max. Times are medians of
``--repeat`` interleaved rounds (one search of each per round); "/faiss" is each time over faiss
flat's in the same run. Each index's path is printed (``NearestNeighbors.describe``), with this
CPU's fp32 matrix-product speed at the search's shape: the ceiling of a search that computes
every distance, and the exact backend's int16 kernel rate when it skips nothing.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from common import (
    dataset_model,
    dataset_split,
    interleaved_medians,
    matmul_peak_gflops,
    patches_per_image,
    peak_rss_mib,
    search_name,
)

from patchcore_lite.evaluation import evaluate
from patchcore_lite.exact_search import ExactKNN, reference_search
from patchcore_lite.knn import NearestNeighbors
from patchcore_lite.model import PatchCore

SEARCHES = [("exact", "flat", 8), ("faiss", "flat", 8), ("torch", "flat", 8), ("faiss", "ivf", 8), ("faiss", "ivf", 16),
            ("faiss", "ivfpq", 8)]


def synthetic_data(m: int, dim: int, n_query: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(200, dim, generator=g)
    bank = centers[torch.randint(200, (m,), generator=g)] + 0.3 * torch.randn(m, dim, generator=g)
    queries = bank[torch.randint(m, (n_query,), generator=g)] + 0.1 * torch.randn(n_query, dim, generator=g)
    return bank, queries


def straightforward(bank: torch.Tensor, queries: torch.Tensor, patches: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole (N, M) distance matrix of 8 images at a time, then its row minima."""
    parts = [torch.cdist(q, bank).min(dim=1) for q in queries.split(8 * patches)]
    return torch.cat([p.values for p in parts]), torch.cat([p.indices for p in parts])


def int16_kernel_gops(bank: torch.Tensor, queries: torch.Tensor, repeat: int = 3) -> float | None:
    """The exact backend with its int16 kernel on every pair in all D columns (the full-space filter, no
    coarse stage, nothing skipped): 2 N M D integer operations per second, the speed of its product on
    this CPU (None without the kernel)."""
    index = ExactKNN(bank, reduce_dim=None)
    if index.kernel is None:
        return None
    index.search(queries)  # warm-up
    seconds = []
    for _ in range(repeat):
        index.search(queries)
        seconds.append(index.stats.seconds)
    return 2 * len(queries) * len(bank) * bank.shape[1] / min(seconds) / 1e9


def compare(bank: torch.Tensor, queries: torch.Tensor, patches: int, args: argparse.Namespace) -> None:
    n_img = len(queries) / patches
    flops = 2 * patches * len(bank) * bank.shape[1]
    peak = matmul_peak_gflops(patches, len(bank), bank.shape[1])
    print(f"this CPU's fp32 matrix product at the search's shape ({patches} x {bank.shape[1]}) @ "
          f"({bank.shape[1]} x {len(bank)}): {peak:.0f} GFLOP/s; exact search = {flops / 1e9:.1f} GFLOP per image")
    int16 = int16_kernel_gops(bank, queries[: 2 * patches])
    if int16:
        print(f"the exact backend's int16 AVX2 kernel on every pair, all {bank.shape[1]} columns: {int16:.0f} GOP/s "
              "(nothing skipped; the certified filter computes far fewer columns)")
    exact_d, exact_i = straightforward(bank, queries, patches)
    indexes, builds = {}, {}
    for backend, index, nprobe in SEARCHES:
        start = time.perf_counter()
        indexes[search_name(backend, index, nprobe)] = NearestNeighbors(bank, backend, index, nprobe=nprobe,
                                                                        seed=args.seed)
        builds[search_name(backend, index, nprobe)] = time.perf_counter() - start
    fns = {"straightforward": lambda: straightforward(bank, queries, patches)}
    fns.update({name: (lambda nn=nn: nn.search(queries)) for name, nn in indexes.items()})
    per_image = {name: t / n_img for name, t in interleaved_medians(fns, args.repeat).items()}
    base, faiss_flat = per_image["straightforward"], per_image["faiss flat"]
    print(f"{'search':21s} {'build s':>8s} {'ms/image':>9s} {'speedup':>8s} {'/faiss':>7s} {'GFLOP/s':>8s} "
          f"{'recall@1':>9s} {'rel.err mean':>13s} {'max':>7s}")
    print(f"{'straightforward':21s} {0:8.2f} {1e3 * base:9.1f} {1:7.1f}x {base / faiss_flat:7.2f} "
          f"{flops / base / 1e9:8.0f}")
    for name, nn in indexes.items():
        dist, idx = nn.search(queries)
        rel = (dist[:, 0] - exact_d) / exact_d.clamp_min(1e-6)
        gflops = f"{flops / per_image[name] / 1e9:8.0f}" if nn.index_type == "flat" else f"{'':8s}"
        print(f"{name:21s} {builds[name]:8.2f} {1e3 * per_image[name]:9.1f} {base / per_image[name]:7.1f}x "
              f"{per_image[name] / faiss_flat:7.2f} {gflops} {(idx[:, 0] == exact_i).float().mean():9.4f} "
              f"{rel.mean():13.2e} {rel.max():7.3f}")
    print("GFLOP/s: the 2 N M D flops of exact search per second of each (the exact backend does fewer flops)")
    for name, nn in indexes.items():
        print(f"  {name:19s} {nn.describe()}")
    sample = queries[torch.randperm(len(queries), generator=torch.Generator().manual_seed(args.seed))[:256]]
    same = [torch.equal(a, b) for a, b in zip(indexes["exact flat"].search(sample), reference_search(bank, sample))]
    print(f"exact flat equals the brute-force definition (exact_search.reference_search) on 256 sampled "
          f"queries: {all(same)}")


def real_data(args: argparse.Namespace) -> tuple[PatchCore, list, torch.Tensor]:
    train, test = dataset_split(args.dataset, args.train_images, None, args.seed)
    model = dataset_model(args.dataset).fit(train)
    _, sample = dataset_split(args.dataset, None, args.images, args.seed)
    queries = model.extract_all(sample, False, "").flatten(0, 2)
    print(f"\n== {args.dataset}: bank {tuple(model.memory_bank.shape)} (10% of {model.n_train_patches} patches "
          f"of {len(train)} training images), queries: {len(sample)} test images x {patches_per_image(model)} patches")
    return model, test, queries


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", type=Path, help="an MVTec-layout category or Magnetic Tile Defects")
    p.add_argument("--train-images", type=int, help="training images for the bank (default: all)")
    p.add_argument("--evaluate", action="store_true", help="also AUROC / AUPRO on the whole test set per search")
    p.add_argument("--bank", type=int, default=16_385, help="synthetic bank size (10%% coreset of MVTec bottle)")
    p.add_argument("--dims", type=int, nargs="+", default=[152, 1024, 1536], help="synthetic feature dimensions")
    p.add_argument("--images", type=int, default=16, help="test images to time (1,296 patches each at 288)")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    if args.dataset is None:
        patches = patches_per_image(PatchCore(pretrained=False))  # the default input's grid
        for dim in args.dims:
            print(f"\n== synthetic bank {args.bank} x {dim}, {args.images} images x {patches} patches")
            compare(*synthetic_data(args.bank, dim, patches * args.images, args.seed), patches, args)
        print(f"\npeak RSS {peak_rss_mib():.0f} MiB")
        return
    model, test, queries = real_data(args)
    compare(model.memory_bank, queries, patches_per_image(model), args)
    if args.evaluate:
        print(f"\n{'search':21s} {'image AUROC':>11s} {'pixel AUROC':>11s} {'AUPRO':>7s}  ({len(test)} test images)")
        for backend, index, nprobe in SEARCHES:
            m = evaluate(model.set_search(backend, index, nprobe), test, progress=False).metrics
            name = search_name(backend, index, nprobe)
            print(f"{name:21s} {m['image_auroc']:11.4f} {m['pixel_auroc']:11.4f} {m['aupro']:7.4f}")
    print(f"\npeak RSS {peak_rss_mib():.0f} MiB")


if __name__ == "__main__":
    main()
