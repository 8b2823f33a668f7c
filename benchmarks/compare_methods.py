"""SPADE vs PaDiM vs PatchCore (1/10/25 %) on the same data, backbone and metrics.

    nice -n 10 python benchmarks/compare_methods.py                    # synthetic + reduced MVTec
    python benchmarks/compare_methods.py --methods PaDiM PatchCore-10% --categories tile --no-real

Runs ``patchcore_lite.tools.compare.compare`` on every synthetic category and on the real
hazelnut and transistor categories found under the data root (``download.mvtec_category``);
prints one table per dataset plus the per-method means, and writes
``results.csv`` and ``compare_methods.png`` (bar plot of the means) to ``--out``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from patchcore_lite.datasets import data_root, mvtec_category
from patchcore_lite.teaching.synthetic import CATEGORIES, ensure_synthetic
from patchcore_lite.teaching.viz import plot_bar
from patchcore_lite.tools.compare import DETECTORS, METRICS, compare, summarise
from patchcore_lite.tools.tables import format_table, write_results

REPO = Path(__file__).resolve().parents[1]
REAL_CATEGORIES = ("hazelnut", "transistor")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", nargs="+", default=list(DETECTORS), choices=list(DETECTORS))
    p.add_argument("--categories", nargs="+", default=list(CATEGORIES), choices=list(CATEGORIES),
                   help="synthetic categories")
    p.add_argument("--no-real", action="store_true", help="synthetic data only")
    p.add_argument("--backbone", default="efficientnet_lite0")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=REPO / "runs" / "compare_methods")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p.parse_args()


def datasets(args: argparse.Namespace) -> dict[str, list[Path]]:
    """Category folders per dataset name; real data only where it exists."""
    synthetic = ensure_synthetic()
    found = {"synthetic": [synthetic / c for c in args.categories]}
    real = [folder for c in REAL_CATEGORIES if (folder := mvtec_category(c)) is not None]
    if real and not args.no_real:
        found["mvtec"] = real
    elif not args.no_real:
        print(f"no MVTec AD {' or '.join(REAL_CATEGORIES)} under {data_root()}: synthetic only")
    return found


def main() -> None:
    args = parse_args()
    rows, means = [], []
    for dataset, roots in datasets(args).items():
        part = [
            {"dataset": dataset, **row}
            for root in roots
            for row in compare(root, args.methods, seed=args.seed, progress=not args.quiet, backbone=args.backbone)
        ]
        print(f"\n== {dataset} ({args.backbone}) ==\n{format_table(part)}")
        mean = [{"dataset": dataset, **row} for row in summarise(part)]
        print(f"\n-- {dataset}: mean over {len(roots)} categories --\n{format_table(mean)}")
        rows += part
        means += mean
    csv_path = write_results(rows + means, args.out / "results.csv")
    labelled = [{**row, "name": f"{row['name']} ({row['dataset']})"} for row in means]
    figure = plot_bar(labelled, METRICS, title=f"Mean per dataset ({args.backbone})")
    figure.savefig(args.out / "compare_methods.png", dpi=120)
    print(f"\nwrote {csv_path} and {args.out / 'compare_methods.png'}")


if __name__ == "__main__":
    main()
