"""The chapters' experiments: PatchCore fit, scored and measured under varied settings.

Each function computes what a chapter's figure or slider shows (``widgets`` draws it):

* chapter 2, locally aware patch features: ``patch_size_results`` (PatchCore at each p);
* chapter 3, coreset: ``coreset_results`` (Algorithm 1 at every coreset ratio);
* chapter 4, scoring: ``search_tradeoff`` (exact vs approximate nearest-neighbour search);
* chapters 3-5: ``split_features`` (features of a test split, once) and ``evaluate_bank``
  (eq. 6-7 and the metrics of one memory bank on them).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .coreset import coverage_curve, greedy_coreset, random_coreset, random_projection
from .datasets import ImageDataset, Sample, train_test_samples
from .knn import NearestNeighbors
from .metrics import METRIC_LABELS
from .metrics import evaluate as compute_metrics
from .model import PatchCore, PatchCoreConfig, score_features
from .patches import neighbour_change, principal_component_map, principal_components
from .pipeline import fit_evaluate


def patch_size_results(
    root: str | Path,
    patch_sizes: Sequence[int] = (1, 3, 5, 7),
    image_index: int | None = None,
    progress: bool = False,
    **overrides: Any,
) -> dict[int, dict[str, Any]]:
    """Fit and evaluate PatchCore on one category at each neighbourhood size p (eq. 1).

    Keeps, per p: the metrics, and for one anomalous test image (the first, unless
    ``image_index`` is given) the image, its mask, its anomaly map, the first principal
    component of its patch features and their ``neighbour_change``. ``overrides`` are
    further ``PatchCoreConfig`` settings (e.g. ``coreset_ratio``).
    """
    _, test = train_test_samples(root)
    index = image_index if image_index is not None else next(i for i, s in enumerate(test) if s.label == 1)
    results = {}
    for p in patch_sizes:
        model = PatchCore(patch_size=p, **overrides)
        result = fit_evaluate(model, root, name=f"p={p}", progress=progress, keep_maps=True)
        image = ImageDataset([test[index]], model.preprocess)[0]["image"]
        features = model.extract(image[None])[0]
        results[p] = {
            "metrics": result.metrics,
            "image": model.preprocess.unnormalize(image),
            "mask": result.masks[index],
            "map": result.maps[index],
            "features": principal_component_map(features),
            "neighbour_change": neighbour_change(features),
            "path": result.paths[index],
        }
    return results


def split_features(model: PatchCore, samples: Sequence[Sample], batch_size: int = 8) -> dict[str, Any]:
    """Patch features of ``samples`` through ``model``'s preprocessing and backbone (no memory bank needed).

    Returns ``features`` (B, h, w, D), ``labels`` (B,), ``masks`` (B, H, W) bool, ``images``
    (B, H, W, 3) in [0, 1] for plotting, ``defects`` and ``extract_s`` (seconds for the features).
    """
    loader = torch.utils.data.DataLoader(ImageDataset(list(samples), model.preprocess), batch_size=batch_size)
    features, masks, images, seconds = [], [], [], 0.0
    for batch in loader:
        start = time.perf_counter()
        features.append(model.extract(batch["image"]))
        seconds += time.perf_counter() - start
        masks.append(batch["mask"].bool())
        images += [model.preprocess.unnormalize(image) for image in batch["image"]]
    return {
        "features": torch.cat(features),
        "labels": np.array([s.label for s in samples]),
        "masks": torch.cat(masks).numpy(),
        "images": np.stack(images),
        "defects": [s.defect for s in samples],
        "extract_s": seconds,
    }


def evaluate_bank(
    bank: torch.Tensor, test: Mapping[str, Any], config: PatchCoreConfig | None = None, **search: Any
) -> tuple[dict[str, Any], NearestNeighbors]:
    """Score a ``split_features`` test set against one memory bank (N, D): metrics and costs, and the index.

    ``search`` overrides ``NearestNeighbors`` settings (``backend``, ``index``, ``nlist``, ``m``, ``nprobe``).
    The row holds ``bank_size``, ``memory_mb``, ``build_s`` (index), ``search_ms_per_image``
    (kNN, eq. 6-7 and maps per test image; features excluded), the metrics and the image ``scores``.
    """
    config = config or PatchCoreConfig()
    settings = {"backend": config.knn_backend, "index": config.knn_index, "seed": config.seed, **search}
    start = time.perf_counter()
    index = NearestNeighbors(bank, **settings)
    built = time.perf_counter()
    scores, maps = score_features(test["features"], index, config, test["masks"].shape[1:])
    seconds = time.perf_counter() - built
    scores, maps = scores.numpy(), maps.numpy()
    row = {
        "bank_size": len(bank),
        "memory_mb": bank.numel() * bank.element_size() / 2**20,
        "build_s": built - start,
        "search_ms_per_image": 1000 * seconds / len(scores),
        **compute_metrics(test["labels"], scores, test["masks"], maps),
        "scores": scores,
    }
    return row, index


def coreset_results(
    bank: torch.Tensor,
    test: Mapping[str, Any],
    config: PatchCoreConfig | None = None,
    ratios: Sequence[float] = (0.01, 0.02, 0.05, 0.1, 0.25, 1.0),
) -> dict[str, Any]:
    """Algorithm 1 at every coreset ratio on one full memory bank (N, D), scored on one test set.

    ``test`` is a ``split_features`` result; ``config`` gives the projection, seed and scoring
    settings (default ``PatchCoreConfig()``). One greedy run up to the largest ratio below 1
    gives every smaller coreset: its first ``int(N * ratio)`` picks, exactly what
    ``select_coreset`` returns at that ratio. Per ratio (``by_ratio[r]``): bank size and memory,
    coverage radius in the original feature space for greedy and random picks, metrics of both
    and the search time per test image (kNN, eq. 6-7 and maps; features excluded).
    Also the bank's 2-D PCA, the greedy pick order and both radius curves.
    """
    config = config or PatchCoreConfig()
    ratios = sorted(set(ratios))
    if not ratios or not all(0 < r <= 1 for r in ratios):
        raise ValueError(f"coreset ratios must lie in (0, 1], got {ratios}")
    n = len(bank)
    sizes = {r: max(1, int(n * r)) for r in ratios}
    n_max = max([s for s in sizes.values() if s < n], default=1)
    projected = random_projection(bank, config.projection_dim, config.projection_eps, config.seed)
    # fast=False: the plain loop, the same picks (benchmarks/RESULTS.md: which is quicker at which size).
    greedy = greedy_coreset(projected, n_max, config.coreset_start, seed=config.seed, fast=False)
    shuffled = random_coreset(n, n_max, config.seed)  # nested too: a prefix of one permutation
    curves = {"greedy": coverage_curve(bank, greedy), "random": coverage_curve(bank, shuffled)}
    by_ratio = {}
    for r in ratios:
        k = sizes[r]
        if k == n:
            full = evaluate_bank(bank, test, config)[0]
            by_ratio[r] = {**full, "radius": 0.0, "radius_random": 0.0, "random": full}
            continue
        by_ratio[r] = {
            **evaluate_bank(bank[greedy[:k]], test, config)[0],
            "radius": float(curves["greedy"][k - 1]),
            "radius_random": float(curves["random"][k - 1]),
            "random": evaluate_bank(bank[shuffled[:k]], test, config)[0],
        }
    return {"n": n, "order": greedy, "curves": curves, "pca": principal_components(bank), "by_ratio": by_ratio}


def search_tradeoff(
    bank: torch.Tensor,
    test: Mapping[str, Any],
    searches: Mapping[str, Mapping[str, Any]],
    config: PatchCoreConfig | None = None,
) -> list[dict[str, Any]]:
    """Exact vs approximate nearest-neighbour search on one bank: one row per entry of ``searches``.

    ``searches`` maps a name to ``NearestNeighbors`` settings (``backend``, ``index``, ``nlist``,
    ``m``, ``nprobe``). Each row: build and search time, recall@1 (share of test patches whose
    neighbour is the exact one), mean relative error of the patch distance, and the metrics.
    """
    config = config or PatchCoreConfig()
    queries = test["features"].flatten(0, 2)
    true_dist, true_idx = NearestNeighbors(bank, "torch").search(queries)
    rows = []
    for name, settings in searches.items():
        result, index = evaluate_bank(bank, test, config, **settings)
        dist, idx = index.search(queries)
        rows.append({
            "search": name,
            "build_s": result["build_s"],
            "search_ms_per_image": result["search_ms_per_image"],
            "recall_at_1": float((idx == true_idx).float().mean()),
            "distance_error": float(((dist - true_dist).abs() / true_dist.clamp_min(1e-12)).mean()),
            **{m: result[m] for m in METRIC_LABELS if m in result},
        })
    return rows
