"""Command line: ``python -m patchcore_lite {demo,fit,predict,evaluate}``.

    python -m patchcore_lite demo                          # embedded synthetic data, seconds
    python -m patchcore_lite evaluate path/to/mvtec/bottle # fit on train/good, score test/
    python -m patchcore_lite fit path/to/bottle --model bottle.npz
    python -m patchcore_lite predict --model bottle.npz img1.png folder/ --out preds/
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path
from typing import NoReturn

import numpy as np

from . import __version__
from .coreset import METHODS
from .datasets import (
    MTD_PREPROCESS,
    MVTEC_PREPROCESS,
    Preprocess,
    dataset_kind,
    find_categories,
    list_images,
    load_image,
    train_test_samples,
)
from .errors import ConfigError, PatchCoreError
from .knn import BACKENDS, INDEXES
from .metrics import format_table, write_results
from .model import PatchCore, PatchCoreConfig
from .patches import MODES
from .pipeline import Result, check_test_set, fit_evaluate
from .synthetic import CATEGORIES

EPILOG = """\
Folder layouts:
  MVTec AD     CATEGORY/train/good/*.png, CATEGORY/test/<defect>/*.png,
               CATEGORY/ground_truth/<defect>/<name>_mask.png
               (ROOT may be one category or a folder of categories)
  Magnetic Tile Defects   MT_Free/Imgs/*.jpg (normal), MT_<defect>/Imgs/*.jpg + .png masks
Backbones: efficientnet_lite0 (default, offline), efficientnet_lite1/2, wide_resnet50_2 (the paper's;
downloads torchvision weights, or --weights FILE), resnet18.
"""


class _Parser(argparse.ArgumentParser):
    """argparse with its usage errors on one line, like every other error of the command line."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _add_model_options(p: argparse.ArgumentParser) -> None:
    d = PatchCoreConfig()
    g = p.add_argument_group("model settings (defaults follow the paper; see patchcore_lite/model.py)")
    g.add_argument("--backbone", default=d.backbone, help="feature extractor (default: %(default)s)")
    g.add_argument("--weights", type=Path, help="backbone weights file (state dict) instead of the default source")
    g.add_argument("--layers", nargs="+", default=list(d.layers), help="stages to read (default: %(default)s)")
    g.add_argument("--random-init", action="store_true", help="random backbone weights (tests only: poor results)")
    g.add_argument("--resize", type=int, help="shorter side before cropping (default: 256; MTD: whole tile to 224x224)")
    g.add_argument("--crop", type=int, help="center crop (default: 224; MTD: none)")
    g.add_argument("--patch-size", type=int, default=d.patch_size, help="neighbourhood p of eq. 1 (default: %(default)s)")
    g.add_argument("--feature-mode", choices=MODES, default=d.feature_mode,
                   help="patch feature construction (default: %(default)s)")
    g.add_argument("--coreset-ratio", type=float, default=d.coreset_ratio,
                   help="fraction of patches kept in the memory bank (default: %(default)s)")
    g.add_argument("--coreset-method", choices=METHODS, default=d.coreset_method,
                   help="greedy k-center (Algorithm 1) or random subsampling (default: %(default)s)")
    g.add_argument("--no-reweight", action="store_true", help="image score = max patch distance (official code) "
                   "instead of the paper's eq. 7 reweighting")
    g.add_argument("--squared-distances", action="store_true", help="patch scores are squared L2 distances "
                   "(official code) instead of the Euclidean distances of the paper's eq. 6")
    g.add_argument("--knn", choices=BACKENDS, default=d.knn_backend, help="search backend (default: %(default)s)")
    g.add_argument("--knn-index", choices=INDEXES, default=d.knn_index,
                   help="flat = exact; ivf, ivfpq = approximate and faster, faiss only (default: %(default)s)")
    g.add_argument("--nprobe", type=int,
                   help=f"inverted lists searched per query by ivf/ivfpq (default: {d.knn_nprobe})")
    g.add_argument("--seed", type=int, default=d.seed, help="fixes coreset and data split (default: %(default)s)")
    g.add_argument("--batch-size", type=int, default=d.batch_size, help="images per forward pass (default: %(default)s)")


def _config(args: argparse.Namespace, root: Path | None) -> PatchCoreConfig:
    """Settings from the options; size defaults depend on the dataset kind. Options that would be
    ignored are refused: a run must do what its command line says."""
    mtd = root is not None and dataset_kind(root) == "mtd"
    if mtd and (args.resize is not None or args.crop is not None):
        raise ConfigError(f"{root}: Magnetic Tile Defects tiles are resized whole to 224x224 (the paper's "
                          "protocol), so --resize and --crop do not apply: drop them.")
    if args.weights is not None and args.random_init:
        raise ConfigError("--weights and --random-init exclude each other: random weights load no file.")
    if args.nprobe is not None and args.knn_index == "flat":
        raise ConfigError("--nprobe only applies to --knn-index ivf or ivfpq; flat search is exhaustive.")
    base = MTD_PREPROCESS if mtd else MVTEC_PREPROCESS
    return PatchCoreConfig(
        backbone=args.backbone, layers=tuple(args.layers), pretrained=not args.random_init,
        resize=base.resize if args.resize is None else args.resize,
        crop=base.crop if args.crop is None else args.crop,
        patch_size=args.patch_size, feature_mode=args.feature_mode, coreset_ratio=args.coreset_ratio,
        coreset_method=args.coreset_method, reweight=not args.no_reweight, squared=args.squared_distances, knn_backend=args.knn,
        knn_index=args.knn_index, knn_nprobe=PatchCoreConfig.knn_nprobe if args.nprobe is None else args.nprobe,
        seed=args.seed, batch_size=args.batch_size,
    )


def _checked_configs(roots: list[Path], args: argparse.Namespace) -> list[PatchCoreConfig]:
    """Each category's settings, and its test set checked for both labels, before the first fit."""
    configs = []
    for root in roots:
        configs.append(_config(args, root))
        check_test_set(train_test_samples(root, seed=args.seed)[1], root)
    return configs


def _evaluate_all(roots: list[Path], args: argparse.Namespace, out: Path) -> list[Result]:
    """Fit and evaluate each category, writing results as each one finishes."""
    results, rows = [], []
    configs = _checked_configs(roots, args)
    out.mkdir(parents=True, exist_ok=True)
    for root, config in zip(roots, configs):
        model = PatchCore(config, weights_path=args.weights)
        print(f"\n== {root.name}: {model.config.backbone}, coreset {model.config.coreset_ratio:.0%}")
        result = fit_evaluate(model, root, seed=args.seed, keep_maps=args.figures)
        results.append(result)
        rows.append(result.row(memory_bank=len(model.memory_bank)))
        write_results(rows, out / "results.csv")  # after every category: nothing finished is lost
        write_results(rows, out / "results.json")
        if args.figures:
            _figures(result, out, model.preprocess)
    print("\n" + format_table(rows))
    print(f"\nresults: {out / 'results.csv'}")
    return results


def _figures(result: Result, out: Path, preprocess: Preprocess) -> None:
    """Examples with maps and a ROC curve per category, as PNG files."""
    from . import viz

    images = [preprocess.unnormalize(preprocess.image(load_image(p))) for p in result.paths]
    fig = viz.plot_examples(images, result.maps, result.masks, result.scores, result.labels,
                            title=f"{result.name}: test images, ground truth, anomaly map")
    fig.savefig(out / f"{result.name}_examples.png", dpi=100, bbox_inches="tight")
    fig = viz.plot_roc(result.labels, result.scores, label=result.name).figure
    fig.savefig(out / f"{result.name}_roc.png", dpi=100, bbox_inches="tight")


def cmd_demo(args: argparse.Namespace) -> None:
    from .synthetic import ensure_synthetic

    _config(args, None)  # bad settings fail before the data is generated
    root = ensure_synthetic()
    print(f"synthetic data (generated deterministically): {root}")
    roots = find_categories(root)
    if args.category:
        roots = [r for r in roots if r.name in args.category]
    args.figures = True
    results = _evaluate_all(roots, args, args.out)
    mean = np.mean([r.metrics["image_auroc"] for r in results])
    print(f"mean image AUROC over {len(results)} synthetic categories: {mean:.3f}; figures in {args.out}/")


def cmd_evaluate(args: argparse.Namespace) -> None:
    _evaluate_all(find_categories(args.root), args, args.out)


def cmd_fit(args: argparse.Namespace) -> None:
    if args.model.is_dir():
        raise ConfigError(f"--model {args.model} is a folder: give the file to write, e.g. {args.model / 'model.npz'}")
    train, _ = train_test_samples(args.root, seed=args.seed)
    model = PatchCore(_config(args, args.root), weights_path=args.weights).fit(train)
    print(f"memory bank: {len(model.memory_bank)} of {model.n_train_patches} patches; saved {model.save(args.model)}")


def cmd_predict(args: argparse.Namespace) -> None:
    files = list_images(args.images)
    model = PatchCore.load(args.model, weights_path=args.weights)
    args.out.mkdir(parents=True, exist_ok=True)
    pred = model.predict(files)
    with open(args.out / "scores.csv", "w", newline="") as f:
        csv.writer(f).writerows([("path", "score"), *((str(p), f"{s:.6f}") for p, s in zip(files, pred.scores))])
    np.savez_compressed(args.out / "maps.npz", maps=pred.maps.astype(np.float16), paths=np.array([str(p) for p in files]))
    for p, s in zip(files, pred.scores):
        print(f"{s:10.4f}  {p}")
    print(f"scores: {args.out / 'scores.csv'}, maps: {args.out / 'maps.npz'}")


def cmd_download(args: argparse.Namespace) -> None:
    from .download import download

    download(args.dataset, args.categories, root=args.root, mirror=args.mirror)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="python -m patchcore_lite",
        description="PatchCore anomaly detection (Roth et al., CVPR 2022): learn what normal looks like from "
        "defect-free images, then score new images and locate anomalies.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EPILOG,
    )
    parser.add_argument("--version", action="version", version=f"patchcore_lite {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("demo", help="run end to end on the embedded synthetic data (seconds; start here)")
    p.add_argument("--out", type=Path, default=Path("runs/demo"), help="report folder (default: %(default)s)")
    p.add_argument("--category", nargs="*", choices=CATEGORIES, help="only these synthetic categories")
    _add_model_options(p)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("evaluate", help="fit on a folder's train/good and report AUROC / AUPRO on its test set",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("root", type=Path, help="an MVTec-layout category, a folder of categories, or Magnetic Tile Defects")
    p.add_argument("--out", type=Path, default=Path("runs/evaluate"), help="results folder (default: %(default)s)")
    p.add_argument("--figures", action="store_true", help="also save example and ROC figures")
    _add_model_options(p)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("fit", help="fit on a folder's normal training images and save the model (.npz)")
    p.add_argument("root", type=Path, help="an MVTec-layout category or Magnetic Tile Defects")
    p.add_argument("--model", type=Path, required=True, help="where to save the model, e.g. bottle.npz")
    _add_model_options(p)
    p.set_defaults(func=cmd_fit)

    p = sub.add_parser("predict", help="score images (files or folders) with a saved model")
    p.add_argument("images", type=Path, nargs="+", help="image files or folders")
    p.add_argument("--model", type=Path, required=True, help="a model saved by `fit`")
    p.add_argument("--weights", type=Path, help="backbone weights file, if the model needs one")
    p.add_argument("--out", type=Path, default=Path("runs/predict"), help="where scores.csv and maps.npz go")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("download", help="fetch MVTec AD categories or Magnetic Tile Defects into the data root")
    p.add_argument("dataset", help="mvtec_ad or mtd (Magnetic Tile Defects)")
    p.add_argument("categories", nargs="*", metavar="CATEGORY", help="MVTec AD categories (default: all 15)")
    p.add_argument("--root", type=Path, help="data root (default: $PATCHCORE_DATA, else the repository's data/)")
    p.add_argument("--mirror", help="fetch MIRROR/<archive file> instead of the publisher's URL "
                   "(default: $PATCHCORE_MIRROR); a local folder or file:// URL works too")
    p.set_defaults(func=cmd_download)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run a command: 0 on success; a user error (bad input, or a file that cannot be read or
    written) is one ``error:`` line on stderr and exit code 2, never a traceback."""
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (PatchCoreError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
