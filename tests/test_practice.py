"""From scores to decisions: plain-folder fit, held-out thresholds, streaming and resumable predict, overlays."""

import csv
import json
import os
import shutil
import stat
from pathlib import Path

import numpy as np
import pytest

from patchcore_lite.datasets import INPUT_SIZE, train_test_samples
from patchcore_lite.errors import ModelFileError
from patchcore_lite.model import PatchCore
from patchcore_lite.thresholds import auto_threshold, decision_rates, split_holdout
from patchcore_lite.tools.cli import main

FAST = ["--coreset-ratio", "0.05", "--batch-size", "2"]


@pytest.fixture(scope="module")
def model_file(synthetic_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("model") / "stripes.npz"
    assert main(["fit", str(synthetic_root / "stripes"), "--model", str(path), "--holdout", "0.2", *FAST]) == 0
    return path


@pytest.fixture(scope="module")
def images(synthetic_root: Path) -> list[Path]:
    """4 normal then 4 anomalous test images of stripes."""
    test = train_test_samples(synthetic_root / "stripes")[1]
    return [s.path for s in test if s.label == 0][:4] + [s.path for s in test if s.label == 1][::5][:4]


@pytest.fixture(scope="module")
def full_run(model_file: Path, images: list[Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("full")
    argv = ["predict", *map(str, images), "--model", str(model_file), "--out", str(out), "--threshold", "auto"]
    assert main([*argv, "--overlays"]) == 0
    return out


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _rows(out: Path) -> list[dict[str, str]]:
    with open(out / "scores.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_auto_threshold_flags_anomalies_and_few_normals(full_run: Path, model_file: Path):
    rows = _rows(full_run)
    flagged = [r["decision"] == "anomalous" for r in rows]
    assert sum(flagged[:4]) <= 1 and sum(flagged[4:]) >= 3, rows
    for r in rows:  # the decision is the rule applied to the values written
        assert (r["decision"] == "anomalous") == (float(r["score"]) >= float(r["threshold"]))
        assert 0 <= int(r["max_row"]) < INPUT_SIZE and 0 <= int(r["max_col"]) < INPUT_SIZE
    record = json.loads((full_run / "threshold.json").read_text())
    rule, value = auto_threshold(PatchCore.load(model_file).normal_scores)
    assert record["rule"] == rule and rule.startswith("mean + 3 sd") and record["threshold"] == pytest.approx(value)
    assert float(rows[0]["threshold"]) == pytest.approx(value)


def test_maps_and_overlays_for_every_image_readable_by_all(full_run: Path, images: list[Path]):
    for folder, suffix in (("maps", ".npy"), ("overlays", ".png")):
        written = sorted((full_run / folder).iterdir())
        assert [p.name for p in written] == [f"{i:06d}_{p.stem}{suffix}" for i, p in enumerate(images)]
        assert all(stat.S_IMODE(p.stat().st_mode) == 0o666 & ~_umask() for p in written)  # 0644 under umask 022
    amap = np.load(full_run / "maps" / f"000004_{images[4].stem}.npy")
    assert amap.shape == (INPUT_SIZE, INPUT_SIZE) and amap.dtype == np.float16
    assert (full_run / "contact_sheet.png").read_bytes()[:4] == b"\x89PNG"


def test_an_interrupted_run_leaves_a_valid_csv_that_resume_completes(
        full_run: Path, model_file: Path, images: list[Path], tmp_path: Path, monkeypatch):
    argv = ["predict", *map(str, images), "--model", str(model_file), "--out", str(tmp_path), "--threshold", "auto",
            "--no-maps"]
    real, calls = PatchCore.score_batch, []

    def crash_on_third_batch(self, batch):
        calls.append(len(batch))
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(self, batch)

    monkeypatch.setattr(PatchCore, "score_batch", crash_on_third_batch)
    assert main(argv) == 130  # Ctrl-C: one line and the shell's code, no traceback
    assert _rows(tmp_path) == _rows(full_run)[:4]  # two batches of 2, flushed as scored
    with open(tmp_path / "scores.csv", "a") as f:
        f.write(f"{images[4]},12.3")  # a row cut short by a crash while writing: scored again
    calls.clear()
    assert main([*argv, "--resume"]) == 0
    assert calls == [2, 2]  # only the last 4 images are scored again
    assert _rows(tmp_path) == _rows(full_run)
    assert not (tmp_path / "maps").exists()


def test_resume_refuses_a_csv_of_other_images(full_run: Path, model_file: Path, images: list[Path], capsys):
    assert main(["predict", str(images[1]), "--model", str(model_file), "--out", str(full_run), "--resume",
                 "--threshold", "auto", "--overlays"]) == 2  # the same settings as full_run, other images
    assert "is not a row this run wrote" in capsys.readouterr().err


def test_fit_on_a_plain_folder_of_good_images(synthetic_root: Path, tmp_path: Path, capsys):
    train = [s.path for s in train_test_samples(synthetic_root / "stripes")[0]][:4]
    for i, path in enumerate(train):  # nested folders, any names
        (tmp_path / "good" / f"batch{i % 2}").mkdir(parents=True, exist_ok=True)
        shutil.copy(path, tmp_path / "good" / f"batch{i % 2}" / f"img{i}.png")
    model = tmp_path / "plain.npz"
    assert main(["fit", str(tmp_path / "good"), "--model", str(model), "--holdout", "0.25", *FAST]) == 0
    loaded = PatchCore.load(model)
    assert len(loaded.normal_scores) == 1 and loaded.n_train_patches == 3 * (INPUT_SIZE // 8) ** 2
    assert set(loaded.normal_pixel_quantiles) == {"0.5", "0.9", "0.99", "0.999"}
    # without a held-out split there is no automatic threshold: a clear error, a manual one still works
    assert main(["fit", str(tmp_path / "good"), "--model", str(model), "--holdout", "0", *FAST]) == 0
    capsys.readouterr()
    argv = ["predict", str(train[0]), "--model", str(model), "--out", str(tmp_path / "p")]
    assert main([*argv, "--threshold", "auto"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--threshold auto is unavailable" in err
    assert main([*argv, "--threshold", "1e9"]) == 0
    assert _rows(tmp_path / "p")[0]["decision"] == "good"


@pytest.mark.parametrize("count, holdout, needed", [(1, "0", 2), (1, "0.1", 2), (3, "0.9", 4)])
def test_too_few_images_is_one_line_saying_how_many(count, holdout, needed, synthetic_root: Path, tmp_path: Path,
                                                    capsys):
    for path in [s.path for s in train_test_samples(synthetic_root / "stripes")[0]][:count]:
        shutil.copy(path, tmp_path / path.name)
    assert main(["fit", str(tmp_path), "--model", str(tmp_path / "m.npz"), "--holdout", holdout]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{count} good image(s) found; at least {needed} are needed" in err


def test_split_holdout_is_seeded_disjoint_and_holds_out_at_least_one():
    items = list(range(30))
    fit, held = split_holdout(items, 0.1, seed=3)
    assert len(held) == 3 and sorted(fit + held) == items and (fit, held) == split_holdout(items, 0.1, seed=3)
    assert len(split_holdout(items[:5], 0.01, seed=0)[1]) == 1
    assert split_holdout(items, 0, seed=0) == (items, [])


def test_auto_threshold_rules():
    rule, value = auto_threshold(np.arange(100.0))
    assert rule.startswith("just above the largest of 100") and value == 99.000001  # flags none of them
    rule, value = auto_threshold([1.0, 2.0, 3.0])
    assert rule.startswith("mean + 3 sd") and value == pytest.approx(2 + 3 * 1.0)
    rates = decision_rates([0, 0, 1, 1], [0.1, 0.9, 0.8, 0.2], 0.5)
    assert rates == {"precision": 0.5, "recall": 0.5, "fpr": 0.5}


@pytest.mark.parametrize("bad", [[], ["x"], [float("inf")], "1.0"])
def test_damaged_normal_scores_are_refused(model_file: Path, tmp_path: Path, bad):
    with np.load(model_file) as f:
        meta = json.loads(f["meta"].tobytes().decode())
        bank = f["memory_bank"]
    meta["normal_scores"] = bad
    path = tmp_path / "bad.npz"
    np.savez(path, memory_bank=bank, meta=np.frombuffer(json.dumps(meta).encode(), np.uint8))
    with pytest.raises(ModelFileError, match="normal_scores must be a non-empty list of finite numbers"):
        PatchCore.load(path)
