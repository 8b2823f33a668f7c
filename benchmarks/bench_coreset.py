"""Greedy coreset: the fast path (lazy_greedy) vs the plain loop (coreset.greedy_coreset) on one bank, same
start; checks the indices are identical. From lazy_greedy.NATIVE_MIN points the fast path runs three times per
round, interleaved: with its compiled catch-up filter after a lower bound in lazy_greedy.BOUND_DIMS principal
components (the default there, for d >= 2 x BOUND_DIMS), with the compiled filter pass alone, and with the
torch ops.

    python benchmarks/bench_coreset.py                       # uniform and clustered 163,856 x 128, 10 %
    python benchmarks/bench_coreset.py --data clustered --no-plain
    python benchmarks/bench_coreset.py --features bank.npy   # your own (N, D) bank, projected to --dim
    python benchmarks/bench_coreset.py --dataset $PATCHCORE_DATA/magnetic_tile --train-images 209

Banks: "uniform" is i.i.d. N(0, 1) noise (nothing to exploit: the worst case);
"clustered" is a Gaussian mixture, closer to real patch features (background
patches repeat): 200 components, centres N(0, 9 I), per-component scale U(0.1, 1).
``--dataset``: real patch features (default PatchCore settings) of the first
``--train-images`` training images, projected to ``--dim`` as Algorithm 1 does;
209 images give MVTec bottle's 163,856 patches.
Peak RSS is the process's high-water mark (ru_maxrss), read after each run.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from common import patch_bank, peak_rss_mib

from patchcore_lite import lazy_greedy
from patchcore_lite.coreset import greedy_coreset, random_projection
from patchcore_lite.exact_search import fused_kernel
from patchcore_lite.lazy_greedy import lazy_greedy_coreset


def make_bank(kind: str, n: int, dim: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind == "uniform":
        return torch.randn(n, dim, generator=g)
    centers = 3 * torch.randn(200, dim, generator=g)
    labels = torch.randint(200, (n,), generator=g)
    scale = 0.1 + 0.9 * torch.rand(200, generator=g)
    return centers[labels] + scale[labels, None] * torch.randn(n, dim, generator=g)


def run(name: str, bank: torch.Tensor, args: argparse.Namespace) -> bool:
    n_select = max(1, int(len(bank) * args.ratio))
    print(f"\n== {name}: bank {tuple(bank.shape)} ({bank.numel() * 4 / 2**20:.0f} MiB float32), "
          f"{n_select} picks, start={args.start}, {torch.get_num_threads()} threads")
    default_min, default_dims = lazy_greedy.NATIVE_MIN, lazy_greedy.BOUND_DIMS
    passes = {  # (NATIVE_MIN, BOUND_DIMS) giving each
        f"bound {default_dims} + compiled": (default_min, default_dims),
        "compiled pass": (default_min, 2**62),
        "torch-ops pass": (2**62, default_dims),
    }
    if len(bank) < default_min or fused_kernel() is None:
        passes = {"torch-ops pass": passes["torch-ops pass"]}
    elif bank.shape[1] < 2 * default_dims:
        del passes[f"bound {default_dims} + compiled"]
    runs, picks = {name: [] for name in passes}, {}
    for _ in range(args.repeat):  # this machine's timings wander by +-25% between runs: interleave
        for kind, (native_min, dims) in passes.items():
            lazy_greedy.NATIVE_MIN, lazy_greedy.BOUND_DIMS = native_min, dims
            t = time.perf_counter()
            picks[kind] = lazy_greedy_coreset(bank, n_select, start=args.start, seed=args.seed)
            runs[kind].append(time.perf_counter() - t)
    lazy_greedy.NATIVE_MIN, lazy_greedy.BOUND_DIMS = default_min, default_dims
    for kind, times in runs.items():
        t = statistics.median(times)
        print(f"fast, {kind:<18}: {t:7.2f} s  {1e3 * t / n_select:6.3f} ms/pick  peak RSS {peak_rss_mib():6.0f} MiB"
              f"  (median of {', '.join(f'{r:.2f}' for r in times)})")
    first = next(iter(passes))  # what select_coreset runs at this size
    fast = picks[first]
    same = all(torch.equal(f, fast) for f in picks.values())
    for kind in list(passes)[1:]:
        ratio = statistics.median(runs[kind]) / statistics.median(runs[first])
        print(f"{first}: {ratio:.2f}x the {kind}")
    print(f"identical indices: {same}")
    if not args.plain:
        return same
    t_fast = statistics.median(runs[next(iter(passes))])
    t = time.perf_counter()
    plain = greedy_coreset(bank, n_select, start=args.start, seed=args.seed)
    t_plain = time.perf_counter() - t
    print(f"plain: {t_plain:7.2f} s  {1e3 * t_plain / n_select:6.3f} ms/pick  peak RSS {peak_rss_mib():6.0f} MiB")
    same = same and torch.equal(fast, plain)
    print(f"speedup {t_plain / t_fast:.1f}x, identical indices: {same}")
    return same


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=163_856, help="bank size (MVTec bottle at WRN50 28x28: 163,856)")
    p.add_argument("--dim", type=int, default=128, help="(projected) feature dimension")
    p.add_argument("--ratio", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--start", choices=["official", "single"], default="official")
    p.add_argument("--data", choices=["uniform", "clustered", "both"], default="both")
    p.add_argument("--features", help="an (N, D) .npy bank; projected to --dim if D > --dim")
    p.add_argument("--dataset", type=Path, help="real features: an MVTec-layout category or Magnetic Tile Defects")
    p.add_argument("--train-images", type=int, help="with --dataset: the first N training images (default: all)")
    p.add_argument("--repeat", type=int, default=3, help="runs of the fast path (the median is reported)")
    p.add_argument("--plain", action=argparse.BooleanOptionalAction, default=True,
                   help="also run the plain loop and compare (minutes at full size)")
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.features or args.dataset:
        feats = torch.from_numpy(np.load(args.features)).float() if args.features else patch_bank(
            args.dataset, args.train_images)
        banks = {str(args.features or args.dataset): random_projection(feats, args.dim, seed=args.seed)}
    else:
        kinds = ["uniform", "clustered"] if args.data == "both" else [args.data]
        banks = {k: make_bank(k, args.n, args.dim, args.seed) for k in kinds}
    ok = [run(name, bank, args) for name, bank in banks.items()]
    return 0 if all(ok) else 1


if __name__ == "__main__":
    sys.exit(main())
