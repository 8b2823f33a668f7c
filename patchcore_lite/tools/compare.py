"""Run several detectors on the same data and backbone and tabulate accuracy and cost.

    rows = compare("data/synthetic/tile")                 # SPADE, PaDiM, PatchCore 1/10/25 %, CFA
    rows = compare(root, methods=["PaDiM", "PatchCore-10%"], resize=128, crop=None)
    print(format_table(rows))

Each detector comes from ``DETECTORS``, a dict of factories that all take the
same keyword settings (``backbone``, ``pretrained``, ``seed``, ``resize``,
``crop``, ``device``, ...) and return a ``detector.BackboneDetector`` (``fit``,
``predict``, ``memory_bytes``). Adding a method is one entry::

    DETECTORS["PaDiM-d20"] = partial(Padim, d=20)

Every detector is fit and evaluated by ``evaluation.fit_evaluate``: the same
train/test split, preprocessing and metrics for all.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from ..evaluation import Result, fit_evaluate
from ..methods.cfa import CFA
from ..methods.padim import Padim
from ..methods.spade import Spade
from ..model import PatchCore

Factory = Callable[..., Any]  # (**settings) -> Detector with memory_bytes

DETECTORS: dict[str, Factory] = {
    "SPADE": Spade,
    "PaDiM": Padim,
    "PatchCore-1%": partial(PatchCore, coreset_ratio=0.01),
    "PatchCore-10%": partial(PatchCore, coreset_ratio=0.1),
    "PatchCore-25%": partial(PatchCore, coreset_ratio=0.25),
    "CFA": CFA,  # the fast path's 3 epochs, model selection on held-out normals (see cfa.py)
}

COLUMNS = ("name", "category", "image_auroc", "pixel_auroc", "aupro", "fit_s", "infer_ms_per_image", "memory_mib")
METRICS = ("image_auroc", "pixel_auroc", "aupro")


def fit_all(
    root: str | Path,
    methods: Iterable[str] | None = None,
    detectors: Mapping[str, Factory] = DETECTORS,
    seed: int = 0,
    progress: bool = True,
    keep_maps: bool = False,
    **settings: Any,
) -> dict[str, tuple[Any, Result]]:
    """Fit and evaluate each method on one category folder: ``{name: (detector, result)}``.

    ``settings`` go to every factory (e.g. ``backbone="resnet18"``, ``resize=128, crop=None``),
    so all methods see the same images through the same network.
    """
    names = list(methods or detectors)
    unknown = [n for n in names if n not in detectors]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; choose from {list(detectors)}")
    fitted = {}
    for name in names:
        detector = detectors[name](seed=seed, **settings)
        fitted[name] = detector, fit_evaluate(detector, root, name, seed, progress, keep_maps)
    return fitted


def comparison_row(detector: Any, result: Result, category: str) -> dict[str, Any]:
    """One table row (``COLUMNS``): metrics, fit time, inference ms per image and stored MiB (2**20 bytes)."""
    return {
        "name": result.name,
        "category": category,
        **{m: result.metrics[m] for m in METRICS},
        "fit_s": result.timings["fit_s"],
        "infer_ms_per_image": 1000 / result.timings["images_per_s"],
        "memory_mib": detector.memory_bytes / 2**20,
    }


def compare(root: str | Path, methods: Iterable[str] | None = None, **kwargs: Any) -> list[dict[str, Any]]:
    """``fit_all`` as table rows, one per method (see ``COLUMNS``); same arguments."""
    fitted = fit_all(root, methods, **kwargs)
    return [comparison_row(detector, result, Path(root).name) for detector, result in fitted.values()]


def summarise(rows: Sequence[Mapping[str, Any]], label: str = "mean") -> list[dict[str, Any]]:
    """Mean of every numeric column per method over categories; ``category`` becomes ``label``."""
    groups: dict[str, list[Mapping[str, Any]]] = {}
    for row in rows:
        groups.setdefault(row["name"], []).append(row)
    return [
        {
            "name": name,
            "category": label,
            **{c: float(np.mean([r[c] for r in group])) for c in COLUMNS[2:] if all(c in r for r in group)},
        }
        for name, group in groups.items()
    ]
