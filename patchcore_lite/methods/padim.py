"""PaDiM: Defard et al., "PaDiM: a Patch Distribution Modeling Framework for Anomaly Detection and
Localization", ICPR 2020 Workshops (LNCS 12664, 2021; arXiv 2011.08785).

Where PatchCore keeps patches and SPADE keeps whole images, PaDiM keeps one
Gaussian per *position* of the feature grid:

* Embedding (Sec. 3.1): the first three stages' maps, upsampled to the finest
  grid and concatenated (as SPADE's pyramid; PatchCore's features with a 1 x 1
  neighbourhood), the coarser maps upsampled bilinearly (see Deviations).
  Then a random subset of d channels ("Rd", Sec. 4.2: d = 100 of 448 for
  ResNet18, 550 of 1792 for WRN50), drawn once with a seed.
* Learning (eq. 1): for each position (i, j), the mean ``mu_ij`` and the sample
  covariance ``Sigma_ij = 1/(N-1) sum_k (x^k_ij - mu_ij)(x^k_ij - mu_ij)^T + eps I``
  over the N training images, with eps = 0.01 so that it is invertible even when
  N < d.
* Inference (eq. 2): the Mahalanobis distance
  ``M(x_ij) = sqrt((x_ij - mu_ij)^T Sigma_ij^-1 (x_ij - mu_ij))`` per position,
  upsampled bilinearly to the input, smoothed by a Gaussian of sigma = 4; the
  image score is the map's maximum (as the authors' code).

The precision matrices ``Sigma_ij^-1`` are computed once at fit time and all
positions are scored in one batched ``einsum``.

Deviations from the reference code (xiahaifeng1995/PaDiM-Anomaly-Detection-
Localization-master; chapter 5b lists them too):

* Alignment: the coarser stages are upsampled *bilinearly* (``patches.align``,
  shared with PatchCore and SPADE, so that a comparison measures the methods, not
  their resampling). The reference ``embedding_concat`` copies each coarse value
  to the s x s finer positions it covers (nearest neighbour, via unfold/fold).
* No min-max normalisation of the maps over the test set: the reference applies
  it before its metrics, which uses the test set; being one monotone map over
  all test pixels, it changes none of the metrics.
* Precision matrices are inverted once at fit time (Cholesky, float64) and
  stored in float32; the reference stores the float32 covariances and inverts
  each position's matrix again for every test set.

Memory: PaDiM keeps ``h * w * d^2`` precision entries. WRN50 at 224 (56 x 56
grid, d = 550): 3136 * 550^2 * 4 bytes = 3.5 GiB per category in float32 (the
reference code's float32 covariances take the same), independent of the number
of training images; EfficientNet-Lite0 with d = 100: 3136 * 100^2 * 4 bytes = 120 MiB.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ..datasets import Data
from ..detector import BackboneDetector, check_detector_config
from ..errors import check_int, check_real, check_setting
from ..patches import patch_features
from ..scoring import anomaly_maps

_CHUNK = 512  # grid positions per covariance batch


@dataclass(frozen=True)
class PadimConfig:
    """Settings of PaDiM; defaults follow the paper except the offline backbone (and hence d)."""

    backbone: str = "efficientnet_lite0"
    layers: tuple[str, ...] = ("layer1", "layer2", "layer3")
    pretrained: bool = True
    resize: int | tuple[int, int] = 256
    crop: int | None = 224
    d: int | None = 100  # random channels kept (paper: 100 for ResNet18, 550 for WRN50); None keeps all
    eps: float = 0.01  # covariance regularisation (eq. 1)
    sigma: float = 4.0
    seed: int = 0
    batch_size: int = 8

    def __post_init__(self) -> None:
        """Refuse any setting out of range with a ConfigError, before a backbone is built."""
        check_detector_config(self, self.layers)
        if self.d is not None:
            check_int("d", self.d, 1, " (random channels kept), or None for all")
        check_real("eps", self.eps, lambda v: v > 0, "> 0 (covariance regularisation, paper: 0.01)")


def covariance(x: torch.Tensor, eps: float) -> torch.Tensor:
    """Eq. 1 for every position: features (N, L, d) -> unbiased covariances + eps I, (L, d, d) float64.

    Two passes (mean first, then centred products) in float64: no cancellation. The result is
    symmetrised: a BLAS product ``A A^T`` need not be bit-for-bit symmetric.
    """
    if len(x) < 2:
        raise ValueError(f"PaDiM needs at least 2 training images for a covariance, got {len(x)}")
    x = x.double()
    centred = (x - x.mean(dim=0)).permute(1, 2, 0)  # (L, d, N): one matrix product per position
    cov = centred @ centred.mT / (len(x) - 1)
    return (cov + cov.mT) / 2 + eps * torch.eye(x.shape[-1], dtype=torch.float64)


def precision_matrices(cov: torch.Tensor) -> torch.Tensor:
    """Inverses of symmetric positive definite (L, d, d) covariances, via Cholesky (float64).

    Batched LAPACK makes one call per small matrix; with a multi-threaded BLAS every call
    pays a thread hand-off, which dominates for matrices this small. A single thread is used
    for these calls only.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return torch.cholesky_inverse(torch.linalg.cholesky(cov.double()))
    finally:
        torch.set_num_threads(threads)


def mahalanobis(delta: torch.Tensor, precision: torch.Tensor) -> torch.Tensor:
    """Eq. 2 for all positions at once: delta (B, L, d), precision (L, d, d) -> (B, L)."""
    squared = torch.einsum("bld,lde,ble->bl", delta, precision, delta)
    return squared.clamp_min(0).sqrt()  # rounding can push a ~0 quadratic form below zero


class Padim(BackboneDetector[PadimConfig]):
    """PaDiM detector: ``fit`` estimates a Gaussian per grid position, ``score_batch`` measures distances.

    Args: as ``BackboneDetector`` (``PadimConfig``); the distances are computed on ``device`` too.
    """

    config_class = PadimConfig

    def _setup(self) -> None:
        c = self.config
        total = sum(self.backbone.channels)
        check_setting(c.d is None or c.d <= total, "d", c.d, f"at most {total}, the channels of {c.backbone} {list(c.layers)}")
        # Sec. 4.2: one random channel subset, fixed for training and testing.
        generator = torch.Generator().manual_seed(c.seed)
        keep = torch.randperm(total, generator=generator)[: c.d or total]
        self.channels = keep.sort().values.to(self.device)
        self.mean: torch.Tensor | None = None  # (h, w, d), on ``device``
        self.precision: torch.Tensor | None = None  # (h, w, d, d), on ``device``

    @torch.inference_mode()
    def extract(self, images: torch.Tensor) -> torch.Tensor:
        """Embedding vectors (B, h, w, d) of Sec. 3.1: first three stages, aligned bilinearly, random channels."""
        maps = self.backbone(images.to(self.device))
        return patch_features(maps, patch_size=1)[..., self.channels].float()

    @torch.inference_mode()
    def fit(self, data: Data, progress: bool = True) -> Padim:
        """Eq. 1: per-position mean and regularised covariance; stores the precision matrices."""
        c = self.config
        feats = self.extract_all(data, progress, "PaDiM features (train)")  # (N, h, w, d)
        n, h, w, d = feats.shape
        x = feats.reshape(n, h * w, d)
        # Positions in chunks: the float64 covariances of one chunk at a time, never all of them.
        chunks = tqdm(x.split(_CHUNK, dim=1), desc="PaDiM covariances", disable=not progress, leave=False)
        precision = torch.cat([precision_matrices(covariance(chunk, c.eps)).float() for chunk in chunks])
        self.mean, self.precision = x.mean(dim=0).reshape(h, w, d), precision.reshape(h, w, d, d)
        return self

    def _kept(self) -> list[torch.Tensor | None]:
        """What PaDiM keeps per category: means and precision matrices (h w d^2 floats)."""
        return [self.mean, self.precision]

    def _check_fitted(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The means and precision matrices, once ``fit`` has run."""
        if self.mean is None or self.precision is None:
            raise RuntimeError("this PaDiM has no Gaussians yet: call fit() first")
        return self.mean, self.precision

    @torch.inference_mode()
    def distance_maps(self, images: torch.Tensor) -> torch.Tensor:
        """Eq. 2 on the feature grid: Mahalanobis distances (B, h, w)."""
        mean, precision = self._check_fitted()
        x = self.extract(images)
        b, h, w, d = x.shape
        delta = (x - mean).reshape(b, h * w, d)
        dist = mahalanobis(delta, precision.reshape(h * w, d, d))
        return dist.reshape(b, h, w).cpu()

    def score_batch(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Image scores (B,) = max of the maps, and anomaly maps (B, H, W), upsampled and blurred."""
        maps = anomaly_maps(self.distance_maps(images), tuple(images.shape[-2:]), self.config.sigma)
        return maps.flatten(1).amax(dim=1), maps
