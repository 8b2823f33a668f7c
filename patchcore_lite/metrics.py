"""Evaluation metrics: image AUROC, pixel AUROC, AUPRO and F1-optimal thresholds.

A test set holds tens of millions of pixels (MVTec AD: ~30M), so the pixel metrics share one sort
of all pixel scores and then keep only integer counts per distinct score. They are exact (no
score binning) and never hold float64 copies of the maps or threshold-by-region matrices.
Pixel scores are compared in float32, the precision the detectors produce (float64 maps are
rounded to it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike
from scipy import ndimage
from sklearn.metrics import precision_recall_curve, roc_auc_score

# What ``compute_metrics`` returns, with the names figures and tables print.
METRIC_LABELS = {"image_auroc": "image AUROC", "pixel_auroc": "pixel AUROC", "aupro": "AUPRO"}
# MVTec AD's evaluation counts diagonally touching defect pixels as one region.
_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


def image_level_inputs(
    labels: ArrayLike, scores: ArrayLike, both_classes: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Check per-image labels (0 normal, 1 anomalous) and scores; return them as 1-D arrays."""
    labels, scores = np.asarray(labels), np.asarray(scores, dtype=np.float64)
    if labels.ndim != 1 or labels.shape != scores.shape:
        raise ValueError(f"labels and scores must be 1-D of equal length; got shapes {labels.shape}, {scores.shape}")
    if not np.isin(labels, (0, 1)).all():
        raise ValueError("labels must be 0 (normal) or 1 (anomalous)")
    if np.isnan(scores).any():
        raise ValueError("scores contain NaN")
    if both_classes and np.unique(labels).size < 2:
        raise ValueError("the test set needs both normal and anomalous images to rank them; it holds only one class")
    return labels.astype(bool), scores


def image_auroc(labels: ArrayLike, scores: ArrayLike) -> float:
    """Area under the ROC curve of image scores (higher score = more anomalous); ties count one half."""
    return float(roc_auc_score(*image_level_inputs(labels, scores)))


def f1_optimal_threshold(labels: ArrayLike, scores: ArrayLike) -> tuple[float, float]:
    """Return (threshold, F1) maximising F1 = 2PR / (P + R) when ``score >= threshold`` means anomalous.

    Pick the threshold on data the model may see (a validation split with both classes), never
    on the test set: a threshold tuned on the test images makes any test F1 optimistic.
    """
    precision, recall, thresholds = precision_recall_curve(*image_level_inputs(labels, scores))
    f1 = 2 * precision * recall / np.maximum(precision + recall, np.finfo(float).tiny)
    best = int(np.argmax(f1[:-1]))  # the final PR point (recall 0) has no threshold
    return float(thresholds[best]), float(f1[best])


def pixel_auroc(masks: ArrayLike, maps: ArrayLike) -> float:
    """Area under the ROC curve over all pixels of all images (masks (N, H, W) 0/1, maps (N, H, W))."""
    return _pixel_auroc(_rank_pixels(masks, maps))


def pro_curve(masks: ArrayLike, maps: ArrayLike, fpr_limit: float = 0.3) -> tuple[np.ndarray, np.ndarray]:
    """Per-region overlap (PRO) against false positive rate, from FPR 0 up to ``fpr_limit``.

    MVTec AD's definition (Bergmann et al., IJCV 2021): the regions are the 8-connected components
    of each ground-truth mask; at each threshold t (every distinct score), FPR is the fraction of
    normal pixels (of all images) scoring >= t and PRO the mean over all regions of the fraction of
    the region scoring >= t. The curve starts at (0, 0); its last point is interpolated at the limit.
    """
    return _pro_curve(_rank_pixels(masks, maps), fpr_limit)


def region_overlaps(mask: ArrayLike, anomaly_map: ArrayLike, threshold: float) -> list[dict[str, float]]:
    """PRO's ingredients for one image at one threshold: each 8-connected defect region's size and
    the fraction of it scoring >= ``threshold``, with the regions numbered as ``pro_curve`` numbers them."""
    mask, anomaly_map = np.asarray(mask, bool), np.asarray(anomaly_map)
    if mask.shape != anomaly_map.shape:
        raise ValueError(f"mask {mask.shape} and map {anomaly_map.shape} must have the same shape")
    ids, sizes = _label_regions(mask[None])
    hits = np.bincount(ids, weights=(anomaly_map >= threshold).ravel(), minlength=sizes.size)
    return [
        {"region": r, "pixels": int(sizes[r]), "overlap": float(hits[r] / sizes[r])} for r in range(1, sizes.size)
    ]


def aupro(masks: ArrayLike, maps: ArrayLike, fpr_limit: float = 0.3) -> float:
    """Area under the PRO curve up to ``fpr_limit`` (trapezoid rule) divided by ``fpr_limit``: 1 is perfect."""
    return normalised_area(*pro_curve(masks, maps, fpr_limit), fpr_limit)


def normalised_area(fpr: np.ndarray, pro: np.ndarray, fpr_limit: float) -> float:
    """Trapezoid area under a ``pro_curve`` divided by its FPR limit (clipped so rounding never passes 1)."""
    return min(float(np.trapezoid(pro, fpr)) / fpr_limit, 1.0)


def compute_metrics(
    labels: ArrayLike,
    scores: ArrayLike,
    masks: ArrayLike | None = None,
    maps: ArrayLike | None = None,
    fpr_limit: float = 0.3,
) -> dict[str, float]:
    """Image AUROC, plus pixel AUROC and AUPRO when masks and maps are given and any pixel is anomalous.

    Masks of normal images are all zeros; anomalous images with empty masks only count at image
    level. The pixel metrics share one sort of the pixel scores.
    """
    results = {"image_auroc": image_auroc(labels, scores)}
    if (masks is None) != (maps is None):
        raise ValueError("pass both masks and maps for pixel metrics, or neither")
    if masks is None:
        return results
    masks, maps = _pixel_inputs(masks, maps)
    _check_masks_match_labels(masks, np.asarray(labels))
    if masks.any():
        ranking = _rank_pixels(masks, maps)
        results["pixel_auroc"] = _pixel_auroc(ranking)
        results["aupro"] = normalised_area(*_pro_curve(ranking, fpr_limit), fpr_limit)
    return results


def _check_masks_match_labels(masks: np.ndarray, labels: np.ndarray) -> None:
    if len(masks) != len(labels):
        raise ValueError(f"{len(masks)} masks for {len(labels)} labelled images")
    marked = masks.reshape(len(masks), -1).any(axis=1)
    wrong = np.flatnonzero(marked & (labels == 0))
    if wrong.size:
        raise ValueError(f"images {wrong[:5].tolist()} are labelled normal but their masks mark anomalous pixels")


@dataclass(frozen=True)
class _Ranking:
    """All test pixels in descending score order, grouped by distinct score (one threshold per group)."""

    ids: np.ndarray  # region id of each pixel in that order (0 = normal pixel), uint32
    fp: np.ndarray  # normal pixels scoring >= each group's score, int64
    tp: np.ndarray  # anomalous pixels scoring >= each group's score, int64
    region_sizes: np.ndarray  # pixels per region; index 0 counts the normal pixels


def _rank_pixels(masks: ArrayLike, maps: ArrayLike) -> _Ranking:
    masks, maps = _pixel_inputs(masks, maps)
    ids, region_sizes = _label_regions(masks)
    # Pack (descending score key, region id) into one uint64 so a plain sort (SIMD, in place)
    # orders the pixels; an argsort plus gathers is ~5x slower and needs more memory.
    keys = _descending_keys(maps).astype(np.uint64)
    keys <<= np.uint64(32)
    keys |= ids
    del ids
    keys.sort()
    ids = keys.astype(np.uint32)  # the low half
    keys >>= np.uint64(32)
    last = np.empty(keys.size, dtype=bool)
    np.not_equal(keys[1:], keys[:-1], out=last[:-1])
    last[-1] = True
    del keys
    ends = np.flatnonzero(last)
    del last
    fp = np.cumsum(ids == 0, dtype=np.int64)[ends]
    ends += 1
    ends -= fp  # pixels so far minus normal pixels so far: now the anomalous count
    return _Ranking(ids, fp, ends, region_sizes)


def _pixel_inputs(masks: ArrayLike, maps: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    masks, maps = np.asarray(masks), np.asarray(maps)
    if maps.ndim != 3 or masks.shape != maps.shape:
        raise ValueError(f"masks and maps must both have shape (N, H, W); got masks {masks.shape}, maps {maps.shape}")
    if masks.dtype != bool:
        if not ((masks == 0) | (masks == 1)).all():
            raise ValueError("masks must hold 0/1 or booleans; binarise them first, e.g. mask > 0")
        masks = masks.astype(bool)
    if maps.size == 0:
        raise ValueError("no pixels to evaluate: masks and maps are empty")
    if np.isnan(maps).any():
        raise ValueError("anomaly maps contain NaN")
    return masks, maps


def _label_regions(masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Number the 8-connected regions of all masks consecutively (0 = normal); return flat ids and sizes."""
    ids = np.zeros(masks.shape, dtype=np.uint32)
    sizes, n_regions = [], 0
    for mask, image_ids in zip(masks, ids):
        n_new = ndimage.label(mask, structure=_EIGHT_CONNECTED, output=image_ids)
        sizes.append(np.bincount(image_ids.ravel(), minlength=n_new + 1)[1:])
        np.add(image_ids, np.uint32(n_regions), out=image_ids, where=mask)
        n_regions += n_new
    return ids.ravel(), np.concatenate([[masks.size - np.count_nonzero(masks)], *sizes])


def _descending_keys(maps: np.ndarray) -> np.ndarray:
    """uint32 keys whose ascending order is the float32 scores' descending order.

    IEEE-754 floats compare like sign-magnitude integers: flip the magnitude bits of non-negative
    scores and leave negative ones, so larger scores get smaller keys. Scores are compared in
    float32, the precision the detectors produce; float64 maps are rounded to it.
    """
    # Adding 0 makes the copy the keys are built in, and turns -0.0 into 0.0 so that the two tie.
    bits = np.add(maps, np.float32(0), dtype=np.float32).view(np.uint32)
    np.bitwise_xor(bits, np.uint32(0x7FFFFFFF), out=bits, where=bits < np.uint32(0x80000000))
    return bits.ravel()


def _pixel_auroc(r: _Ranking) -> float:
    n_normal, n_anomalous = int(r.fp[-1]), int(r.tp[-1])
    if n_normal == 0 or n_anomalous == 0:
        raise ValueError("pixel AUROC needs both normal and anomalous pixels in the masks")
    # Trapezoids between consecutive (FP, TP) points in exact integer arithmetic:
    # 2 * area = sum_g (FP_g - FP_g-1) * (TP_g + TP_g-1), starting from (0, 0).
    step = np.diff(r.fp)
    twice_area = int(r.fp[0]) * int(r.tp[0]) + int(np.dot(step, r.tp[1:])) + int(np.dot(step, r.tp[:-1]))
    return twice_area / (2 * n_normal * n_anomalous)


def _pro_curve(r: _Ranking, fpr_limit: float) -> tuple[np.ndarray, np.ndarray]:
    if not 0 < fpr_limit <= 1:
        raise ValueError(f"fpr_limit must be in (0, 1], not {fpr_limit}")
    n_normal, n_regions = int(r.region_sizes[0]), r.region_sizes.size - 1
    if n_regions == 0 or n_normal == 0:
        raise ValueError("AUPRO needs anomalous regions and normal pixels; all masks are empty or all full")
    # Thresholds up to the limit, plus the first one past it to interpolate at the limit.
    k = min(int(np.searchsorted(r.fp, math.floor(fpr_limit * n_normal), side="right")), r.fp.size - 1)
    fp, ends = r.fp[: k + 1], r.fp[: k + 1] + r.tp[: k + 1] - 1
    # Sum over regions of their covered fraction = running sum of 1/|region| over region pixels.
    inverse_size = 1.0 / r.region_sizes
    inverse_size[0] = 0.0
    covered = inverse_size[r.ids[: ends[-1] + 1]]
    np.cumsum(covered, out=covered)
    fpr = np.concatenate([[0.0], fp / n_normal])
    pro = np.concatenate([[0.0], np.minimum(covered[ends] / n_regions, 1.0)])
    if fpr[-1] > fpr_limit:
        share = (fpr_limit - fpr[-2]) / (fpr[-1] - fpr[-2])
        fpr[-1], pro[-1] = fpr_limit, pro[-2] + share * (pro[-1] - pro[-2])
    return fpr, pro
