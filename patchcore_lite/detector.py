"""What every detector shares: PatchCore (model.py), SPADE, PaDiM and CFA (methods/).

``BackboneDetector`` holds the scaffolding around a method, so that each detector's module
holds only the method itself:

* the backbone and preprocessing, built from a config dataclass and keyword
  overrides (``Spade(k=5)`` is ``Spade(replace(SpadeConfig(), k=5))``);
* ``extract_all``: the features of every image, in tensors preallocated at the
  first batch, so no per-batch copies stay alive while a bank is built;
* ``scored_batches``: ``score_batch`` over every batch of the one loader
  (``datasets.image_batches``, ``config.batch_size`` images at a time), in order; ``predict``
  collects it, ``evaluation.evaluate`` adds the ground truth, the command line writes it as it comes;
* ``memory_bytes``: the size of the tensors a detector keeps per category.

A subclass sets ``config_class`` and implements ``_setup`` (its own state,
unfitted), ``extract``, ``fit``, ``score_batch``, ``_check_fitted`` and ``_kept``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Generic, TypeVar

import numpy as np
import torch

from .backbone import Backbone, check_backbone
from .datasets import Batch, Data, Preprocess, check_size, image_batches
from .errors import DataError, check_int, check_real

Features = torch.Tensor | tuple[torch.Tensor, ...]
ConfigT = TypeVar("ConfigT")


def check_not_empty(data: Data) -> int:
    """The number of images in ``data``; a DataError if there are none (before any other check or work)."""
    if len(data) == 0:
        raise DataError("no images given: the folder or list is empty")
    return len(data)


def check_detector_config(config: Any, layers: Sequence[str]) -> None:
    """The settings every detector's config shares (backbone, ``layers``, sizes, sigma, seed,
    batch size), checked when the config is built: a ConfigError names the first bad one."""
    check_backbone(config.backbone, layers)
    check_size(config.resize, config.crop)
    check_real("sigma", config.sigma, lambda v: v > 0, "> 0 (the anomaly map's Gaussian blur, paper: 4)")
    check_int("seed", config.seed, 0)
    check_int("batch_size", config.batch_size)



@dataclass
class Prediction:
    """Output of ``predict``: one score per image, one map per image (input size)."""

    scores: np.ndarray  # (N,)
    maps: np.ndarray  # (N, H, W) float32


class BackboneDetector(ABC, Generic[ConfigT]):
    """A detector on a frozen backbone's features.

    Args:
        config: settings (a ``config_class`` instance); keyword ``overrides`` replace its fields.
        weights_path: backbone weights file instead of the default source.
        device: where the backbone runs.
    """

    config_class: type  # the settings' dataclass; its defaults apply when no config is given

    def __init__(
        self, config: ConfigT | None = None, weights_path: str | Path | None = None, device: str = "cpu",
        **overrides: Any,
    ) -> None:
        self.config: ConfigT = replace(config or self.config_class(), **overrides)
        c: Any = self.config
        self.device = torch.device(device)
        self.backbone = Backbone(c.backbone, self.backbone_layers(), c.pretrained, weights_path, c.seed).to(self.device)
        self.preprocess = Preprocess(resize=c.resize, crop=c.crop, mean=self.backbone.mean, std=self.backbone.std)
        self._setup()

    def backbone_layers(self) -> tuple[str, ...]:
        """The stages the backbone returns, finest first: ``config.layers`` unless a method needs more."""
        return self.config.layers  # type: ignore[attr-defined]

    @abstractmethod
    def _setup(self) -> None:
        """The method's own state before ``fit``: what it derives from the config and backbone, and None
        for what ``fit`` learns."""

    @abstractmethod
    def extract(self, images: torch.Tensor) -> Features:
        """Features of a batch of normalised images, batch first."""

    @abstractmethod
    def fit(self, data: Data, progress: bool = True) -> BackboneDetector[ConfigT]:
        """Learn from normal training images; returns the detector."""

    @abstractmethod
    def score_batch(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Image scores (B,) and anomaly maps (B, H, W) of normalised images."""

    @abstractmethod
    def _check_fitted(self) -> object:
        """Raise a ``RuntimeError`` that says what to call if ``fit`` has not run."""

    @abstractmethod
    def _kept(self) -> Sequence[torch.Tensor | None]:
        """The tensors the detector keeps per category (None: not fitted yet)."""

    def extract_all(self, data: Data, progress: bool, desc: str) -> Features:
        """``extract`` of every image, stacked into tensors allocated at the first batch."""
        n = check_not_empty(data)
        out: tuple[torch.Tensor, ...] = ()
        for batch in image_batches(data, self.preprocess, self._batch_size, progress, desc):
            feats = self.extract(batch.images)
            parts = feats if isinstance(feats, tuple) else (feats,)
            if not out:
                out = tuple(torch.empty((n, *p.shape[1:]), dtype=p.dtype, device=p.device) for p in parts)
            for whole, part in zip(out, parts):
                whole[batch.start : batch.start + len(part)] = part
        return out if isinstance(feats, tuple) else out[0]

    def scored_batches(
        self, data: Data, progress: bool = True, desc: str = "scoring"
    ) -> Iterator[tuple[Batch, torch.Tensor, torch.Tensor]]:
        """Each batch of ``data`` with its image scores (B,) and anomaly maps (B, H, W), in order.

        The loop every prediction runs through; the fit is checked before any image is read."""
        self._check_fitted()
        for batch in image_batches(data, self.preprocess, self._batch_size, progress, desc):
            scores, maps = self.score_batch(batch.images)
            yield batch, scores, maps

    def predict(self, data: Data, progress: bool = True) -> Prediction:
        """Scores and maps of every image, in order."""
        scores, maps = [], []
        for _, s, m in self.scored_batches(data, progress):
            scores.append(s)
            maps.append(m)
        return Prediction(torch.cat(scores).numpy(), torch.cat(maps).numpy())

    @property
    def _batch_size(self) -> int:
        return self.config.batch_size  # type: ignore[attr-defined]  # every detector config has one

    @property
    def memory_bytes(self) -> int:
        """Size of what the detector keeps per category (``_kept``); 0 before ``fit``."""
        return sum(t.numel() * t.element_size() for t in self._kept() if t is not None)
