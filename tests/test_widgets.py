"""The book's widget callbacks: precomputed results, figures, numbers, and the slider that drives them."""

from functools import partial
from pathlib import Path

import ipywidgets
import numpy as np
import pytest
import torch
from matplotlib.figure import Figure

from patchcore_lite.datasets import INPUT_SIZE
from patchcore_lite.teaching import widgets
from patchcore_lite.teaching.experiments import patch_size_results
from patchcore_lite.teaching.measures import neighbour_change, principal_component_map

SIZES = (1, 3)


@pytest.fixture(scope="module")
def results(synthetic_root: Path) -> dict:
    # A 1% coreset keeps the two fits quick; the figure and numbers do not depend on it.
    return patch_size_results(synthetic_root / "tile", SIZES, coreset_ratio=0.01)


def titles(fig: Figure) -> list[str]:
    return [ax.get_title() for ax in fig.axes if ax.get_title()]


def test_results_keep_metrics_and_one_anomalous_image_per_patch_size(results):
    assert sorted(results) == list(SIZES)
    for r in results.values():
        assert set(r.metrics) == {"image_auroc", "pixel_auroc", "aupro"}
        assert all(0.5 < v <= 1 for v in r.metrics.values()), r.metrics  # far better than chance
        assert r.map.shape == r.mask.shape == (INPUT_SIZE, INPUT_SIZE) and r.mask.any()
        assert r.image.shape == (INPUT_SIZE, INPUT_SIZE, 3) and 0 <= r.image.min() and r.image.max() <= 1
        assert r.feature_map.shape == (INPUT_SIZE // 8, INPUT_SIZE // 8)  # the stride-8 grid
        assert Path(r.path).parent.name != "good"
    # The map is highest on the defect: its mean inside the mask beats the mean outside.
    r = results[3]
    assert r.map[r.mask].mean() > r.map[~r.mask].mean()


def test_larger_neighbourhoods_give_smoother_features(results):
    assert results[3].neighbour_change < results[1].neighbour_change


def test_neighbour_change_analytic():
    assert neighbour_change(torch.ones(4, 5, 3)) == 0.0
    checkerboard = torch.tensor([[0.0, 1.0], [1.0, 0.0]])[..., None]
    # Every adjacent pair differs by 1; the mean norm is 0.5.
    assert neighbour_change(checkerboard) == pytest.approx(2.0)


def test_principal_component_map_follows_the_main_direction_with_a_fixed_sign():
    columns = torch.arange(6.0).expand(4, 6)  # feature grows along the width
    along = torch.stack([columns, torch.zeros(4, 6)], dim=-1)
    against = torch.stack([-columns, torch.zeros(4, 6)], dim=-1)
    up, down = principal_component_map(along), principal_component_map(against)
    assert up.shape == (4, 6)
    np.testing.assert_allclose(up, np.tile(np.arange(6.0) - 2.5, (4, 1)), atol=1e-5)
    np.testing.assert_allclose(down, -up, atol=1e-5)  # loadings summing >= 0 fix the sign


def test_view_draws_features_map_and_metrics_and_returns_the_numbers(results):
    fig, numbers = widgets.patch_size_view(results, 3)
    assert isinstance(fig, Figure) and "3x3" in fig.get_suptitle()
    assert numbers == {"patch_size": 3, **results[3].metrics, "neighbour_change": results[3].neighbour_change}
    assert titles(fig)[:3] == [
        "p = 3: patch features (1st principal component)",
        "p = 3: anomaly map",
        "Detection and localisation vs p",
    ]
    metric_ax = next(ax for ax in fig.axes if ax.get_title().startswith("Detection"))
    legend = [t.get_text() for t in metric_ax.get_legend().get_texts()]
    assert legend == ["image auroc", "pixel auroc", "aupro", "p = 3"]
    assert metric_ax.get_xlabel() == "neighbourhood size p"
    assert list(metric_ax.lines[0].get_xdata()) == list(SIZES)


def test_view_and_grid_reject_sizes_that_were_not_computed(results):
    with pytest.raises(ValueError, match=r"p=5; choose one of \[1, 3\]"):
        widgets.patch_size_view(results, 5)
    with pytest.raises(ValueError, match=r"p=\[5\]"):
        widgets.patch_size_grid(results, (3, 5))


def test_grid_has_one_row_per_patch_size(results):
    fig = widgets.patch_size_grid(results)
    assert titles(fig) == [
        "p = 1: patch features (1st principal component)", "p = 1: anomaly map",
        "p = 3: patch features (1st principal component)", "p = 3: anomaly map",
    ]


def test_interactive_view_follows_the_slider(results):
    slider = ipywidgets.SelectionSlider(options=SIZES, value=1, description="p")
    widget = widgets.interactive_view(partial(widgets.patch_size_view, results), p=slider)
    assert widget.result["patch_size"] == 1
    slider.value = 3
    assert widget.result == widgets.patch_size_view(results, 3)[1]


def test_threshold_view_moves_the_operating_point_and_the_region():
    labels = np.array([0, 0, 0, 1, 1, 1])
    scores = np.array([0.1, 0.2, 0.6, 0.4, 0.7, 0.9])
    yy, xx = np.mgrid[:32, :32]
    anomaly_map = np.exp(-((yy - 16) ** 2 + (xx - 16) ** 2) / 50.0)  # 1 at the centre, falling off
    mask = anomaly_map > 0.5
    image = np.zeros((32, 32, 3))
    points = [widgets.threshold_view(labels, scores, image, anomaly_map, mask, t)[1] for t in (0.0, 0.5, 0.8, 1.0)]
    assert (points[0]["fpr"], points[0]["tpr"]) == (1.0, 1.0)
    assert (points[1]["fpr"], points[1]["tpr"]) == (1 / 3, 2 / 3)  # 0.6 flagged; 0.4 missed
    assert (points[3]["fpr"], points[3]["tpr"]) == (0.0, 0.0)
    shares = [p["region_share"] for p in points]
    assert shares[0] == 1.0 and shares == sorted(shares, reverse=True) and 0 < shares[2] < shares[1]


def test_blur_view_spreads_a_lone_peak():
    grid = torch.zeros(28, 28)
    grid[10, 10] = 5.0
    mask = np.zeros((224, 224), dtype=bool)
    mask[80:88, 80:88] = True  # the peak's cell
    numbers = [widgets.blur_view(grid, np.zeros((224, 224, 3)), mask, s)[1] for s in (0, 1, 4, 8)]
    peaks = [n["max"] for n in numbers]
    assert peaks == sorted(peaks, reverse=True) and peaks[-1] < peaks[0] / 4  # the blur lowers a lone outlier
    assert all(n["defect_above_median"] == 1.0 for n in numbers)  # and still marks where it was


def test_greedy_steps_view_marks_the_next_pick_and_the_worst_covered_point():
    # Points on a line: picks at 0 and 10, so 4 (4 from 0) is worst covered; greedy picks it next.
    points = torch.tensor([[0.0, 0.0], [4.0, 0.0], [7.0, 0.0], [10.0, 0.0], [13.0, 0.0]])
    orders = {"greedy": torch.tensor([0, 3, 1, 4]), "random": torch.tensor([0, 3, 4, 2])}
    fig, numbers = widgets.greedy_steps_view(points, orders, 2)
    assert numbers == {"k": 2, "radius_greedy": pytest.approx(4.0), "next_greedy": 1, "worst_greedy": 1,
                       "radius_random": pytest.approx(4.0), "next_random": 4, "worst_random": 1}
    assert titles(fig) == ["greedy: k = 2, coverage radius 4.00", "random: k = 2, coverage radius 4.00"]
    later = widgets.greedy_steps_view(points, orders, 3)[1]
    assert later["radius_greedy"] == pytest.approx(3.0) and later["radius_random"] == pytest.approx(4.0)
    for k in (0, 4):  # no pick yet, or no next pick to draw
        with pytest.raises(ValueError, match="k must be"):
            widgets.greedy_steps_view(points, orders, k)


def _reweight_inputs() -> tuple[dict[int, np.ndarray], np.ndarray, np.ndarray, dict]:
    s_star = np.array([1.0, 2.0, 3.0, 3.1])
    labels = np.array([0, 0, 1, 1])
    # b = 2 lowers the second anomalous image (3.1 -> 0.93) below the second normal one (2 -> 1).
    weights = {2: np.array([0.6, 0.5, 0.99, 0.3]), 9: np.ones(4)}
    picture = {"index": 2, "image": np.zeros((16, 16, 3)), "map": np.random.default_rng(0).random((16, 16)),
               "mask": np.zeros((16, 16), dtype=bool)}
    return weights, s_star, labels, picture


def test_reweight_view_returns_the_image_weight_and_the_ranking_changes():
    weights, s_star, labels, picture = _reweight_inputs()
    _, same = widgets.reweight_view(weights, s_star, labels, picture, 9)
    assert same["weight"] == 1.0 and same["score"] == 3.0 and same["flipped_pairs"] == 0
    assert same["auroc_before"] == same["auroc_after"] == 1.0
    fig, low = widgets.reweight_view(weights, s_star, labels, picture, 2)
    assert (low["weight"], low["score"], low["weight_min"], low["weight_max"]) == pytest.approx((0.99, 2.97, 0.3, 0.99))
    # Scores 0.6, 1.0, 2.97, 0.93: pairs (1, 3) (normal-anomalous) and (2, 3) flip; AUROC loses pair (1, 3).
    assert low["flipped_pairs"] == 2 and low["flipped_normal_anomalous_pairs"] == 1
    assert low["auroc_after"] == 0.75
    assert "s (eq. 7, b = 2)" in [ax.get_ylabel() for ax in fig.axes]
    with pytest.raises(ValueError, match="b=5"):
        widgets.reweight_view(weights, s_star, labels, picture, 5)
