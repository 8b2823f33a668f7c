"""From scores to decisions: hold out normal images at fit time, set a threshold from their scores alone.

    fit, held = split_holdout(good_images, 0.1, seed=0)
    model = PatchCore().fit(fit).calibrate(held)      # records the held-out normal scores
    rule, value = auto_threshold(model.normal_scores)  # "anomalous" where score >= value

No anomalous image is needed: the rule only asks how high normal images score.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

import numpy as np
from numpy.typing import ArrayLike

from .errors import DataError, check_real

T = TypeVar("T")

HOLDOUT = 0.1  # default fraction of the good images kept out of the memory bank
QUANTILE = 0.99
MIN_FOR_QUANTILE = 20  # below this a 0.99 quantile is just the maximum: use mean + 3 sd instead
PIXEL_QUANTILES = (0.5, 0.9, 0.99, 0.999)


def check_holdout(fraction: object) -> None:
    """Refuse a held-out fraction outside [0, 1) with a ConfigError."""
    check_real("holdout", fraction, lambda v: 0 <= v < 1, "in [0, 1), the fraction of good images held out")


def split_holdout(images: Sequence[T], fraction: float, seed: int, where: object = "") -> tuple[list[T], list[T]]:
    """(for the memory bank, held out): a seeded random ``fraction`` held out, at least 1 unless 0.

    A DataError says how many images are needed when there are too few for both parts.
    """
    check_holdout(fraction)
    held = 0 if fraction == 0 else max(1, round(fraction * len(images)))
    needed = max(2, held + 1)
    if len(images) < needed:
        split = f" ({held} held out for the threshold, the rest for the memory bank)" if held else ""
        raise DataError(f"{where}: {len(images)} good image(s) found; at least {needed} are needed{split}.")
    order = np.random.default_rng(seed).permutation(len(images))
    out = set(order[:held].tolist())
    return [x for i, x in enumerate(images) if i not in out], [images[i] for i in sorted(out)]


def auto_threshold(normal_scores: ArrayLike) -> tuple[str, float]:
    """(rule, threshold) from held-out normal image scores: their 0.99 quantile when there are at
    least 20 of them, else their mean + 3 standard deviations."""
    s = np.asarray(normal_scores, dtype=np.float64)
    if len(s) >= MIN_FOR_QUANTILE:
        return f"quantile {QUANTILE} of {len(s)} held-out normal image scores", float(np.quantile(s, QUANTILE))
    sd = s.std(ddof=1) if len(s) > 1 else 0.0
    return f"mean + 3 sd of {len(s)} held-out normal image scores", float(s.mean() + 3 * sd)


def pixel_quantiles(maps: np.ndarray) -> dict[str, float]:
    """A few quantiles of normal images' pixel scores, keyed by the quantile as text."""
    return dict(zip(map(str, PIXEL_QUANTILES), np.quantile(maps, PIXEL_QUANTILES).tolist()))


def decision_rates(labels: ArrayLike, scores: ArrayLike, threshold: float) -> dict[str, float]:
    """Precision, recall and false-positive rate of ``score >= threshold`` against labels (1 = anomalous)."""
    labels, flagged = np.asarray(labels) == 1, np.asarray(scores) >= threshold
    tp, fp = int((flagged & labels).sum()), int((flagged & ~labels).sum())
    return {
        "precision": tp / max(1, int(flagged.sum())),
        "recall": tp / max(1, int(labels.sum())),
        "fpr": fp / max(1, int((~labels).sum())),
    }
