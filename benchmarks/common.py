"""What the benchmarks share: peak memory, medians of repeated timings, banks of real features."""

from __future__ import annotations

import random
import resource
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from patchcore_lite.datasets import (
    MTD_PREPROCESS,
    MVTEC_PREPROCESS,
    Sample,
    dataset_kind,
    image_batches,
    train_test_samples,
)
from patchcore_lite.model import PatchCore


def peak_rss_mib() -> float:
    """The process's peak resident memory so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def median_seconds(fn: Callable[[], object], repeat: int, warm_up: bool = True) -> float:
    """Median wall time of ``repeat`` calls, after one untimed warm-up call (first calls are slower):
    this machine's timings wander by +-25% between runs."""
    if warm_up:
        fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def interleaved_medians(fns: dict[str, Callable[[], object]], repeat: int) -> dict[str, float]:
    """Median wall time of each function over ``repeat`` rounds, one call of each per round after a
    warm-up round: a slow spell of this shared machine hits every function alike."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for round_ in range(repeat + 1):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            if round_:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def matmul_peak_gflops(n: int, m: int, d: int, repeat: int = 5) -> float:
    """This CPU's fp32 matrix-product speed at the search's shape, (n x d) @ (d x m), in GFLOP/s (best of
    ``repeat``): the ceiling of any search that computes every distance."""
    a, b = torch.randn(n, d), torch.randn(d, m)
    a @ b
    best = min(_seconds(lambda: a @ b) for _ in range(repeat))
    return 2 * n * m * d / best / 1e9


def _seconds(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def search_name(backend: str, index: str, nprobe: int) -> str:
    """How the tables name a search: "faiss flat", "faiss ivf nprobe 16"."""
    return f"{backend} {index}" + (f" nprobe {nprobe}" if index != "flat" else "")


def dataset_model(root: Path, **settings) -> PatchCore:
    """A default PatchCore with the dataset's image sizes (MTD: whole tile; MVTec: resize + crop),
    unless ``settings`` give ``resize`` and ``crop``."""
    base = MTD_PREPROCESS if dataset_kind(root) == "mtd" else MVTEC_PREPROCESS
    return PatchCore(**{"resize": base.resize, "crop": base.crop, **settings})


def dataset_split(root: Path, train_images: int | None, test_images: int | None,
                  seed: int = 0) -> tuple[list[Sample], list[Sample]]:
    """The first ``train_images`` training images and a seeded sample of ``test_images`` test images."""
    train, test = train_test_samples(root, seed=seed)
    if train_images is not None and train_images > len(train):
        raise SystemExit(f"{root} has {len(train)} training images, fewer than --train-images {train_images}")
    if test_images is not None and test_images < len(test):
        test = random.Random(seed).sample(test, test_images)
    return train[:train_images], test


def patch_bank(root: Path, train_images: int | None) -> torch.Tensor:
    """Patch features (N, D) of the first ``train_images`` training images, default PatchCore settings."""
    train, _ = dataset_split(root, train_images, None)
    return dataset_model(root).extract_all(train, True, "features").flatten(0, 2)


def input_images(model: PatchCore, samples: list[Sample]) -> torch.Tensor:
    """The samples decoded and preprocessed once, as (N, 3, H, W) tensors: timings that start from
    tensors leave decoding out."""
    return torch.cat([batch.images for batch in image_batches(samples, model.preprocess, model.config.batch_size)])


def patches_per_image(model: PatchCore) -> int:
    """The patches ``model`` scores per image at its square input size (MVTec: the crop; MTD: the resize)."""
    p = model.preprocess
    side = p.crop or p.resize
    h, w = (side, side) if isinstance(side, int) else side
    return int(model.extract(torch.zeros(1, 3, h, w)).shape[1:3].numel())
