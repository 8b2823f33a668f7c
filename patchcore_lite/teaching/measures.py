"""What the chapters measure about the method's pieces, to draw and discuss them.

* the coverage of a coreset (the k-center objective Algorithm 1 minimises greedily): its
  radius, the worst-covered point, and the radius of every prefix of a pick order (chapter 3);
* principal components of patch features, and how quickly features change across an image
  (chapters 1-3);
* how a change of image scores (eq. 7's reweighting) reorders the test images (chapter 4).

None of it is needed to fit or run a detector; all of it is tested, since figures are made of it.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from numpy.typing import ArrayLike
from scipy.stats import kendalltau
from torch import Tensor

from ..coreset import check_features
from ..metrics import image_auroc

# ---- coverage of a coreset (chapter 3) ----------------------------------------------------------


def coreset_radius(projected: Tensor, indices: Tensor) -> float:
    """Coverage radius ``max_m min_{n in coreset} ||m - n||_2`` (the k-center objective of Algorithm 1).

    The last value of ``coverage_curve``, computed directly: float64, in chunks of at most
    2^22 distances (no N x N matrix).
    """
    return worst_covered(projected, indices)[1]


def worst_covered(projected: Tensor, indices: Tensor) -> tuple[int, float]:
    """The bank element farthest from the coreset, and its distance (the coverage radius).

    ``argmax_m min_{n in coreset} ||m - n||_2`` and that maximum: the point Algorithm 1
    picks next (with the single start, up to float rounding of near-ties); the lowest index wins
    a tie. Float64, in chunks of at most 2^22 distances (no N x N matrix).
    """
    check_features(projected)
    sel = projected[indices].double()
    if len(sel) == 0:
        raise ValueError("the coreset is empty")
    worst, radius, offset = 0, -1.0, 0
    for chunk in projected.split(max(1, 2**22 // len(sel))):
        nearest = torch.cdist(chunk.double(), sel).amin(dim=1)
        j = int(torch.argmax(nearest))
        if nearest[j].item() > radius:
            worst, radius = offset + j, nearest[j].item()
        offset += len(chunk)
    return worst, radius


def coverage_curve(points: Tensor, order: Tensor, block: int = 256) -> np.ndarray:
    """Coverage radius of every prefix of a pick order: ``r_k = max_m min_{first k picks c} ||m - c||``.

    ``r_k`` is Algorithm 1's k-center objective for the first k picks (k = 1 .. len(order)).
    Greedy picks are nested (the first k picks of a longer run are the k-pick run), so one
    curve gives the radius of every coreset ratio. Works on ``block`` picks and about
    2^22 / ``block`` points at a time, with a running minimum along the picks: never N x N.
    In float64 for float64 points, else in float32.
    """
    check_features(points)
    order = torch.as_tensor(order, dtype=torch.long)
    if len(order) == 0:
        raise ValueError("the coreset is empty")
    x = points if points.dtype == torch.float64 else points.float()
    x = x - x.mean(dim=0)  # distances are translation invariant; centring keeps the products accurate
    curve = torch.zeros(len(order), dtype=x.dtype)
    for rows in x.split(max(1, 2**22 // block)):
        nearest = torch.full((len(rows), 1), math.inf, dtype=x.dtype)  # distance to the nearest pick so far
        for start, chunk in zip(range(0, len(order), block), order.split(block)):
            running = torch.minimum(torch.cdist(rows, x[chunk]).cummin(dim=1).values, nearest)
            part = curve[start : start + len(chunk)]
            torch.maximum(part, running.amax(dim=0), out=part)
            nearest = running[:, -1:]
    return curve.double().numpy()


# ---- patch features (chapters 1-3) ---------------------------------------------------------------


def principal_components(x: torch.Tensor, k: int = 2) -> np.ndarray:
    """Coordinates (N, k) of the rows of ``x`` (N, D) along their first k principal axes.

    An axis's sign is arbitrary; it is fixed so that the axis's loadings sum to >= 0,
    which keeps the results of related inputs (e.g. feature grids) comparable.
    """
    x = x.double() - x.double().mean(dim=0)
    _, _, vh = torch.linalg.svd(x, full_matrices=False)
    axes = vh[:k] * torch.where(vh[:k].sum(dim=1, keepdim=True) >= 0, 1.0, -1.0)
    return (x @ axes.T).float().numpy()


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


# ---- image rankings (chapter 4) ------------------------------------------------------------------


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
