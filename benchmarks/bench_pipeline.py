"""PatchCore's costs on one dataset and backbone: features, coreset, inference, memory.

    python benchmarks/bench_pipeline.py                                   # a synthetic category
    python benchmarks/bench_pipeline.py --data ../shared/data/magnetic_tile
    python benchmarks/bench_pipeline.py --data path/to/bottle --backbone wide_resnet50_2

Prints feature-extraction images/s, coreset seconds and ms per pick, inference
images/s (features + search + maps, end to end), and the process's peak memory.
A measurement, not a test: figures depend on the machine and what else runs on it.
"""

from __future__ import annotations

import argparse
import platform
import resource
import time
from pathlib import Path

import torch

from patchcore_lite.datasets import MTD_PREPROCESS, MVTEC_PREPROCESS, dataset_kind, train_test_samples
from patchcore_lite.model import PatchCore
from patchcore_lite.synthetic import ensure_synthetic


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, help="MVTec-layout category or MTD (default: synthetic 'disc')")
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--weights", type=Path, help="backbone weights file")
    parser.add_argument("--coreset-ratio", type=float, default=0.1)
    parser.add_argument("--knn", choices=["faiss", "torch"], default="faiss")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    root = args.data or ensure_synthetic() / "disc"
    base = MTD_PREPROCESS if dataset_kind(root) == "mtd" else MVTEC_PREPROCESS
    train, test = train_test_samples(root)
    model = PatchCore(
        backbone=args.backbone, coreset_ratio=args.coreset_ratio, knn_backend=args.knn,
        batch_size=args.batch_size, resize=base.resize, crop=base.crop, weights_path=args.weights,
    )
    model.fit(train)
    t = model.fit_timings
    start = time.perf_counter()
    model.predict(test)
    infer_s = time.perf_counter() - start

    print(f"\nPatchCore on {root} ({len(train)} train, {len(test)} test images)")
    print(f"machine: {platform.processor() or platform.machine()}, torch threads {torch.get_num_threads()}")
    print(f"backbone {args.backbone}, layers {model.config.layers}, feature dim {model.memory_bank.shape[1]}, "
          f"batch {args.batch_size}, search {args.knn}")
    print(f"feature extraction : {len(train) / t['features_s']:8.1f} images/s ({t['features_s']:.1f} s)")
    print(f"coreset            : {t['coreset_s']:8.1f} s for {t['coreset_picks']} picks of "
          f"{model.n_train_patches} patches = {1000 * t['coreset_s'] / t['coreset_picks']:.2f} ms/pick")
    print(f"inference          : {len(test) / infer_s:8.1f} images/s ({infer_s:.1f} s, features + search + maps)")
    print(f"memory bank        : {model.memory_bytes / 2**20:8.1f} MiB")
    print(f"peak memory (RSS)  : {peak_rss_mib():8.0f} MiB")


if __name__ == "__main__":
    main()
