"""The command line: fit, predict and evaluate on a synthetic category; settings reach the model; errors."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from patchcore_lite.cli import build_parser, main
from patchcore_lite.datasets import train_test_samples
from patchcore_lite.model import PatchCore


@pytest.fixture(scope="module")
def category(synthetic_root: Path) -> Path:
    return sorted(p for p in synthetic_root.iterdir() if p.is_dir())[0]


def test_fit_then_predict_scores_anomalies_above_normals(category: Path, tmp_path: Path):
    model_file, out = tmp_path / "m.npz", tmp_path / "pred"
    assert main(["fit", str(category), "--model", str(model_file), "--coreset-ratio", "0.05"]) == 0
    _, test = train_test_samples(category)
    normal = next(s.path for s in test if s.label == 0)
    anomalous = next(s.path for s in test if s.label == 1)
    assert main(["predict", str(normal), str(anomalous), "--model", str(model_file), "--out", str(out)]) == 0
    with open(out / "scores.csv") as f:
        rows = list(csv.reader(f))[1:]
    assert [r[0] for r in rows] == [str(normal), str(anomalous)]
    assert float(rows[0][1]) < float(rows[1][1])
    with np.load(out / "maps.npz") as maps:
        assert maps["maps"].shape == (2, 224, 224)


def test_evaluate_writes_results_with_the_search_asked_for(category: Path, tmp_path: Path):
    args = ["evaluate", str(category), "--out", str(tmp_path), "--coreset-ratio", "0.05",
            "--knn-index", "ivf", "--nprobe", "4"]
    assert main(args) == 0
    (row,) = json.loads((tmp_path / "results.json").read_text())
    assert row["name"] == category.name and 0.5 < row["image_auroc"] <= 1


def test_options_reach_the_config(category: Path):
    from patchcore_lite.cli import _config

    args = build_parser().parse_args(["fit", str(category), "--model", "x.npz", "--knn-index", "ivf",
                                      "--nprobe", "16", "--no-reweight", "--patch-size", "5"])
    config = _config(args, category)
    assert (config.knn_index, config.knn_nprobe, config.reweight, config.patch_size) == ("ivf", 16, False, 5)
    assert PatchCore(config, pretrained=False).config.knn_nprobe == 16


def test_bad_input_is_one_clear_line_and_exit_code_2(tmp_path: Path, capsys):
    assert main(["evaluate", str(tmp_path / "nowhere")]) == 2
    assert str(tmp_path / "nowhere") in capsys.readouterr().err
    assert main(["predict", str(tmp_path), "--model", str(tmp_path / "missing.npz")]) == 2
    assert "missing.npz" in capsys.readouterr().err
