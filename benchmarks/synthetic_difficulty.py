"""How hard the synthetic data is: default PatchCore and the book's comparisons on every category.

    python benchmarks/synthetic_difficulty.py                      # all variants, all categories
    python benchmarks/synthetic_difficulty.py --variants default random1 greedy1 --categories disc

Variants: default (10% greedy, p=3, eq. 7), greedy1 / random1 (1% coreset), p1 / p5 (patch size),
eq6 (reweight=False). Generates the data into a temporary folder (seconds), so it always measures
the current generator.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from patchcore_lite.evaluation import fit_evaluate
from patchcore_lite.model import PatchCore
from patchcore_lite.teaching.synthetic import CATEGORIES, generate

VARIANTS: dict[str, dict] = {
    "default": {},
    "greedy1": {"coreset_ratio": 0.01},
    "random1": {"coreset_ratio": 0.01, "coreset_method": "random"},
    "p1": {"patch_size": 1},
    "p5": {"patch_size": 5},
    "eq6": {"reweight": False},
}
METRICS = ("image_auroc", "pixel_auroc", "aupro")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--categories", nargs="+", default=list(CATEGORIES), choices=list(CATEGORIES))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        root = generate(Path(tmp) / "synthetic", categories=args.categories)
        print(f"generated {len(args.categories)} categories in {time.perf_counter() - start:.1f} s")
        print(f"{'category':8} {'variant':8} " + " ".join(f"{m:>11}" for m in METRICS))
        means = {v: [] for v in args.variants}
        for category in args.categories:
            for variant in args.variants:
                result = fit_evaluate(PatchCore(**VARIANTS[variant]), root / category, progress=False)
                values = [result.metrics[m] for m in METRICS]
                means[variant].append(values)
                print(f"{category:8} {variant:8} " + " ".join(f"{x:11.3f}" for x in values), flush=True)
        for variant, rows in means.items():
            print(f"{'mean':8} {variant:8} " + " ".join(f"{x:11.3f}" for x in np.mean(rows, axis=0)))


if __name__ == "__main__":
    main()
