"""PaDiM (Defard et al. 2020): Gaussians per position, Mahalanobis maps, seeded channels."""

import numpy as np
import pytest
import torch
from scipy.spatial.distance import mahalanobis as scipy_mahalanobis

from patchcore_lite.errors import ConfigError
from patchcore_lite.evaluation import fit_evaluate
from patchcore_lite.methods.padim import (
    Padim,
    PadimConfig,
    covariance,
    mahalanobis,
    precision_matrices,
)
from patchcore_lite.metrics import image_auroc


def _images(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, 3, 64, 64, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def fitted():
    """Random-weight PaDiM on 64 x 64 noise, fewer images (6) than channels (d = 20): Sigma is singular."""
    train = _images(6, 0)
    return Padim(pretrained=False, d=20).fit(train, progress=False), train


def test_covariance_is_symmetric_positive_definite(fitted):
    padim, train = fitted
    x = padim.extract(train).flatten(1, 2)
    cov = covariance(x, eps=0.01)
    assert torch.equal(cov, cov.mT)
    torch.linalg.cholesky(cov)  # raises if not positive definite
    eig = torch.linalg.eigvalsh(cov)
    assert (eig > 0).all()
    # N - 1 = 5 < d = 20: the sample covariance has a null space, where only eps * I remains.
    assert eig[:, 0].min().item() == pytest.approx(0.01, rel=1e-6)


def test_covariance_is_eq1_as_numpy(fitted):
    padim, train = fitted
    x = padim.extract(train).flatten(1, 2).double().numpy()
    cov = covariance(torch.from_numpy(x), eps=0.01).numpy()
    for pos in (0, 100, x.shape[1] - 1):
        expected = np.cov(x[:, pos], rowvar=False) + 0.01 * np.eye(x.shape[2])  # official code
        assert np.allclose(cov[pos], expected, rtol=1e-10, atol=1e-12)


def test_fit_stores_mean_and_inverse_covariance(fitted):
    padim, train = fitted
    x = padim.extract(train).flatten(1, 2)
    cov = covariance(x, eps=0.01)
    h, w, d = padim.mean.shape
    assert torch.allclose(padim.mean.reshape(h * w, d), x.mean(dim=0), atol=1e-5)
    identity = torch.eye(d, dtype=torch.float64).expand(h * w, d, d)
    assert torch.allclose(padim.precision.reshape(h * w, d, d).double() @ cov, identity, atol=1e-3)


def test_mahalanobis_matches_scipy():
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(3, 5, 5, generator=gen, dtype=torch.float64)
    precision = precision_matrices(a @ a.mT + 0.1 * torch.eye(5, dtype=torch.float64))
    delta = torch.randn(2, 3, 5, generator=gen, dtype=torch.float64)
    got = mahalanobis(delta, precision)
    for b in range(2):
        for pos in range(3):
            expected = scipy_mahalanobis(delta[b, pos].numpy(), np.zeros(5), precision[pos].numpy())
            assert got[b, pos].item() == pytest.approx(expected, rel=1e-10)
    assert torch.equal(mahalanobis(torch.zeros(1, 3, 5, dtype=torch.float64), precision), torch.zeros(1, 3))


def test_maps_are_distances_to_the_position_gaussian(fitted):
    padim, _ = fitted
    test = _images(2, 1)
    x = padim.extract(test)
    maps = padim.distance_maps(test)
    for b, y, xx in ((0, 0, 0), (1, 7, 3)):
        expected = scipy_mahalanobis(
            x[b, y, xx].double().numpy(), padim.mean[y, xx].double().numpy(), padim.precision[y, xx].double().numpy()
        )
        assert maps[b, y, xx].item() == pytest.approx(expected, rel=1e-4)
    scores, anomaly = padim.score_batch(test)
    assert anomaly.shape == (2, 64, 64)
    assert torch.equal(scores, anomaly.flatten(1).amax(dim=1))


def test_channel_subset_is_seeded(fitted):
    padim, _ = fitted
    same = Padim(padim.config)
    other = Padim(padim.config, seed=1)
    assert len(padim.channels) == 20 and len(set(padim.channels.tolist())) == 20
    assert torch.equal(same.channels, padim.channels)
    assert not torch.equal(other.channels, padim.channels)
    with pytest.raises(ValueError, match="channels"):
        Padim(padim.config, d=10_000)


def test_deterministic_and_memory(fitted):
    padim, train = fitted
    again = Padim(padim.config).fit(train, progress=False)
    test = _images(2, 1)
    assert torch.equal(padim.score_batch(test)[1], again.score_batch(test)[1])
    h, w, d = padim.mean.shape
    assert padim.memory_bytes == 4 * h * w * d * (d + 1)


def test_needs_two_images_and_fit():
    with pytest.raises(RuntimeError, match="fit"):
        Padim(pretrained=False, d=20).score_batch(_images(1, 0))
    with pytest.raises(ValueError, match="at least 2"):
        covariance(torch.zeros(1, 4, 3), eps=0.01)
    for bad in ({"eps": 0}, {"d": 0}, {"sigma": -1.0}, {"crop": 512}):
        with pytest.raises(ConfigError, match=f"{next(iter(bad))} = "):
            PadimConfig(**bad)


def test_separates_synthetic_anomalies(synthetic_root):
    # Measured on this category at this size (pretrained EfficientNet-Lite0): image AUROC 0.908,
    # pixel AUROC 0.878. Floors leave a margin.
    result = fit_evaluate(Padim(resize=128, crop=None), synthetic_root / "tile", progress=False)
    assert image_auroc(result.labels, result.scores) > 0.85
    assert result.metrics["pixel_auroc"] > 0.83
