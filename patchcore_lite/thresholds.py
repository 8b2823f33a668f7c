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
FEW_NORMALS = 20  # fewer held-out normal scores: mean + 3 sd where it is higher, and a warning
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


DECIMALS = 6  # scores.csv and threshold.json write scores and thresholds with this many decimals


def above_all(scores: ArrayLike, decimals: int = DECIMALS) -> float:
    """The smallest number written with ``decimals`` decimals that is above every score as written:
    decisions compare the written values, so ``score >= threshold`` is false for each of ``scores``."""
    top = float(f"{np.max(scores):.{decimals}f}")
    value = top + 10.0**-decimals
    while float(f"{value:.{decimals}f}") <= top:  # float rounding at large magnitudes
        value += 10.0**-decimals
    return float(f"{value:.{decimals}f}")


def auto_threshold(normal_scores: ArrayLike) -> tuple[str, float]:
    """(rule, threshold) from held-out normal image scores; ``score >= threshold`` flags none of them.

    Just above the largest score (as written with 6 decimals): for a new normal image the chance to score
    above the largest of n exchangeable normal scores is 1 / (n + 1), so this is the 1 - 1/(n + 1) quantile
    of normal scores, with no distribution assumed. Below 20 scores (``FEW_NORMALS``) the mean + 3 sd
    is used where it is higher (one score alone: just above it). ``threshold_warning`` says when n is too
    small to trust.
    """
    s = np.asarray(normal_scores, dtype=np.float64)
    if s.ndim != 1 or len(s) == 0 or not np.isfinite(s).all():
        raise ValueError("normal_scores must be a non-empty 1-D array of finite scores")
    n, floor = len(s), above_all(s)
    if n < FEW_NORMALS:
        sd = s.std(ddof=1) if n > 1 else 0.0
        value = float(f"{s.mean() + 3 * sd:.{DECIMALS}f}")
        if value > floor:
            return f"mean + 3 sd of {n} held-out normal image scores", value
    return f"just above the largest of {n} held-out normal image scores", floor


def threshold_warning(n_normal: int) -> str | None:
    """A warning when an automatic threshold rests on fewer than ``FEW_NORMALS`` normal scores."""
    if n_normal >= FEW_NORMALS:
        return None
    return (f"warning: the automatic threshold rests on {n_normal} held-out normal image score(s), fewer than "
            f"{FEW_NORMALS}: about 1 in {n_normal + 1} normal images may be flagged, and that rate itself is "
            "uncertain; fit on more good images or raise --holdout.")


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
