"""Metrics against hand-computed answers and slow reference implementations of their definitions."""

from bisect import bisect

import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import roc_auc_score

from patchcore_lite.metrics import (
    aupro,
    compute_metrics,
    f1_optimal_threshold,
    image_auroc,
    pixel_auroc,
    pro_curve,
    region_overlaps,
)


def reference_aupro(masks: np.ndarray, maps: np.ndarray, fpr_limit: float) -> float:
    """MVTec AD's evaluation written plainly: loop over every distinct score as a threshold."""
    regions = []
    for i, mask in enumerate(masks):
        labelled, n = ndimage.label(mask, structure=np.ones((3, 3)))
        regions += [(i, labelled == k) for k in range(1, n + 1)]
    normal = ~masks
    fprs, pros = [0.0], [0.0]
    for t in np.unique(maps)[::-1]:
        detected = maps >= t
        fprs.append((detected & normal).sum() / normal.sum())
        pros.append(np.mean([detected[i][region].mean() for i, region in regions]))
    return reference_trapezoid(np.array(fprs), np.array(pros), fpr_limit) / fpr_limit


def reference_trapezoid(x: np.ndarray, y: np.ndarray, x_max: float) -> float:
    """Trapezoid area up to x_max, interpolating y at x_max (as in MVTec AD's generic_util.trapezoid)."""
    correction = 0.0
    if x_max not in x:
        i = bisect(x, x_max)
        y_at = y[i - 1] + (y[i] - y[i - 1]) * (x_max - x[i - 1]) / (x[i] - x[i - 1])
        correction = 0.5 * (y_at + y[i - 1]) * (x_max - x[i - 1])
    keep = x <= x_max
    return float(np.sum(0.5 * (y[keep][1:] + y[keep][:-1]) * np.diff(x[keep]))) + correction


def random_case(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Small masks with blobs and stray pixels (diagonal contacts, empty images) and maps with ties."""
    rng = np.random.default_rng(seed)
    masks = rng.random((4, 14, 16)) < 0.04
    masks[0, 2:6, 3:9] = True
    masks[1, 8:13, 10:12] = True
    masks[3] = False
    maps = (rng.random(masks.shape) + 0.6 * masks * rng.random(masks.shape)).round(2).astype(np.float32)
    return masks, maps


def two_regions() -> tuple[np.ndarray, np.ndarray]:
    """Regions of 4 and 16 pixels; scores: small region 3, half the normals 2, large region 1.5, rest 1.

    PRO curve: (0, 0), (0, 0.5), (0.5, 0.5), (0.5, 1), (1, 1).
    """
    masks = np.zeros((1, 10, 10), dtype=bool)
    masks[0, 1:3, 1:3] = True
    masks[0, 5:9, 5:9] = True
    maps = np.ones((1, 10, 10), dtype=np.float32)
    maps.reshape(-1)[np.flatnonzero(~masks)[:40]] = 2.0  # 40 of the 80 normal pixels
    maps[0, 1:3, 1:3] = 3.0
    maps[0, 5:9, 5:9] = 1.5
    return masks, maps


# image AUROC


def test_image_auroc_extremes_and_ties():
    labels = [0, 0, 1, 1]
    assert image_auroc(labels, [0.1, 0.2, 0.8, 0.9]) == 1.0
    assert image_auroc(labels, [0.9, 0.8, 0.2, 0.1]) == 0.0
    assert image_auroc(labels, [0.5, 0.5, 0.5, 0.5]) == 0.5


def test_image_auroc_hand_case():
    # Pairs (anomalous, normal) ranked right: (0.35 > 0.1), (0.8 > 0.1), (0.8 > 0.4); wrong: (0.35 < 0.4).
    assert image_auroc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == 0.75


def test_image_auroc_needs_both_classes():
    with pytest.raises(ValueError, match="both normal and anomalous"):
        image_auroc([0, 0, 0], [0.1, 0.2, 0.3])


def test_image_inputs_checked():
    with pytest.raises(ValueError, match="equal length"):
        image_auroc([0, 1], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="0 \\(normal\\) or 1"):
        image_auroc([0, 2], [0.1, 0.2])


def test_f1_optimal_threshold_hand_case():
    # Thresholds 0.8, 0.4, 0.35, 0.1 give F1 2/3, 1/2, 4/5, 2/3.
    threshold, f1 = f1_optimal_threshold([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8])
    assert threshold == 0.35
    assert f1 == pytest.approx(0.8)


# pixel AUROC


@pytest.mark.parametrize("seed", range(4))
def test_pixel_auroc_matches_sklearn(seed):
    rng = np.random.default_rng(seed)
    masks = rng.random((3, 9, 11)) < 0.2
    # Ties, negative scores, -0.0 and +0.0 exercise the integer sort keys.
    maps = (rng.standard_normal(masks.shape) + masks).round(1).astype(np.float32)
    expected = roc_auc_score(masks.ravel(), maps.ravel())
    original = maps.copy()
    assert pixel_auroc(masks, maps) == pytest.approx(expected, abs=1e-12)
    np.testing.assert_array_equal(maps, original)  # the sort keys are built in a copy
    assert pixel_auroc(masks.astype(np.uint8), maps.astype(np.float64)) == pytest.approx(expected, abs=1e-12)


def test_pixel_auroc_signed_zero_and_infinities_tie_correctly():
    # Anomalous 0.0 ties normal -0.0 (one half); the other three pairs are ordered.
    masks = np.array([[[1, 0, 1, 0]]], dtype=bool)
    assert pixel_auroc(masks, np.array([[[0.0, -0.0, np.inf, -np.inf]]])) == 0.875
    assert pixel_auroc(masks, np.array([[[-0.0, 0.0, -np.inf, np.inf]]])) == 0.125
    assert pixel_auroc(masks, np.array([[[-0.0, 0.0, 0.0, -0.0]]])) == 0.5


def test_pixel_metrics_reject_bad_shapes_and_values():
    masks = np.zeros((2, 4, 4), dtype=bool)
    with pytest.raises(ValueError, match="shape"):
        pixel_auroc(masks, np.zeros((2, 4, 5)))
    with pytest.raises(ValueError, match="shape"):
        aupro(masks[0], np.zeros((4, 4)))
    masks[0, 1, 1] = True
    with pytest.raises(ValueError, match="0/1"):
        pixel_auroc(masks * np.uint8(255), np.zeros((2, 4, 4)))
    with pytest.raises(ValueError, match="NaN"):
        pixel_auroc(masks, np.full((2, 4, 4), np.nan))
    with pytest.raises(ValueError, match="both normal and anomalous pixels"):
        pixel_auroc(np.zeros_like(masks), np.zeros((2, 4, 4)))


# AUPRO


def test_aupro_perfect_map_is_one():
    masks, _ = random_case(0)
    assert aupro(masks, masks.astype(np.float32)) == pytest.approx(1.0, abs=1e-12)


def test_aupro_constant_map_follows_the_diagonal():
    masks, _ = random_case(1)
    constant = np.zeros(masks.shape, dtype=np.float32)
    fpr, pro = pro_curve(masks, constant, fpr_limit=0.3)
    np.testing.assert_allclose(fpr, [0.0, 0.3])
    np.testing.assert_allclose(pro, [0.0, 0.3])  # interpolated at the limit on the segment (0, 0)-(1, 1)
    assert aupro(masks, constant, 0.3) == pytest.approx(0.15)
    assert aupro(masks, constant, 1.0) == pytest.approx(0.5)


def test_aupro_two_regions_known_curve():
    masks, maps = two_regions()
    fpr, pro = pro_curve(masks, maps, fpr_limit=1.0)
    np.testing.assert_allclose(fpr, [0, 0, 0.5, 0.5, 1])
    np.testing.assert_allclose(pro, [0, 0.5, 0.5, 1, 1])
    assert aupro(masks, maps, 0.3) == pytest.approx(0.5)
    assert aupro(masks, maps, 0.6) == pytest.approx((0.5 * 0.5 + 0.1 * 1.0) / 0.6)
    assert aupro(masks, maps, 1.0) == pytest.approx(0.75)


def test_aupro_regions_are_eight_connected():
    # Two diagonal pixels form one region and a lone pixel another: detecting one diagonal pixel first
    # covers half of one region of two (PRO 0.25); with 4-connectivity it would be 1 of 3 regions (1/3).
    masks = np.zeros((1, 6, 6), dtype=bool)
    masks[0, 1, 1] = masks[0, 2, 2] = masks[0, 5, 5] = True
    maps = np.zeros((1, 6, 6), dtype=np.float32)
    maps[0, 1, 1] = 1.0
    fpr, pro = pro_curve(masks, maps, fpr_limit=1.0)
    assert (fpr[1], pro[1]) == (0.0, 0.25)


def test_aupro_normal_images_add_false_positives():
    masks, maps = two_regions()
    hot_normal_image = np.full((1, 10, 10), 2.5, dtype=np.float32)  # above everything but the small region
    masks2 = np.concatenate([masks, np.zeros_like(masks)])
    fpr, pro = pro_curve(masks2, np.concatenate([maps, hot_normal_image]), fpr_limit=1.0)
    # Thresholds 3, 2.5, 2, 1.5, 1 over 80 + 100 normal pixels.
    np.testing.assert_allclose(fpr, [0, 0, 100 / 180, 140 / 180, 140 / 180, 1])
    np.testing.assert_allclose(pro, [0, 0.5, 0.5, 0.5, 1, 1])


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("fpr_limit", [0.05, 0.3, 1.0])
def test_aupro_matches_brute_force_reference(seed, fpr_limit):
    masks, maps = random_case(seed)
    value = aupro(masks, maps, fpr_limit)
    assert value == pytest.approx(reference_aupro(masks, maps, fpr_limit), abs=1e-9)
    assert 0 <= value <= 1


def test_pro_curve_ends_at_the_limit_and_never_exceeds_one():
    masks, maps = random_case(7)
    fpr, pro = pro_curve(masks, maps, fpr_limit=0.3)
    assert fpr[0] == pro[0] == 0 and fpr[-1] == 0.3
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(pro) >= 0) and pro.max() <= 1


def test_aupro_needs_regions_and_a_valid_limit():
    masks, maps = random_case(0)
    with pytest.raises(ValueError, match="anomalous regions"):
        aupro(np.zeros_like(masks), maps)
    with pytest.raises(ValueError, match="fpr_limit"):
        aupro(masks, maps, fpr_limit=0.0)


def test_region_overlaps_count_8_connected_regions():
    mask = np.zeros((6, 6), dtype=bool)
    mask[0, 0] = mask[1, 1] = True  # diagonal neighbours: one region of 2 pixels
    mask[4:6, 3:6] = True  # a second region of 6 pixels
    amap = np.zeros((6, 6))
    amap[0, 0] = 1.0
    amap[4, 3:6] = 1.0
    regions = region_overlaps(mask, amap, threshold=0.5)
    assert [(r["region"], r["pixels"], r["overlap"]) for r in regions] == [(1, 2, 0.5), (2, 6, 0.5)]
    assert region_overlaps(np.zeros((3, 3)), np.ones((3, 3)), 0.5) == []
    with pytest.raises(ValueError, match="same shape"):
        region_overlaps(mask, amap[:5], 0.5)


def test_region_overlaps_average_to_the_pro_curve():
    masks, maps = two_regions()
    _, pro = pro_curve(masks, maps, fpr_limit=1.0)  # thresholds 3, 2, 1.5, 1
    for t, expected in zip((3.0, 2.0, 1.5, 1.0), pro[1:]):
        regions = region_overlaps(masks[0], maps[0], t)
        assert [r["pixels"] for r in regions] == [4, 16]
        assert np.mean([r["overlap"] for r in regions]) == expected

# compute_metrics and tables


def test_evaluate_image_only_and_with_pixels():
    masks, maps = random_case(2)
    labels = masks.reshape(len(masks), -1).any(axis=1).astype(int)
    scores = maps.reshape(len(maps), -1).max(axis=1)
    assert compute_metrics(labels, scores) == {"image_auroc": image_auroc(labels, scores)}
    result = compute_metrics(labels, scores, masks, maps, fpr_limit=0.3)
    assert result == {
        "image_auroc": image_auroc(labels, scores),
        "pixel_auroc": pixel_auroc(masks, maps),
        "aupro": aupro(masks, maps, 0.3),
    }
    # All-zero masks (e.g. anomalous images without pixel annotations): image level only.
    assert set(compute_metrics(labels, scores, np.zeros_like(masks), maps)) == {"image_auroc"}


def test_evaluate_rejects_inconsistent_inputs():
    masks, maps = random_case(2)
    with pytest.raises(ValueError, match="labelled normal"):
        compute_metrics([0, 1, 1, 0], [0.1, 0.2, 0.3, 0.4], masks, maps)
    with pytest.raises(ValueError, match="both masks and maps"):
        compute_metrics([0, 1, 1, 0], [0.1, 0.2, 0.3, 0.4], masks)
