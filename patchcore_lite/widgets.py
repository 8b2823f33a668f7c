"""The book's interactive figures: plain functions that return a Figure and the numbers it shows.

A chapter computes results for every slider position once (``*_results``), then a slider only
redraws (``*_view``), so it answers instantly. ``interactive_view`` puts sliders above any view's
figure; its ``.result`` holds the numbers, so a cell or a test can move a slider and check them.
A static page cannot recompute: chapters also draw each widget's figure at a few settings
(``*_grid``). Add new callbacks as more functions in this flat list.
"""

from __future__ import annotations

import csv
import io
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure
from numpy.typing import ArrayLike
from scipy.stats import kendalltau

from .coreset import coverage_curve, greedy_coreset, random_coreset, random_projection
from .datasets import ImageDataset, Sample, train_test_samples
from .knn import NearestNeighbors
from .metrics import evaluate as compute_metrics
from .metrics import image_auroc
from .model import PatchCore, PatchCoreConfig, score_features
from .pipeline import fit_evaluate
from .viz import overlay

View = Callable[..., tuple[Figure, dict[str, Any]]]


def interactive_view(view: View, **sliders: Any) -> Any:
    """Sliders above the figure of ``view(**slider values)``; ``.result`` holds the figure's numbers.

    The figure is an ``ipywidgets.Image`` (PNG bytes), redrawn when a slider moves. Not
    ``ipywidgets.interactive``: its Output widget made headless execution (nbclient, so the
    book build and nbval) stall for the whole cell timeout after the cell, about one run in
    two (measured: 60 s with a 60 s timeout). An Image's bytes are also saved with the page,
    so the static site shows the figure at the slider's starting value.
    """
    import ipywidgets

    image = ipywidgets.Image(format="png")
    box = ipywidgets.VBox([*sliders.values(), image])

    def redraw(_: Any = None) -> None:
        figure, box.result = view(**{name: slider.value for name, slider in sliders.items()})
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png")
        image.value = buffer.getvalue()

    for slider in sliders.values():
        slider.observe(redraw, names="value")
    redraw()
    return box


def principal_component_map(features: torch.Tensor) -> np.ndarray:
    """First principal component of a (h, w, D) feature grid, as an (h, w) image (``principal_components``, k = 1)."""
    h, w, d = features.shape
    return principal_components(features.reshape(-1, d), k=1).reshape(h, w)


def neighbour_change(features: torch.Tensor) -> float:
    """Mean distance between horizontally or vertically adjacent patch features of a (h, w, D) grid,
    relative to the mean feature norm: how quickly the features change across the image."""
    dy = torch.linalg.vector_norm(features[1:] - features[:-1], dim=-1)
    dx = torch.linalg.vector_norm(features[:, 1:] - features[:, :-1], dim=-1)
    scale = torch.linalg.vector_norm(features, dim=-1).mean()
    return float(torch.cat([dy.flatten(), dx.flatten()]).mean() / scale)


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


def _draw_patch_size(result: Mapping[str, Any], p: int, feature_ax: Any, map_ax: Any) -> None:
    feature_ax.imshow(result["features"], cmap="viridis")
    feature_ax.set_title(f"p = {p}: patch features (1st principal component)")
    feature_ax.set_xlabel(f"patch column (neighbour change {result['neighbour_change']:.2f})")
    feature_ax.set_ylabel("patch row")
    overlay(result["image"], result["map"], result["mask"], ax=map_ax, title=f"p = {p}: anomaly map")


def patch_size_view(results: Mapping[int, Mapping[str, Any]], p: int) -> tuple[Figure, dict[str, Any]]:
    """Chapter 2's widget: features, anomaly map and metrics at neighbourhood size ``p``.

    Returns the figure and ``{"patch_size": p, <metric>: value, "neighbour_change": value}``.
    """
    if p not in results:
        raise ValueError(f"no precomputed results for p={p}; choose one of {sorted(results)}")
    fig = Figure(figsize=(15, 4.2), layout="constrained")
    feature_ax, map_ax, metric_ax = fig.subplots(1, 3)
    _draw_patch_size(results[p], p, feature_ax, map_ax)
    sizes = sorted(results)
    for name in results[p]["metrics"]:
        values = [results[q]["metrics"][name] for q in sizes]
        metric_ax.plot(sizes, values, marker="o", label=name.replace("_", " "))
    metric_ax.axvline(p, color="grey", linestyle="--", label=f"p = {p}")
    metric_ax.set(xlabel="neighbourhood size p", ylabel="score (1 is perfect)", xticks=sizes,
                  title="Detection and localisation vs p")
    metric_ax.legend(loc="lower right")
    fig.suptitle(f"Locally aware patch features with a {p}x{p} neighbourhood")
    numbers = {"patch_size": p, **results[p]["metrics"], "neighbour_change": results[p]["neighbour_change"]}
    return fig, numbers


def patch_size_grid(results: Mapping[int, Mapping[str, Any]], patch_sizes: Sequence[int] | None = None) -> Figure:
    """The patch-size widget drawn for several p at once (one row each), for the static site."""
    sizes = list(patch_sizes) if patch_sizes is not None else sorted(results)
    missing = sorted(set(sizes) - set(results))
    if missing:
        raise ValueError(f"no precomputed results for p={missing}; choose from {sorted(results)}")
    fig = Figure(figsize=(10, 4 * len(sizes)), layout="constrained")
    for (feature_ax, map_ax), p in zip(fig.subplots(len(sizes), 2, squeeze=False), sizes):
        _draw_patch_size(results[p], p, feature_ax, map_ax)
    fig.suptitle("Patch features and anomaly maps for growing neighbourhoods p")
    return fig


# ---- chapters 3-5: memory bank, coreset, scoring and evaluation -------------------------------


def principal_components(x: torch.Tensor, k: int = 2) -> np.ndarray:
    """Coordinates (N, k) of the rows of ``x`` (N, D) along their first k principal axes.

    An axis's sign is arbitrary; it is fixed so that the axis's loadings sum to >= 0,
    which keeps the results of related inputs (e.g. feature grids) comparable.
    """
    x = x.double() - x.double().mean(dim=0)
    _, _, vh = torch.linalg.svd(x, full_matrices=False)
    axes = vh[:k] * torch.where(vh[:k].sum(dim=1, keepdim=True) >= 0, 1.0, -1.0)
    return (x @ axes.T).float().numpy()


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
    # fast=False: same picks; the plain loop is the quicker one for banks of tens of thousands.
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


_METRICS = {"image_auroc": "image AUROC", "pixel_auroc": "pixel AUROC", "aupro": "AUPRO"}


def _draw_bank(ax: Any, results: Mapping[str, Any], ratio: float, max_points: int = 6000) -> None:
    """PCA scatter of the whole bank (grey, subsampled for speed) with the coreset at ``ratio`` on top."""
    pca, n = results["pca"], results["n"]
    k = results["by_ratio"][ratio]["bank_size"]
    picks = results["order"][:k].numpy() if k < n else np.arange(n)
    shown = np.random.default_rng(0).permutation(n)[:max_points]
    ax.scatter(*pca[shown].T, s=2, c="lightgrey", label=f"all {n} training patches")
    ax.scatter(*pca[picks].T, s=4 if k > 500 else 10, c="tab:red", label=f"coreset: {k} patches ({ratio:.0%})")
    ax.set(xlabel="1st principal component", ylabel="2nd principal component",
           title=f"Memory bank (PCA view), greedy coreset at {ratio:.0%}")
    ax.legend(loc="upper right", fontsize=8, markerscale=3)


def _mark(ax: Any, ratio: float) -> None:
    ax.axvline(ratio, color="grey", linestyle="--", label=f"ratio {ratio:.0%}")


def coreset_view(results: Mapping[str, Any], ratio: float) -> tuple[Figure, dict[str, Any]]:
    """Chapter 3's widget: the coreset at ``ratio``, its coverage radius, accuracy and search time.

    Returns the figure and ``{"ratio", "bank_size", "radius", "radius_random", <metrics>,
    "search_ms_per_image"}`` for that ratio (greedy coreset).
    """
    by_ratio = results["by_ratio"]
    if ratio not in by_ratio:
        raise ValueError(f"no precomputed results for ratio {ratio}; choose one of {sorted(by_ratio)}")
    ratios, n = sorted(by_ratio), results["n"]
    fig = Figure(figsize=(12, 8.5), layout="constrained")
    (bank_ax, radius_ax), (metric_ax, time_ax) = fig.subplots(2, 2)
    _draw_bank(bank_ax, results, ratio)

    picks = np.arange(1, len(results["order"]) + 1) / n
    radius_ax.plot(picks, results["curves"]["greedy"], label="greedy coreset (Algorithm 1)")
    radius_ax.plot(picks, results["curves"]["random"], label="random subsample")
    _mark(radius_ax, ratio)
    radius_ax.set(xscale="log", xlabel="coreset ratio (share of training patches kept)",
                  ylabel="coverage radius max_m min_c ||m - c||", title="How far the farthest patch is from the coreset")
    radius_ax.legend()

    for j, (name, label) in enumerate(_METRICS.items()):
        metric_ax.plot(ratios, [by_ratio[r][name] for r in ratios], marker="o", color=f"C{j}",
                       label=f"{label} (greedy)")
        metric_ax.plot(ratios, [by_ratio[r]["random"][name] for r in ratios], marker="x", linestyle=":",
                       color=f"C{j}", label=f"{label} (random)")
    _mark(metric_ax, ratio)
    metric_ax.set(xscale="log", xlabel="coreset ratio", ylabel="score (1 is perfect)", title="Accuracy vs coreset ratio")
    metric_ax.legend(fontsize=8, loc="lower right")

    time_ax.plot(ratios, [by_ratio[r]["search_ms_per_image"] for r in ratios], marker="o",
                 label="nearest-neighbour search + scoring")
    _mark(time_ax, ratio)
    time_ax.set(xscale="log", xlabel="coreset ratio", ylabel="milliseconds per test image",
                title="Inference cost vs coreset ratio (features excluded)")
    time_ax.legend()
    fig.suptitle(f"Greedy coreset at {ratio:.0%} of the memory bank")
    row = by_ratio[ratio]
    numbers = {"ratio": ratio, "bank_size": row["bank_size"], "radius": row["radius"],
               "radius_random": row["radius_random"], **{m: row[m] for m in _METRICS if m in row},
               "search_ms_per_image": row["search_ms_per_image"]}
    return fig, numbers


def coreset_grid(results: Mapping[str, Any], ratios: Sequence[float]) -> Figure:
    """The coreset widget's bank view at several ratios side by side, for the static site."""
    missing = sorted(set(ratios) - set(results["by_ratio"]))
    if missing:
        raise ValueError(f"no precomputed results for ratios {missing}; choose from {sorted(results['by_ratio'])}")
    fig = Figure(figsize=(5 * len(ratios), 4.5), layout="constrained")
    for ax, r in zip(fig.subplots(1, len(ratios), squeeze=False)[0], ratios):
        _draw_bank(ax, results, r)
    fig.suptitle("Which training patches the greedy coreset keeps")
    return fig


def ranking_changes(before: ArrayLike, after: ArrayLike, labels: ArrayLike) -> dict[str, float]:
    """How a change of image scores (e.g. eq. 7's reweighting) reorders the test images.

    Kendall's tau between the two rankings, the number of image pairs whose order flips
    (of all pairs, and of normal-anomalous pairs, the only ones AUROC counts) and both AUROCs.
    """
    before, after, labels = np.asarray(before, float), np.asarray(after, float), np.asarray(labels)
    if not before.shape == after.shape == labels.shape or before.ndim != 1:
        raise ValueError(f"need three 1-D arrays of equal length, got {before.shape}, {after.shape}, {labels.shape}")
    i, j = np.triu_indices(len(before), k=1)
    flipped = np.sign(before[i] - before[j]) * np.sign(after[i] - after[j]) < 0
    return {
        "kendall_tau": float(kendalltau(before, after).statistic),
        "flipped_pairs": int(flipped.sum()),
        "flipped_normal_anomalous_pairs": int((flipped & (labels[i] != labels[j])).sum()),
        "auroc_before": image_auroc(labels, before),
        "auroc_after": image_auroc(labels, after),
    }


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
            **{m: result[m] for m in _METRICS if m in result},
        })
    return rows


def read_paper_results(path: str | Path) -> tuple[list[dict[str, Any]], str]:
    """Rows of a published-results CSV (numeric cells as floats) and its ``#`` comment lines (the sources)."""
    lines = Path(path).read_text().splitlines()
    notes = "\n".join(line.lstrip("# ") for line in lines if line.startswith("#"))
    rows = csv.DictReader(line for line in lines if line.strip() and not line.startswith("#"))
    return [{key: _number(value) for key, value in row.items()} for row in rows], notes


def _number(text: str) -> float | str:
    try:
        return float(text)
    except ValueError:
        return text
