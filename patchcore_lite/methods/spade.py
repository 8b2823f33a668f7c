"""SPADE: Cohen & Hoshen, "Sub-Image Anomaly Detection with Deep Pyramid Correspondences", arXiv 2005.02357 (2020).

PatchCore's closest predecessor. Two nearest-neighbour stages, no training:

1. **Image level** (Sec. 3.1, eq. 1, after DN2): each image is one vector, the
   globally average-pooled output of the deepest stage (the paper: WRN50's
   ``avgpool``). The image score is the mean squared distance to its K nearest
   training images, ``d(y) = 1/K sum_{f in N_K(f_y)} ||f - f_y||^2`` (K = 50).
2. **Pixel level** (Sec. 3.2, eq. 2): the gallery ``G`` holds the pixel features
   of those K nearest training images, at *every* location (so a pixel may match
   anywhere in them: alignment by correspondence, not by position). The score of
   pixel p is ``d(y, p) = 1/kappa sum_{f in N_kappa(F(y, p))} ||f - F(y, p)||^2``
   with kappa = 1, i.e. the distance to the closest gallery feature. Pixel
   features are the feature pyramid of the first three stages (56, 28, 14 for
   WRN50 at 224) upsampled to the finest grid and concatenated; maps are
   upsampled to the input and smoothed by a Gaussian of sigma = 4 (Sec. 4).

These pixel features are PatchCore's with a 1 x 1 neighbourhood (no local
aggregation) from one more, shallower stage.

Deviations (there is no official code; chapter 5b lists them too):

* K: with N < K training images, eq. 1 averages over the K' = min(K, N) nearest
  and every gallery holds all training pixels (N = K' is common on small data).
* One search per pixel over the concatenated pyramid, its coarser stages aligned
  bilinearly (``patches.align``). The widely used port (byungjae89/SPADE-pytorch)
  searches each stage at its own resolution and averages the three bilinearly
  upsampled maps; it also uses K = 5 and plain (not squared) distances, which
  ``k=5, squared=False`` select.
* Backbone: EfficientNet-Lite0 by default (offline); the image vector is its
  deepest stage (``layer4``) averaged, where the paper pools WRN50's output.

Memory: SPADE keeps every training pixel feature. Per category that is
``N * h * w * D * 4`` bytes: for WRN50 (D = 1792, 56 x 56) and MVTec's 391
hazelnut images 8.2 GiB; for EfficientNet-Lite0 (D = 176) 0.80 GiB.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..datasets import Data
from ..detector import BackboneDetector, check_detector_config
from ..errors import check_choice, check_int
from ..knn import BACKENDS, NearestNeighbors
from ..patches import patch_features
from ..scoring import anomaly_maps


@dataclass(frozen=True)
class SpadeConfig:
    """Settings of SPADE; defaults follow the paper (Sec. 4) except the offline backbone."""

    backbone: str = "efficientnet_lite0"
    pixel_layers: tuple[str, ...] = ("layer1", "layer2", "layer3")
    image_layer: str = "layer4"
    pretrained: bool = True
    resize: int | tuple[int, int] = 256
    crop: int | None = 224
    k: int = 50  # K nearest training images (eq. 1)
    kappa: int = 1  # nearest gallery features per pixel (eq. 2)
    squared: bool = True  # paper: squared L2; False: Euclidean as SPADE-pytorch
    sigma: float = 4.0
    knn_backend: str = "faiss"
    seed: int = 0
    batch_size: int = 8

    def __post_init__(self) -> None:
        """Refuse any setting out of range with a ConfigError, before a backbone is built."""
        check_detector_config(self, (*self.pixel_layers, self.image_layer))
        check_int("k", self.k)
        check_int("kappa", self.kappa)
        check_choice("knn_backend", self.knn_backend, BACKENDS)


class Spade(BackboneDetector[SpadeConfig]):
    """SPADE detector: ``fit`` stores features, ``score_batch`` runs both kNN stages.

    Args: as ``BackboneDetector`` (``SpadeConfig``); the searches stay on the CPU.
    """

    config_class = SpadeConfig

    def _setup(self) -> None:
        self.image_features: torch.Tensor | None = None  # (N, C) pooled, eq. 1
        self.pixel_features: torch.Tensor | None = None  # (N, h, w, D) gallery source, eq. 2
        self.image_index: NearestNeighbors | None = None
        self._gallery: tuple[tuple[int, ...], NearestNeighbors] | None = None  # last gallery, reused

    def backbone_layers(self) -> tuple[str, ...]:
        """The pixel pyramid's stages and the pooled image stage, each once."""
        return tuple(dict.fromkeys((*self.config.pixel_layers, self.config.image_layer)))

    @torch.inference_mode()
    def extract(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pooled image features (B, C) and aligned pyramid pixel features (B, h, w, D)."""
        c = self.config
        maps = dict(zip(self.backbone.layers, self.backbone(images.to(self.device))))
        pooled = maps[c.image_layer].mean(dim=(2, 3))
        pixels = patch_features([maps[layer] for layer in c.pixel_layers], patch_size=1)
        return pooled.float().cpu(), pixels.float().cpu()

    def fit(self, data: Data, progress: bool = True) -> Spade:
        """Store the pooled and pixel features of the normal training images (no training)."""
        self.image_features, self.pixel_features = self.extract_all(data, progress, "SPADE features (train)")
        self.image_index = NearestNeighbors(self.image_features, self.config.knn_backend, seed=self.config.seed)
        self._gallery = None
        return self

    def _kept(self) -> list[torch.Tensor | None]:
        """What SPADE keeps per category: every training pixel feature plus the pooled ones."""
        return [self.image_features, self.pixel_features]

    def _check_fitted(self) -> tuple[NearestNeighbors, torch.Tensor]:
        """The image index and the training pixel features, once ``fit`` has run."""
        if self.image_index is None or self.pixel_features is None:
            raise RuntimeError("this SPADE has no training features yet: call fit() first")
        return self.image_index, self.pixel_features

    def _distance(self, dist: torch.Tensor) -> torch.Tensor:
        """Mean over the neighbours (columns) of squared (paper) or plain distances."""
        return (dist.square() if self.config.squared else dist).mean(dim=1)

    def distances(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Eq. 1 image scores (B,), eq. 2 pixel scores on the feature grid (B, h, w), neighbours (B, K)."""
        image_index, train_pixels = self._check_fitted()
        c = self.config
        pooled, pixels = self.extract(images)
        dist, neighbours = image_index.search(pooled, k=min(c.k, len(train_pixels)))
        b, h, w, d = pixels.shape
        maps = torch.stack([
            self._distance(self._gallery_index(nearest).search(x.reshape(-1, d), c.kappa)[0])
            for x, nearest in zip(pixels, neighbours)
        ])
        return self._distance(dist), maps.reshape(b, h, w), neighbours

    def _gallery_index(self, neighbours: torch.Tensor) -> NearestNeighbors:
        """Index over all pixel features of the given training images; kept while they repeat.

        When K covers the whole training set every test image has the same gallery.
        """
        key = tuple(sorted(neighbours.tolist()))
        if self._gallery is None or self._gallery[0] != key:
            assert self.pixel_features is not None
            gallery = self.pixel_features[list(key)].flatten(0, 2)
            self._gallery = key, NearestNeighbors(gallery, self.config.knn_backend, seed=self.config.seed)
        return self._gallery[1]

    def score_batch(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Image scores (B,) and anomaly maps (B, H, W): pixel scores upsampled and blurred (sigma 4)."""
        scores, maps, _ = self.distances(images)
        return scores, anomaly_maps(maps, tuple(images.shape[-2:]), self.config.sigma)
