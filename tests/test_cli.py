"""The command line: fit, predict and evaluate on a synthetic category; settings reach the model; errors."""

import csv
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from test_datasets import make_category, make_mtd, write_image

from patchcore_lite.datasets import INPUT_SIZE, train_test_samples
from patchcore_lite.errors import DataError
from patchcore_lite.evaluation import fit_evaluate
from patchcore_lite.model import PatchCore
from patchcore_lite.tools.cli import build_parser, main


@pytest.fixture(scope="module")
def category(synthetic_root: Path) -> Path:
    return sorted(p for p in synthetic_root.iterdir() if p.is_dir())[0]


@pytest.fixture(scope="module")
def model_file(category: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("model") / "m.npz"
    assert main(["fit", str(category), "--model", str(path), "--coreset-ratio", "0.05"]) == 0
    return path


def test_fit_then_predict_scores_anomalies_above_normals(category: Path, model_file: Path, tmp_path: Path):
    out = tmp_path / "pred"
    _, test = train_test_samples(category)
    normal = next(s.path for s in test if s.label == 0)
    anomalous = next(s.path for s in test if s.label == 1)
    assert main(["predict", str(normal), str(anomalous), "--model", str(model_file), "--out", str(out)]) == 0
    with open(out / "scores.csv") as f:
        rows = list(csv.reader(f))[1:]
    assert [r[0] for r in rows] == [str(normal), str(anomalous)]
    assert [r[2:4] for r in rows] == [["", ""]] * 2  # no --threshold: no decision
    assert float(rows[0][1]) < float(rows[1][1])
    maps = sorted((out / "maps").iterdir())
    assert [p.name for p in maps] == [f"000000_{normal.stem}.npy", f"000001_{anomalous.stem}.npy"]
    assert np.load(maps[0]).shape == (INPUT_SIZE, INPUT_SIZE)


def test_evaluate_writes_results_with_the_search_asked_for(category: Path, tmp_path: Path):
    args = ["evaluate", str(category), "--out", str(tmp_path), "--coreset-ratio", "0.05",
            "--knn-index", "ivf", "--nprobe", "4"]
    assert main(args) == 0
    (row,) = json.loads((tmp_path / "results.json").read_text())
    assert row["name"] == category.name and 0.5 < row["image_auroc"] <= 1
    # the default --holdout 0.1 of train/good sets the automatic threshold; its cost on the labelled test set:
    assert row["auto_threshold"] > 0 and all(0 <= row[k] <= 1 for k in ("precision", "recall", "fpr"))


def test_options_reach_the_config(category: Path):
    from patchcore_lite.tools.cli import _config

    args = build_parser().parse_args(["fit", str(category), "--model", "x.npz", "--knn-index", "ivf",
                                      "--nprobe", "16", "--no-reweight", "--patch-size", "5"])
    config = _config(args, category)
    assert (config.knn_index, config.knn_nprobe, config.reweight, config.patch_size) == ("ivf", 16, False, 5)
    assert PatchCore(config, pretrained=False).config.knn_nprobe == 16


def test_grid_layer_option(category: Path, capsys):
    from patchcore_lite.tools.cli import _config

    parse = build_parser().parse_args
    args = parse(["fit", str(category), "--model", "x.npz", "--layers", "layer1", "layer2", "layer3",
                  "--grid-layer", "layer2"])
    assert _config(args, category).grid_index == 1
    # without --grid-layer: the finest layer (eq. 3)
    config = _config(parse(["fit", str(category), "--model", "x.npz", "--layers", "layer1", "layer2"]), category)
    assert config.grid_index == 0
    assert main(["fit", str(category), "--model", "x.npz", "--grid-layer", "layer4"]) == 2
    assert "grid_layer" in _one_error_line(capsys)


def test_predict_on_a_category_folder_scores_its_images_not_its_masks(model_file: Path, tmp_path: Path):
    widget = make_category(tmp_path / "widget")
    (widget / "test" / "good" / "._000.png").write_bytes(b"macOS resource fork")
    write_image(widget / ".cache" / "thumb.png")
    out = tmp_path / "pred"
    assert main(["predict", str(tmp_path), "--model", str(model_file), "--out", str(out)]) == 0
    with open(out / "scores.csv") as f:
        scored = [Path(row[0]) for row in list(csv.reader(f))[1:]]
    images = [s.path for s in train_test_samples(widget)[0] + train_test_samples(widget)[1]]
    assert sorted(scored) == sorted(images)  # 8 images; no mask, no hidden file


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_bad_input_is_one_clear_line_and_exit_code_2(tmp_path: Path, model_file: Path, capsys):
    assert main(["evaluate", str(tmp_path / "nowhere")]) == 2
    assert str(tmp_path / "nowhere") in _one_error_line(capsys)
    assert main(["predict", str(model_file), "--model", str(tmp_path / "missing.npz")]) == 2
    assert "missing.npz" in _one_error_line(capsys)
    (tmp_path / "empty").mkdir()
    assert main(["predict", str(tmp_path / "empty"), "--model", str(model_file)]) == 2
    assert f"{tmp_path / 'empty'}: no images to score" in _one_error_line(capsys)
    (tmp_path / "file").write_text("")
    assert main(["predict", str(model_file), "--model", str(model_file), "--out", str(tmp_path / "file")]) == 2
    assert "--out is an existing file, not a folder" in _one_error_line(capsys)  # checked before any work


@pytest.mark.parametrize("options, message", [
    (["--coreset-ratio", "0"], "coreset_ratio = 0.0: must be in"),
    (["--crop", "0"], "crop = 0: must be None or a positive int"),
    (["--resize", "0"], "resize = 0: must be a positive int"),
    (["--backbone", "vgg"], "backbone = 'vgg': must be one of efficientnet_lite0"),
    (["--layers", "layer9"], "unknown: layer9"),
    (["--patch-size", "-1"], "patch_size = -1"),
    (["--seed", "-2"], "seed = -2"),
    (["--holdout", "1"], "holdout = 1.0: must be in [0, 1)"),
    (["--nprobe", "8"], "--nprobe only applies to --knn-index ivf"),
    (["--knn-index", "ivf", "--nprobe", "0"], "knn_nprobe = 0"),
    (["--knn", "torch", "--knn-index", "ivf"], "torch backend is exact"),
    (["--random-init", "--weights", "w.pth"], "--weights and --random-init exclude each other"),
])
def test_bad_settings_are_one_line_before_any_work(options: list[str], message: str, tmp_path: Path, capsys,
                                                   monkeypatch):
    monkeypatch.setattr(PatchCore, "fit", lambda *a, **k: pytest.fail("fit started"))
    widget = make_category(tmp_path / "widget")
    out = str(tmp_path / "out")
    for command in (["fit", str(widget), "--model", str(tmp_path / "m.npz")], ["evaluate", str(widget), "--out", out],
                    ["demo", "--out", out]):
        assert main([*command, *options]) == 2
        assert message in _one_error_line(capsys)


def test_usage_errors_are_one_line_with_exit_code_2(capsys):
    for argv in (["fit", "x", "--model", "m.npz", "--crop", "abc"], ["demo", "--category", "bottle"], ["nonsense"]):
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        assert exit_.value.code == 2
        assert "(see python -m patchcore_lite" in _one_error_line(capsys)


def test_magnetic_tiles_refuse_resize_and_crop(tmp_path: Path, capsys):
    mtd = make_mtd(tmp_path / "mtd")
    for option in ("--resize", "--crop"):
        assert main(["evaluate", str(mtd), option, "200", "--out", str(tmp_path)]) == 2
        assert f"resized whole to the square input ({INPUT_SIZE}x{INPUT_SIZE})" in _one_error_line(capsys)


TINY = ["--random-init", "--backbone", "resnet18", "--resize", "32", "--crop", "32"]  # a 4x4 patch grid


def test_each_file_is_decoded_once_to_check_it_and_once_to_use_it(tmp_path: Path, monkeypatch):
    """The check before work decodes every image and mask once (evaluate, fit and predict decoded each
    twice before any work: the loader checked again what the command had checked); the run then reads each
    file once to use it."""
    from patchcore_lite import datasets

    widget = make_category(tmp_path / "widget", n_train=4)
    real, opened = datasets._open_decoded, Counter()
    monkeypatch.setattr(datasets, "_open_decoded", lambda path: opened.update([path]) or real(path))
    model = tmp_path / "m.npz"
    train = sorted((widget / "train").rglob("*.png"))
    test = sorted((widget / "test").rglob("*.png")) + sorted((widget / "ground_truth").rglob("*.png"))
    for argv, files in ((["evaluate", widget, "--out", tmp_path / "evaluated"], train + test),
                        (["fit", widget / "train", "--model", model], train),
                        (["predict", widget / "test", "--model", model, "--out", tmp_path / "predicted"],
                         sorted((widget / "test").rglob("*.png")))):
        opened.clear()
        assert main([str(a) for a in argv] + (TINY if argv[0] != "predict" else [])) == 0
        assert opened == dict.fromkeys(files, 2), f"{argv[0]}: {opened}"


def test_a_test_set_without_anomalies_is_refused_before_the_fit(tmp_path: Path, capsys, monkeypatch):
    good_only = make_category(tmp_path / "good_only", defects={})
    monkeypatch.setattr(PatchCore, "fit", lambda *a, **k: pytest.fail("fit started"))
    assert main(["evaluate", str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    assert "good_only: the test set has only normal images (2), so AUROC is undefined" in _one_error_line(capsys)
    with pytest.raises(DataError, match="only normal images"):
        fit_evaluate(PatchCore(pretrained=False), good_only)


def test_demo_reruns_into_its_own_report_but_not_over_an_evaluation(tmp_path: Path, capsys):
    """The README's first command run twice: the demo replaces its own earlier report (same categories);
    an evaluation of something else in that folder is still refused without --overwrite."""
    out = tmp_path / "demo"
    demo = ["demo", "--category", "disc", "--out", str(out), *TINY]
    assert main(demo) == 0
    first = _untimed_rows(out / "results.csv")
    capsys.readouterr()
    assert main(demo) == 0
    assert "replacing the demo's earlier report" in capsys.readouterr().out
    assert _untimed_rows(out / "results.csv") == first  # one row, the same numbers: nothing of the first run mixed in
    assert len(first) == 1
    assert main(["demo", "--category", "grain", "--out", str(out), *TINY]) == 2
    assert "add --overwrite" in _one_error_line(capsys)


def _untimed_rows(path: Path) -> list[dict[str, str]]:
    """results.csv without its timing columns, which differ from run to run."""
    with open(path, newline="") as f:
        return [{k: v for k, v in row.items() if not k.endswith("_s")} for row in csv.DictReader(f)]
