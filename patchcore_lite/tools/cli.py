"""Command line: ``python -m patchcore_lite {demo,fit,predict,evaluate}``.

    python -m patchcore_lite demo                          # embedded synthetic data, seconds
    python -m patchcore_lite evaluate path/to/mvtec/bottle # fit on train/good, score test/
    python -m patchcore_lite fit path/to/bottle --model bottle.npz     # or a plain folder of good images
    python -m patchcore_lite predict --model bottle.npz img1.png folder/ --out preds/ --threshold auto --overlays
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import re
import shlex
import signal
import sys
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import NoReturn

import numpy as np
import torch

from .. import __version__
from ..backbone import DEVICES, resolve_device
from ..coreset import METHODS
from ..datasets import (
    INPUT_SIZE,
    MTD_PREPROCESS,
    MVTEC_PREPROCESS,
    RUN_MANIFEST,
    Batch,
    ImageDataset,
    Preprocess,
    Sample,
    Unscored,
    dataset_kind,
    find_categories,
    list_images,
    list_inputs,
    load_image,
    train_test_samples,
    validate_samples,
)
from ..errors import ConfigError, DataError, PatchCoreError, shown
from ..evaluation import Result, check_test_set, fit_evaluate
from ..knn import BACKENDS, INDEXES
from ..model import PatchCore, PatchCoreConfig
from ..patches import MODES
from ..teaching.synthetic import CATEGORIES
from ..thresholds import (
    HOLDOUT,
    auto_threshold,
    check_holdout,
    split_holdout,
    threshold_warning,
)
from .outputs import (
    RunLock,
    atomic_save,
    atomic_write,
    check_regular_file,
    check_writable,
    earlier_run,
    read_record,
    refuse_image_folder,
    remove_outputs,
    sha256_file,
    write_json,
)
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


def _add_run_options(p: argparse.ArgumentParser, ray: bool = False) -> None:
    """--device on every command that computes; --ray on those that can spread over a cluster."""
    p.add_argument("--device", choices=DEVICES, default="cpu", help="where the backbone and the search run; "
                   "auto: cuda if torch sees a GPU (default: %(default)s)")
    if ray:
        p.add_argument("--ray", nargs="?", const="", metavar="ADDRESS", help="run on Ray: a local instance, or the "
                       "cluster at ADDRESS (HOST:PORT of `ray start --head`); needs `pip install ray[data]`")


def _add_overwrite_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--overwrite", action="store_true", help="replace the results and figures of an earlier "
                   "evaluation in OUT (without it, an OUT holding one is refused; OUT/run.json records the run)")


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
    g.add_argument("--knn", choices=BACKENDS, default=d.knn_backend, help="search backend (default: %(default)s; "
                   "exact = the same results as faiss flat by a certified filter, see chapter 4)")
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
        coreset_method=args.coreset_method, reweight=not args.no_reweight, squared=args.squared_distances, knn_backend=args.knn,
        knn_index=args.knn_index, knn_nprobe=PatchCoreConfig.knn_nprobe if args.nprobe is None else args.nprobe,
        seed=args.seed, batch_size=args.batch_size,
    )


Checked = tuple[PatchCoreConfig, list[Sample], list[Sample]]


def _checked_categories(roots: list[Path], args: argparse.Namespace) -> list[Checked]:
    """Each category's settings and its train and test samples, the test set checked for both labels and
    every image and mask decoded once (masks must be binary), before the first fit: a problem in the last
    category costs no fit, and the fits read the same samples without decoding them again."""
    checked = []
    for root in roots:
        config = _config(args, root)
        train, test = train_test_samples(root, seed=args.seed)
        check_test_set(test, root)
        validate_samples(train + test)
        checked.append((config, train, test))
    for config in dict.fromkeys(c for c, _, _ in checked):  # settings that cannot apply (a patch larger than the grid)
        PatchCore(replace(config, pretrained=False)).check_patch_grid()  # strides need no weights
    return checked


def _evaluate_outputs(roots: list[Path], args: argparse.Namespace) -> list[str]:
    """The files evaluate writes into --out (run.json first)."""
    names = [RUN_MANIFEST, "results.csv", "results.json"]
    if args.figures:
        names += [f"{root.name}_{kind}.png" for root in roots for kind in ("examples", "roc")]
    return names


def _figure_names(record: object) -> list[str]:
    """The figures an earlier evaluation lists in its run.json (only names evaluate gives figures: an edited
    record cannot make --overwrite remove another file)."""
    listed = record.get("outputs") if isinstance(record, dict) else None
    if not isinstance(listed, list):
        return []
    return [name for name in listed if isinstance(name, str) and re.fullmatch(r"[^/]+_(examples|roc)\.png", name)]


def _check_outputs(roots: list[Path], out: Path, names: list[str]) -> None:
    """Every file evaluate will write, checked writable before the first fit, and never inside a folder
    evaluate reads (its figures would become test images of the next run)."""
    check_writable(out, "--out", folder=True)
    refuse_image_folder(out, "--out", [*names, *_figure_names(read_record(out / RUN_MANIFEST))])
    for root in roots:
        if out.resolve() == root.resolve():
            raise ConfigError(f"{shown(out)}: --out is the dataset folder itself: its figures would sit beside train/ "
                              f"and test/ and be scored as images by predict; use --out {shown(root / 'results')} or a "
                              "folder outside the dataset.")
        for read in [root / "train", root / "test", root / "ground_truth", *root.glob("MT_*")]:
            if out.resolve().is_relative_to(read.resolve()):
                raise ConfigError(f"{shown(out)}: --out is inside {shown(read)}, which evaluate reads: its results "
                                  f"and figures would be read as data next time; use --out {shown(root / 'results')} "
                                  "or a folder outside the dataset.")
    for name in names:
        check_writable(out / name, f"--out file {name}")


def _evaluate_all(roots: list[Path], args: argparse.Namespace, out: Path) -> list[Result]:
    """Fit and evaluate each category into --out, which the run owns (checked, locked, recorded in run.json,
    never mixed with an earlier run), writing results (in category order) as each category finishes."""
    names = _evaluate_outputs(roots, args)
    _check_outputs(roots, out, names)
    with RunLock(out, _command(args)):
        earlier = earlier_run(out, names, EVALUATE, args.overwrite)
        # The demo replaces its own earlier report (same synthetic categories), so the README's command reruns.
        again = earlier is not None and args.func is cmd_demo and earlier.get("roots") == [str(r) for r in roots]
        if earlier is not None and not (args.overwrite or again):  # never replaced in silence, nor figures mixed
            raise DataError(f"{shown(out)}: holds an earlier evaluation ({RUN_MANIFEST}); add --overwrite to replace "
                            "it, or choose another --out.")
        checked = _checked_categories(roots, args)
        if again and not args.overwrite:
            print(f"replacing the demo's earlier report in {shown(out)}")
        if args.overwrite or again:
            remove_outputs(out, [*names, *_figure_names(earlier)])
        write_json(out / RUN_MANIFEST, {"written_by": EVALUATE, "package_version": __version__,
                                        "command": _command(args), "roots": [str(r) for r in roots],
                                        "settings": {r.name: asdict(c) for r, (c, _, _) in zip(roots, checked)},
                                        "outputs": names})
        results, rows, kept = {}, {}, 0
        try:
            for i, result, bank, preprocess in _category_runs(roots, checked, args):
                results[i], rows[i] = result, result.row(memory_bank=bank)
                table = [rows[j] for j in sorted(rows)]
                write_results(table, out / "results.csv")  # after every category: nothing finished is lost
                write_results(table, out / "results.json")
                kept = len(table)
                if args.figures:
                    _figures(result, out, preprocess or PatchCore(checked[i][0], weights_path=args.weights).preprocess)
        except (PatchCoreError, KeyboardInterrupt) as exc:
            kept_note = (f"{kept} of {len(roots)} categories evaluated and kept in {shown(out / 'results.csv')}; "
                         "run again with --overwrite to redo them")
            if isinstance(exc, KeyboardInterrupt):
                raise _interrupted(exc, kept_note) from None
            if args.ray is None:
                raise
            raise type(exc)(f"{exc}; {kept_note}") from None
    print("\n" + format_table([rows[j] for j in sorted(rows)]))
    print(f"\nresults: {out / 'results.csv'}")
    return [results[j] for j in sorted(results)]


def _category_runs(roots: list[Path], checked: list[Checked], args: argparse.Namespace
                   ) -> Iterator[tuple[int, Result, int, Preprocess | None]]:
    """(position, result, bank size, preprocessing if at hand) of each category as it finishes: one
    after the other here, or as Ray tasks with ``--ray`` (the same numbers at the same thread count)."""
    if args.ray is not None:
        from . import distributed

        threads = torch.get_num_threads()
        print(f"Ray: {len(roots)} categories as tasks, {threads} thread(s) each")
        with distributed.session(args.ray):
            for i, result, bank, node, search in distributed.evaluate_categories(
                    roots, checked, args.weights, args.device, args.seed, args.holdout, args.figures, threads):
                print(f"== {roots[i].name}: done on node {node[:8]}\nsearch: {search}")
                yield i, result, bank, None
        return
    for i, (root, (config, train, test)) in enumerate(zip(roots, checked)):
        model = PatchCore(config, weights_path=args.weights, device=args.device)
        print(f"\n== {root.name}: {model.config.backbone}, coreset {model.config.coreset_ratio:.0%}")
        result = fit_evaluate(model, root, seed=args.seed, keep_maps=args.figures, holdout=args.holdout,
                              samples=(train, test))
        print(f"search: {model._check_fitted().describe()}")
        yield i, result, len(model.memory_bank), model.preprocess


def _figures(result: Result, out: Path, preprocess: Preprocess) -> None:
    """Examples with maps and a ROC curve per category, as PNG files."""
    from ..teaching import viz

    images = [preprocess.unnormalize(preprocess.image(load_image(p))) for p in result.paths]
    fig = viz.plot_examples(images, result.maps, result.masks, result.scores, result.labels,
                            title=f"{result.name}: test images, ground truth, anomaly map")
    atomic_save(out / f"{result.name}_examples.png", lambda f: fig.savefig(f, format="png", dpi=100, bbox_inches="tight"))
    fig = viz.plot_roc(result.labels, result.scores, label=result.name).figure
    atomic_save(out / f"{result.name}_roc.png", lambda f: fig.savefig(f, format="png", dpi=100, bbox_inches="tight"))


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
    check_writable(args.model, "--model")
    images, dataset = _good_images(args.root, args.seed)
    samples = [s if isinstance(s, Sample) else Sample(Path(s), 0, "good", None) for s in images]
    _refuse_writing_over(args.model, "--model", [s.path for s in samples])
    config = _config(args, dataset)
    train, held = split_holdout(samples, args.holdout, args.seed, args.root)
    validate_samples(samples)  # decoded once here; the datasets below are read without checking again
    PatchCore(replace(config, pretrained=False)).check_patch_grid()  # before the weights are loaded
    model = PatchCore(config, weights_path=args.weights, device=args.device)
    model.fit(ImageDataset(train, model.preprocess))
    if held:
        model.calibrate(ImageDataset(held, model.preprocess))
        rule, value = auto_threshold(model.normal_scores)
        print(f"held out {len(held)} good images; --threshold auto would be {value:.6f} ({rule})")
        if warning := threshold_warning(len(held)):
            print(warning, file=sys.stderr)
    print(f"memory bank: {len(model.memory_bank)} of {model.n_train_patches} patches; saved {model.save(args.model)}")
    print(f"search: {model._check_fitted().describe()}")


def _refuse_writing_over(output: Path, what: str, inputs: list[Path]) -> None:
    """Refuse an output path that is one of the run's inputs, or a folder holding one: writing it
    would destroy what the run reads (``fit --model`` onto a training image)."""
    target = output.resolve()
    for path in inputs:
        if path.resolve().is_relative_to(target):
            raise ConfigError(f"{shown(output)}: {what} would overwrite {shown(path)}, which this run reads; "
                              "choose another path.")


def _threshold(args: argparse.Namespace, model: PatchCore) -> dict | None:
    """``--threshold`` as threshold.json's record: rule, value (as written) and, for ``auto``, the number of
    held-out normal scores it rests on (a warning when too few); None without ``--threshold``."""
    if args.threshold is None:
        return None
    if args.threshold != "auto":
        return {"rule": "manual", "threshold": float(f"{_float_threshold(args.threshold):.6f}")}
    if model.normal_scores is None:
        raise ConfigError(f"{args.model} holds no held-out normal scores (fit with --holdout 0, or by an older "
                          "version), so --threshold auto is unavailable: re-fit it, or give --threshold VALUE.")
    rule, value = auto_threshold(model.normal_scores)
    return {"rule": rule, "threshold": float(f"{value:.6f}"), "n_normal": len(model.normal_scores)}


def _float_threshold(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not np.isfinite(value):
        raise ConfigError(f"--threshold {text!r}: must be 'auto' or a finite number")
    return value


PREDICT, EVALUATE = "patchcore_lite predict", "patchcore_lite evaluate"  # run.json's written_by
COLUMNS = ("path", "score", "decision", "threshold", "max_row", "max_col", "sha256")
CONTACT_SHEET_MAX = 48
OUTPUTS = ("scores.csv", "threshold.json", "unscored.csv", "contact_sheet.png", "maps", "overlays", RUN_MANIFEST)
CSV_OPEN = {"encoding": "utf-8", "errors": "surrogateescape", "newline": ""}  # any file name round-trips


class Interrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM, with what was kept and how to go on (one line for main to print)."""

    def __init__(self, message: str = "", signum: int = signal.SIGINT) -> None:
        super().__init__(message)
        self.message, self.signum = message, signum


def _interrupted(exc: KeyboardInterrupt, message: str) -> Interrupted:
    """``exc`` (Ctrl-C, or SIGTERM as raised by ``_interrupt``) with what was kept and how to go on."""
    return Interrupted(message, getattr(exc, "signum", signal.SIGINT))


def cmd_predict(args: argparse.Namespace) -> None:
    """Score images into ``--out``, which the run owns: checked, locked, recorded in run.json, never mixed."""
    out = args.out
    check_writable(out, "--out", folder=True)
    for name in OUTPUTS:
        check_writable(out / name, f"--out entry {name}", folder=name in ("maps", "overlays"))
    for path in args.images:
        if path.is_dir() and path.resolve() == out.resolve():
            raise ConfigError(f"{shown(out)}: --out is the image folder itself, so its maps and overlays would be "
                              f"read as images next time; use --out {shown(out / 'predictions')} or another folder.")
    for name in OUTPUTS:  # --overwrite removes them, a new run replaces them
        _refuse_writing_over(out / name, f"--out entry {name}", [*args.images, args.model])
    refuse_image_folder(out, "--out", OUTPUTS)
    check_regular_file(args.model, "--model")
    files, unscored = list_inputs(args.images, exclude=[out])
    model = PatchCore.load(args.model, weights_path=args.weights, device=args.device)
    threshold = _threshold(args, model)
    run = {"written_by": PREDICT, "package_version": __version__,
           "model": {"path": str(args.model), "sha256": sha256_file(args.model)}, "threshold": threshold,
           "maps": not args.no_maps, "overlays": args.overlays, "batch_size": model.config.batch_size}
    validate_samples([Sample(p, 0, "good", None) for p in files])  # every image decoded before any output
    with RunLock(out, _command(args)):
        done = _prepare(out, run, files, args)
        _write_run_files(out, run, threshold, unscored, resumed=bool(done))
        if threshold and (warning := threshold_warning(threshold.get("n_normal", FEW))):
            print(warning, file=sys.stderr)
        _score_all(model, files, done, threshold, args)
        if args.overlays:
            _contact_sheet(out / "scores.csv", out)
    text = f", threshold {threshold['threshold']:.6f} ({threshold['rule']})" if threshold else ""
    print(f"scores: {shown(out / 'scores.csv')} ({len(files)} images{text})")
    if unscored:
        print(f"not scored: {len(unscored)} entries under the input folders, listed with the reason in "
              f"{shown(out / 'unscored.csv')}")


FEW = 10**9  # a manual threshold rests on no normal scores: no warning


def _command(args: argparse.Namespace) -> str:
    """The command line, for the lock file and the Ctrl-C message (one line)."""
    argv = getattr(args, "argv", None) or sys.argv[1:]
    return shown("python -m patchcore_lite " + shlex.join(argv))


def _write_run_files(out: Path, run: dict, threshold: dict | None, unscored: list[Unscored], resumed: bool) -> None:
    """run.json, threshold.json and unscored.csv, each whole or absent (atomic); on resume only unscored.csv."""
    if not resumed:
        write_json(out / RUN_MANIFEST, run)
        if threshold is not None:
            write_json(out / "threshold.json", {**threshold, "model": str(run["model"]["path"]),
                                                "model_sha256": run["model"]["sha256"]})
    if unscored:
        text = io.StringIO(newline="")
        csv.writer(text).writerows([("path", "reason"), *((str(u.path), u.reason) for u in unscored)])
        atomic_write(out / "unscored.csv", text.getvalue().encode("utf-8", "surrogateescape"))
    else:
        (out / "unscored.csv").unlink(missing_ok=True)


def _prepare(out: Path, run: dict, files: list[Path], args: argparse.Namespace) -> list[list[str]]:
    """The rows to keep (under the lock): none for a new run; an earlier run's, checked, for --resume.
    A folder holding another run is refused without --resume or --overwrite: runs never mix."""
    earlier = earlier_run(out, OUTPUTS, PREDICT, args.overwrite)
    if args.overwrite:
        remove_outputs(out, OUTPUTS)
        return []
    if earlier is None:
        return []
    if not args.resume:
        raise DataError(f"{shown(out)}: holds an earlier run ({RUN_MANIFEST}); add --resume to continue it, "
                        "--overwrite to replace it, or choose another --out.")
    for key, what in (("model", f"--model ({shown(args.model)}: other file contents)"), ("threshold", "--threshold"), ("maps", "--no-maps"),
                      ("overlays", "--overlays"), ("batch_size", "the model's batch size"),
                      ("package_version", "patchcore_lite version")):
        mine, theirs = run[key], earlier.get(key)
        if key == "model":
            mine, theirs = mine["sha256"], (theirs or {}).get("sha256")
        if mine != theirs:
            raise DataError(f"{shown(out)}: --resume with another {what} than the run it continues "
                            f"({_brief(theirs)} there, {_brief(mine)} now); use the same settings, or "
                            "another --out.")
    return _scored_rows(out / "scores.csv", files, run)


def _brief(value: object) -> str:
    text = str(value)
    return text if len(text) <= 40 else text[:16] + "..."


def _scored_rows(csv_path: Path, files: list[Path], run: dict) -> list[list[str]]:
    """The complete rows of the earlier run, read with the csv module (any file name), each one checked.

    A last row cut short by a crash is dropped (scored again); blank lines are ignored; any other damage
    (a hand edit) is refused naming the row. An image whose contents differ from those its row was scored
    on (the row's SHA-256; file times are not trusted: a copy or a touch changes them, an edit may not) is
    refused. The file is rewritten (atomically) only when a cut row or blank lines must go."""
    if not csv_path.exists() or csv_path.stat().st_size == 0:
        return []
    raw = csv_path.read_bytes().decode("utf-8", "surrogateescape")
    lines = list(csv.reader(io.StringIO(raw, newline="")))
    complete = raw.endswith("\n") and len(lines) > 1 and _well_formed(lines[-1])
    if not complete and len(lines) > 1:
        lines = lines[:-1]  # cut short by a crash while writing (even just after a newline in a quoted name)
    if not lines or tuple(lines[0]) != COLUMNS:
        raise DataError(f"{shown(csv_path)}: not a scores.csv written by this version of predict; drop --resume.")
    rows = [row for row in lines[1:] if row]
    threshold = run["threshold"]
    threshold_text = "" if threshold is None else f"{threshold['threshold']:.6f}"
    for i, row in enumerate(rows):
        where = f"{shown(csv_path)}: row {i + 1}"
        if i >= len(files) or len(row) != len(COLUMNS) or row[0] != str(files[i]) or row[3] != threshold_text:
            raise DataError(f"{where} ({shown(row[0]) if row else 'empty'}) is not a row this run wrote for its images "
                            "and threshold; drop --resume or use another --out.")
        if not _well_formed(row) or row[2] not in ("", "good", "anomalous"):
            raise DataError(f"{where}: not as predict writes it (score {shown(row[1])}, decision {shown(row[2])}, "
                            f"sha256 {shown(row[6])}; edited?); restore the file or drop --resume.")
        if sha256_file(files[i]) != row[6]:
            raise DataError(f"{shown(files[i])}: its contents changed after it was scored (row {i + 1} of "
                            f"{shown(csv_path)}); drop --resume to score everything again, or use another --out.")
    if len(rows) != len(lines) - 1 or not complete:
        text = io.StringIO(newline="")
        csv.writer(text).writerows([COLUMNS, *rows])
        atomic_write(csv_path, text.getvalue().encode("utf-8", "surrogateescape"))
    return rows


def _well_formed(row: list[str]) -> bool:
    """A whole row as predict writes it: a finite score, row and column integers, a whole SHA-256."""
    return (len(row) == len(COLUMNS) and _is_score(row[1]) and row[4].isdigit() and row[5].isdigit()
            and _is_sha256(row[6]))


def _is_sha256(text: str) -> bool:
    return len(text) == 64 and all(c in "0123456789abcdef" for c in text)


def _is_score(text: str) -> bool:
    try:
        return np.isfinite(float(text))
    except ValueError:
        return False


def _score_all(model: PatchCore, files: list[Path], done: list[list[str]], threshold: dict | None,
               args: argparse.Namespace) -> None:
    """Score the images not in ``done``, appending each batch's rows to scores.csv as it is scored.

    Batches start where an uninterrupted run's do (a batch's scores differ in the 6th decimal with its
    size), so the rows of a cut batch are scored again but not written twice: a resumed run writes the
    same scores to the last digit."""
    out = args.out
    for folder in ("maps", "overlays"):
        if _wants(args, folder):
            (out / folder).mkdir(exist_ok=True)
    threshold_text = "" if threshold is None else f"{threshold['threshold']:.6f}"
    csv_path, kept = out / "scores.csv", len(done)
    first = kept - kept % model.config.batch_size
    try:
        with open(csv_path, "a", **CSV_OPEN) as f:
            writer = csv.writer(f)
            if not done:
                f.truncate(0)
                writer.writerow(COLUMNS)
                f.flush()
            for start, rows in _scored_rows_batches(model, files, first, threshold_text, args):
                end, rows = start + len(rows), rows[max(0, kept - start):]
                writer.writerows(rows)
                f.flush()
                kept = max(kept, end)
                for row in rows:
                    print(f"{float(row[1]):10.4f}  {row[2]:9}  {shown(row[0])}")
    except PatchCoreError as exc:
        if args.ray is None:
            raise
        raise type(exc)(f"{exc}; {kept} of {len(files)} images are scored and kept in {shown(csv_path)} "
                        f"(the first {kept}): continue with: {_command(args)}"
                        f"{'' if args.resume else ' --resume'}") from None
    except KeyboardInterrupt as exc:
        resume = "" if args.resume else " --resume"
        raise _interrupted(exc, f"{kept} of {len(files)} images scored and kept in {shown(csv_path)}; "
                                f"continue with: {_command(args)}{resume}") from None


def _scored_rows_batches(model: PatchCore, files: list[Path], first: int, threshold_text: str,
                         args: argparse.Namespace) -> Iterator[tuple[int, list[tuple]]]:
    """(first image, CSV rows) of the batches of ``files[first:]``, their maps and overlays written:
    scored here, or by Ray actors with ``--ray`` (the same batches, so the same bytes)."""
    if args.ray is None:
        rest = ImageDataset([Sample(p, 0, "good", None) for p in files[first:]], model.preprocess)  # checked
        for batch, scores, maps in model.scored_batches(rest, progress=False):
            start = first + batch.start
            yield start, _batch_rows(model, files, start, batch, scores, maps, threshold_text, args)
        return
    from . import distributed

    threads = torch.get_num_threads()
    with distributed.session(args.ray):
        for start, outputs in distributed.predict_outputs(files, first, args.model, args.weights, args.device,
                                                          model.config.batch_size, threshold_text, not args.no_maps,
                                                          args.overlays, threads):
            yield start, write_outputs(args.out, outputs)


def _wants(args: argparse.Namespace, folder: str) -> bool:
    return args.overlays if folder == "overlays" else not args.no_maps


def _name(index: int, path: Path) -> str:
    """File name stem of image ``index``'s map and overlay: unique even when stems repeat."""
    return f"{index:06d}_{path.stem}"


def _batch_rows(model: PatchCore, files: list[Path], start: int, batch: Batch, scores: torch.Tensor,
                maps: torch.Tensor, threshold_text: str, args: argparse.Namespace) -> list[tuple]:
    """Write one scored batch's maps and overlays (its first image is ``files[start]``), each whole or
    absent; return its CSV rows."""
    chunk = files[start : start + len(batch.images)]
    outputs = batch_outputs(model, chunk, start, batch, scores, maps, threshold_text, not args.no_maps, args.overlays)
    return write_outputs(args.out, outputs)


@dataclass
class ImageOutput:
    """What predict writes for one image: its CSV row, and the bytes of its map and overlay files
    (empty when not asked for). Made wherever the image is scored, written by this process."""

    row: tuple[str, str, str, str, int, int, str]  # COLUMNS
    name: str  # file stem of maps/NAME.npy and overlays/NAME.png
    map_npy: bytes = b""
    overlay_png: bytes = b""


def batch_outputs(model: PatchCore, chunk: list[Path], start: int, batch: Batch, scores: torch.Tensor,
                  maps: torch.Tensor, threshold_text: str, with_maps: bool, overlays: bool) -> list[ImageOutput]:
    """The outputs of one scored batch, whose images are ``chunk``, the first one image ``start`` of the run."""
    outputs = []
    for i, (path, image, score, amap) in enumerate(zip(chunk, batch.images, scores.numpy(), maps.numpy())):
        score_text = f"{score:.6f}"
        # Decided on the values as written, so that the CSV always agrees with itself.
        decision = "" if not threshold_text else (
            "anomalous" if float(score_text) >= float(threshold_text) else "good")
        row, col = np.unravel_index(int(np.argmax(amap)), amap.shape)
        out = ImageOutput((str(path), score_text, decision, threshold_text, int(row), int(col), sha256_file(path)),
                          _name(start + i, path))
        if with_maps:
            buffer = io.BytesIO()  # np.save to a real file writes with tofile, which misses short writes
            np.save(buffer, amap.astype(np.float16))
            out.map_npy = buffer.getvalue()
        if overlays:
            out.overlay_png = _overlay_png(model.preprocess.unnormalize(image), amap, score, decision, threshold_text)
        outputs.append(out)
    return outputs


def write_outputs(out: Path, outputs: list[ImageOutput]) -> list[tuple]:
    """Write the maps and overlays of ``outputs`` into ``out``; return their CSV rows."""
    for o in outputs:
        if o.map_npy:
            atomic_write(out / "maps" / f"{o.name}.npy", o.map_npy)
        if o.overlay_png:
            atomic_write(out / "overlays" / f"{o.name}.png", o.overlay_png)
    return [o.row for o in outputs]


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

    with open(csv_path, **CSV_OPEN) as f:
        rows = [row for row in csv.reader(f)][1:]
    top = sorted(range(len(rows)), key=lambda i: -float(rows[i][1]))[:CONTACT_SHEET_MAX]
    cols, lines = min(6, len(top)), -(-len(top) // 6)
    fig = Figure(figsize=(2.5 * cols, 2.5 * lines), layout="constrained")
    for k, i in enumerate(top):
        ax = fig.add_subplot(lines, cols, k + 1)
        with Image.open(out / "overlays" / f"{_name(i, Path(rows[i][0]))}.png") as png:
            ax.imshow(np.asarray(png.convert("RGB")))
        path = Path(rows[i][0])
        ax.set_title(f"{shown(path.parent.name)}/{shown(path.name)} {float(rows[i][1]):.3f}", fontsize=7)
        ax.axis("off")
    atomic_write(out / "contact_sheet.png", viz.png_bytes(fig, dpi=72))


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
    _add_run_options(p)
    _add_overwrite_option(p)
    _add_model_options(p)
    p.set_defaults(func=cmd_demo, ray=None)

    p = sub.add_parser("evaluate", help="fit on a folder's train/good and report AUROC / AUPRO on its test set",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("root", type=Path, help="an MVTec-layout category, a folder of categories, or Magnetic Tile Defects")
    p.add_argument("--out", type=Path, default=Path("runs/evaluate"), help="results folder (default: %(default)s)")
    p.add_argument("--figures", action="store_true", help="also save example and ROC figures")
    _add_run_options(p, ray=True)
    _add_overwrite_option(p)
    _add_model_options(p)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("fit", help="fit on a folder's normal training images and save the model (.npz)")
    p.add_argument("root", type=Path, help="an MVTec-layout category, Magnetic Tile Defects, or a plain folder "
                   "of good images (searched at any depth)")
    p.add_argument("--model", type=Path, required=True, help="where to save the model, e.g. bottle.npz")
    _add_run_options(p)
    _add_model_options(p)
    p.set_defaults(func=cmd_fit)

    p = sub.add_parser("predict", help="score images (files or folders) with a saved model",
                       description="Score images with a saved model. Folders are searched at any depth; symlinks "
                       "to files and folders are followed, each folder entered once (a symlink back into a folder "
                       "already searched is not followed again). Every entry not scored (not an image, hidden, a "
                       "mask, a broken symlink, an unreadable folder, an earlier run's output folder, a file named "
                       "twice: each file is scored once) is listed "
                       "with the reason in OUT/unscored.csv. OUT belongs to one run: run.json records the model "
                       "and settings, a second run into it at the same time is refused, and --resume only "
                       "continues a run with the same model and settings.")
    p.add_argument("images", type=Path, nargs="+", help="image files or folders")
    p.add_argument("--model", type=Path, required=True, help="a model saved by `fit`")
    p.add_argument("--weights", type=Path, help="backbone weights file, if the model needs one")
    p.add_argument("--out", type=Path, default=Path("runs/predict"),
                   help="where scores.csv, threshold.json, maps/ and overlays/ go (default: %(default)s)")
    p.add_argument("--threshold", help="'auto' (from the held-out normal scores saved by fit) or a score: "
                   "adds decision (anomalous if score >= threshold) to the CSV")
    p.add_argument("--resume", action="store_true", help="keep the rows already in OUT/scores.csv, score the rest "
                   "(same model and settings as the run that wrote them, recorded in OUT/run.json)")
    p.add_argument("--overwrite", action="store_true", help="replace the outputs of an earlier run in OUT "
                   "(without it, an OUT holding another run is refused)")
    p.add_argument("--no-maps", action="store_true", help="write no maps/<index>_<name>.npy (float16, input-sized: ~166 kB at 288x288)")
    p.add_argument("--overlays", action="store_true",
                   help="write overlays/<index>_<name>.png and contact_sheet.png (most anomalous first)")
    _add_run_options(p, ray=True)
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("download", help="fetch MVTec AD categories or Magnetic Tile Defects into the data root")
    p.add_argument("dataset", help="mvtec_ad or mtd (Magnetic Tile Defects)")
    p.add_argument("categories", nargs="*", metavar="CATEGORY", help="MVTec AD categories (default: all 15)")
    p.add_argument("--root", type=Path, help="data root (default: $PATCHCORE_DATA, else the repository's data/)")
    p.add_argument("--mirror", help="fetch MIRROR/<archive file> instead of the publisher's URL "
                   "(default: $PATCHCORE_MIRROR); a local folder or file:// URL works too")
    p.set_defaults(func=cmd_download)
    return parser


STOPS = (signal.SIGINT, signal.SIGTERM)


def _interrupt(signum: int, frame: object) -> NoReturn:
    """Ctrl-C or SIGTERM: raise Interrupted; from here on the run only cleans up (temporary files removed,
    the lock released, one line printed), so further Ctrl-C and SIGTERM are ignored: a second Ctrl-C cannot
    cut the clean-up short (a traceback, a temporary file left). main restores the handlers."""
    for stop in STOPS:
        signal.signal(stop, signal.SIG_IGN)
    raise Interrupted("", signum)


def main(argv: list[str] | None = None, exiting: bool = False) -> int:
    """Run a command: 0 on success; a user error (bad input, or a file that cannot be read or
    written) is one ``error:`` line on stderr and exit code 2, never a traceback. Ctrl-C and SIGTERM
    end the run cleanly (locks released, partial files removed) with one line and 128 + the signal.

    ``exiting``: the process ends right after (``python -m patchcore_lite``), so Ctrl-C and SIGTERM stay
    ignored once the command is done: one arriving while the interpreter shuts down (torch's exit hooks
    import modules) cannot print a traceback. Otherwise the handlers found are restored."""
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    previous = {}
    with contextlib.suppress(ValueError):  # not the main thread: the handlers stay as they are
        previous = {stop: signal.signal(stop, _interrupt) for stop in STOPS}
    try:
        if hasattr(args, "device"):
            args.device = resolve_device(args.device)
        if getattr(args, "ray", None):  # a wrong or silent address: one line before any work (Ray not imported)
            from .distributed import check_address

            check_address(args.ray)
        args.func(args)
    except (PatchCoreError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        signum = getattr(exc, "signum", signal.SIGINT)
        name = signal.Signals(signum).name
        message = getattr(exc, "message", "") or "nothing more was written"
        print(f"interrupted ({name}): {message}", file=sys.stderr)
        return 128 + signum
    finally:
        for stop, handler in previous.items():
            signal.signal(stop, signal.SIG_IGN if exiting else handler)
    return 0
