"""The evaluation protocol (PatchCore, Sec. 4.1-4.2): fit on a folder's normal training images,
score its test set, and measure image AUROC, pixel AUROC and AUPRO (``metrics``).

The same loop serves PatchCore, SPADE, PaDiM and CFA: any ``detector.BackboneDetector``, scored
through its ``scored_batches``. Every file is checked before the first image is processed, so
bad input costs seconds, never a finished fit.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .datasets import (
    ImageDataset,
    Sample,
    train_test_samples,
    validate_samples,
)
from .detector import BackboneDetector
from .errors import DataError
from .metrics import compute_metrics
from .thresholds import auto_threshold, decision_rates, split_holdout


def check_test_set(test: Sequence[Sample], where: str | Path) -> None:
    """Refuse a test set without both normal and anomalous images: its AUROC is undefined."""
    labels = {s.label for s in test}
    if labels != {0, 1}:
        kind = "normal" if labels == {0} else "anomalous"
        raise DataError(
            f"{where}: the test set has only {kind} images ({len(test)}), so AUROC is undefined; "
            "add normal (test/good/) and defective (test/<defect>/) test images."
        )


@dataclass
class Result:
    """Scores, ground truth, metrics and costs of one detector on one test set."""

    name: str
    labels: np.ndarray
    scores: np.ndarray
    defects: list[str]
    paths: list[str]
    metrics: dict[str, float] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    maps: np.ndarray | None = None  # (N, H, W), kept when asked for
    masks: np.ndarray | None = None

    def row(self, **extra: object) -> dict[str, object]:
        """One flat table row: name, metrics, timings and any extra columns."""
        return {"name": self.name, **extra, **self.metrics, **self.timings}


def evaluate(
    detector: BackboneDetector,
    test: list[Sample] | ImageDataset,
    name: str = "",
    progress: bool = True,
    keep_maps: bool = False,
) -> Result:
    """Score every test sample and compute image AUROC, pixel AUROC and AUPRO.

    Samples are checked first; an ``ImageDataset`` is taken as already checked.
    """
    if not isinstance(test, ImageDataset):
        check_test_set(test, name or "test samples")
        validate_samples(test)
        test = ImageDataset(test, detector.preprocess)
    samples = test.samples
    scores, maps, masks = [], [], []
    start = time.perf_counter()
    for batch, s, m in detector.scored_batches(test, progress, f"scoring {name}".strip()):
        scores.append(s.numpy())
        maps.append(m.numpy().astype(np.float32))
        masks.append(batch.masks.numpy())
    seconds = time.perf_counter() - start
    labels = np.array([s.label for s in samples])
    all_maps, all_masks = np.concatenate(maps), np.concatenate(masks)
    result = Result(
        name=name,
        labels=labels,
        scores=np.concatenate(scores),
        defects=[s.defect for s in samples],
        paths=[str(s.path) for s in samples],
        metrics=compute_metrics(labels, np.concatenate(scores), all_masks, all_maps),
        timings={"predict_s": seconds, "images_per_s": len(samples) / seconds},
    )
    if keep_maps:
        result.maps, result.masks = all_maps, all_masks
    return result


def fit_evaluate(
    detector: BackboneDetector,
    root: str | Path,
    name: str | None = None,
    seed: int = 0,
    progress: bool = True,
    keep_maps: bool = False,
    holdout: float = 0.0,
    samples: tuple[list[Sample], list[Sample]] | None = None,
) -> Result:
    """Fit on ``root``'s normal training images, then evaluate on its test set.

    With ``holdout`` > 0 that fraction of the training images (seeded) stays out of the fit; their
    scores set ``thresholds.auto_threshold``, and the metrics gain precision, recall and false-positive
    rate at it: what the automatic threshold costs on labelled data.
    The test set's labels and every file are checked first: a problem never surfaces after the fit.
    ``samples``: ``root``'s (train, test) as the caller listed and checked them (``check_test_set``,
    ``validate_samples``, as the command line does for every category before the first fit); they are
    not decoded again."""
    if samples is None:
        samples = train_test_samples(root, seed=seed)
        check_test_set(samples[1], root)
        validate_samples(samples[0] + samples[1])
    train, test = samples
    train, held = split_holdout(train, holdout, seed, root) if holdout else (train, [])
    start = time.perf_counter()
    detector.fit(ImageDataset(train, detector.preprocess), progress=progress)
    fit_seconds = time.perf_counter() - start
    test_set = ImageDataset(test, detector.preprocess)
    result = evaluate(detector, test_set, name or Path(root).name, progress, keep_maps)
    result.timings = {"fit_s": fit_seconds, **result.timings}
    if held:
        _, threshold = auto_threshold(detector.predict(ImageDataset(held, detector.preprocess), progress=False).scores)
        result.metrics.update(auto_threshold=threshold, **decision_rates(result.labels, result.scores, threshold))
    return result
