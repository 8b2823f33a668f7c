"""PatchCore: the whole method behind ``fit`` / ``predict`` / ``save`` / ``load``.

    model = PatchCore().fit(train_samples)        # memory bank + greedy coreset
    result = model.predict(test_samples)          # image scores and anomaly maps
    model.save("bottle.npz"); PatchCore.load("bottle.npz")

Every default and where it comes from (paper = Roth et al. 2022, official =
amazon-science/patchcore-inspection):

================  ===================  =============================================
setting           default              source
================  ===================  =============================================
backbone          efficientnet_lite0   offline stand-in for the paper's WRN50
layers            layer2, layer3       paper Sec. 4.4 (stride 8 + 16 stages)
resize, crop      256, 224             paper Sec. 4.1 / official MVTec loader
patch_size p      3                    paper Sec. 4.4 (neighbourhood 3x3)
patch_stride s    1                    official
feature_mode      avgpool              anomalib; ``official`` = unfold + pooling
coreset_ratio     0.1                  paper Table 1 (PatchCore-10%)
projection_dim    128                  official (``ApproximateGreedyCoresetSampler``)
coreset_start     official             10 random starts, official
k                 1                    paper eq. 6, all official runs
reweight, b       True, 9              paper eq. 7, b as anomalib (official: off)
sigma             4                    paper Sec. 3.3 / official
knn               faiss flat           official (exact L2)
knn_nprobe        16                   ivf/ivfpq only; chosen on MTD (RESULTS.md)
distance          Euclidean ||.||_2    paper eq. 6; official: squared L2 (see below)
================  ===================  =============================================

Scores: a patch score is the Euclidean distance to the nearest bank patch, the
L2 norm eq. 6 is written with. The official code scores with the *squared* L2
distance (faiss ``IndexFlatL2`` returns squared distances and it keeps them);
with k = 1 squaring changes no ranking of eq. 6's image scores, but it does
change eq. 7's weights and the upsampled, blurred maps.

Search: exact search costs ``2 N M D`` flops per image (N test patches, M bank
vectors), so at a bottle-size bank it takes most of the inference time on a CPU.
``knn_index="ivf"`` (approximate, faiss inverted lists) does less work;
``benchmarks/bench_knn.py --dataset`` measures its speed and what it costs in accuracy.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import numpy as np
import torch

from . import __version__
from .coreset import select_coreset
from .datasets import Data
from .detector import BackboneDetector, Prediction  # noqa: F401  (Prediction: predict's result, importable here)
from .errors import ModelFileError
from .knn import NearestNeighbors, check_search
from .patches import MODES, patch_features
from .scoring import anomaly_maps, image_scores, patch_scores

FORMAT_VERSION = 1


@dataclass(frozen=True)
class PatchCoreConfig:
    """All settings of a PatchCore model; saved with it. See the module table."""

    backbone: str = "efficientnet_lite0"
    layers: tuple[str, ...] = ("layer2", "layer3")
    pretrained: bool = True
    resize: int | tuple[int, int] = 256
    crop: int | None = 224
    patch_size: int = 3
    patch_stride: int = 1
    feature_mode: str = "avgpool"
    embed_dim: int = 1024
    target_dim: int = 1024
    coreset_ratio: float = 0.1
    coreset_method: str = "greedy"
    projection_dim: int = 128
    projection_eps: float | None = None
    coreset_start: str = "official"
    k: int = 1
    reweight: bool = True
    reweight_b: int = 9
    sigma: float = 4.0
    knn_backend: str = "faiss"
    knn_index: str = "flat"
    knn_nprobe: int = 16
    seed: int = 0
    batch_size: int = 8

    def __post_init__(self) -> None:
        if self.feature_mode not in MODES:
            raise ValueError(f"feature_mode must be one of {MODES}, got {self.feature_mode!r}")
        if not 0 < self.coreset_ratio <= 1:
            raise ValueError(f"coreset_ratio must be in (0, 1], got {self.coreset_ratio}")
        if self.k < 1 or self.reweight_b < 1 or self.batch_size < 1 or self.knn_nprobe < 1:
            raise ValueError("k, reweight_b, batch_size and knn_nprobe must be >= 1")
        check_search(self.knn_backend, self.knn_index)  # before a fit, not after it

    @classmethod
    def from_dict(cls, values: dict) -> PatchCoreConfig:
        """Inverse of ``asdict``; JSON turns tuples into lists."""
        known = {f.name for f in fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown settings {sorted(unknown)}")
        fixed = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
        return cls(**fixed)


class PatchCore(BackboneDetector[PatchCoreConfig]):
    """Roth et al., "Towards Total Recall in Industrial Anomaly Detection", CVPR 2022.

    Args: as ``BackboneDetector`` (``PatchCoreConfig``); the search stays on the CPU.
    """

    config_class = PatchCoreConfig

    def _setup(self) -> None:
        self.memory_bank: torch.Tensor | None = None
        self.index: NearestNeighbors | None = None
        self.n_train_patches = 0
        self.fit_timings: dict[str, float] = {}

    # ---- features -------------------------------------------------------------
    @torch.inference_mode()
    def extract(self, images: torch.Tensor) -> torch.Tensor:
        """Locally aware patch features (B, h, w, D) of normalised images (eq. 1-3)."""
        c = self.config
        fmaps = self.backbone(images.to(self.device))
        feats = patch_features(fmaps, c.patch_size, c.patch_stride, c.feature_mode, c.embed_dim, c.target_dim)
        return feats.float().cpu()

    # ---- fit --------------------------------------------------------------------
    def fit(self, data: Data, progress: bool = True) -> PatchCore:
        """Build the memory bank of training patches and subsample it (Algorithm 1)."""
        c = self.config
        start = time.perf_counter()
        bank = self.extract_all(data, progress, "features (train)").flatten(0, 2)
        extracted = time.perf_counter()
        self.n_train_patches = len(bank)
        picks = select_coreset(
            bank, c.coreset_ratio, c.coreset_method, c.projection_dim, c.projection_eps,
            c.coreset_start, c.seed, progress,
        )
        self._set_bank(bank[picks].contiguous())
        self.fit_timings = {
            "features_s": extracted - start,
            "coreset_s": time.perf_counter() - extracted,
            "coreset_picks": len(picks),
        }
        return self

    def _kept(self) -> list[torch.Tensor | None]:
        """What PatchCore keeps per category: the memory bank."""
        return [self.memory_bank]

    def _set_bank(self, bank: torch.Tensor) -> None:
        c = self.config
        self.memory_bank = bank
        self.index = NearestNeighbors(bank, c.knn_backend, c.knn_index, nprobe=c.knn_nprobe, seed=c.seed)

    def set_search(
        self,
        backend: str = PatchCoreConfig.knn_backend,
        index: str = PatchCoreConfig.knn_index,
        nprobe: int = PatchCoreConfig.knn_nprobe,
    ) -> PatchCore:
        """Search the same memory bank another way (no refit), e.g. ``set_search(index="ivf")``.

        The defaults are the config's: ``set_search()`` returns to exact faiss search."""
        self.config = replace(self.config, knn_backend=backend, knn_index=index, knn_nprobe=nprobe)
        if self.memory_bank is not None:
            self._set_bank(self.memory_bank)
        return self

    # ---- predict ----------------------------------------------------------------
    def _check_fitted(self) -> NearestNeighbors:
        if self.index is None:
            raise RuntimeError("this PatchCore has no memory bank yet: call fit() or PatchCore.load()")
        return self.index

    @torch.inference_mode()
    def score_features(self, features: torch.Tensor, size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Image scores (B,) and (B, *size) anomaly maps of patch features (B, h, w, D) (eq. 6-7)."""
        return score_features(features, self._check_fitted(), self.config, size)

    @torch.inference_mode()
    def score_batch(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Image scores (B,) and anomaly maps (B, H, W) for normalised images (eq. 6-7)."""
        index = self._check_fitted()  # before the backbone runs
        return score_features(self.extract(images), index, self.config, tuple(images.shape[-2:]))

    # ---- save / load ------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write the bank and settings to one ``.npz`` (no pickle), atomically."""
        if self.memory_bank is None:
            raise RuntimeError("nothing to save: call fit() first")
        path = Path(path)
        meta = {
            "format_version": FORMAT_VERSION,
            "package_version": __version__,
            "config": asdict(self.config),
            "backbone_fingerprint": self.backbone.fingerprint(),
            "n_train_patches": self.n_train_patches,
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            np.savez(f, memory_bank=self.memory_bank.numpy(), meta=np.frombuffer(json.dumps(meta).encode(), np.uint8))
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | Path, weights_path: str | Path | None = None, device: str = "cpu") -> PatchCore:
        """Read a model written by ``save``; refuse files of another format or backbone."""
        path = Path(path)
        bank, meta = _read_model_file(path)
        try:
            config = PatchCoreConfig.from_dict(meta["config"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelFileError(f"{path}: invalid settings ({exc})") from None
        model = cls(config, weights_path=weights_path, device=device)
        if not np.isclose(model.backbone.fingerprint(), meta.get("backbone_fingerprint", -1), rtol=1e-9):
            raise ModelFileError(
                f"{path} was fit with other {config.backbone} weights than the ones loaded now "
                "(pretrained vs random, or another weights file): load it with the same weights."
            )
        if bank.ndim != 2 or not np.isfinite(bank).all():
            raise ModelFileError(f"{path}: the memory bank is damaged (shape {bank.shape} or non-finite values)")
        model.n_train_patches = int(meta.get("n_train_patches", len(bank)))
        model._set_bank(torch.from_numpy(bank))
        return model


def score_features(
    features: torch.Tensor, index: NearestNeighbors, config: PatchCoreConfig, size: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Image scores (B,) and (B, *size) anomaly maps of patch features (B, h, w, D) against a bank's index.

    Eq. 6 (nearest-neighbour distance of every patch, its maximum per image), eq. 7 (the
    reweighting, if ``config.reweight``) and the maps (upsampled to ``size``, blurred by
    ``config.sigma``): what ``PatchCore.score_features`` does, for any memory bank.
    """
    dist, nearest = patch_scores(features, index, config.k)
    scores = image_scores(features, dist, nearest, index, config.reweight, config.reweight_b)
    return scores, anomaly_maps(dist, tuple(size), config.sigma)


def _read_model_file(path: Path) -> tuple[np.ndarray, dict]:
    """Bank and metadata of a saved model, with a clear error for anything else."""
    try:
        with np.load(path, allow_pickle=False) as f:
            bank = f["memory_bank"].astype(np.float32)
            meta = json.loads(f["meta"].tobytes().decode())
    except FileNotFoundError:
        raise ModelFileError(f"model file {path} does not exist") from None
    except Exception as exc:  # zip, json, key and pickle refusals all mean the same to a user
        raise ModelFileError(
            f"{path} is not a PatchCore model file written by patchcore_lite ({type(exc).__name__}: {exc}). "
            "Re-create it with `python -m patchcore_lite fit`."
        ) from None
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise ModelFileError(
            f"{path} has model format {version} (written by patchcore_lite "
            f"{meta.get('package_version', '?')}); this is patchcore_lite {__version__}, which reads "
            f"format {FORMAT_VERSION}. Re-fit the model with this version."
        )
    return bank, meta
