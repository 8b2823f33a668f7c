"""PatchCore: the whole method behind ``fit`` / ``predict`` / ``save`` / ``load``.

    model = PatchCore().fit(train_samples)        # memory bank + greedy coreset
    result = model.predict(test_samples)          # image scores and anomaly maps
    model.save("bottle.npz"); PatchCore.load("bottle.npz")
    model.calibrate(held_out_good)                # normal scores for thresholds.auto_threshold

Every default and where it comes from (paper = Roth et al. 2022, official =
amazon-science/patchcore-inspection):

================  ===================  =============================================
setting           default              source
================  ===================  =============================================
backbone          efficientnet_lite0   offline stand-in for the paper's WRN50
layers            layer2, layer3       paper Sec. 4.4 (stride 8 + 16 stages)
grid_layer        None                 the finest layer's grid (eq. 3); e.g. layer2 with layer1 added
resize, crop      329, 288             accuracy study (chapter 9): paper Sec. 4.1's 256, 224 scaled to 288
patch_size p      3                    paper Sec. 4.4 (neighbourhood 3x3)
patch_stride s    1                    official
feature_mode      avgpool              anomalib; ``official`` = unfold + pooling
coreset_ratio     0.1                  paper Table 1 (PatchCore-10%)
projection_dim    128                  official (``ApproximateGreedyCoresetSampler``)
coreset_start     official             10 random starts, official
k                 1                    paper eq. 6, all official runs
reweight, b       True, 9              paper eq. 7, b as anomalib (official: off)
sigma             4                    paper Sec. 3.3 / official
knn               faiss flat           official (exact L2); ``exact`` = the same by a certified filter
knn_nprobe        16                   ivf/ivfpq only; chosen on MTD (RESULTS.md)
squared           False                paper eq. 6 (Euclidean); True = official (squared L2)
================  ===================  =============================================

Input size: the paper resizes MVTec AD images to 256 and centre-crops 224 (Sec. 4.1). With the
offline EfficientNet-Lite0, a 288-pixel input (resize 329, crop 288; Magnetic Tile Defects resized
whole to 288 x 288: a 36 x 36 patch grid instead of 28 x 28) raised the mean AUPRO over the
development sets from 0.842 to 0.858 and no image AUROC fell, at 13.5 images/s on the rule's
bottle-size bank (224: 20.9): the accuracy study, ``benchmarks/accuracy_study.py``, with its rule
written before the runs (``benchmarks/RESULTS.md``). ``resize=256, crop=224`` is the paper's setting
(``datasets.protocol(kind, 224)``).

Scores: a patch score is the Euclidean distance to the nearest bank patch, the
L2 norm eq. 6 is written with. The official code scores with the *squared* L2
distance (faiss ``IndexFlatL2`` returns squared distances and it keeps them);
with k = 1 squaring changes no ranking of eq. 6's image scores, but it does
change the upsampled, blurred maps (and the means over k > 1 neighbours).
``squared=True`` (``--squared-distances``) scores as the official code does.

Search: exact search costs ``2 N M D`` flops per image (N test patches, M bank
vectors), so at a bottle-size bank it takes most of the inference time on a CPU.
``knn_backend="exact"`` returns the same nearest neighbours with far fewer flops: a certified
lower bound from 64 principal components rules out almost every bank vector, and the rest are
re-ranked exactly (``exact_search``; the default ``faiss`` is the official code's ``IndexFlatL2``).
``knn_index="ivf"`` (approximate, faiss inverted lists) does less work;
``benchmarks/bench_knn.py --dataset`` measures its speed and what it costs in accuracy.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import stat
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import __version__
from .coreset import METHODS, STARTS, select_coreset
from .datasets import MVTEC_PREPROCESS, Data
from .detector import BackboneDetector, Prediction, check_detector_config  # noqa: F401  (Prediction: importable here)
from .errors import (
    ConfigError,
    ModelFileError,
    check_choice,
    check_int,
    check_real,
    check_setting,
    file_kind,
    shown,
)
from .knn import NearestNeighbors, check_search
from .patches import MODES, patch_features
from .scoring import check_reweight, scores_and_maps
from .thresholds import pixel_quantiles

FORMAT_VERSION = 1


@dataclass(frozen=True)
class PatchCoreConfig:
    """All settings of a PatchCore model; saved with it. See the module table."""

    backbone: str = "efficientnet_lite0"
    layers: tuple[str, ...] = ("layer2", "layer3")
    grid_layer: str | None = None  # the layer whose grid the patches use; None: the finest (eq. 3)
    pretrained: bool = True
    resize: int | tuple[int, int] = MVTEC_PREPROCESS.resize
    crop: int | None = MVTEC_PREPROCESS.crop
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
    squared: bool = False  # official code: squared L2 patch scores; paper eq. 6: Euclidean
    sigma: float = 4.0
    knn_backend: str = "faiss"
    knn_index: str = "flat"
    knn_nprobe: int = 16
    seed: int = 0
    batch_size: int = 8

    def __post_init__(self) -> None:
        """Refuse any setting out of range with a ConfigError, before a backbone is built or a fit starts."""
        check_detector_config(self, self.layers)
        check_choice("feature_mode", self.feature_mode, MODES)
        valid = f"one of the layers read ({', '.join(self.layers)}), or None for the finest of them"
        check_setting(self.grid_layer is None or self.grid_layer in self.layers, "grid_layer", self.grid_layer, valid)
        for name in ("patch_size", "patch_stride", "embed_dim", "target_dim", "projection_dim", "k", "knn_nprobe"):
            check_int(name, getattr(self, name))
        check_real("coreset_ratio", self.coreset_ratio, lambda v: 0 < v <= 1, "in (0, 1], the fraction of patches kept")
        check_choice("coreset_method", self.coreset_method, METHODS)
        eps = self.projection_eps
        if eps is not None:
            check_real("projection_eps", eps, lambda v: 0 < v < 1, "None (use projection_dim) or in (0, 1)")
        check_choice("coreset_start", self.coreset_start, STARTS)
        check_reweight(self.reweight_b)
        check_search(self.knn_backend, self.knn_index)

    @property
    def scoring(self) -> dict[str, Any]:
        """The settings of eq. 6-7 and the maps, as ``scoring.scores_and_maps`` takes them."""
        return {"k": self.k, "squared": self.squared, "reweight": self.reweight, "b": self.reweight_b,
                "sigma": self.sigma}

    @property
    def grid_index(self) -> int:
        """Position in ``layers`` of the stage whose grid the patches use (eq. 3: 0, the finest)."""
        return 0 if self.grid_layer is None else self.layers.index(self.grid_layer)

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

    Args: as ``BackboneDetector`` (``PatchCoreConfig``); on a GPU the exact search runs there too
    (``knn.NearestNeighbors``), the memory bank itself stays in CPU memory.
    """

    config_class = PatchCoreConfig

    def _setup(self) -> None:
        self.memory_bank: torch.Tensor | None = None
        self.index: NearestNeighbors | None = None
        self.n_train_patches = 0
        self.fit_timings: dict[str, float] = {}
        self.normal_scores: np.ndarray | None = None  # held-out normal image scores (calibrate)
        self.normal_pixel_quantiles: dict[str, float] = {}

    # ---- features -------------------------------------------------------------
    @torch.inference_mode()
    def extract(self, images: torch.Tensor) -> torch.Tensor:
        """Locally aware patch features (B, h, w, D) of normalised images (eq. 1-3)."""
        c = self.config
        fmaps = self.backbone(images.to(self.device))
        feats = patch_features(fmaps, c.patch_size, c.patch_stride, c.feature_mode, c.embed_dim, c.target_dim,
                               c.grid_index)
        return feats.float().cpu()

    def check_patch_grid(self) -> None:
        """Refuse a patch size larger than the patch grid (eq. 3's finest stage at this input size): every
        neighbourhood would be mostly zero padding and every patch alike."""
        c, pre = self.config, self.preprocess
        side = pre.crop if pre.crop is not None else min([pre.resize] if isinstance(pre.resize, int) else pre.resize)
        grid = side // self.backbone.strides[c.grid_index]
        if c.patch_size > grid:
            raise ConfigError(f"patch_size = {c.patch_size}: larger than the {grid}x{grid} patch grid of "
                              f"{c.layers[c.grid_index]} at a {side}-pixel input; use --patch-size {grid} or less, "
                              "or a larger --crop / --resize.")

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
        if c.reweight:
            check_reweight(c.reweight_b, len(picks))
        self._set_bank(bank[picks].contiguous())
        self.fit_timings = {
            "features_s": extracted - start,
            "coreset_s": time.perf_counter() - extracted,
            "coreset_picks": len(picks),
        }
        return self

    def calibrate(self, normal: Data, progress: bool = True) -> PatchCore:
        """Score normal images kept out of the memory bank and record their image scores and
        pixel-score quantiles: ``thresholds.auto_threshold(model.normal_scores)`` then needs no
        anomalous image. Saved with the model."""
        pred = self.predict(normal, progress)
        self.normal_scores = pred.scores.astype(np.float64)
        self.normal_pixel_quantiles = pixel_quantiles(pred.maps)
        return self

    def _kept(self) -> list[torch.Tensor | None]:
        """What PatchCore keeps per category: the memory bank."""
        return [self.memory_bank]

    def _set_bank(self, bank: torch.Tensor) -> None:
        c = self.config
        self.memory_bank = bank
        self.index = NearestNeighbors(bank, c.knn_backend, c.knn_index, nprobe=c.knn_nprobe, seed=c.seed,
                                      device=self.device)

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
        return scores_and_maps(features, self._check_fitted(), size, **self.config.scoring)

    @torch.inference_mode()
    def score_batch(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Image scores (B,) and anomaly maps (B, H, W) for normalised images (eq. 6-7)."""
        index = self._check_fitted()  # before the backbone runs
        return scores_and_maps(self.extract(images), index, tuple(images.shape[-2:]), **self.config.scoring)

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
            "search": self.index.describe() if self.index else "",  # which path ran; informative, not read back
        }
        if self.normal_scores is not None:  # optional keys: older files without them still load
            meta["normal_scores"] = self.normal_scores.tolist()
            meta["normal_pixel_quantiles"] = self.normal_pixel_quantiles
        bank = self.memory_bank.numpy()
        meta["digest"] = model_digest(bank, meta)  # an edit of the bank or of any setting is refused on load
        path.parent.mkdir(parents=True, exist_ok=True)
        # A new file in the same folder, renamed into place: an existing model is replaced whole or
        # not at all. open() gives it the usual permissions (umask), where mkstemp would give 0600.
        tmp = path.with_name(f"{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            with open(tmp, "xb") as f:
                np.savez(f, memory_bank=bank, meta=np.frombuffer(json.dumps(meta).encode(), np.uint8))
            os.replace(tmp, path)
        except BaseException:  # disk full, interrupted, path is a folder: leave nothing behind
            tmp.unlink(missing_ok=True)
            raise
        return path

    @classmethod
    def load(cls, path: str | Path, weights_path: str | Path | None = None, device: str = "cpu") -> PatchCore:
        """Read a model written by ``save``; refuse, with a ModelFileError naming the file, anything else.

        The metadata, settings and bank are checked before the backbone is built; the bank's
        width and the weights' fingerprint, which need the backbone, right after.
        """
        path = Path(path)
        bank, meta, config = _read_model_file(path)
        if weights_path is not None and not config.pretrained:
            raise ConfigError(f"--weights {shown(weights_path)}: {shown(path)} was fit with a random {config.backbone} "
                              "(--random-init), which loads no weights file; drop --weights.")
        model = cls(config, weights_path=weights_path, device=device)
        if not np.isclose(model.backbone.fingerprint(), meta["backbone_fingerprint"], rtol=1e-9):
            raise ModelFileError(
                f"{path} was fit with other {config.backbone} weights than the ones loaded now "
                "(pretrained vs random, or another weights file): load it with the same weights."
            )
        width = config.target_dim if config.feature_mode == "official" else sum(model.backbone.channels)
        if bank.shape[1] != width:
            raise ModelFileError(
                f"{path}: the memory bank holds {bank.shape[1]}-dimensional features, but {config.backbone} "
                f"{list(config.layers)} ({config.feature_mode}) gives {width}: the file is damaged or was "
                "edited. Re-create it with `python -m patchcore_lite fit`."
            )
        if "digest" in meta and meta["digest"] != model_digest(bank, meta):  # last: the specific checks speak first
            raise ModelFileError(f"{shown(path)}: the memory bank or settings were changed after `fit` wrote it (its "
                                 "digest no longer matches), so its scores would not mean what its settings say. "
                                 "Re-create it with `python -m patchcore_lite fit`.")
        model.n_train_patches = int(meta["n_train_patches"])
        if "normal_scores" in meta:
            model.normal_scores = np.array(meta["normal_scores"], dtype=np.float64)
            model.normal_pixel_quantiles = meta.get("normal_pixel_quantiles", {})
        model._set_bank(torch.from_numpy(bank))
        return model


def _read_model_file(path: Path) -> tuple[np.ndarray, dict, PatchCoreConfig]:
    """Bank, metadata and settings of a saved model, with a ModelFileError for anything else."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise ModelFileError(f"model file {shown(path)} does not exist") from None
    if not stat.S_ISREG(mode):  # a FIFO blocks np.load forever, /dev/zero never ends
        raise ModelFileError(f"{shown(path)}: the model is a {file_kind(mode)}, not a regular file; "
                             "give the .npz file written by `python -m patchcore_lite fit`.")
    try:
        with np.load(path, allow_pickle=False) as f:
            bank = f["memory_bank"]
            meta = json.loads(f["meta"].tobytes().decode())
    except FileNotFoundError:
        raise ModelFileError(f"model file {path} does not exist") from None
    except Exception as exc:  # zip, json, key and pickle refusals all mean the same to a user
        raise ModelFileError(
            f"{path} is not a PatchCore model file written by patchcore_lite ({type(exc).__name__}: {exc}). "
            "Re-create it with `python -m patchcore_lite fit`."
        ) from None
    refit = "Re-create it with `python -m patchcore_lite fit`."
    if not isinstance(meta, dict):
        raise ModelFileError(f"{path}: its metadata is a JSON {type(meta).__name__}, not an object: "
                             f"not a model written by patchcore_lite. {refit}")
    _check_format(path, meta)
    missing = [key for key in _META_KEYS if key not in meta]
    if missing:
        raise ModelFileError(f"{path}: the metadata lacks {', '.join(missing)}: the file is damaged. {refit}")
    try:
        config = PatchCoreConfig.from_dict(meta["config"])
    except (TypeError, ValueError, AttributeError) as exc:
        raise ModelFileError(f"{path}: invalid settings ({exc}). {refit}") from None
    if bank.ndim != 2 or 0 in bank.shape or bank.dtype.kind != "f" or not np.isfinite(bank).all():
        raise ModelFileError(
            f"{path}: the memory bank is damaged: shape {bank.shape}, dtype {bank.dtype}, where a non-empty "
            f"(M, D) array of finite floats is expected. {refit}"
        )
    fingerprint, n_train = meta["backbone_fingerprint"], meta["n_train_patches"]
    if not (_is_number(fingerprint) and _is_number(n_train) and float(n_train).is_integer() and n_train >= len(bank)):
        raise ModelFileError(f"{path}: backbone_fingerprint {fingerprint!r} or n_train_patches {n_train!r} "
                             f"is not a number (at least the bank's {len(bank)}). {refit}")
    normal = meta.get("normal_scores", [0.0])
    if not (isinstance(normal, list) and normal and all(_is_number(v) and np.isfinite(v) for v in normal)):
        raise ModelFileError(f"{path}: normal_scores must be a non-empty list of finite numbers. {refit}")
    return bank.astype(np.float32), meta, config


def model_digest(bank: np.ndarray, meta: dict) -> str:
    """SHA-256 of the bank's bytes and of the metadata (without its own digest) as canonical JSON."""
    digest = hashlib.sha256(np.ascontiguousarray(bank).tobytes())
    digest.update(str((bank.dtype.str, bank.shape)).encode())
    digest.update(json.dumps({k: v for k, v in meta.items() if k != "digest"}, sort_keys=True).encode())
    return digest.hexdigest()


_META_KEYS = ("config", "backbone_fingerprint", "n_train_patches")  # format_version: _check_format


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_format(path: Path, meta: dict) -> None:
    """Refuse a model format this version cannot read: a newer one, or no valid version at all."""
    version = meta.get("format_version")
    if version == FORMAT_VERSION:
        return
    newer = _is_number(version) and version > FORMAT_VERSION  # type: ignore[operator]
    fix = "upgrade patchcore_lite (pip install -U patchcore-lite) or re-fit" if newer else "re-fit"
    raise ModelFileError(
        f"{path} has model format {version!r} (written by patchcore_lite {meta.get('package_version', '?')}); "
        f"this is patchcore_lite {__version__}, which reads format {FORMAT_VERSION}: {fix} the model with this version."
    )
