"""PatchCore's costs end to end: fit (features, coreset, memory) and inference per search, stage by stage.

    python benchmarks/bench_pipeline.py                                   # a synthetic category
    python benchmarks/bench_pipeline.py --data $PATCHCORE_DATA/magnetic_tile --train-images 209
    python benchmarks/bench_pipeline.py --data path/to/bottle --backbone wide_resnet50_2

Fit: feature extraction in images/s, with batch norms folded (default) and, in the
same run, unfolded (the straightforward network); coreset seconds and ms per pick;
peak RSS after the fit. 209 training images give MVTec bottle's bank, 163,856
patches (10% = 16,385). Inference, per search: milliseconds per image for each stage
(backbone, patch features, search, image scores with eq. 7, maps), images/s from
normalised tensors to maps ("end to end", the issue's measure), and images/s from
image files (decoding and resizing included), with the loader's prefetching thread and, for the
two exact flat searches, without it (decoding in the scoring thread); the loader's default
(``datasets.default_prefetch``) prefetches only where torch's threads leave a core free. Medians of
``--repeat`` interleaved rounds (every search once per round); each search's path is printed.
A measurement, not a test: figures depend on the machine and what else runs on it.
"""

from __future__ import annotations

import argparse
import functools
import platform
import statistics
import time
from pathlib import Path
from unittest.mock import patch

import torch
from common import (
    dataset_model,
    dataset_split,
    input_images,
    interleaved_medians,
    median_seconds,
    peak_rss_mib,
    search_name,
)

from patchcore_lite import detector
from patchcore_lite.backbone import Backbone
from patchcore_lite.datasets import default_prefetch, image_batches
from patchcore_lite.knn import NearestNeighbors
from patchcore_lite.model import PatchCore
from patchcore_lite.patches import patch_features
from patchcore_lite.scoring import anomaly_maps, image_scores, patch_scores
from patchcore_lite.teaching.synthetic import ensure_synthetic

SEARCHES = [("exact", "flat", 8), ("faiss", "flat", 8), ("torch", "flat", 8), ("faiss", "ivf", 8), ("faiss", "ivf", 16)]
STAGES = ("backbone", "patches", "search", "image score", "maps")


def features_per_second(model: PatchCore, images: torch.Tensor, repeat: int) -> tuple[float, float]:
    """Images/s of the folded backbone and of the same network unfolded, timed in alternation."""
    c = model.config
    plain = Backbone(c.backbone, c.layers, c.pretrained, seed=c.seed, fold=False)
    runs: dict[bool, list[float]] = {True: [], False: []}
    nets = ((True, model.backbone), (False, plain))
    batches = [batch.images for batch in image_batches(images, model.preprocess, c.batch_size)]
    with torch.inference_mode():
        for _, net in nets:
            net(batches[0])  # warm-up
        for _ in range(repeat):  # alternating, so a slow spell of the machine hits both
            for folded, net in nets:
                runs[folded].append(median_seconds(lambda: [net(b) for b in batches], 1, warm_up=False))
    return len(images) / statistics.median(runs[True]), len(images) / statistics.median(runs[False])


def stage_times(model: PatchCore, images: torch.Tensor) -> dict[str, float]:
    """Seconds spent in each inference stage over all batches (one pass): ``score_batch`` taken apart."""
    c, index, times = model.config, model.index, dict.fromkeys(STAGES, 0.0)

    def timed(stage: str, fn, *args):
        start = time.perf_counter()
        out = fn(*args)
        times[stage] += time.perf_counter() - start
        return out

    with torch.inference_mode():
        for batch in image_batches(images, model.preprocess, c.batch_size):
            maps = timed("backbone", model.backbone, batch.images)
            feats = timed("patches", patch_features, maps, c.patch_size, c.patch_stride, c.feature_mode,
                          c.embed_dim, c.target_dim, c.grid_index)
            dist, nearest = timed("search", patch_scores, feats, index, c.k, c.squared)
            timed("image score", image_scores, feats, dist, nearest, index, c.reweight, c.reweight_b)
            timed("maps", anomaly_maps, dist, tuple(batch.images.shape[-2:]), c.sigma)
    return times


def interleaved_stages(model: PatchCore, indexes: dict[str, NearestNeighbors], images: torch.Tensor,
                       repeat: int) -> dict[str, dict[str, float]]:
    """Per search, the stage times of its median run; one run of every search per round, after a warm-up
    round, so a slow spell of the machine hits them all."""
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in indexes}
    for round_ in range(repeat + 1):
        for name, index in indexes.items():
            model.index = index
            times = stage_times(model, images)
            if round_:
                runs[name].append(times)
    return {name: sorted(r, key=lambda t: sum(t.values()))[len(r) // 2] for name, r in runs.items()}


def _predict(model: PatchCore, index: NearestNeighbors, test: list, prefetch: int):
    """``predict`` on the image files with ``index``, the loader decoding ``prefetch`` batches ahead (0: serial)."""
    def run():
        model.index = index
        with patch.object(detector, "image_batches", functools.partial(image_batches, prefetch=prefetch)):
            return model.predict(test, progress=False)
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, help="MVTec-layout category or MTD (default: synthetic 'disc')")
    parser.add_argument("--train-images", type=int, help="fit on the first N training images (default: all)")
    parser.add_argument("--test-images", type=int, default=64, help="seeded sample of test images to time")
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--weights", type=Path, help="backbone weights file")
    parser.add_argument("--coreset-ratio", type=float, default=0.1)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    root = args.data or ensure_synthetic() / "disc"
    train, test = dataset_split(root, args.train_images, args.test_images)
    model = dataset_model(root, backbone=args.backbone, coreset_ratio=args.coreset_ratio,
                          batch_size=args.batch_size, weights_path=args.weights)
    model.fit(train)
    fit_rss, t = peak_rss_mib(), model.fit_timings
    images = input_images(model, test)

    print(f"\nPatchCore on {root}: {len(train)} training images, {len(test)} test images timed")
    print(f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; backbone {args.backbone}, layers {model.config.layers}, "
          f"batch {args.batch_size}, medians of {args.repeat} runs")
    folded, plain = features_per_second(model, images, args.repeat)
    print(f"features  : {folded:6.1f} images/s folded batch norms, {plain:6.1f} unfolded ({folded / plain:.2f}x)")
    print(f"fit       : features {t['features_s']:.1f} s, coreset {t['coreset_s']:.1f} s for {t['coreset_picks']} "
          f"picks of {model.n_train_patches} patches ({1e3 * t['coreset_s'] / t['coreset_picks']:.2f} ms/pick), "
          f"peak RSS {fit_rss:.0f} MiB")
    print(f"bank      : {tuple(model.memory_bank.shape)}, {model.memory_bytes / 2**20:.1f} MiB\n")
    indexes = {}
    for backend, index, nprobe in SEARCHES:
        indexes[search_name(backend, index, nprobe)] = model.set_search(backend, index, nprobe).index
    stages = interleaved_stages(model, indexes, images, args.repeat)
    from_files = interleaved_medians({**{name: _predict(model, index, test, 1) for name, index in indexes.items()},
                                      **{f"{name} serial": _predict(model, indexes[name], test, 0)
                                         for name in ("exact flat", "faiss flat")}}, args.repeat)
    print(f"{'search':20s}" + "".join(f"{s:>12s}" for s in STAGES)
          + f"{'tensors->maps':>15s}{'files->maps':>13s}{'serial decode':>15s}")
    for name in indexes:
        serial = f"{len(test) / from_files[name + ' serial']:9.1f} img/s" if name + " serial" in from_files else ""
        print(f"{name:20s}" + "".join(f"{1e3 * stages[name][s] / len(test):9.1f} ms" for s in STAGES)
              + f"{len(test) / sum(stages[name].values()):9.1f} img/s{len(test) / from_files[name]:7.1f} img/s"
              + serial)
    print("files->maps: `predict` on the image files, decoding one batch ahead in a thread; serial decode: decoding "
          f"in the scoring thread; the loader's default here: {'prefetch' if default_prefetch() else 'serial'}")
    best = min(from_files["exact flat"], from_files["exact flat serial"])
    gain = from_files["faiss flat serial"] / best
    print(f"end to end from files: exact flat {len(test) / best:.1f} images/s (the faster loader) against faiss flat "
          f"with serial decoding {len(test) / from_files['faiss flat serial']:.1f}: {gain:.2f}x")
    for name, index in indexes.items():
        print(f"  {name:18s} {index.describe()}")
    print(f"\npeak RSS  : {peak_rss_mib():.0f} MiB")


if __name__ == "__main__":
    main()
