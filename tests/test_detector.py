"""detector.py: the scaffolding every detector shares behaves the same for all of them."""

import pytest
import torch

from patchcore_lite.detector import BackboneDetector
from patchcore_lite.tools.compare import DETECTORS

# Random 64 x 64 inputs and random backbone weights keep all six detectors to seconds.
TINY = {"pretrained": False, "resize": 64, "crop": None, "batch_size": 3}


def _images(n: int = 7, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, 64, 64, generator=torch.Generator().manual_seed(seed))


def _detector(name: str) -> BackboneDetector:
    extra = {"epochs": 1} if name == "CFA" else {}
    return DETECTORS[name](**TINY, **extra)


@pytest.mark.parametrize("name", list(DETECTORS))
def test_shared_scaffolding(name):
    detector = _detector(name)
    images = _images()
    assert detector.memory_bytes == 0
    with pytest.raises(RuntimeError, match="fit"):
        detector.predict(images, progress=False)
    with pytest.raises(ValueError, match="no images"):
        detector.fit([], progress=False)
    detector.fit(images, progress=False)
    kept = [t for t in detector._kept() if t is not None]
    assert kept and detector.memory_bytes == sum(t.numel() * t.element_size() for t in kept)
    # predict is score_batch over the batches, in order; batches of 3 change only the rounding.
    test = _images(seed=2)  # not the training images: no all-zero distances
    pred = detector.predict(test, progress=False)
    scores, maps = detector.score_batch(test)
    tol = {"rtol": 1e-4, "atol": 1e-4 * maps.abs().max().item()}
    torch.testing.assert_close(torch.from_numpy(pred.scores), scores, **tol)
    torch.testing.assert_close(torch.from_numpy(pred.maps), maps, **tol)
    assert pred.maps.shape == (7, 64, 64)


@pytest.mark.parametrize("name", ["SPADE", "PatchCore-10%"])
def test_extract_all_stacks_extract_of_every_batch(name):
    detector = _detector(name)
    images = _images(5, seed=1)
    whole = detector.extract_all(images, progress=False, desc="")
    expected = detector.extract(images)  # one batch of all five
    for got, want in zip(*(t if isinstance(t, tuple) else (t,) for t in (whole, expected))):
        torch.testing.assert_close(got, want)
