"""Scoring (eq. 6-7) and anomaly maps."""

import numpy as np
import pytest
import scipy.ndimage as ndi
import torch

from patchcore_lite.errors import ConfigError
from patchcore_lite.knn import NearestNeighbors
from patchcore_lite.model import PatchCoreConfig
from patchcore_lite.scoring import (
    anomaly_maps,
    gaussian_blur,
    image_scores,
    patch_scores,
    reweight_factor,
)


@pytest.mark.parametrize("shape", [(2, 224, 224), (1, 5, 7), (1, 40, 3)])
def test_separable_blur_equals_scipy(shape):
    x = torch.rand(*shape, generator=torch.Generator().manual_seed(0))
    ref = np.stack([ndi.gaussian_filter(a.double().numpy(), sigma=4) for a in x])
    assert np.abs(gaussian_blur(x, 4.0).numpy() - ref).max() < 1e-5


def test_blur_keeps_mass_and_sigma_zero_is_identity():
    x = torch.zeros(1, 64, 64)
    x[0, 32, 32] = 1
    assert gaussian_blur(x, 4.0).sum().item() == pytest.approx(1.0, abs=1e-5)
    assert torch.equal(gaussian_blur(x, 0), x)


def _toy():
    """A bank of 3 patches and one 2x2 test image whose patch (1, 0) is far from all of them."""
    bank = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    feats = torch.tensor([[[[0.1, 0.0], [1.0, 0.2]], [[5.0, 0.0], [0.0, 0.9]]]])  # (1, 2, 2, 2)
    return bank, feats, NearestNeighbors(bank, backend="torch")


def test_patch_scores_are_nearest_distances():
    bank, feats, index = _toy()
    dist, nearest = patch_scores(feats, index)
    expected = torch.cdist(feats.reshape(-1, 2), bank).min(dim=1)
    assert torch.allclose(dist.flatten(), expected.values, atol=1e-5)
    assert torch.equal(nearest.flatten(), expected.indices)


def test_image_score_is_max_without_reweighting():
    bank, feats, index = _toy()
    dist, nearest = patch_scores(feats, index)
    score = image_scores(feats, dist, nearest, index, reweight=False)
    assert score.item() == pytest.approx(4.0, abs=1e-5)  # patch (5, 0) to bank (1, 0)


def test_eq7_by_hand():
    bank, feats, index = _toy()
    dist, nearest = patch_scores(feats, index)
    score = image_scores(feats, dist, nearest, index, reweight=True, b=2)
    # m_test* = (5, 0), m* = (1, 0); N_2(m*) = {(1, 0), then (0, 0) at distance 1}
    d = np.array([4.0, 5.0])  # distances of m_test* to those two
    weight = 1 - np.exp(d[0]) / np.exp(d).sum()
    assert score.item() == pytest.approx(weight * 4.0, rel=1e-5)


def test_reweighting_never_raises_a_score():
    gen = torch.Generator().manual_seed(1)
    bank = torch.randn(200, 8, generator=gen)
    feats = 2 * torch.randn(6, 5, 5, 8, generator=gen)
    index = NearestNeighbors(bank, backend="torch")
    dist, nearest = patch_scores(feats, index)
    plain = image_scores(feats, dist, nearest, index, reweight=False)
    for b in (2, 9, 50):
        weighted = image_scores(feats, dist, nearest, index, reweight=True, b=b)
        assert (weighted <= plain).all()
        assert (weighted >= plain * (1 - 1 / b) - 1e-6).all()


def test_eq7_refuses_what_would_score_every_image_0():
    """b = 1, or a one-vector bank, leaves m* alone in N_b(m*): weight 1 - 1 = 0 for every image."""
    bank, feats, index = _toy()
    dist, nearest = patch_scores(feats, index)
    assert torch.equal(reweight_factor(torch.tensor([[3.0]])), torch.zeros(1))  # what b = 1 would give
    with pytest.raises(ConfigError, match=r"reweight_b = 1.*reweight=False \(CLI: --no-reweight\) is eq. 6"):
        image_scores(feats, dist, nearest, index, reweight=True, b=1)
    tiny = NearestNeighbors(bank[:1], backend="torch")
    d1, n1 = patch_scores(feats, tiny)
    with pytest.raises(ConfigError, match="memory bank size for eq. 7 = 1"):
        image_scores(feats, d1, n1, tiny, reweight=True, b=9)
    with pytest.raises(ConfigError, match="reweight_b = 1"):
        PatchCoreConfig(reweight_b=1)


def test_reweight_factor_bounds_and_overflow():
    dist = torch.tensor([[1000.0, 1000.5, 1001.0]])  # exp() alone would overflow
    w = reweight_factor(dist)
    assert torch.isfinite(w).all() and 2 / 3 <= w.item() < 1


def test_anomaly_map_peaks_at_the_anomalous_patch():
    scores = torch.zeros(1, 28, 28)
    scores[0, 20, 5] = 1.0
    maps = anomaly_maps(scores, (224, 224), sigma=4)
    assert maps.shape == (1, 224, 224)
    y, x = np.unravel_index(maps[0].argmax().item(), (224, 224))
    assert abs(y - (20 * 8 + 4)) <= 4 and abs(x - (5 * 8 + 4)) <= 4
