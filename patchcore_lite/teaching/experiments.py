"""The chapters' experiments: PatchCore fit, scored and measured under varied settings.

Each function computes what a chapter's figure or slider shows (``widgets`` draws it), and returns
a dataclass whose fields say what it holds:

* chapter 2, locally aware patch features: ``patch_size_results`` (PatchCore at each p: ``PatchSizeRun``);
* chapter 3, coreset: ``coreset_results`` (Algorithm 1 at every coreset ratio: ``CoresetSweep``);
* chapter 4, scoring: ``search_tradeoff`` (exact vs approximate nearest-neighbour search: ``SearchRow``);
* chapters 3-5: ``split_features`` (features of a test split, once: ``SplitFeatures``) and
  ``evaluate_bank`` (eq. 6-7 and the metrics of one memory bank on them: ``BankScores``).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..coreset import greedy_coreset, random_coreset, random_projection
from ..datasets import ImageDataset, Sample, image_batches, train_test_samples
from ..evaluation import fit_evaluate
from ..knn import NearestNeighbors
from ..metrics import compute_metrics
from ..model import PatchCore, PatchCoreConfig
from ..scoring import scores_and_maps
from .measures import (
    coverage_curve,
    neighbour_change,
    principal_component_map,
    principal_components,
)


@dataclass(frozen=True)
class PatchSizeRun:
    """PatchCore at one neighbourhood size p, and what it does to one anomalous test image."""

    metrics: dict[str, float]  # image AUROC, pixel AUROC, AUPRO on the category's test set
    image: np.ndarray  # (H, W, 3) in [0, 1], the test image shown
    mask: np.ndarray  # (H, W) bool, its ground truth
    map: np.ndarray  # (H, W), its anomaly map
    feature_map: np.ndarray  # (h, w), first principal component of its patch features
    neighbour_change: float  # measures.neighbour_change of its patch features
    path: str


@dataclass(frozen=True)
class SplitFeatures:
    """Patch features of a list of samples, with what the chapters plot and score them against."""

    features: torch.Tensor  # (B, h, w, D)
    labels: np.ndarray  # (B,) 0 normal, 1 anomalous
    masks: np.ndarray  # (B, H, W) bool
    images: np.ndarray  # (B, H, W, 3) in [0, 1], for plotting
    defects: list[str]
    extract_s: float  # seconds spent in the backbone and patch features


@dataclass(frozen=True)
class BankScores:
    """One memory bank scored on a ``SplitFeatures`` test set: costs, metrics and the image scores."""

    bank_size: int
    memory_mib: float  # the bank's float32 bytes / 2^20
    build_s: float  # building the search index
    search_ms_per_image: float  # kNN, eq. 6-7 and maps per test image; features excluded
    metrics: dict[str, float]
    scores: np.ndarray  # (B,)


@dataclass(frozen=True)
class CoresetRow:
    """One coreset ratio of ``coreset_results``: the greedy coreset and a random subsample of the same size."""

    greedy: BankScores
    random: BankScores
    radius: float  # coverage radius of the greedy coreset, in the original feature space
    radius_random: float


@dataclass(frozen=True)
class CoresetSweep:
    """Algorithm 1 at every coreset ratio on one full memory bank (``coreset_results``)."""

    n: int  # patches in the full bank
    order: torch.Tensor  # greedy pick order (every smaller coreset is a prefix of it)
    curves: dict[str, np.ndarray]  # coverage radius after each pick: "greedy", "random"
    pca: np.ndarray  # (n, 2) the bank's first two principal components
    by_ratio: dict[float, CoresetRow]


@dataclass(frozen=True)
class SearchRow:
    """One nearest-neighbour search of ``search_tradeoff``, against the exact search."""

    search: str
    build_s: float
    search_ms_per_image: float
    recall_at_1: float  # share of test patches whose neighbour is the exact one
    distance_error: float  # mean relative error of the patch distance
    metrics: dict[str, float]

    def row(self, **extra: object) -> dict[str, object]:
        """One flat table row (``tools.tables.format_table``): any extra columns first, then the fields and metrics."""
        fields = {k: v for k, v in vars(self).items() if k != "metrics"}
        return {**extra, **fields, **self.metrics}


def patch_size_results(
    root: str | Path,
    patch_sizes: Sequence[int] = (1, 3, 5, 7),
    image_index: int | None = None,
    progress: bool = False,
    **overrides: Any,
) -> dict[int, PatchSizeRun]:
    """Fit and evaluate PatchCore on one category at each neighbourhood size p (eq. 1).

    One ``PatchSizeRun`` per p, for one anomalous test image (the first, unless ``image_index``
    is given). ``overrides`` are further ``PatchCoreConfig`` settings (e.g. ``coreset_ratio``).
    """
    _, test = train_test_samples(root)
    index = image_index if image_index is not None else next(i for i, s in enumerate(test) if s.label == 1)
    results = {}
    for p in patch_sizes:
        model = PatchCore(patch_size=p, **overrides)
        result = fit_evaluate(model, root, name=f"p={p}", progress=progress, keep_maps=True)
        image = ImageDataset([test[index]], model.preprocess)[0]["image"]
        features = model.extract(image[None])[0]
        results[p] = PatchSizeRun(
            metrics=result.metrics,
            image=model.preprocess.unnormalize(image),
            mask=result.masks[index],
            map=result.maps[index],
            feature_map=principal_component_map(features),
            neighbour_change=neighbour_change(features),
            path=result.paths[index],
        )
    return results


def split_features(model: PatchCore, samples: Sequence[Sample]) -> SplitFeatures:
    """Patch features of ``samples`` through ``model``'s preprocessing and backbone (no memory bank needed)."""
    features, masks, images, seconds = [], [], [], 0.0
    for batch in image_batches(list(samples), model.preprocess, model.config.batch_size):
        start = time.perf_counter()
        features.append(model.extract(batch.images))
        seconds += time.perf_counter() - start
        masks.append(batch.masks)
        images += [model.preprocess.unnormalize(image) for image in batch.images]
    return SplitFeatures(
        features=torch.cat(features),
        labels=np.array([s.label for s in samples]),
        masks=torch.cat(masks).numpy(),
        images=np.stack(images),
        defects=[s.defect for s in samples],
        extract_s=seconds,
    )


def evaluate_bank(
    bank: torch.Tensor, test: SplitFeatures, config: PatchCoreConfig | None = None, **search: Any
) -> tuple[BankScores, NearestNeighbors]:
    """Score a test set against one memory bank (N, D): metrics and costs, and the index.

    ``search`` overrides ``NearestNeighbors`` settings (``backend``, ``index``, ``nlist``, ``m``, ``nprobe``).
    """
    config = config or PatchCoreConfig()
    settings = {"backend": config.knn_backend, "index": config.knn_index, "seed": config.seed, **search}
    start = time.perf_counter()
    index = NearestNeighbors(bank, **settings)
    built = time.perf_counter()
    scores, maps = scores_and_maps(test.features, index, test.masks.shape[1:], **config.scoring)
    seconds = time.perf_counter() - built
    scores, maps = scores.numpy(), maps.numpy()
    row = BankScores(
        bank_size=len(bank),
        memory_mib=bank.numel() * bank.element_size() / 2**20,
        build_s=built - start,
        search_ms_per_image=1000 * seconds / len(scores),
        metrics=compute_metrics(test.labels, scores, test.masks, maps),
        scores=scores,
    )
    return row, index


def coreset_results(
    bank: torch.Tensor,
    test: SplitFeatures,
    config: PatchCoreConfig | None = None,
    ratios: Sequence[float] = (0.01, 0.02, 0.05, 0.1, 0.25, 1.0),
) -> CoresetSweep:
    """Algorithm 1 at every coreset ratio on one full memory bank (N, D), scored on one test set.

    ``config`` gives the projection, seed and scoring settings (default ``PatchCoreConfig()``).
    One greedy run up to the largest ratio below 1 gives every smaller coreset: its first
    ``int(N * ratio)`` picks, exactly what ``select_coreset`` returns at that ratio. Per ratio:
    the greedy coreset and a random subsample of the same size, scored, with their coverage radii.
    """
    config = config or PatchCoreConfig()
    ratios = sorted(set(ratios))
    if not ratios or not all(0 < r <= 1 for r in ratios):
        raise ValueError(f"coreset ratios must lie in (0, 1], got {ratios}")
    n = len(bank)
    sizes = {r: max(1, int(n * r)) for r in ratios}
    n_max = max([s for s in sizes.values() if s < n], default=1)
    projected = random_projection(bank, config.projection_dim, config.projection_eps, config.seed)
    # The plain loop (Algorithm 1 as written), the same picks as PatchCore.fit's fast path.
    greedy = greedy_coreset(projected, n_max, config.coreset_start, seed=config.seed)
    shuffled = random_coreset(n, n_max, config.seed)  # nested too: a prefix of one permutation
    curves = {"greedy": coverage_curve(bank, greedy), "random": coverage_curve(bank, shuffled)}
    by_ratio = {}
    for r in ratios:
        k = sizes[r]
        if k == n:
            full = evaluate_bank(bank, test, config)[0]
            by_ratio[r] = CoresetRow(greedy=full, random=full, radius=0.0, radius_random=0.0)
            continue
        by_ratio[r] = CoresetRow(
            greedy=evaluate_bank(bank[greedy[:k]], test, config)[0],
            random=evaluate_bank(bank[shuffled[:k]], test, config)[0],
            radius=float(curves["greedy"][k - 1]),
            radius_random=float(curves["random"][k - 1]),
        )
    return CoresetSweep(n=n, order=greedy, curves=curves, pca=principal_components(bank), by_ratio=by_ratio)


def search_tradeoff(
    bank: torch.Tensor,
    test: SplitFeatures,
    searches: Mapping[str, Mapping[str, Any]],
    config: PatchCoreConfig | None = None,
) -> list[SearchRow]:
    """Exact vs approximate nearest-neighbour search on one bank: one row per entry of ``searches``.

    ``searches`` maps a name to ``NearestNeighbors`` settings (``backend``, ``index``, ``nlist``,
    ``m``, ``nprobe``).
    """
    config = config or PatchCoreConfig()
    queries = test.features.flatten(0, 2)
    true_dist, true_idx = NearestNeighbors(bank, "torch").search(queries)
    rows = []
    for name, settings in searches.items():
        result, index = evaluate_bank(bank, test, config, **settings)
        dist, idx = index.search(queries)
        rows.append(SearchRow(
            search=name,
            build_s=result.build_s,
            search_ms_per_image=result.search_ms_per_image,
            recall_at_1=float((idx == true_idx).float().mean()),
            distance_error=float(((dist - true_dist).abs() / true_dist.clamp_min(1e-12)).mean()),
            metrics=result.metrics,
        ))
    return rows
