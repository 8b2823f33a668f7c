"""Anomaly scores and maps from nearest-neighbour distances (PatchCore, Sec. 3.3).

* Patch score (eq. 6, inner part): distance of each test patch to its nearest
  memory-bank patch, ``min_m ||m_test - m||_2`` (with ``k`` > 1, the mean over
  the k nearest, as the official code's ``anomaly_score_num_nn``). The distance
  is Euclidean, as eq. 6 writes it; the official code uses the squared L2
  distance faiss's ``IndexFlatL2`` returns (with k = 1 the same ranking of
  image scores; other eq. 7 weights and maps).
* Image score (eq. 6): ``s* = max`` over the image's patch scores.
* Reweighting (eq. 7): ``s = (1 - exp||m_test* - m*|| / sum_{m in N_b(m*)}
  exp||m_test* - m||) * s*``, where ``m_test*`` is the most anomalous patch,
  ``m*`` its nearest bank patch and ``N_b(m*)`` the b nearest bank patches of
  ``m*`` (m* included, as anomalib does). A test patch whose nearest neighbour
  sits in a sparse region of the bank is trusted more. The paper uses it; the
  official code does not (its issues #27, #54). Default here: on, b = 9.
  b must be at least 2: N_1(m*) = {m*}, so b = 1 makes the weight 1 - 1 = 0 and
  every image scores 0. anomalib takes b = 1 to mean "no reweighting"; here it is
  refused (``check_reweight``) and ``reweight=False`` is eq. 6.
* Anomaly map: patch scores upsampled bilinearly to the input size and
  smoothed by a Gaussian of sigma = 4 (Sec. 3.3), as the official code does with
  ``scipy.ndimage.gaussian_filter``; ours is separable and matches it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .errors import check_int
from .knn import NearestNeighbors


def scores_and_maps(
    features: torch.Tensor,
    index: NearestNeighbors,
    size: tuple[int, int],
    k: int = 1,
    squared: bool = False,
    reweight: bool = True,
    b: int = 9,
    sigma: float = 4.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Image scores (B,) and (B, *size) anomaly maps of patch features (B, h, w, D) against a bank's index.

    Eq. 6 (``patch_scores``: the nearest-neighbour distance of every patch; its maximum per image),
    eq. 7 (``image_scores``: the reweighting, if ``reweight``) and the maps (``anomaly_maps``:
    upsampled to ``size``, blurred by ``sigma``), for any memory bank. ``PatchCore`` calls it with
    its config's settings (``PatchCoreConfig.scoring``).
    """
    dist, nearest = patch_scores(features, index, k, squared)
    scores = image_scores(features, dist, nearest, index, reweight, b)
    return scores, anomaly_maps(dist, tuple(size), sigma)


def check_reweight(b: int, bank_size: int | None = None) -> None:
    """Eq. 7's two conditions, checked wherever they can fail (config, fit, scoring): b >= 2, and a
    memory bank of at least 2 vectors (``N_b(m*)`` is capped at the bank's size). Either short,
    every image would score 0: a ConfigError says what to change."""
    check_int("reweight_b", b, 2, " (eq. 7: b = 1 gives every image the score 0); "
              "reweight=False (CLI: --no-reweight) is eq. 6, no reweighting")
    if bank_size is not None:
        check_int("memory bank size for eq. 7", bank_size, 2, ": raise coreset_ratio, fit on more images, "
                  "or set reweight=False (CLI: --no-reweight), eq. 6")


def patch_scores(
    features: torch.Tensor, index: NearestNeighbors, k: int = 1, squared: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 6 (inner): distances (B, H, W) to the bank and nearest bank indices (B, H, W).

    ``squared=True`` averages squared L2 distances, as the official code; False (default) the
    Euclidean distances eq. 6 is written with. Eq. 7's weight always uses Euclidean distances.
    """
    b, h, w, d = features.shape
    dist, idx = index.search(features.reshape(-1, d), k=k)
    dist = dist.square() if squared else dist
    return dist.mean(dim=1).reshape(b, h, w), idx[:, 0].reshape(b, h, w)


def image_scores(
    features: torch.Tensor,
    scores: torch.Tensor,
    nearest: torch.Tensor,
    index: NearestNeighbors,
    reweight: bool = True,
    b: int = 9,
) -> torch.Tensor:
    """Eq. 6 (``reweight=False``) or eq. 7: one score per image, shape (B,).

    ``features`` (B, H, W, D), ``scores`` and ``nearest`` (B, H, W) come from
    ``patch_scores``. Eq. 7 needs b >= 2 and a bank of at least 2 vectors (N_b(m*) is
    capped at the bank's size); anything less would score every image 0, so it is refused.
    """
    flat = scores.flatten(1)
    s_star, where = flat.max(dim=1)
    if not reweight:
        return s_star
    check_reweight(b, len(index.bank))
    batch = torch.arange(len(flat))
    m_test = features.flatten(1, 2)[batch, where]  # (B, D) most anomalous patches
    m_star = index.bank[nearest.flatten(1)[batch, where]]  # (B, D) their nearest bank patches
    _, support = index.search(m_star, k=min(b, len(index.bank)))  # N_b(m*), m* first
    dist = torch.linalg.vector_norm(m_test[:, None] - index.bank[support], dim=-1)
    return reweight_factor(dist) * s_star


def reweight_factor(dist: torch.Tensor) -> torch.Tensor:
    """Eq. 7's weight ``1 - softmax(dist)[0]`` for distances (B, b), m* in column 0 (b >= 2).

    Column 0 is the smallest distance, so the weight lies in [1 - 1/b, 1):
    reweighting never raises a score. softmax keeps exp() from overflowing.
    Only ``image_scores`` calls it, after refusing b < 2.
    """
    return 1 - torch.softmax(dist, dim=1)[:, 0]


def gaussian_kernel(sigma: float, truncate: float = 4.0) -> torch.Tensor:
    """1-D Gaussian of radius ``int(truncate * sigma + 0.5)``, as scipy.ndimage."""
    radius = int(truncate * sigma + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    return (kernel / kernel.sum()).float()


def gaussian_blur(maps: torch.Tensor, sigma: float = 4.0) -> torch.Tensor:
    """Sec. 3.3's smoothing: separable Gaussian blur of (B, H, W) maps; equals scipy's gaussian_filter.

    Two 1-D passes cost 2(2r+1) multiply-adds per pixel instead of (2r+1)^2.
    Borders use scipy's default ``mode='reflect'`` (edge pixel repeated).
    """
    if sigma <= 0:
        return maps
    kernel = gaussian_kernel(sigma)
    radius = len(kernel) // 2
    x = maps[:, None]
    for dim, weight in ((3, kernel.view(1, 1, 1, -1)), (2, kernel.view(1, 1, -1, 1))):
        x = F.conv2d(_symmetric_pad(x, radius, dim), weight)
    return x[:, 0]


def _symmetric_pad(x: torch.Tensor, radius: int, dim: int) -> torch.Tensor:
    """Pad ``dim`` by mirroring with the edge repeated (d c b a | a b c d), any radius."""
    size = x.shape[dim]
    pos = torch.arange(-radius, size + radius) % (2 * size)  # the extension has period 2 * size
    return x.index_select(dim, torch.where(pos < size, pos, 2 * size - 1 - pos))


def anomaly_maps(scores: torch.Tensor, size: tuple[int, int], sigma: float = 4.0) -> torch.Tensor:
    """Sec. 3.3: patch scores (B, h, w) -> pixel maps (B, H, W): bilinear upsampling, then blur."""
    upsampled = F.interpolate(scores[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
    return gaussian_blur(upsampled, sigma)


