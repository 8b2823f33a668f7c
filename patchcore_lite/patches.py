"""Locally aware patch features (PatchCore, Sec. 3.1, eq. 1-3).

A feature vector of one position of a stage sees only its own receptive field.
PatchCore widens it without going deeper: each position takes the average of
its p x p neighbourhood N_p^(h,w) (eq. 1-2, "adaptive average pooling"), the
coarser stage is upsampled bilinearly to the finer stage's grid, and the two
are concatenated (eq. 3). The result is one vector per patch of the finer grid.
``grid`` picks another stage's grid instead: finer stages are then downsampled to it
(bilinear; at a factor of 2 that is the mean of each 2 x 2 block), so a stride-4 stage can add
its detail to the stride-8 grid without quadrupling the number of patches (the accuracy study,
``benchmarks/accuracy_study.py``).

Two ways to build it, both selectable with ``mode``:

* ``"avgpool"`` (default): ``AvgPool2d(p, s)`` per stage, bilinear alignment,
  concatenation. D = sum of the stages' channels (152 for EfficientNet-Lite0,
  1536 for WRN50). As anomalib does; cheaper than ``"official"``, which
  unfolds p * p copies of every channel first.
* ``"official"``: the official code's path: unfold each p x p neighbourhood
  into a C*p*p vector, align the unfolded grids bilinearly, adaptive-average-pool
  each stage's vector to ``embed_dim`` (1024), stack the stages and pool the
  pair to ``target_dim`` (1024). It amounts to local means over small groups
  of channels and neighbourhood positions, and fixes D whatever the backbone.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

MODES = ("avgpool", "official")


def local_aggregate(fmap: torch.Tensor, patch_size: int = 3, stride: int = 1) -> torch.Tensor:
    """Eq. 1-2: mean of each p x p neighbourhood, zero padded as the official unfold.

    (B, C, H, W) -> (B, C, H', W'); H' = H for odd p and stride 1.
    """
    if patch_size < 1 or stride < 1:
        raise ValueError(f"patch_size and stride must be >= 1, got {patch_size}, {stride}")
    return F.avg_pool2d(fmap, patch_size, stride, padding=(patch_size - 1) // 2, count_include_pad=True)


def align(fmaps: list[torch.Tensor], size: tuple[int, int] | None = None) -> list[torch.Tensor]:
    """Eq. 3's alignment: resize every map bilinearly to ``size`` (default: the first, finest grid)."""
    size = size or tuple(fmaps[0].shape[-2:])
    return [
        m if tuple(m.shape[-2:]) == size else F.interpolate(m, size=size, mode="bilinear", align_corners=False)
        for m in fmaps
    ]


def patch_features(
    fmaps: list[torch.Tensor],
    patch_size: int = 3,
    stride: int = 1,
    mode: str = "avgpool",
    embed_dim: int = 1024,
    target_dim: int = 1024,
    grid: int = 0,
) -> torch.Tensor:
    """Eq. 3: locally aware patch features of all positions, shape (B, H, W, D).

    ``fmaps`` are the backbone's stage outputs, finest first; the patches lie on the grid of
    ``fmaps[grid]`` (0, the finest, as in the paper).
    """
    if not 0 <= grid < len(fmaps):
        raise ValueError(f"grid must index one of the {len(fmaps)} stages, got {grid}")
    if mode == "avgpool":
        pooled = [local_aggregate(m, patch_size, stride) for m in fmaps]
        aligned = align(pooled, tuple(pooled[grid].shape[-2:]))
        return torch.cat(aligned, dim=1).permute(0, 2, 3, 1).contiguous()
    if mode == "official":
        return _official(fmaps, patch_size, stride, embed_dim, target_dim, grid)
    raise ValueError(f"unknown feature mode {mode!r}; choose one of {MODES}")


def _unfold(fmap: torch.Tensor, patch_size: int, stride: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, C*p*p, H', W'): each position's neighbourhood as one vector."""
    b, _, h, w = fmap.shape
    pad = (patch_size - 1) // 2
    cols = F.unfold(fmap, patch_size, padding=pad, stride=stride)
    out_h = (h + 2 * pad - patch_size) // stride + 1
    return cols.reshape(b, -1, out_h, cols.shape[-1] // out_h)


def _official(
    fmaps: list[torch.Tensor], patch_size: int, stride: int, embed_dim: int, target_dim: int, grid: int = 0
) -> torch.Tensor:
    """patchcore-inspection's PatchMaker + Preprocessing + Aggregator, in one pass."""
    unfolded = [_unfold(m, patch_size, stride) for m in fmaps]
    unfolded = align(unfolded, tuple(unfolded[grid].shape[-2:]))
    b, _, h, w = unfolded[0].shape
    per_stage = [
        F.adaptive_avg_pool1d(u.permute(0, 2, 3, 1).reshape(b * h * w, 1, -1), embed_dim)
        for u in unfolded
    ]  # each (BHW, 1, embed_dim)
    stacked = torch.cat(per_stage, dim=1).reshape(b * h * w, 1, -1)
    return F.adaptive_avg_pool1d(stacked, target_dim).reshape(b, h, w, target_dim)
