"""The accuracy study's rule (benchmarks/accuracy_study.py) on hand-made result rows."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
study = pytest.importorskip("accuracy_study")

SETS = ["magnetic_tile", "hazelnut", "transistor"]


def rows(name: str, image: list[float], aupro: list[float], speed: float | None = None, rnd: int = 1) -> list[dict]:
    out = [{"round": rnd, "candidate": name, "dataset": d, "image_auroc": i, "pixel_auroc": 0.9, "aupro": a,
            "fit_s": 1.0, "ms_per_image": 50.0}
           for d, i, a in zip(SETS, image, aupro)]
    if speed is not None:
        out.append({"round": rnd, "candidate": name, "dataset": "speed gate", "images_per_s": speed})
    return out


BASE = rows("default", [0.96, 1.0, 0.9375], [0.70, 0.90, 0.85], speed=16.0)


def test_rule_needs_higher_mean_aupro_no_image_drop_and_speed():
    data = (BASE
            + rows("better but slow", [0.96, 1.0, 0.9375], [0.80, 0.95, 0.90], speed=9.0)
            + rows("better, drops MTD image AUROC by 0.006", [0.954, 1.0, 0.9375], [0.90, 0.95, 0.90], speed=20.0)
            + rows("better, drops by 0.004", [0.956, 1.0, 0.9375], [0.72, 0.91, 0.86], speed=13.0)
            + rows("equal AUPRO", [0.99, 1.0, 1.0], [0.70, 0.90, 0.85], speed=30.0))
    done = study.summary(data, SETS)
    assert done["better but slow"]["rule_1"] and not done["better but slow"]["rule_3"]
    assert not done["better, drops MTD image AUROC by 0.006"]["rule_2"]
    assert not done["equal AUPRO"]["rule_1"]  # strictly higher, as the rule says
    assert study.winner(done) == "better, drops by 0.004"
    assert done["default"]["mean_aupro"] == pytest.approx((0.70 + 0.90 + 0.85) / 3)


def test_no_passing_candidate_keeps_the_default_and_unfinished_candidates_are_left_out():
    data = BASE + rows("worse", [0.96, 1.0, 0.9375], [0.60, 0.90, 0.85], speed=20.0)
    data += rows("half done", [0.99, 1.0, 1.0], [0.99, 0.99, 0.99])[:2]
    done = study.summary(data, SETS)
    assert "half done" not in done
    assert study.winner(done) == "default"


def test_round_2_combines_the_two_best_that_change_different_settings():
    data = (BASE + rows("p = 1", [0.96, 1.0, 0.9375], [0.80, 0.90, 0.85])
            + rows("p = 5", [0.96, 1.0, 0.9375], [0.79, 0.90, 0.85])
            + rows("resolution 256", [0.96, 1.0, 0.9375], [0.75, 0.90, 0.85]))
    candidates = {"default": {}, "p = 1": {"patch_size": 1}, "p = 5": {"patch_size": 5},
                  "resolution 256": {"resolution": 256}}
    combined = study.round_2(study.summary(data, SETS), candidates)
    assert combined == {"p = 1 + resolution 256": {"patch_size": 1, "resolution": 256}}


def test_candidates_sharing_features_differ_only_in_scoring():
    assert study.family({"k": 3, "patch_size": 5}) == study.family({"patch_size": 5, "coreset_ratio": 0.25})
    assert study.family({"patch_size": 5}) != study.family({"patch_size": 3})


def test_report_keeps_a_recorded_candidate_that_is_no_longer_one():
    data = BASE + rows("old round 2", [0.96, 1.0, 0.875], [0.80, 0.95, 0.90], rnd=2)
    text = study.report(data, SETS, {"default": {}})
    assert "| 2* | old round 2 |" in text and "| 1 | default |" in text
    assert "earlier, incomplete round 1" in text
    plain = study.report(BASE, SETS, {"default": {}})
    assert "| 1* |" not in plain and "incomplete" not in plain


def test_input_protocols_of_the_study(synthetic_root):
    category = next(p for p in sorted(synthetic_root.iterdir()) if p.is_dir())
    whole = study.model_for(category, {"resolution": "whole"}).config
    assert (whole.resize, whole.crop) == ((224, 224), None)  # MVTec: the whole image, nothing cropped
    r = study.model_for(category, {"resolution": 320}).config
    assert (r.resize, r.crop) == (366, 320)  # the paper's 256 -> 224 ratio kept


def test_all_candidates_are_round_1_and_the_round_2_it_defines():
    data = BASE + rows("p = 1", [0.96, 1.0, 0.9375], [0.80, 0.90, 0.85]) + rows(
        "resolution 256", [0.96, 1.0, 0.9375], [0.75, 0.90, 0.85])
    candidates = study.all_candidates(study.summary(data, SETS))
    assert list(candidates)[: len(study.ROUND_1)] == list(study.ROUND_1)
    assert candidates["p = 1 + resolution 256"] == {"patch_size": 1, "resolution": 256}
