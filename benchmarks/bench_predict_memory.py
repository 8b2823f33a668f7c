"""Peak memory of streaming ``predict``: 100 images against 1,000 (issue 15's target: within 150 MB; measured in MiB).

    python benchmarks/bench_predict_memory.py [--category tile] [--counts 100 1000]

Fits a model on one synthetic category (held-out split for the automatic threshold), then runs
``python -m patchcore_lite predict --threshold auto`` in a fresh process per count on that many
test images (the category's test images repeated; maps written per image) and prints each
process's peak RSS. A fresh process per run: a process's peak RSS only ever grows.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

from patchcore_lite.datasets import list_images
from patchcore_lite.teaching.synthetic import ensure_synthetic
from patchcore_lite.tools.cli import main as cli

RUN = (
    "import resource, sys; from patchcore_lite.tools.cli import main; code = main(sys.argv[1:]); "
    "print('peak_rss_mib', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024); sys.exit(code)"
)


def peak_rss_mib(args: list[str]) -> float:
    done = subprocess.run([sys.executable, "-c", RUN, *args], capture_output=True, text=True, check=True)
    return float(done.stdout.split("peak_rss_mib")[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--category", default="tile")
    p.add_argument("--counts", type=int, nargs="+", default=[100, 1000])
    args = p.parse_args()
    root = ensure_synthetic() / args.category
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp) / "model.npz"
        assert cli(["fit", str(root), "--model", str(model)]) == 0
        images = [str(f) for f in list_images([root / "test"])]
        for count in args.counts:
            files = (images * (count // len(images) + 1))[:count]
            out = Path(tmp) / f"predict_{count}"
            mib = peak_rss_mib(["predict", "--model", str(model), *files, "--out", str(out), "--threshold", "auto"])
            rows = len((out / "scores.csv").read_text().splitlines()) - 1
            print(f"{count:5d} images ({rows} rows, {len(list((out / 'maps').iterdir()))} maps): peak RSS {mib:.0f} MiB")


if __name__ == "__main__":
    main()
