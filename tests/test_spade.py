"""SPADE (Cohen & Hoshen 2020): kNN stages against brute force, separation, determinism."""

import pytest
import torch
import torch.nn.functional as F

from patchcore_lite.errors import ConfigError
from patchcore_lite.evaluation import fit_evaluate
from patchcore_lite.methods.spade import Spade, SpadeConfig
from patchcore_lite.metrics import image_auroc
from patchcore_lite.scoring import anomaly_maps


def _images(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, 3, 64, 64, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def tiny():
    """A random-weight SPADE on 64 x 64 noise: 16 x 16 pixel grid, 2 x 2 deepest stage."""
    return Spade(pretrained=False), _images(5, 0), _images(2, 1)


def test_features_are_pooled_deepest_stage_and_aligned_pyramid(tiny):
    spade, train, _ = tiny
    pooled, pixels = spade.extract(train)
    with torch.inference_mode():
        l1, l2, l3, l4 = spade.backbone(train)
    assert torch.allclose(pooled, l4.mean(dim=(2, 3)), atol=1e-6)
    up = [F.interpolate(m, size=l1.shape[-2:], mode="bilinear", align_corners=False) for m in (l2, l3)]
    assert torch.allclose(pixels, torch.cat([l1, *up], dim=1).permute(0, 2, 3, 1), atol=1e-6)


def _brute_force(spade: Spade, train: torch.Tensor, test: torch.Tensor, k: int):
    """Eq. 1 and 2 (kappa = 1, squared L2) with explicit loops over images and pixels."""
    train_pooled, train_pixels = spade.extract(train)
    test_pooled, test_pixels = spade.extract(test)
    scores, maps = [], []
    for f_y, pixels in zip(test_pooled, test_pixels):
        dists = [float(((f_y - f) ** 2).sum()) for f in train_pooled]
        nearest = sorted(range(len(dists)), key=dists.__getitem__)[:k]
        scores.append(sum(dists[j] for j in nearest) / k)
        gallery = torch.cat([train_pixels[j].reshape(-1, pixels.shape[-1]) for j in nearest])
        h, w = pixels.shape[:2]
        pixel_map = torch.empty(h, w)
        for y in range(h):
            for x in range(w):
                pixel_map[y, x] = ((gallery - pixels[y, x]) ** 2).sum(dim=1).min()
        maps.append(pixel_map)
    return torch.tensor(scores), torch.stack(maps)


@pytest.mark.parametrize("k", [1, 3])
def test_distances_equal_brute_force(tiny, k):
    spade, train, test = tiny
    spade = Spade(spade.config, k=k).fit(train, progress=False)
    expected_scores, expected_maps = _brute_force(spade, train, test, k)
    scores, maps, neighbours = spade.distances(test)
    assert neighbours.shape == (2, k)
    assert torch.allclose(scores, expected_scores, rtol=1e-4)
    assert torch.allclose(maps, expected_maps, rtol=1e-3, atol=1e-3 * expected_maps.max().item())
    image_scores, anomaly = spade.score_batch(test)
    assert torch.allclose(image_scores, scores)
    assert torch.allclose(anomaly, anomaly_maps(maps, (64, 64), sigma=4.0))


def test_k_beyond_the_training_set_averages_over_every_image(tiny):
    spade, train, test = tiny  # 5 training images
    capped = Spade(spade.config, k=50).fit(train, progress=False)
    every = Spade(spade.config, k=len(train)).fit(train, progress=False)
    (scores, maps, neighbours), (expected_scores, expected_maps, _) = capped.distances(test), every.distances(test)
    assert neighbours.shape == (2, len(train))  # K' = min(K, N) neighbours
    assert torch.equal(scores, expected_scores) and torch.equal(maps, expected_maps)
    brute_scores, _ = _brute_force(every, train, test, len(train))
    assert torch.allclose(scores, brute_scores, rtol=1e-4)  # the mean over K' = N, not over K


def test_euclidean_option_is_the_root_for_k1(tiny):
    spade, train, test = tiny
    squared = Spade(spade.config, k=1).fit(train, progress=False)
    plain = Spade(spade.config, k=1, squared=False).fit(train, progress=False)
    (sq_scores, sq_maps, _), (scores, maps, _) = squared.distances(test), plain.distances(test)
    assert torch.allclose(scores, sq_scores.sqrt(), rtol=1e-4)
    assert torch.allclose(maps, sq_maps.sqrt(), rtol=1e-3, atol=1e-3)


def test_deterministic_and_memory(tiny):
    spade, train, test = tiny
    spade.fit(train, progress=False)
    first = spade.score_batch(test)
    again = Spade(spade.config)  # a second construction with the same seed
    again.fit(train, progress=False)
    second = again.score_batch(test)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    assert torch.equal(spade.score_batch(test)[1], first[1])  # the cached gallery changes nothing
    pooled, pixels = spade.extract(train)
    assert spade.memory_bytes == 4 * (pooled.numel() + pixels.numel())


def test_unfitted_raises():
    with pytest.raises(RuntimeError, match="fit"):
        Spade(pretrained=False).score_batch(_images(1, 0))
    with pytest.raises(ConfigError, match="k = 0: must be an integer >= 1"):
        Spade(pretrained=False, k=0)
    with pytest.raises(ConfigError, match="layers .*unknown: layer9"):  # refused before the backbone is built
        SpadeConfig(image_layer="layer9")
    with pytest.raises(ConfigError, match="knn_backend = 'annoy'"):
        SpadeConfig(knn_backend="annoy")


def test_separates_synthetic_anomalies(synthetic_root):
    # Measured on this category at this size (pretrained EfficientNet-Lite0): image AUROC 0.552,
    # pixel AUROC 0.870. SPADE's pooled image score is its weak point: it barely ranks the faint
    # defects above normal images, while its maps still localise them.
    result = fit_evaluate(Spade(resize=128, crop=None), synthetic_root / "tile", progress=False)
    assert image_auroc(result.labels, result.scores) > 0.5
    assert result.metrics["pixel_auroc"] > 0.83
