"""CFA: Lee, Lee and Song, "CFA: Coupled-hypersphere-based Feature Adaptation for Target-Oriented
Anomaly Localization", IEEE Access 10, 2022 (arXiv 2206.04325).

PatchCore compares test patches with ImageNet features as they are. CFA adapts them to the target
data first: a small learnable *patch descriptor* phi maps every patch feature p_t into a space where
normal patches sit inside small hyperspheres around the vectors of a *memory bank* C, so that an
abnormal patch, which no training pushed there, ends up far away.

* Features (Sec. 3, as the official code): the first three stages (``layer1``-``layer3``), each
  averaged over 3 x 3 neighbourhoods, upsampled bilinearly to ``layer1``'s grid (stride 4: 56 x 56
  at 224) and concatenated: ``patches.patch_features``. 176 channels for EfficientNet-Lite0,
  1792 for WRN50.
* Patch descriptor phi: a 1 x 1 CoordConv, i.e. one linear map of ``[p_t, y_t, x_t]`` (the patch
  feature and its grid coordinates in [-1, 1]) to D // gamma_d channels.
* Memory bank C: the mean of phi(p_t) over the training images, one vector per grid position,
  computed once with the untrained phi. Its size is h * w, whatever the number of training images
  ("scalable memory bank"); K-means with h * w // gamma_c clusters compresses it further. Frozen.
  This is the official code's bank. The paper's Algorithm 1 builds it differently: K-means of one
  image's phi(p_t), then an exponential moving average (EMA, weight beta) over the training
  images of each memory vector's nearest not-yet-taken patch: ``paper_memory_bank``,
  ``CFAConfig(bank="kmeans_ema")``.
* Loss (coupled hyperspheres): with ``D_t^k`` the squared distance of phi(p_t) to its k-th nearest
  memory vector (over the whole bank), the K nearest are attracted into the sphere of radius r and
  the next J ("hard negatives") repelled:

      L_att = 1/(T K) sum_t sum_{k=1..K}     max(0, D_t^k - r^2)          / nu
      L_rep = 1/(T J) sum_t sum_{j=K+1..K+J} max(0, r^2 - D_t^j - alpha)  / nu
      L_CFA = L_att + L_rep

  (1/nu as the official code, nu = 1e-3; alpha = 0.1; K = J = 3.) Training minimises L_CFA;
  ``loss_terms="att"`` or ``"rep"`` minimises one term alone (both are still recorded), the
  ablation of the paper's Table 5.
* Score: with d_t^k the Euclidean distances to the K nearest memory vectors,
  ``A_t = softmin(d_t^1..d_t^K)_1 * d_t^1``: the nearest distance weighted by how much nearer the
  nearest vector is than the next ones (certainty). Maps are upsampled bilinearly and blurred with
  sigma = 4 (``scoring.anomaly_maps``); the image score is the map's maximum.

Where the official code (sungwool/CFA_for_anomaly_localization) and anomalib differ, and what we do:

=====================  ===========================  ==========================  ====================
point                  official                     anomalib                    here (default)
=====================  ===========================  ==========================  ====================
radius r               nn.Parameter, learned        a plain tensor: never       ``learn_radius=True``
                       (AdamW, weight decay too)    learned, stays 1e-5         (official); False =
                                                                                anomalib
repulsion neighbours   ``dist[..., J:]`` (= K+1..   same as official            K+1 .. K+J (equal for
                       K+J only because K = J)                                  K = J)
coarser stages         pooled, then upsampled       *unpooled* map upsampled    pooled (official)
                                                    (a bug in its Descriptor)
memory-bank mean       mean of batch means          same                        exact mean over all
                       (exact only with equal                                   images (float64)
                       batches: drop_last)
memory bank            per-position mean (not the   same                        per-position mean;
                       paper's Algorithm 1)                                     ``bank="kmeans_ema"``
                                                                                = Algorithm 1
model selection        best epoch *on the test      last epoch                  best epoch on a held-
                       set*, each metric apart                                  out split of training
                                                                                normals + cut-paste
epochs                 30                           30 (max_epochs)             ``epochs`` (fast: 3);
                                                                                ``PAPER_EPOCHS`` = 30
K-means                sklearn, 3000 iterations,    same                        sklearn, seeded,
                       unseeded                                                 n_init=1
=====================  ===========================  ==========================  ====================

Note what r's start value implies: r^2 = 1e-10, so ``L_rep`` is zero until r^2 exceeds alpha
(r > 0.32), and even then only for a hard negative closer than sqrt(r^2 - alpha). With a learned r
AdamW grows it by at most about ``lr`` per step while L_att is active, so repulsion can switch on
after a few hundred steps at the earliest, and only if the features' distances are that small
(chapter 6 measures them: in its runs the hard negatives lie far outside that sphere and L_rep
stays 0); with anomalib's fixed r it never does, and anomalib
trains with L_att alone.

Model selection never looks at the test set: ``val_fraction`` of the training normals are held
out (seeded), each also gets ``val_anomalies`` cut-paste copies (Li et al., CVPR 2021: a
rectangle of another held-out image pasted, flipped, at a random place; the rectangle is the
mask), and the epoch with the best mean of image AUROC, pixel AUROC and AUPRO on that
validation set is kept (epoch 0, the untrained descriptor, included).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ..datasets import Data, image_batches
from ..detector import BackboneDetector, check_detector_config, check_not_empty
from ..errors import DataError, check_choice, check_int, check_real
from ..metrics import compute_metrics
from ..patches import patch_features
from ..scoring import anomaly_maps

PAPER_EPOCHS = 30
BANKS = ("position_mean", "kmeans_ema")  # the official code's memory bank, the paper's Algorithm 1
LOSS_TERMS = ("att+rep", "att", "rep")  # L_CFA (the paper, default); one term alone: its Table 5 ablation


@dataclass(frozen=True)
class CFAConfig:
    """All settings of CFA; defaults follow the official code except the backbone, ``epochs`` and
    the validation split (see the module docstring)."""

    backbone: str = "efficientnet_lite0"
    layers: tuple[str, ...] = ("layer1", "layer2", "layer3")
    pretrained: bool = True
    resize: int | tuple[int, int] = 256
    crop: int | None = 224
    gamma_d: int = 1  # descriptor output = D // gamma_d channels
    gamma_c: int = 1  # memory bank = h * w // gamma_c vectors (K-means when > 1)
    bank: str = "position_mean"  # official per-position mean; "kmeans_ema": the paper's Algorithm 1
    beta: float = 0.1  # EMA weight of Algorithm 1 (bank="kmeans_ema"); the book's choice, see paper_memory_bank
    k: int = 3  # K nearest memory vectors: attracted, and scored
    j: int = 3  # J hard negatives after them: repelled
    alpha: float = 0.1  # repulsion margin
    nu: float = 1e-3  # losses are divided by nu
    radius: float = 1e-5  # initial r
    learn_radius: bool = True  # official: r is learned; anomalib: fixed
    loss_terms: str = "att+rep"  # what training minimises: L_att + L_rep (paper); "att" or "rep" alone (ablation)
    epochs: int = 3  # fast path; the paper trains PAPER_EPOCHS
    batch_size: int = 4
    lr: float = 1e-3
    weight_decay: float = 5e-4
    sigma: float = 4.0
    val_fraction: float = 0.2  # held-out training normals for model selection; 0 = keep the last epoch
    val_anomalies: int = 1  # cut-paste copies per held-out image
    seed: int = 0

    def __post_init__(self) -> None:
        """Refuse any setting out of range with a ConfigError, before a backbone is built."""
        check_detector_config(self, self.layers)
        check_choice("bank", self.bank, BANKS)
        check_choice("loss_terms", self.loss_terms, LOSS_TERMS)
        check_real("beta", self.beta, lambda v: 0 < v <= 1, "in (0, 1]")
        for name, minimum in (("gamma_d", 1), ("gamma_c", 1), ("k", 1), ("j", 0), ("epochs", 0)):
            check_int(name, getattr(self, name), minimum)
        for name, ok, valid in (("alpha", lambda v: v >= 0, ">= 0"), ("nu", lambda v: v > 0, "> 0"),
                                ("radius", lambda v: v >= 0, ">= 0"), ("lr", lambda v: v > 0, "> 0"),
                                ("weight_decay", lambda v: v >= 0, ">= 0"),
                                ("val_fraction", lambda v: 0 <= v < 1, "in [0, 1); 0 keeps the last epoch")):
            check_real(name, getattr(self, name), ok, valid)
        # Held-out normals without cut-paste anomalies would give a validation set with one class: no AUROC.
        check_int("val_anomalies", self.val_anomalies, 1 if self.val_fraction > 0 else 0,
                  " cut-paste copies per held-out image while val_fraction > 0 (or set val_fraction=0)")


# ----------------------------------------------------------------------------- descriptor


def coordinate_channels(h: int, w: int) -> torch.Tensor:
    """CoordConv's two extra channels (Liu et al. 2018) as (h, w, 2): row y, then column x, in [-1, 1]."""
    y = torch.linspace(-1, 1, h) if h > 1 else torch.zeros(1)
    x = torch.linspace(-1, 1, w) if w > 1 else torch.zeros(1)
    return torch.stack(torch.meshgrid(y, x, indexing="ij"), dim=-1)


class PatchDescriptor(nn.Module):
    """phi: a 1 x 1 CoordConv from D feature channels (+ 2 coordinates) to D // gamma_d.

    Works channels-last, (B, h, w, D) -> (B, h, w, D // gamma_d): a 1 x 1 convolution is a linear
    map per position, and ``nn.Linear`` has the same default initialisation as ``nn.Conv2d``.
    """

    def __init__(self, in_dim: int, gamma_d: int = 1) -> None:
        super().__init__()
        if in_dim // gamma_d < 1:
            raise ValueError(f"gamma_d = {gamma_d} leaves no channels of {in_dim}")
        self.layer = nn.Linear(in_dim + 2, in_dim // gamma_d)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        b, h, w, _ = features.shape
        coords = coordinate_channels(h, w).to(features).expand(b, h, w, 2)
        return self.layer(torch.cat([features, coords], dim=-1))


# ----------------------------------------------------------------------------- memory bank


def compress_bank(bank: torch.Tensor, gamma_c: int, seed: int = 0) -> torch.Tensor:
    """K-means centres of the bank, ``len(bank) // gamma_c`` of them (gamma_c = 1: the bank as is)."""
    if gamma_c == 1:
        return bank
    from sklearn.cluster import KMeans

    n_clusters = len(bank) // gamma_c
    if n_clusters < 1:
        raise ValueError(f"gamma_c = {gamma_c} leaves no memory vectors of {len(bank)}")
    kmeans = KMeans(n_clusters=n_clusters, n_init=1, max_iter=3000, random_state=seed)
    return torch.from_numpy(kmeans.fit(bank.double().numpy()).cluster_centers_).to(bank.dtype)


def greedy_nearest(bank: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    """C_i^NN of Algorithm 1: for each memory vector j in order, the index of its nearest candidate not yet taken.

    bank (M, D), candidates (T, D) with M <= T; returns M distinct indices into ``candidates``.
    Each row's few nearest candidates are sorted once; a row looks further (a full scan of the
    free candidates) only when all of those are taken. Exact ties may be broken either way.
    """
    m, t = len(bank), len(candidates)
    if m > t:
        raise ValueError(f"{m} memory vectors need at least as many candidates, got {t}")
    dist = (bank**2).sum(1)[:, None] + (candidates**2).sum(1)[None, :] - 2 * bank @ candidates.T
    near = np.argpartition(dist, min(few := 16, t) - 1, axis=1)[:, :few]
    near = np.take_along_axis(near, np.argsort(np.take_along_axis(dist, near, 1), axis=1, kind="stable"), 1)
    free = np.ones(t, dtype=bool)
    taken = np.empty(m, dtype=np.int64)
    for j in range(m):
        choice = next((int(c) for c in near[j] if free[c]), None)
        if choice is None:  # all of row j's nearest are taken: scan what is left
            choice = int(np.argmin(np.where(free, dist[j], np.inf)))
        taken[j] = choice
        free[choice] = False  # y leaves Y: no later memory vector may take it
    return taken


def paper_memory_bank(phi: torch.Tensor, n_vectors: int, beta: float = 0.1, seed: int = 0) -> torch.Tensor:
    """CFA's memory bank as the paper's Algorithm 1 builds it, from descriptors ``phi`` (N, T, D') -> (n_vectors, D').

    C_0 = K-means (n_vectors clusters) of the first image's T vectors phi(p_t) (n_vectors = T: the
    vectors themselves, K-means with one cluster per point). Then for each image i = 1..N in order:
    every memory vector j, in order, takes the nearest of image i's vectors not yet taken
    (``greedy_nearest``: C_i^NN), and C_i = (1 - beta) C_{i-1} + beta C_i^NN. Returns C_N.

    Unlike the official per-position mean, nothing ties a memory vector to a grid position, and
    with a constant beta the last images weigh most (image i's weight is beta (1 - beta)^(N - i)).
    The paper names beta but the book found no value for it: 0.1 is this package's choice.
    """
    check_real("beta", beta, lambda v: 0 < v <= 1, "in (0, 1]")
    if phi.ndim != 3 or len(phi) == 0:
        raise ValueError(f"phi must be (N, T, D) with N >= 1 images, got shape {tuple(phi.shape)}")
    if not 1 <= n_vectors <= phi.shape[1]:
        raise ValueError(f"n_vectors = {n_vectors}: must be in 1 .. {phi.shape[1]} (the vectors of one image)")
    feats = phi.detach().double().cpu().numpy()
    bank = feats[0].copy()
    if n_vectors < len(bank):
        from sklearn.cluster import KMeans

        kmeans = KMeans(n_clusters=n_vectors, n_init=1, max_iter=3000, random_state=seed)
        bank = kmeans.fit(bank).cluster_centers_
    for image in feats:
        bank = (1 - beta) * bank + beta * image[greedy_nearest(bank, image)]
    return torch.from_numpy(bank).to(phi.dtype)


# ----------------------------------------------------------------------------- loss and score


def nearest_squared(phi: torch.Tensor, bank: torch.Tensor, n: int, chunk: int = 4096) -> torch.Tensor:
    """Squared Euclidean distances (N, n) of rows of ``phi`` (N, D) to their n nearest bank rows, ascending.

    The search uses ``|a|^2 + |c|^2 - 2 a.c`` (one matrix product, as the official code) without
    gradients, in chunks of rows; then only the n distances found are recomputed, with gradients,
    from the selected bank rows: the loss's gradient is the same (only the selected distances
    carry one), and the backward pass costs N * n * D instead of N * M * D.
    """
    n = min(n, len(bank))
    bank_sq = (bank * bank).sum(dim=1)
    with torch.no_grad():
        idx = torch.cat([
            torch.addmm(bank_sq, rows, bank.T, alpha=-2).topk(n, dim=1, largest=False).indices
            for rows in phi.detach().split(chunk)
        ])
    dots = torch.bmm(bank[idx], phi[:, :, None])[..., 0]  # (N, n)
    dist = (phi * phi).sum(dim=1, keepdim=True) + bank_sq[idx] - 2 * dots
    return dist.clamp_min(0).sort(dim=1).values


def cfa_loss(
    dist_sq: torch.Tensor, radius: torch.Tensor | float, k: int = 3, alpha: float = 0.1, nu: float = 1e-3
) -> tuple[torch.Tensor, torch.Tensor]:
    """(L_att, L_rep) of the paper's coupled-hypersphere loss, from ascending squared distances (..., K + J).

    L_att = mean over patches and the K nearest of max(0, D^k - r^2) / nu;
    L_rep = mean over patches and the next J of max(0, r^2 - D^j - alpha) / nu (0 if J = 0).
    """
    r2 = torch.as_tensor(radius) ** 2
    att = torch.relu(dist_sq[..., :k] - r2).mean() / nu
    hard = dist_sq[..., k:]
    rep = torch.relu(r2 - hard - alpha).mean() / nu if hard.shape[-1] else att.new_zeros(())
    return att, rep


def softmin_score(dist: torch.Tensor) -> torch.Tensor:
    """A_t = softmin(d^1..d^K)_1 * d^1 for ascending Euclidean distances (..., K) -> (...)."""
    return torch.softmax(-dist, dim=-1)[..., 0] * dist[..., 0]


# ----------------------------------------------------------------------------- validation


def split_indices(n: int, fraction: float, seed: int = 0) -> tuple[list[int], list[int]]:
    """(train, validation) indices: a seeded random ``fraction`` of n held out (rounded).

    ``fraction`` > 0 that holds out no image, or every image, is a DataError naming the numbers:
    silently skipping the model selection, or training on nothing, would be a wrong answer.
    """
    n_val = round(n * fraction)
    if fraction > 0 and not 1 <= n_val < n:
        raise DataError(
            f"val_fraction = {fraction} of {n} training images holds out {n_val}: CFA needs at least 1 "
            "held-out and 1 training image. Use more training images, another val_fraction, or val_fraction=0."
        )
    order = np.random.default_rng(seed).permutation(n)
    return sorted(order[n_val:].tolist()), sorted(order[:n_val].tolist())


def cut_paste(
    images: torch.Tensor, copies: int = 1, seed: int = 0, area: tuple[float, float] = (0.02, 0.15)
) -> tuple[torch.Tensor, torch.Tensor]:
    """CutPaste anomalies (Li et al., CVPR 2021): (copies * N, 3, H, W) images and (copies * N, H, W) masks.

    Each copy of image i gets a rectangle (``area`` of the image, aspect ratio 1/3 .. 3) cut from
    another of the images (i itself if there is only one) at a random place, flipped left-right
    with probability 1/2, and pasted at another random place; the mask is that rectangle.
    """
    rng = np.random.default_rng(seed)
    n, _, h, w = images.shape
    out = images.repeat(copies, 1, 1, 1)
    masks = torch.zeros(len(out), h, w)
    for i in range(len(out)):
        size = rng.uniform(*area) * h * w
        aspect = math.exp(rng.uniform(math.log(1 / 3), math.log(3)))
        ph = min(h - 1, max(2, round(math.sqrt(size * aspect))))
        pw = min(w - 1, max(2, round(math.sqrt(size / aspect))))
        source = (i % n + rng.integers(1, n)) % n if n > 1 else 0
        sy, sx, dy, dx = (int(rng.integers(0, lim)) for lim in (h - ph, w - pw, h - ph, w - pw))
        patch = images[source, :, sy : sy + ph, sx : sx + pw]
        out[i, :, dy : dy + ph, dx : dx + pw] = patch.flip(-1) if rng.random() < 0.5 else patch
        masks[i, dy : dy + ph, dx : dx + pw] = 1
    return out, masks


def _subset(data: Data, indices: list[int]) -> Data:
    if isinstance(data, torch.Tensor):
        return data[indices]
    if isinstance(data, torch.utils.data.Dataset):
        return torch.utils.data.Subset(data, indices)
    return [data[i] for i in indices]


# ----------------------------------------------------------------------------- the detector


class CFA(BackboneDetector[CFAConfig]):
    """CFA detector: ``fit`` builds the memory bank and trains the descriptor, ``score_batch`` scores.

    Args: as ``BackboneDetector`` (``CFAConfig``); the descriptor and distances run on ``device`` too.

    The backbone is frozen, so ``fit`` extracts the training features once and keeps them in memory
    for all epochs: N x h x w x D floats (30 images with EfficientNet-Lite0, 56 x 56 x 176: 63 MiB;
    WRN50's D = 1792 needs ten times that).

    After ``fit``: ``memory_bank`` (M, D'), ``radius``, ``history`` (one dict per epoch: the mean
    training losses ``loss``, ``l_att``, ``l_rep`` (NaN for epoch 0, before training), r at the
    epoch's end and the validation metrics ``val_*``) and ``best_epoch`` (the epoch kept).
    """

    config_class = CFAConfig

    def _setup(self) -> None:
        c = self.config
        with torch.random.fork_rng():
            torch.manual_seed(c.seed)
            self.descriptor = PatchDescriptor(sum(self.backbone.channels), c.gamma_d).to(self.device)
        self.radius = nn.Parameter(torch.tensor(c.radius, device=self.device), requires_grad=c.learn_radius)
        self.memory_bank: torch.Tensor | None = None
        self.history: list[dict[str, float]] = []
        self.best_epoch = 0

    # ---- features -------------------------------------------------------------------
    @torch.no_grad()  # not inference_mode: cached features are inputs of the descriptor's backward pass
    def extract(self, images: torch.Tensor) -> torch.Tensor:
        """Patch features p_t (B, h, w, D): 3 x 3 means of the three stages on the finest grid."""
        return patch_features(self.backbone(images.to(self.device)), patch_size=3).float()

    def _distances(self, phi: torch.Tensor, n: int) -> torch.Tensor:
        assert self.memory_bank is not None
        return nearest_squared(phi.flatten(0, 2), self.memory_bank, n).unflatten(0, phi.shape[:3])

    # ---- fit --------------------------------------------------------------------------
    def fit(self, data: Data, progress: bool = True) -> CFA:
        """Hold out a validation split, build the memory bank, train phi with L_CFA, keep the best epoch."""
        c = self.config
        train_idx, val_idx = split_indices(check_not_empty(data), c.val_fraction, c.seed)
        feats = self.extract_all(_subset(data, train_idx), progress, "CFA features (train)")
        self.memory_bank = self._build_bank(feats)
        val = self._validation_set(_subset(data, val_idx), progress) if val_idx else None
        optimizer = torch.optim.AdamW(
            [*self.descriptor.parameters(), self.radius], lr=c.lr, weight_decay=c.weight_decay, amsgrad=True
        )
        generator = torch.Generator().manual_seed(c.seed)
        # Epoch 0 is the untrained descriptor: validated, so it can be kept; no training loss yet.
        self.history = [self._record(0, math.nan, math.nan, val)]
        best, self.best_epoch = self._state(), 0
        bar = tqdm(range(1, c.epochs + 1), desc="CFA training", disable=not progress, unit="epoch")
        for epoch in bar:
            self.history.append(self._record(epoch, *self._epoch(feats, optimizer, generator), val))
            bar.set_postfix({k: f"{v:.4g}" for k, v in self.history[-1].items() if k in ("loss", "val_score")})
            if val is None or self.history[-1]["val_score"] > self.history[self.best_epoch]["val_score"]:
                best, self.best_epoch = self._state(), epoch
        self.descriptor.load_state_dict(best["descriptor"])
        self.radius.data.copy_(best["radius"])
        return self

    @torch.no_grad()
    def _build_bank(self, feats: torch.Tensor) -> torch.Tensor:
        """C: mean of phi(p_t) over the training images per position (float64 sum), then K-means;
        or, with ``bank="kmeans_ema"``, the paper's Algorithm 1 (``paper_memory_bank``)."""
        c = self.config
        if c.bank == "kmeans_ema":
            phi = torch.cat([self.descriptor(f).flatten(1, 2) for f in feats.split(c.batch_size)])
            n_vectors = max(1, phi.shape[1] // c.gamma_c)
            return paper_memory_bank(phi.cpu(), n_vectors, c.beta, c.seed).to(self.device)
        total = sum(self.descriptor(f).double().sum(dim=0) for f in feats.split(c.batch_size))
        bank = (total / len(feats)).float().flatten(0, 1)  # (h * w, D')
        return compress_bank(bank.cpu(), c.gamma_c, c.seed).to(self.device)

    def _validation_set(self, data: Data, progress: bool) -> dict[str, torch.Tensor]:
        """Held-out normals and their cut-paste copies: features, labels and masks."""
        batches = image_batches(data, self.preprocess, self.config.batch_size, progress, "CFA validation")
        images = torch.cat([batch.images for batch in batches])
        pasted, pasted_masks = cut_paste(images, self.config.val_anomalies, self.config.seed)
        normals = torch.zeros(len(images), *images.shape[-2:])
        return {
            "features": torch.cat([self.extract_all(x, False, "") for x in (images, pasted)]),
            "labels": torch.cat([torch.zeros(len(images)), torch.ones(len(pasted))]),
            "masks": torch.cat([normals, pasted_masks]),
        }

    def _epoch(
        self, feats: torch.Tensor, optimizer: torch.optim.Optimizer, generator: torch.Generator
    ) -> tuple[float, float]:
        """One pass over the training features in seeded random batches: mean (L_att, L_rep) over it.

        Both terms are measured; ``loss_terms`` says which of them the step minimises.
        """
        c, att_sum, rep_sum = self.config, 0.0, 0.0
        use_att, use_rep = ("att" in c.loss_terms), ("rep" in c.loss_terms)
        for batch in torch.randperm(len(feats), generator=generator).split(c.batch_size):
            dist_sq = self._distances(self.descriptor(feats[batch]), c.k + c.j)
            att, rep = cfa_loss(dist_sq, self.radius, c.k, c.alpha, c.nu)
            optimizer.zero_grad()
            (use_att * att + use_rep * rep).backward()
            optimizer.step()
            att_sum += att.item() * len(batch)
            rep_sum += rep.item() * len(batch)
        return att_sum / len(feats), rep_sum / len(feats)

    def _record(self, epoch: int, att: float, rep: float, val: dict[str, torch.Tensor] | None) -> dict[str, float]:
        row = {"epoch": epoch, "loss": att + rep, "l_att": att, "l_rep": rep, "radius": self.radius.item()}
        if val is not None:
            scores, maps = self._score_features(val["features"], tuple(val["masks"].shape[-2:]))
            metrics = compute_metrics(val["labels"].numpy(), scores.numpy(), val["masks"].numpy(), maps.numpy())
            row |= {f"val_{k}": v for k, v in metrics.items()}
            row["val_score"] = float(np.mean(list(metrics.values())))
        return row

    def _state(self) -> dict[str, Any]:
        return {"descriptor": {k: v.clone() for k, v in self.descriptor.state_dict().items()},
                "radius": self.radius.detach().clone()}

    # ---- score ------------------------------------------------------------------------
    @torch.no_grad()
    def _score_features(self, feats: torch.Tensor, size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        scores, maps = [], []
        for part in feats.split(self.config.batch_size):
            dist = self._distances(self.descriptor(part), self.config.k).sqrt()
            m = anomaly_maps(softmin_score(dist), size, self.config.sigma).cpu()
            scores.append(m.flatten(1).amax(dim=1))
            maps.append(m)
        return torch.cat(scores), torch.cat(maps)

    def score_batch(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Image scores (B,) and anomaly maps (B, H, W) of normalised images: A_t, upsampled, blurred, max."""
        self._check_fitted()
        return self._score_features(self.extract(images), tuple(images.shape[-2:]))

    def _check_fitted(self) -> None:
        if self.memory_bank is None:
            raise RuntimeError("this CFA has no memory bank yet: call fit() first")

    def _kept(self) -> list[torch.Tensor | None]:
        """What CFA keeps per category: the memory bank and the descriptor's weights (plus r)."""
        if self.memory_bank is None:
            return []
        return [self.memory_bank, self.radius, *self.descriptor.parameters()]
