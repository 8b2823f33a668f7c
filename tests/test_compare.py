"""compare.py: one row per method with every column, summaries, and adding a detector."""

import math
from functools import partial

import pytest

from patchcore_lite.methods.padim import Padim
from patchcore_lite.tools.compare import (
    COLUMNS,
    DETECTORS,
    compare,
    comparison_row,
    fit_all,
    summarise,
)


def test_tiny_run_gives_complete_rows(synthetic_root):
    # 64 x 64 inputs keep all six methods to a few seconds.
    rows = compare(synthetic_root / "disc", progress=False, resize=64, crop=None)
    assert [r["name"] for r in rows] == list(DETECTORS)
    for row in rows:
        assert list(row) == list(COLUMNS)
        assert row["category"] == "disc"
        assert all(0 <= row[m] <= 1 for m in ("image_auroc", "pixel_auroc", "aupro"))
        assert row["pixel_auroc"] > 0.75, row  # every method localises, even at 64 px (measured 0.84-0.99)
        assert all(math.isfinite(row[c]) and row[c] > 0 for c in ("fit_s", "infer_ms_per_image", "memory_mib"))
    memory = {r["name"]: r["memory_mib"] for r in rows}
    # Coreset ratios order the PatchCore banks; SPADE keeps every training feature.
    assert memory["PatchCore-1%"] < memory["PatchCore-10%"] < memory["PatchCore-25%"] < memory["SPADE"]


def test_adding_a_detector_is_one_entry(synthetic_root):
    detectors = {**DETECTORS, "PaDiM-d20": partial(Padim, d=20)}
    fitted = fit_all(synthetic_root / "disc", ["PaDiM-d20"], detectors, progress=False, keep_maps=True,
                     resize=64, crop=None)
    detector, result = fitted["PaDiM-d20"]
    assert result.maps.shape == result.masks.shape == (len(result.labels), 64, 64)
    row = comparison_row(detector, result, "disc")
    assert row["name"] == "PaDiM-d20"
    assert row["memory_mib"] * 2**20 == 4 * 16 * 16 * 20 * 21  # 16 x 16 grid, d = 20: means + precisions
    with pytest.raises(ValueError, match="unknown methods"):
        compare(synthetic_root / "disc", ["SPADE++"], progress=False)


def test_summarise_averages_per_method():
    rows = [
        {"name": "A", "category": "x", "image_auroc": 0.5, "fit_s": 1.0},
        {"name": "B", "category": "x", "image_auroc": 1.0, "fit_s": 2.0},
        {"name": "A", "category": "y", "image_auroc": 1.0, "fit_s": 3.0},
    ]
    assert summarise(rows) == [
        {"name": "A", "category": "mean", "image_auroc": 0.75, "fit_s": 2.0},
        {"name": "B", "category": "mean", "image_auroc": 1.0, "fit_s": 2.0},
    ]
