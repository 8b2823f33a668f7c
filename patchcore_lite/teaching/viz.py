"""Figures for detection results: map overlays, example grids, ROC and PRO curves, histograms, bar charts.

Every function builds a ``matplotlib.figure.Figure`` directly instead of going through pyplot: it
works without a display, leaves no global figure state behind, and a figure returned as a notebook
cell's result is shown once (pyplot figures would be shown a second time when the cell ends). The
other side of that choice: a figure made earlier in a cell is not shown unless passed to ``display``
(tests/test_book.py checks every chapter for such calls).
"""

from __future__ import annotations

import io
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from numpy.typing import ArrayLike
from sklearn.metrics import roc_curve

from ..metrics import image_auroc, image_level_inputs, normalised_area, pro_curve

# A chapter's interactive figure: settings in, the Figure and the numbers it shows out (widgets, flipbook).
View = Callable[..., tuple[Figure, dict[str, Any]]]

_MASK_COLOUR = "lime"
_MAX_CURVE_POINTS = 4000  # a PRO curve has one point per distinct pixel score: millions


def png_bytes(figure: Figure, dpi: float | None = None) -> bytes:
    """The figure as PNG file contents (for an ipywidgets Image, a flipbook frame or a file)."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


def overlay(
    image_hwc_01: ArrayLike,
    anomaly_map: ArrayLike,
    mask: ArrayLike | None = None,
    ax: Axes | None = None,
    alpha: float = 0.5,
    vmin: float | None = None,
    vmax: float | None = None,
    title: str = "anomaly map",
    outline_label: str = "ground truth",
) -> Figure:
    """Draw the anomaly map as a heat map over the image, with the ground-truth outline if given.

    The image is (H, W, 3) or (H, W) with values in [0, 1]; map and mask are (H, W). Pass the same
    ``vmin``/``vmax`` to several overlays to compare them on one colour scale. ``outline_label`` names
    the mask's outline in the legend.
    """
    image, anomaly_map = _image_01(image_hwc_01), np.asarray(anomaly_map)
    if anomaly_map.shape != image.shape[:2]:
        raise ValueError(f"anomaly map shape {anomaly_map.shape} does not match image shape {image.shape[:2]}")
    ax = ax if ax is not None else Figure(figsize=(4.5, 4), layout="constrained").add_subplot()
    ax.imshow(image, cmap="gray", vmin=0, vmax=1)  # cmap and limits only apply to grey images
    heat = ax.imshow(anomaly_map, cmap="jet", alpha=alpha, vmin=vmin, vmax=vmax)
    ax.figure.colorbar(heat, ax=ax, label="anomaly score")
    if mask is not None:
        _outline(ax, mask, image.shape[:2], outline_label)
    _image_axes(ax, title)
    return ax.figure


def plot_examples(
    images: ArrayLike,
    maps: ArrayLike,
    masks: ArrayLike,
    scores: ArrayLike,
    labels: ArrayLike,
    n: int = 6,
    indices: Sequence[int] | None = None,
    title: str = "Test images, ground truth and anomaly maps",
) -> Figure:
    """One row per example: image | ground-truth mask | map overlay, all maps on one colour scale.

    Without ``indices``, shows up to ``n`` images: the first anomalous ones (half, rounded up) and
    then the first normal ones, in dataset order.
    """
    images, maps, masks, scores, labels = _gallery_inputs(images, maps, masks, scores, labels)
    chosen = _pick_examples(labels, n) if indices is None else np.asarray(indices, dtype=int)
    if chosen.size == 0 or not ((0 <= chosen) & (chosen < len(maps))).all():
        raise ValueError(f"indices must select at least one of the {len(maps)} images; got {chosen.tolist()}")
    fig = Figure(figsize=(10, 3 * len(chosen)), layout="constrained")
    fig.suptitle(title)
    vmin, vmax = float(maps[chosen].min()), float(maps[chosen].max())
    for row, i in zip(fig.subplots(len(chosen), 3, squeeze=False), chosen):
        row[0].imshow(_image_01(images[i]), cmap="gray", vmin=0, vmax=1)
        _image_axes(row[0], f"image {i}")
        row[0].set_ylabel(f"{'anomalous' if labels[i] else 'normal'}\nscore {scores[i]:.3g}")
        row[1].imshow(masks[i], cmap="gray", vmin=0, vmax=1)
        _image_axes(row[1], "ground truth")
        overlay(images[i], maps[i], masks[i], ax=row[2], vmin=vmin, vmax=vmax)
    return fig


def failure_cases(labels: ArrayLike, scores: ArrayLike, n: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """The worst ranked test images: up to ``n`` normal ones with the highest scores (worst first)
    and up to ``n`` anomalous ones with the lowest (worst first), as two index arrays.

    They are the images that cost AUROC most: a normal image ranked above k anomalous ones breaks
    k of the (anomalous, normal) pairs image AUROC counts. Ties keep dataset order.
    """
    if n < 1:
        raise ValueError(f"n must be at least 1, not {n}")
    labels, scores = image_level_inputs(labels, scores, both_classes=False)
    normal, anomalous = np.flatnonzero(~labels), np.flatnonzero(labels)
    worst_normal = normal[np.argsort(-scores[normal], kind="stable")[:n]]
    worst_anomalous = anomalous[np.argsort(scores[anomalous], kind="stable")[:n]]
    return worst_normal, worst_anomalous


def _case_kind(anomalous: bool, score: float, threshold: float | None) -> str:
    """What a gallery image is: an error only where the threshold makes it one."""
    if threshold is None:
        return "lowest-scored anomalous" if anomalous else "highest-scored normal"
    if anomalous:
        return "false negative" if score < threshold else "caught, lowest-scored anomalous"
    return "false positive" if score >= threshold else "passed, highest-scored normal"


def plot_failures(
    images: ArrayLike,
    maps: ArrayLike,
    masks: ArrayLike,
    scores: ArrayLike,
    labels: ArrayLike,
    n: int = 3,
    threshold: float | None = None,
    defects: Sequence[str] | None = None,
    title: str = "Failure gallery: the highest-scored normal and the lowest-scored anomalous images",
) -> Figure:
    """A failure gallery: one column per case of ``failure_cases`` (highest-scored normal images, then
    lowest-scored anomalous ones), rows image | ground truth | anomaly map, all maps on one colour scale.

    A cross marks the map's maximum, the place the detector found most anomalous. Each title gives
    the image's score and how many images of the other class it is ranked wrongly against; with a
    ``threshold`` it also says whether the image is flagged, and ``defects`` names each image's defect.
    A case is called a false positive (negative) only when the threshold flags (passes) it: the worst
    ranked images need not be errors at a given threshold.
    """
    images, maps, masks, scores, labels = _gallery_inputs(images, maps, masks, scores, labels)
    if defects is not None and len(defects) != len(labels):
        raise ValueError(f"need one defect name per image: {len(defects)} names for {len(labels)} images")
    worst_normal, worst_anomalous = failure_cases(labels, scores, n)
    cases = [(int(i), _case_kind(False, scores[i], threshold), k + 1) for k, i in enumerate(worst_normal)]
    cases += [(int(i), _case_kind(True, scores[i], threshold), k + 1) for k, i in enumerate(worst_anomalous)]
    chosen = [i for i, _, _ in cases]
    vmin, vmax = float(maps[chosen].min()), float(maps[chosen].max())
    fig = Figure(figsize=(2.7 * len(cases) + 1, 8.2), layout="constrained")
    fig.suptitle(title)
    axes = fig.subplots(3, len(cases), squeeze=False)
    for column, (i, kind, number) in enumerate(cases):
        if not labels[i]:  # ranked above anomalous images
            relation, wrong, against = "above", scores[labels] < scores[i], "anomalous"
        else:  # ranked below normal images
            relation, wrong, against = "below", scores[~labels] > scores[i], "normal"
        name = defects[i] if defects is not None else ("anomalous" if labels[i] else "normal")
        verdict = "" if threshold is None else (", flagged" if scores[i] >= threshold else ", passed")
        y, x = np.unravel_index(int(np.argmax(maps[i])), maps[i].shape)
        image_ax, mask_ax, map_ax = axes[:, column]
        image_ax.imshow(_image_01(images[i]), cmap="gray", vmin=0, vmax=1)
        _image_axes(image_ax, f"{kind} {number}: image {i}\n{name}, score {scores[i]:.3g}{verdict}\n"
                              f"{relation} {wrong.sum()} of {len(wrong)} {against}")
        mask_ax.imshow(masks[i], cmap="gray", vmin=0, vmax=1)
        _image_axes(mask_ax, f"ground truth ({int(masks[i].sum())} px)")
        map_ax.imshow(_image_01(images[i]), cmap="gray", vmin=0, vmax=1)
        heat = map_ax.imshow(maps[i], cmap="inferno", alpha=0.6, vmin=vmin, vmax=vmax)  # colour-blind safe
        if masks[i].any():
            map_ax.contour(masks[i].astype(np.float32), levels=[0.5], colors=_MASK_COLOUR, linewidths=1)
        _image_axes(map_ax, "anomaly map")
        for ax in (image_ax, map_ax):
            ax.plot([x], [y], marker="x", markersize=10, markeredgewidth=2.5, color="white")
            ax.plot([x], [y], marker="x", markersize=8, markeredgewidth=1.2, color="black")
    fig.colorbar(heat, ax=axes[2, :].tolist(), label="anomaly score (one scale)", shrink=0.8)
    axes[2, 0].legend(handles=[Line2D([], [], color=_MASK_COLOUR, label="ground truth"),
                               Line2D([], [], color="black", marker="x", linestyle="", label="map maximum")],
                      loc="upper left", bbox_to_anchor=(0, -0.05), fontsize=8)
    return fig


def plot_roc(
    labels: ArrayLike, scores: ArrayLike, ax: Axes | None = None, label: str = "model", title: str = "Image-level ROC"
) -> Figure:
    """ROC curve of image scores, AUROC in the legend; call again with the same ``ax`` to compare models."""
    auroc = image_auroc(labels, scores)
    fpr, tpr, _ = roc_curve(*image_level_inputs(labels, scores))
    ax = _curve_axes(ax, "chance", [0, 1], [0, 1])
    ax.plot(fpr, tpr, label=f"{label} (AUROC {auroc:.3f})")
    ax.set(xlabel="false positive rate (normal images)", ylabel="true positive rate (anomalous images)", title=title)
    ax.legend(loc="lower right")
    return ax.figure


def plot_pro_curve(
    masks: ArrayLike,
    maps: ArrayLike,
    fpr_limit: float = 0.3,
    ax: Axes | None = None,
    label: str = "model",
    title: str = "Per-region overlap",
) -> Figure:
    """PRO against pixel FPR up to ``fpr_limit`` (see ``metrics.pro_curve``), AUPRO in the legend."""
    fpr, pro = pro_curve(masks, maps, fpr_limit)
    area = normalised_area(fpr, pro, fpr_limit)
    keep = np.unique(np.linspace(0, len(fpr) - 1, _MAX_CURVE_POINTS).astype(int))  # keeps both ends
    ax = _curve_axes(ax, "perfect", [0, 0, fpr_limit], [0, 1, 1])
    ax.plot(fpr[keep], pro[keep], label=f"{label} (AUPRO@{fpr_limit:g} {area:.3f})")
    ax.set(xlabel="false positive rate (normal pixels)", ylabel="per-region overlap", title=title)
    ax.legend(loc="lower right")
    return ax.figure


def plot_score_histogram(
    labels: ArrayLike,
    scores: ArrayLike,
    threshold: float | None = None,
    bins: int = 30,
    title: str = "Image anomaly scores",
) -> Figure:
    """Histograms of normal and anomalous image scores on shared bins, with an optional threshold line."""
    labels, scores = image_level_inputs(labels, scores, both_classes=False)
    edges = np.histogram_bin_edges(scores, bins)
    ax = Figure(figsize=(6, 3.5), layout="constrained").add_subplot()
    for name, selected in (("normal", ~labels), ("anomalous", labels)):
        if selected.any():
            ax.hist(scores[selected], edges, alpha=0.6, label=f"{name} ({selected.sum()})")
    if threshold is not None:
        ax.axvline(threshold, color="black", linestyle="--", label=f"threshold {threshold:.3g}")
    ax.set(xlabel="image anomaly score", ylabel="number of images", title=title)
    ax.legend()
    return ax.figure


def plot_bar(
    rows: Sequence[Mapping[str, Any]],
    metrics: Sequence[str],
    label_key: str = "name",
    title: str = "Comparison",
) -> Figure:
    """Grouped bars: one group per row (e.g. category or method, named by ``row[label_key]``), one bar per metric."""
    missing = [(i, key) for i, row in enumerate(rows) for key in (label_key, *metrics) if key not in row]
    if not rows or not metrics or missing:
        raise ValueError(f"rows need {label_key!r} and metrics {list(metrics)}; missing (row, key): {missing[:5]}")
    x, width = np.arange(len(rows)), 0.8 / len(metrics)
    ax = Figure(figsize=(max(5.0, 0.25 * len(rows) * len(metrics) + 2), 4), layout="constrained").add_subplot()
    for j, key in enumerate(metrics):
        ax.bar(x + (j - (len(metrics) - 1) / 2) * width, [float(row[key]) for row in rows], width, label=key)
    ax.set_xticks(x, [str(row[label_key]) for row in rows], rotation=30, ha="right")
    ax.set(xlabel=label_key, ylabel="value", title=title)
    ax.legend(loc="upper left", bbox_to_anchor=(1, 1))  # beside the bars: inside it hides the last group
    return ax.figure


def _image_01(image: ArrayLike) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] != 3):
        raise ValueError(f"images must be (H, W, 3) or (H, W); got shape {image.shape}")
    if image.size and (image.min() < 0 or image.max() > 1):
        raise ValueError("image values must lie in [0, 1]; divide 8-bit images by 255")
    return image


def _outline(ax: Axes, mask: ArrayLike, shape: tuple[int, ...], label: str = "ground truth") -> None:
    mask = np.asarray(mask)
    if mask.shape != shape:
        raise ValueError(f"mask shape {mask.shape} does not match image shape {shape}")
    if mask.any():  # contouring an empty mask only warns
        ax.contour(mask.astype(np.float32), levels=[0.5], colors=_MASK_COLOUR, linewidths=1)
    ax.legend(handles=[Line2D([], [], color=_MASK_COLOUR, label=label)], loc="lower right", fontsize=7)


def _image_axes(ax: Axes, title: str) -> None:
    ax.set_title(title)
    ax.set_xticks([])
    ax.set_yticks([])


def _curve_axes(ax: Axes | None, name: str, x: list[float], y: list[float]) -> Axes:
    """Axes for a curve in the unit square with a dashed reference line, drawn once per axes."""
    ax = ax if ax is not None else Figure(figsize=(5, 4.5), layout="constrained").add_subplot()
    if not any(line.get_gid() == name for line in ax.lines):
        ax.plot(x, y, linestyle="--", color="grey", label=name, gid=name)
    ax.set_xlim(0, x[-1])
    ax.set_ylim(0, 1.02)
    return ax


def _gallery_inputs(
    images: ArrayLike, maps: ArrayLike, masks: ArrayLike, scores: ArrayLike, labels: ArrayLike
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Arrays of a grid of test images, checked: images (N, H, W[, 3]), maps and masks (N, H, W), N scores and labels."""
    images, maps, masks = np.asarray(images), np.asarray(maps), np.asarray(masks)
    labels, scores = image_level_inputs(labels, scores, both_classes=False)
    if maps.ndim != 3 or masks.shape != maps.shape or images.shape[:3] != maps.shape or len(labels) != len(maps):
        raise ValueError(
            f"need images (N, H, W[, 3]), maps and masks (N, H, W), N scores and labels; got images "
            f"{images.shape}, maps {maps.shape}, masks {masks.shape}, {len(labels)} scores and labels"
        )
    return images, maps, masks, scores, labels


def _pick_examples(labels: np.ndarray, n: int) -> np.ndarray:
    if n < 1:
        raise ValueError(f"n must be at least 1, not {n}")
    anomalous, normal = np.flatnonzero(labels), np.flatnonzero(~labels)
    first = anomalous[: (n + 1) // 2]
    rest = normal[: n - len(first)]
    extra = anomalous[len(first) : n - len(rest)]  # too few normals: more anomalies instead
    return np.sort(np.concatenate([first, rest, extra]))


def flow_diagram(
    steps: Sequence[tuple[str, str]], title: str = "", loop: tuple[int, int, str] | None = None
) -> Figure:
    """A left-to-right diagram of ``steps`` (name, what it does) joined by arrows, drawn by code.

    ``loop=(from, to, label)`` adds an arrow back from step ``from`` to step ``to`` (a training loop).
    The book draws its pipeline pictures with it, so no hand-drawn image goes stale.
    """
    n = len(steps)
    figure = Figure(figsize=(2.1 * n, 2.6 if loop else 2.0), layout="constrained")
    ax = figure.add_subplot()
    ax.set(xlim=(-0.1, n - 0.1), ylim=(-1.1 if loop else -0.45, 0.6), title=title)
    ax.axis("off")
    for i, (name, detail) in enumerate(steps):
        ax.text(i + 0.4, 0.08, f"{name}\n\n{detail}", ha="center", va="center", fontsize=8, wrap=True,
                bbox={"boxstyle": "round,pad=0.5", "facecolor": "#eef3fb", "edgecolor": "#4a72b0"})
        if i + 1 < n:
            ax.annotate("", xy=(i + 0.98, 0.08), xytext=(i + 0.82, 0.08), arrowprops={"arrowstyle": "->", "lw": 1.5})
    if loop is not None:
        start, end, label = loop
        ax.annotate("", xy=(end + 0.4, -0.3), xytext=(start + 0.4, -0.3),
                    arrowprops={"arrowstyle": "->", "lw": 1.5, "color": "crimson", "connectionstyle": "arc3,rad=-0.2"})
        ax.text((start + end) / 2 + 0.4, -0.95, label, ha="center", fontsize=8, color="crimson")
    return figure
