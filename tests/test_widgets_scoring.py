"""Chapters 3-5's helpers and widget callbacks: coreset sweep, coverage, scoring, search trade-off."""

from functools import partial
from pathlib import Path

import ipywidgets
import numpy as np
import pytest
import torch
from matplotlib.figure import Figure

from patchcore_lite.coreset import select_coreset
from patchcore_lite.datasets import INPUT_SIZE, train_test_samples
from patchcore_lite.model import PatchCore
from patchcore_lite.teaching import widgets
from patchcore_lite.teaching.experiments import (
    CoresetSweep,
    SplitFeatures,
    coreset_results,
    evaluate_bank,
    search_tradeoff,
    split_features,
)
from patchcore_lite.teaching.measures import (
    coreset_radius,
    principal_components,
    ranking_changes,
)

RATIOS = (0.01, 0.05, 0.2, 1.0)
GRID, CELL = 8, 4  # fake test images: 8 x 8 patches of 4 x 4 pixels


def clustered_bank(seed: int = 0, dim: int = 160) -> torch.Tensor:
    """1500 points: one big dense cluster and ten small, distant ones (rare but normal patterns)."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(11, dim, generator=g) * 4
    sizes = [1200] + [30] * 10
    return torch.cat([c + 0.3 * torch.randn(n, dim, generator=g) for c, n in zip(centres, sizes)])


@pytest.fixture(scope="module")
def bank() -> torch.Tensor:
    return clustered_bank()


@pytest.fixture(scope="module")
def test_set(bank: torch.Tensor) -> SplitFeatures:
    """4 normal images (patches drawn from the bank plus noise) and 4 with a far-off 2 x 2 patch block."""
    g = torch.Generator().manual_seed(1)
    picks = torch.randint(len(bank), (8, GRID, GRID), generator=g)
    features = bank[picks] + 0.1 * torch.randn(8, GRID, GRID, bank.shape[1], generator=g)
    features[4:, 2:4, 2:4] += 25.0
    masks = np.zeros((8, GRID * CELL, GRID * CELL), dtype=bool)
    masks[4:, 2 * CELL : 4 * CELL, 2 * CELL : 4 * CELL] = True
    labels = np.array([0] * 4 + [1] * 4)
    return SplitFeatures(features, labels, masks, images=np.zeros((8, 1, 1, 3)), defects=["x"] * 8, extract_s=0.0)


@pytest.fixture(scope="module")
def results(bank: torch.Tensor, test_set: SplitFeatures) -> CoresetSweep:
    return coreset_results(bank, test_set, ratios=RATIOS)


def test_principal_components_find_the_main_axes_with_fixed_signs():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(500, 3, generator=g) * torch.tensor([10.0, 3.0, 0.1])
    pcs = principal_components(x, 2)
    assert pcs.shape == (500, 2)
    centred = (x - x.mean(dim=0)).numpy()
    assert abs(np.corrcoef(pcs[:, 0], centred[:, 0])[0, 1]) > 0.99
    assert abs(np.corrcoef(pcs[:, 1], centred[:, 1])[0, 1]) > 0.99
    np.testing.assert_allclose(principal_components(-x, 2), -pcs, atol=1e-4)  # axes' signs fixed by loadings


def test_coreset_sweep_uses_the_coresets_select_coreset_returns(bank, results):
    n = len(bank)
    for r in RATIOS[:-1]:
        k = int(n * r)
        assert torch.equal(results.order[:k], select_coreset(bank, r, seed=0))
        assert results.by_ratio[r].greedy.bank_size == k
        assert results.by_ratio[r].greedy.memory_mib == pytest.approx(k * bank.shape[1] * 4 / 2**20)
    assert results.by_ratio[1.0].greedy.bank_size == n


def test_coverage_radius_falls_with_the_ratio_and_greedy_beats_random(bank, results):
    by_ratio = results.by_ratio
    radii = [by_ratio[r].radius for r in RATIOS]
    assert all(a > b for a, b in zip(radii, radii[1:])) and radii[-1] == 0.0
    for r in RATIOS[:-1]:
        k = int(len(bank) * r)
        assert by_ratio[r].radius == pytest.approx(coreset_radius(bank, results.order[:k]), rel=1e-4)
        assert by_ratio[r].radius < by_ratio[r].radius_random


def test_sweep_scores_the_test_set_like_the_full_bank(results, test_set):
    for r in RATIOS:
        row = results.by_ratio[r].greedy
        assert row.metrics["image_auroc"] == 1.0  # the anomalous block is far from every normal patch
        assert row.metrics["pixel_auroc"] > 0.9 and row.search_ms_per_image > 0
        assert row.scores.shape == (8,)
    # A subsample can only raise nearest-neighbour distances (eq. 6 without eq. 7's weight < 1 factor).
    full = results.by_ratio[1.0].greedy.scores
    assert (results.by_ratio[0.01].greedy.scores >= (1 - 1 / 9) * full - 1e-4).all()


def test_coreset_view_draws_labelled_panels_and_returns_the_numbers(results):
    fig, numbers = widgets.coreset_view(results, 0.05)
    assert isinstance(fig, Figure) and "5%" in fig.get_suptitle()
    assert len(fig.axes) == 4
    for ax in fig.axes:
        assert ax.get_title() and ax.get_xlabel() and ax.get_ylabel() and ax.get_legend() is not None
    row = results.by_ratio[0.05]
    assert numbers == {
        "ratio": 0.05, "bank_size": row.greedy.bank_size, "radius": row.radius, "radius_random": row.radius_random,
        **row.greedy.metrics, "search_ms_per_image": row.greedy.search_ms_per_image,
    }
    bank_ax = fig.axes[0]
    assert len(bank_ax.collections[1].get_offsets()) == row.greedy.bank_size  # the coreset drawn in red


def test_coreset_view_and_grid_reject_ratios_that_were_not_computed(results):
    with pytest.raises(ValueError, match="ratio 0.5"):
        widgets.coreset_view(results, 0.5)
    with pytest.raises(ValueError, match=r"\[0.5\]"):
        widgets.coreset_grid(results, (0.05, 0.5))
    assert len(widgets.coreset_grid(results, (0.01, 0.2)).axes) == 2


def test_coreset_slider_updates_the_numbers(results):
    slider = ipywidgets.SelectionSlider(options=RATIOS, value=0.01, description="ratio")
    widget = widgets.interactive_view(partial(widgets.coreset_view, results), ratio=slider)
    assert widget.result["bank_size"] == results.by_ratio[0.01].greedy.bank_size
    slider.value = 0.2
    assert widget.result == widgets.coreset_view(results, 0.2)[1]


def test_coreset_results_checks_ratios(bank, test_set):
    with pytest.raises(ValueError, match="coreset ratios"):
        coreset_results(bank, test_set, ratios=(0.1, 1.5))


def test_ranking_changes_on_a_hand_made_case():
    changes = ranking_changes([1, 2, 3, 4], [1, 3, 2, 4], [0, 0, 1, 1])
    assert changes["flipped_pairs"] == 1 and changes["flipped_normal_anomalous_pairs"] == 1
    assert changes["kendall_tau"] == pytest.approx(4 / 6)
    assert changes["auroc_before"] == 1.0 and changes["auroc_after"] == 0.75
    same = ranking_changes([1, 2, 3], [10, 20, 30], [0, 1, 1])
    assert same["flipped_pairs"] == 0 and same["kendall_tau"] == 1.0
    with pytest.raises(ValueError, match="equal length"):
        ranking_changes([1, 2], [1, 2, 3], [0, 1])


def test_search_tradeoff_exact_and_exhaustive_searches_find_every_neighbour(bank, test_set):
    searches = {
        "flat": {"index": "flat"},
        "torch": {"backend": "torch", "index": "flat"},
        "ivf, all cells": {"index": "ivf", "nlist": 4, "nprobe": 4},
        "ivfpq": {"index": "ivfpq", "nlist": 4, "m": 8, "nprobe": 4},
    }
    rows = {row.search: row for row in search_tradeoff(bank, test_set, searches)}
    for name in ("flat", "torch", "ivf, all cells"):
        assert rows[name].recall_at_1 == 1.0 and rows[name].distance_error < 1e-3  # float32 rounding
        assert rows[name].metrics["image_auroc"] == 1.0
    assert rows["ivfpq"].distance_error > 1e-2  # product quantisation approximates distances


@pytest.fixture(scope="module")
def small_model(synthetic_root: Path):
    """PatchCore fit on 4 training images of one synthetic category, and 4 test images."""
    train, test = train_test_samples(synthetic_root / "disc")
    model = PatchCore(coreset_ratio=0.1).fit(train[:4], progress=False)
    return model, train[:4], test[:2] + test[-2:]


def test_split_features_and_evaluate_bank_reproduce_patchcore_predict(small_model):
    model, _, test = small_model
    test_set = split_features(model, test)
    assert test_set.features.shape == (4, INPUT_SIZE // 8, INPUT_SIZE // 8, model.memory_bank.shape[1])
    assert test_set.masks.shape == (4, INPUT_SIZE, INPUT_SIZE) and test_set.masks.dtype == bool
    assert test_set.images.shape == (4, INPUT_SIZE, INPUT_SIZE, 3) and 0 <= test_set.images.min() <= test_set.images.max() <= 1
    assert test_set.labels.tolist() == [s.label for s in test] == [0, 0, 1, 1]
    row, _ = evaluate_bank(model.memory_bank, test_set, model.config)
    np.testing.assert_allclose(row.scores, model.predict(test, progress=False).scores, rtol=1e-5)


def test_fitted_bank_is_in_greedy_pick_order(small_model):
    # Chapter 5 takes the first k rows of a fitted bank as the k-pick coreset.
    model, train, _ = small_model
    full = split_features(model, train).features.flatten(0, 2)
    assert torch.equal(model.memory_bank, full[select_coreset(full, 0.1, seed=0)])
    smaller = select_coreset(full, 0.02, seed=0)
    assert torch.equal(model.memory_bank[: len(smaller)], full[smaller])
