"""The book's interactive figures: plain functions that return a Figure and the numbers it shows.

A chapter computes results for every slider position once (``experiments.*_results``), then a slider only
redraws (``*_view``), so it answers instantly. ``interactive_view`` puts sliders above any view's
figure; its ``.result`` holds the numbers, so a cell or a test can move a slider and check them.
A static page cannot recompute: chapters also draw each widget's figure at a few settings
(``*_grid``). Add new callbacks as more functions in this flat list.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.patches import Circle

from ..metrics import METRIC_LABELS
from ..scoring import anomaly_maps
from .experiments import CoresetSweep, PatchSizeRun
from .measures import ranking_changes, worst_covered
from .viz import View, overlay, plot_roc, png_bytes


def interactive_view(view: View, **sliders: Any) -> Any:
    """Sliders above the figure of ``view(**slider values)``; ``.result`` holds the figure's numbers.

    The figure is an ``ipywidgets.Image`` (PNG bytes), redrawn when a slider moves. Not
    ``ipywidgets.interactive``: its Output widget made headless execution (nbclient, so the
    book build and nbval) stall for the whole cell timeout after the cell, about one run in
    two. An Image's bytes are also saved with the page,
    so the static site shows the figure at the slider's starting value.
    """
    import ipywidgets

    image = ipywidgets.Image(format="png")
    box = ipywidgets.VBox([*sliders.values(), image])

    def redraw(_: Any = None) -> None:
        figure, box.result = view(**{name: slider.value for name, slider in sliders.items()})
        image.value = png_bytes(figure)

    for slider in sliders.values():
        slider.observe(redraw, names="value")
    redraw()
    return box


def _draw_patch_size(result: PatchSizeRun, p: int, feature_ax: Any, map_ax: Any) -> None:
    feature_ax.imshow(result.feature_map, cmap="viridis")
    feature_ax.set_title(f"p = {p}: patch features (1st principal component)")
    feature_ax.set_xlabel(f"patch column (neighbour change {result.neighbour_change:.2f})")
    feature_ax.set_ylabel("patch row")
    overlay(result.image, result.map, result.mask, ax=map_ax, title=f"p = {p}: anomaly map")


def patch_size_view(results: Mapping[int, PatchSizeRun], p: int) -> tuple[Figure, dict[str, Any]]:
    """Chapter 2's widget: features, anomaly map and metrics at neighbourhood size ``p``.

    Returns the figure and ``{"patch_size": p, <metric>: value, "neighbour_change": value}``.
    """
    if p not in results:
        raise ValueError(f"no precomputed results for p={p}; choose one of {sorted(results)}")
    fig = Figure(figsize=(15, 4.2), layout="constrained")
    feature_ax, map_ax, metric_ax = fig.subplots(1, 3)
    _draw_patch_size(results[p], p, feature_ax, map_ax)
    sizes = sorted(results)
    for name in results[p].metrics:
        values = [results[q].metrics[name] for q in sizes]
        metric_ax.plot(sizes, values, marker="o", label=name.replace("_", " "))
    metric_ax.axvline(p, color="grey", linestyle="--", label=f"p = {p}")
    metric_ax.set(xlabel="neighbourhood size p", ylabel="score (1 is perfect)", xticks=sizes,
                  title="Detection and localisation vs p")
    metric_ax.legend(loc="lower right")
    fig.suptitle(f"Locally aware patch features with a {p}x{p} neighbourhood")
    numbers = {"patch_size": p, **results[p].metrics, "neighbour_change": results[p].neighbour_change}
    return fig, numbers


def patch_size_grid(results: Mapping[int, PatchSizeRun], patch_sizes: Sequence[int] | None = None) -> Figure:
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


def _draw_bank(ax: Any, results: CoresetSweep, ratio: float, max_points: int = 6000) -> None:
    """PCA scatter of the whole bank (grey, subsampled for speed) with the coreset at ``ratio`` on top."""
    pca, n = results.pca, results.n
    k = results.by_ratio[ratio].greedy.bank_size
    picks = results.order[:k].numpy() if k < n else np.arange(n)
    shown = np.random.default_rng(0).permutation(n)[:max_points]
    ax.scatter(*pca[shown].T, s=2, c="lightgrey", label=f"all {n} training patches")
    ax.scatter(*pca[picks].T, s=4 if k > 500 else 10, c="tab:red", label=f"coreset: {k} patches ({ratio:.0%})")
    ax.set(xlabel="1st principal component", ylabel="2nd principal component",
           title=f"Memory bank (PCA view), greedy coreset at {ratio:.0%}")
    ax.legend(loc="upper right", fontsize=8, markerscale=3)


def _mark(ax: Any, ratio: float) -> None:
    ax.axvline(ratio, color="grey", linestyle="--", label=f"ratio {ratio:.0%}")


def coreset_view(results: CoresetSweep, ratio: float) -> tuple[Figure, dict[str, Any]]:
    """Chapter 3's widget: the coreset at ``ratio``, its coverage radius, accuracy and search time.

    Returns the figure and ``{"ratio", "bank_size", "radius", "radius_random", <metrics>,
    "search_ms_per_image"}`` for that ratio (greedy coreset).
    """
    by_ratio = results.by_ratio
    if ratio not in by_ratio:
        raise ValueError(f"no precomputed results for ratio {ratio}; choose one of {sorted(by_ratio)}")
    ratios, n = sorted(by_ratio), results.n
    fig = Figure(figsize=(12, 8.5), layout="constrained")
    (bank_ax, radius_ax), (metric_ax, time_ax) = fig.subplots(2, 2)
    _draw_bank(bank_ax, results, ratio)

    picks = np.arange(1, len(results.order) + 1) / n
    radius_ax.plot(picks, results.curves["greedy"], label="greedy coreset (Algorithm 1)")
    radius_ax.plot(picks, results.curves["random"], label="random subsample")
    _mark(radius_ax, ratio)
    radius_ax.set(xscale="log", xlabel="coreset ratio (share of training patches kept)",
                  ylabel="coverage radius max_m min_c ||m - c||", title="How far the farthest patch is from the coreset")
    radius_ax.legend()

    for j, (name, label) in enumerate(METRIC_LABELS.items()):
        metric_ax.plot(ratios, [by_ratio[r].greedy.metrics[name] for r in ratios], marker="o", color=f"C{j}",
                       label=f"{label} (greedy)")
        metric_ax.plot(ratios, [by_ratio[r].random.metrics[name] for r in ratios], marker="x", linestyle=":",
                       color=f"C{j}", label=f"{label} (random)")
    _mark(metric_ax, ratio)
    metric_ax.set(xscale="log", xlabel="coreset ratio", ylabel="score (1 is perfect)", title="Accuracy vs coreset ratio")
    metric_ax.legend(fontsize=8, loc="lower right")

    time_ax.plot(ratios, [by_ratio[r].greedy.search_ms_per_image for r in ratios], marker="o",
                 label="nearest-neighbour search + scoring")
    _mark(time_ax, ratio)
    time_ax.set(xscale="log", xlabel="coreset ratio", ylabel="milliseconds per test image",
                title="Inference cost vs coreset ratio (features excluded)")
    time_ax.legend()
    fig.suptitle(f"Greedy coreset at {ratio:.0%} of the memory bank")
    row = by_ratio[ratio]
    numbers = {"ratio": ratio, "bank_size": row.greedy.bank_size, "radius": row.radius,
               "radius_random": row.radius_random, **row.greedy.metrics,
               "search_ms_per_image": row.greedy.search_ms_per_image}
    return fig, numbers


def coreset_grid(results: CoresetSweep, ratios: Sequence[float]) -> Figure:
    """The coreset widget's bank view at several ratios side by side, for the static site."""
    missing = sorted(set(ratios) - set(results.by_ratio))
    if missing:
        raise ValueError(f"no precomputed results for ratios {missing}; choose from {sorted(results.by_ratio)}")
    fig = Figure(figsize=(5 * len(ratios), 4.5), layout="constrained")
    for ax, r in zip(fig.subplots(1, len(ratios), squeeze=False)[0], ratios):
        _draw_bank(ax, results, r)
    fig.suptitle("Which training patches the greedy coreset keeps")
    return fig


def greedy_steps_view(points: torch.Tensor, orders: Mapping[str, torch.Tensor], k: int) -> tuple[Figure, dict[str, Any]]:
    """Chapter 3's step-by-step figure: the first ``k`` picks of each pick order, one panel each.

    ``points`` (N, 2) is the bank, ``orders`` maps a name ("greedy", "random") to a pick order of
    more than ``k`` indices. Each panel shows the picks so far, the pick ``k + 1`` (a star), and the
    worst-covered point (Algorithm 1's objective, ``measures.worst_covered``) with a dashed circle of
    the coverage radius r_k around it, which reaches its nearest pick. Numbers per name:
    ``radius_<name>``, ``next_<name>`` and ``worst_<name>`` (indices into ``points``).
    """
    short = [name for name, order in orders.items() if not 1 <= k < len(order)]
    if short:
        raise ValueError(f"k must be >= 1 and below each order's length (the next pick is drawn); k={k}, {short}")
    fig = Figure(figsize=(5.6 * len(orders), 5.2), layout="constrained")
    xy = points.numpy()
    numbers: dict[str, Any] = {"k": k}
    for ax, (name, order) in zip(fig.subplots(1, len(orders), sharex=True, sharey=True, squeeze=False)[0], orders.items()):
        picks, upcoming = order[:k], int(order[k])
        worst, radius = worst_covered(points, picks)
        nearest = int(picks[torch.cdist(points[[worst]].double(), points[picks].double()).argmin()])
        ax.scatter(*xy.T, s=4, c="lightgrey", label=f"bank ({len(xy)} points)")
        ax.scatter(*xy[picks.numpy()].T, s=28, c="tab:blue", label=f"{k} picks so far")
        ax.scatter(*xy[upcoming], s=260, marker="*", c="tab:orange", edgecolors="black", zorder=3,
                   label=f"pick {k + 1}")
        ax.add_patch(Circle(xy[worst], radius, fill=False, linestyle="--", color="black"))
        ax.plot(*xy[[worst, nearest]].T, color="black", linewidth=1, label=f"coverage radius r = {radius:.2f}")
        ax.scatter(*xy[worst], s=60, facecolors="none", edgecolors="black", linewidths=1.5, label="worst-covered point")
        ax.set(title=f"{name}: k = {k}, coverage radius {radius:.2f}", xlabel="feature 1", ylabel="feature 2",
               aspect="equal")
        ax.legend(loc="upper right", fontsize=8)
        numbers.update({f"radius_{name}": radius, f"next_{name}": upcoming, f"worst_{name}": worst})
    fig.suptitle(f"Step {k + 1}: which point each method picks next")
    return fig, numbers


def reweight_view(
    weights: Mapping[int, np.ndarray], s_star: np.ndarray, labels: np.ndarray, picture: Mapping[str, Any], b: int
) -> tuple[Figure, dict[str, Any]]:
    """Chapter 4's eq. 7 figure: what the neighbourhood size b does to the weights and image scores.

    ``weights[b]`` (B,) are eq. 7's weights ``s / s*`` of every test image at that b, ``s_star`` (B,)
    the eq. 6 scores, ``labels`` (B,). ``picture`` holds one test image's ``image``, ``map``,
    ``mask`` and its position ``index`` in the test set. Numbers: that image's ``weight`` and
    ``score``, the weights' ``weight_min``/``weight_max``, and ``measures.ranking_changes`` from
    eq. 6 to eq. 7 at this b (Kendall tau, flipped pairs, AUROC before and after).
    """
    if b not in weights:
        raise ValueError(f"no precomputed weights for b={b}; choose one of {sorted(weights)}")
    bs, w, labels = sorted(weights), np.asarray(weights[b]), np.asarray(labels)
    i = picture["index"]
    fig = Figure(figsize=(14, 4.2), layout="constrained")
    image_ax, weight_ax, score_ax = fig.subplots(1, 3)
    overlay(picture["image"], picture["map"], picture["mask"], ax=image_ax,
            title=f"test image {i}: s* = {s_star[i]:.2f}, weight {w[i]:.4f}")
    for j in range(len(labels)):
        anomalous = bool(labels[j])
        weight_ax.plot(bs, [weights[c][j] for c in bs], marker="o", markersize=3, alpha=0.9 if j == i else 0.5,
                       linewidth=2.5 if j == i else 1, linestyle="-" if anomalous else "--",
                       color="tab:orange" if anomalous else "tab:blue")
    weight_ax.plot(bs, [1 - 1 / c for c in bs], "k:", label="lower bound 1 - 1/b")
    weight_ax.axvline(b, color="grey", linestyle="--", label=f"b = {b}")
    weight_ax.plot([], [], color="tab:orange", label="anomalous test images")
    weight_ax.plot([], [], color="tab:blue", linestyle="--", label="normal test images")
    weight_ax.set(xscale="log", xlabel="b (neighbours of m* in eq. 7)", ylabel="weight s / s*",
                  title="Eq. 7's weight of every test image")
    weight_ax.set_xticks(bs, [str(c) for c in bs], minor=False)
    weight_ax.minorticks_off()
    weight_ax.legend(fontsize=8, loc="lower right")
    s = w * s_star
    for value, name, colour in ((0, "normal", "tab:blue"), (1, "anomalous", "tab:orange")):
        score_ax.scatter(s_star[labels == value], s[labels == value], s=22, c=colour, label=name)
    line = np.array([min(s.min(), s_star.min()), s_star.max()])
    score_ax.plot(line, line, "k--", linewidth=1, label="s = s* (weight 1)")
    change = ranking_changes(s_star, s, labels)
    score_ax.set(xlabel="s* (eq. 6)", ylabel=f"s (eq. 7, b = {b})",
                 title=f"Image scores: AUROC {change['auroc_before']:.3f} (eq. 6), {change['auroc_after']:.3f} (eq. 7)")
    score_ax.legend(fontsize=8)
    fig.suptitle(f"Reweighting (eq. 7) with the b = {b} nearest bank patches of m*")
    return fig, {"b": b, "weight": float(w[i]), "score": float(s[i]), "weight_min": float(w.min()),
                 "weight_max": float(w.max()), **change}




def threshold_view(
    labels: np.ndarray, scores: np.ndarray, image: np.ndarray, anomaly_map: np.ndarray, mask: np.ndarray,
    threshold: float,
) -> tuple[Figure, dict[str, Any]]:
    """One decision threshold t: its operating point on the image ROC curve, and one image's region map >= t.

    An image is flagged when its score is >= t; the image's predicted region is where its anomaly map
    is >= t (with eq. 6 alone the image score is the map's maximum before blurring, so the two agree).
    """
    labels, scores = np.asarray(labels), np.asarray(scores)
    flagged = scores >= threshold
    fpr, tpr = float(flagged[labels == 0].mean()), float(flagged[labels == 1].mean())
    figure = Figure(figsize=(9, 4), layout="constrained")
    roc_ax, image_ax = figure.subplots(1, 2)
    plot_roc(labels, scores, ax=roc_ax, label="PatchCore")
    roc_ax.plot([fpr], [tpr], "o", color="crimson", markersize=9, label=f"t = {threshold:.3g}")
    roc_ax.legend(loc="lower right")
    predicted = anomaly_map >= threshold
    overlay(image, anomaly_map, mask, ax=image_ax, title=f"map >= t: {predicted.mean():.1%} of the image")
    if predicted.any():
        image_ax.contour(predicted.astype(np.float32), levels=[0.5], colors="crimson", linewidths=1.2)
    return figure, {"threshold": threshold, "fpr": fpr, "tpr": tpr, "flagged": int(flagged.sum()),
                    "region_share": float(predicted.mean())}


def blur_view(
    patch_grid: torch.Tensor, image: np.ndarray, mask: np.ndarray, sigma: float
) -> tuple[Figure, dict[str, Any]]:
    """One image's anomaly map (Sec. 3.3: patch scores upsampled, blurred by a Gaussian of ``sigma``) over the image.

    ``patch_grid`` (h, w) are the image's patch scores; sigma = 0 shows the upsampled map unblurred.
    The numbers: the map's maximum and the share of the ground truth above the map's median.
    """
    anomaly_map = anomaly_maps(patch_grid[None], tuple(mask.shape), sigma)[0].numpy()
    figure = overlay(image, anomaly_map, mask, title=f"anomaly map, sigma = {sigma:g}")
    inside = anomaly_map[mask.astype(bool)]
    return figure, {"sigma": sigma, "max": float(anomaly_map.max()),
                    "defect_above_median": float((inside > np.median(anomaly_map)).mean()) if inside.size else 0.0}
