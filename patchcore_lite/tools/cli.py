"""Command line: ``python -m patchcore_lite {demo,fit,predict,evaluate}``.

    python -m patchcore_lite demo                          # embedded synthetic data, seconds
    python -m patchcore_lite evaluate path/to/mvtec/bottle # fit on train/good, score test/
    python -m patchcore_lite fit path/to/bottle --model bottle.npz     # or a plain folder of good images
    python -m patchcore_lite predict --model bottle.npz img1.png folder/ --out preds/ --threshold auto --overlays
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path
from typing import NoReturn

import numpy as np
import torch

from .. import __version__
from ..coreset import METHODS
from ..datasets import (
    INPUT_SIZE,
    MTD_PREPROCESS,
    MVTEC_PREPROCESS,
    Batch,
    Preprocess,
    dataset_kind,
    find_categories,
    list_images,
    load_image,
    train_test_samples,
)
from ..errors import ConfigError, DataError, PatchCoreError
from ..evaluation import Result, check_test_set, fit_evaluate
from ..knn import BACKENDS, INDEXES, backend_for
from ..model import PatchCore, PatchCoreConfig
from ..patches import MODES
from ..teaching.synthetic import CATEGORIES
from ..thresholds import HOLDOUT, auto_threshold, check_holdout, split_holdout
from .tables import format_table, write_results

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
    g.add_argument("--grid-layer", help="layer whose grid the patches use (default: the finest of --layers, eq. 3)")
    g.add_argument("--random-init", action="store_true", help="random backbone weights (tests only: poor results)")
    g.add_argument("--resize", type=int, help=f"shorter side before cropping (default: {MVTEC_PREPROCESS.resize}; "
                   f"MTD: whole tile to {INPUT_SIZE}x{INPUT_SIZE}; the paper: 256)")
    g.add_argument("--crop", type=int, help=f"center crop (default: {MVTEC_PREPROCESS.crop}; MTD: none; the paper: 224)")
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
    g.add_argument("--knn", choices=BACKENDS, default=None,
                   help=f"search backend (default: {d.knn_backend} for flat search, faiss for ivf/ivfpq)")
    g.add_argument("--knn-index", choices=INDEXES, default=d.knn_index,
                   help="flat = exact; ivf, ivfpq = approximate and faster, faiss only (default: %(default)s)")
    g.add_argument("--nprobe", type=int,
                   help=f"inverted lists searched per query by ivf/ivfpq (default: {d.knn_nprobe})")
    g.add_argument("--seed", type=int, default=d.seed, help="fixes coreset and data split (default: %(default)s)")
    g.add_argument("--batch-size", type=int, default=d.batch_size, help="images per forward pass (default: %(default)s)")
    g.add_argument("--holdout", type=float, default=HOLDOUT, help="fraction of the good images kept out of the "
                   "memory bank to set the automatic threshold (at least 1 image; 0: none) (default: %(default)s)")


def _config(args: argparse.Namespace, root: Path | None) -> PatchCoreConfig:
    """Settings from the options; size defaults depend on the dataset kind. Options that would be
    ignored are refused: a run must do what its command line says."""
    mtd = root is not None and dataset_kind(root) == "mtd"
    if mtd and (args.resize is not None or args.crop is not None):
        raise ConfigError(f"{root}: Magnetic Tile Defects tiles are resized whole to the square input "
                          f"({INPUT_SIZE}x{INPUT_SIZE}), so --resize and --crop do not apply: drop them.")
    if args.weights is not None and args.random_init:
        raise ConfigError("--weights and --random-init exclude each other: random weights load no file.")
    if args.nprobe is not None and args.knn_index == "flat":
        raise ConfigError("--nprobe only applies to --knn-index ivf or ivfpq; flat search is exhaustive.")
    check_holdout(args.holdout)
    base = MTD_PREPROCESS if mtd else MVTEC_PREPROCESS
    return PatchCoreConfig(
        backbone=args.backbone, layers=tuple(args.layers), grid_layer=args.grid_layer, pretrained=not args.random_init,
        resize=base.resize if args.resize is None else args.resize,
        crop=base.crop if args.crop is None else args.crop,
        patch_size=args.patch_size, feature_mode=args.feature_mode, coreset_ratio=args.coreset_ratio,
        coreset_method=args.coreset_method, reweight=not args.no_reweight, squared=args.squared_distances, knn_backend=args.knn or backend_for(args.knn_index),
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
        result = fit_evaluate(model, root, seed=args.seed, keep_maps=args.figures, holdout=args.holdout)
        print(f"search: {model._check_fitted().describe()}")
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
    from ..teaching import viz

    images = [preprocess.unnormalize(preprocess.image(load_image(p))) for p in result.paths]
    fig = viz.plot_examples(images, result.maps, result.masks, result.scores, result.labels,
                            title=f"{result.name}: test images, ground truth, anomaly map")
    fig.savefig(out / f"{result.name}_examples.png", dpi=100, bbox_inches="tight")
    fig = viz.plot_roc(result.labels, result.scores, label=result.name).figure
    fig.savefig(out / f"{result.name}_roc.png", dpi=100, bbox_inches="tight")


def cmd_demo(args: argparse.Namespace) -> None:
    from ..teaching.synthetic import ensure_synthetic

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


def _good_images(root: Path, seed: int) -> tuple[list, Path | None]:
    """The good training images of ``root`` and the dataset folder whose size defaults apply
    (None for a plain folder of good images, searched at any depth)."""
    try:
        dataset_kind(root)
    except DataError:
        if not root.is_dir():
            raise
        return list_images([root]), None
    return train_test_samples(root, seed=seed)[0], root


def cmd_fit(args: argparse.Namespace) -> None:
    if args.model.is_dir():
        raise ConfigError(f"--model {args.model} is a folder: give the file to write, e.g. {args.model / 'model.npz'}")
    images, dataset = _good_images(args.root, args.seed)
    config = _config(args, dataset)
    train, held = split_holdout(images, args.holdout, args.seed, args.root)
    model = PatchCore(config, weights_path=args.weights).fit(train)
    if held:
        model.calibrate(held)
        rule, value = auto_threshold(model.normal_scores)
        print(f"held out {len(held)} good images; --threshold auto would be {value:.4f} ({rule})")
    print(f"memory bank: {len(model.memory_bank)} of {model.n_train_patches} patches; saved {model.save(args.model)}")
    print(f"search: {model._check_fitted().describe()}")


def _threshold(args: argparse.Namespace, model: PatchCore) -> tuple[str, float] | None:
    """(rule, value) of ``--threshold``: a number, ``auto`` (the model's held-out normal scores) or none."""
    if args.threshold is None:
        return None
    if args.threshold != "auto":
        return "manual", _float_threshold(args.threshold)
    if model.normal_scores is None:
        raise ConfigError(f"{args.model} holds no held-out normal scores (fit with --holdout 0, or by an older "
                          "version), so --threshold auto is unavailable: re-fit it, or give --threshold VALUE.")
    return auto_threshold(model.normal_scores)


def _float_threshold(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not np.isfinite(value):
        raise ConfigError(f"--threshold {text!r}: must be 'auto' or a finite number")
    return value


COLUMNS = ("path", "score", "decision", "threshold", "max_row", "max_col")
CONTACT_SHEET_MAX = 48


def cmd_predict(args: argparse.Namespace) -> None:
    files = list_images(args.images)
    model = PatchCore.load(args.model, weights_path=args.weights)
    threshold = _threshold(args, model)
    threshold_text = "" if threshold is None else f"{threshold[1]:.6f}"
    for folder in (args.out, *(args.out / d for d in ("maps", "overlays") if _wants(args, d))):
        folder.mkdir(parents=True, exist_ok=True)
    if threshold is not None:
        record = {"rule": threshold[0], "threshold": float(threshold_text), "model": str(args.model)}
        (args.out / "threshold.json").write_text(json.dumps(record, indent=1) + "\n")
    csv_path = args.out / "scores.csv"
    done = _scored_rows(csv_path, files, threshold_text) if args.resume else []
    # Rows reach the file batch by batch: an interrupted run leaves a valid CSV that --resume continues.
    with open(csv_path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerows([COLUMNS, *done])
        f.flush()
        for batch, scores, maps in model.scored_batches(files[len(done):], progress=False):
            rows = _batch_rows(model, files, len(done) + batch.start, batch, scores, maps, threshold_text, args)
            writer.writerows(rows)
            f.flush()
            for row in rows:
                print(f"{float(row[1]):10.4f}  {row[2]:9}  {row[0]}")
    if args.overlays:
        _contact_sheet(csv_path, args.out)
    print(f"scores: {csv_path}" + (f", threshold {threshold_text} ({threshold[0]})" if threshold else ""))


def _wants(args: argparse.Namespace, folder: str) -> bool:
    return args.overlays if folder == "overlays" else not args.no_maps


def _name(index: int, path: Path) -> str:
    """File name stem of image ``index``'s map and overlay: unique even when stems repeat."""
    return f"{index:06d}_{path.stem}"


def _scored_rows(csv_path: Path, files: list[Path], threshold_text: str) -> list[list[str]]:
    """The complete rows of an earlier run on the same images and threshold, for --resume."""
    if not csv_path.is_file():
        return []
    text = csv_path.read_text()
    rows = list(csv.reader(text.splitlines()))
    if not rows or tuple(rows[0]) != COLUMNS:
        raise DataError(f"{csv_path}: not a scores.csv written by this version of predict; drop --resume.")
    done = rows[1:] if text.endswith("\n") else rows[1:-1]  # a last row cut short by a crash is scored again
    for i, row in enumerate(done):
        if i >= len(files) or row[0] != str(files[i]) or row[3] != threshold_text:
            raise DataError(f"{csv_path}: row {i + 1} ({row[0]}, threshold {row[3] or 'none'}) is not from this "
                            "run's images and threshold; drop --resume or use another --out.")
    return done


def _batch_rows(model: PatchCore, files: list[Path], start: int, batch: Batch, scores: torch.Tensor,
                maps: torch.Tensor, threshold_text: str, args: argparse.Namespace) -> list[tuple]:
    """Write one scored batch's maps and overlays (its first image is ``files[start]``); return its CSV rows."""
    chunk = files[start : start + len(batch.images)]
    rows = []
    for i, (path, image, score, amap) in enumerate(zip(chunk, batch.images, scores.numpy(), maps.numpy())):
        score_text = f"{score:.6f}"
        # Decided on the values as written, so that the CSV always agrees with itself.
        decision = "" if not threshold_text else (
            "anomalous" if float(score_text) >= float(threshold_text) else "good")
        row, col = np.unravel_index(int(np.argmax(amap)), amap.shape)
        name = _name(start + i, path)
        if not args.no_maps:
            np.save(args.out / "maps" / f"{name}.npy", amap.astype(np.float16))
        if args.overlays:
            png = _overlay_png(model.preprocess.unnormalize(image), amap, score, decision, threshold_text)
            (args.out / "overlays" / f"{name}.png").write_bytes(png)
        rows.append((str(path), score_text, decision, threshold_text, int(row), int(col)))
    return rows


def _overlay_png(image: np.ndarray, amap: np.ndarray, score: float, decision: str, threshold_text: str) -> bytes:
    """The map over the image, the region at or above the threshold outlined, score and decision in the corner."""
    from ..teaching import viz

    region = amap >= float(threshold_text) if threshold_text else None
    fig = viz.overlay(image, amap, region, title="", outline_label="map >= threshold")
    ax = fig.axes[0]
    ax.text(0.02, 0.98, f"{score:.3f} {decision}".strip(), transform=ax.transAxes, va="top", color="white",
            fontsize=9, bbox={"facecolor": "black", "alpha": 0.6, "pad": 2})
    return viz.png_bytes(fig, dpi=72)


def _contact_sheet(csv_path: Path, out: Path) -> None:
    """One grid of the overlays, the most anomalous images first (at most CONTACT_SHEET_MAX)."""
    from matplotlib.figure import Figure
    from PIL import Image

    from ..teaching import viz

    with open(csv_path, newline="") as f:
        rows = list(csv.reader(f))[1:]
    top = sorted(range(len(rows)), key=lambda i: -float(rows[i][1]))[:CONTACT_SHEET_MAX]
    cols, lines = min(6, len(top)), -(-len(top) // 6)
    fig = Figure(figsize=(2.5 * cols, 2.5 * lines), layout="constrained")
    for k, i in enumerate(top):
        ax = fig.add_subplot(lines, cols, k + 1)
        with Image.open(out / "overlays" / f"{_name(i, Path(rows[i][0]))}.png") as png:
            ax.imshow(np.asarray(png.convert("RGB")))
        path = Path(rows[i][0])
        ax.set_title(f"{path.parent.name}/{path.name} {float(rows[i][1]):.3f}", fontsize=7)
        ax.axis("off")
    (out / "contact_sheet.png").write_bytes(viz.png_bytes(fig, dpi=72))


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
    p.add_argument("root", type=Path, help="an MVTec-layout category, Magnetic Tile Defects, or a plain folder "
                   "of good images (searched at any depth)")
    p.add_argument("--model", type=Path, required=True, help="where to save the model, e.g. bottle.npz")
    _add_model_options(p)
    p.set_defaults(func=cmd_fit)

    p = sub.add_parser("predict", help="score images (files or folders) with a saved model")
    p.add_argument("images", type=Path, nargs="+", help="image files or folders")
    p.add_argument("--model", type=Path, required=True, help="a model saved by `fit`")
    p.add_argument("--weights", type=Path, help="backbone weights file, if the model needs one")
    p.add_argument("--out", type=Path, default=Path("runs/predict"),
                   help="where scores.csv, threshold.json, maps/ and overlays/ go (default: %(default)s)")
    p.add_argument("--threshold", help="'auto' (from the held-out normal scores saved by fit) or a score: "
                   "adds decision (anomalous if score >= threshold) to the CSV")
    p.add_argument("--resume", action="store_true", help="keep the rows already in OUT/scores.csv, score the rest")
    p.add_argument("--no-maps", action="store_true", help="write no maps/<index>_<name>.npy (float16, input-sized: ~166 kB at 288x288)")
    p.add_argument("--overlays", action="store_true",
                   help="write overlays/<index>_<name>.png and contact_sheet.png (most anomalous first)")
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
