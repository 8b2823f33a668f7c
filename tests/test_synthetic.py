"""Tests for patchcore_lite.teaching.synthetic: determinism, exact masks, layout, regeneration, in-memory helpers,
and difficulty: a default PatchCore must not solve the data (the book's comparisons need room to differ)."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from patchcore_lite.datasets import (
    INPUT_SIZE,
    MVTEC_PREPROCESS,
    load_image,
    load_mask,
    mvtec_samples,
    train_test_samples,
    validate_samples,
)
from patchcore_lite.errors import DataError
from patchcore_lite.evaluation import Result, fit_evaluate
from patchcore_lite.model import PatchCore
from patchcore_lite.teaching import synthetic
from patchcore_lite.teaching.synthetic import (
    CATEGORIES,
    DEFECTS,
    ensure_synthetic,
    generate,
    make_image,
    synthetic_validation,
    toy_point_cloud,
)


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_generation_is_byte_for_byte_deterministic(synthetic_root, tmp_path):
    start = time.perf_counter()
    generate(tmp_path / "again", categories=("disc",))
    print(f"generated 1 of {len(CATEGORIES)} categories in {time.perf_counter() - start:.2f} s")
    assert _files(tmp_path / "again" / "disc") == _files(synthetic_root / "disc")


def test_layout_parses_as_mvtec(synthetic_root):
    assert sorted(p.name for p in synthetic_root.iterdir()) == sorted([*CATEGORIES, "VERSION"])
    for category in CATEGORIES:
        train = mvtec_samples(synthetic_root / category, "train")
        test = mvtec_samples(synthetic_root / category, "test")
        assert len(train) == synthetic.N_TRAIN
        assert sum(s.label == 0 for s in test) == synthetic.N_TEST_GOOD
        defects = {s.defect for s in test if s.label == 1}
        assert defects == set(DEFECTS[category])
        assert len(test) == synthetic.N_TEST_GOOD + synthetic.N_PER_DEFECT * len(defects)
        validate_samples(train + test)


def test_defects_have_masks_inside_the_centre_crop(synthetic_root):
    for category in CATEGORIES:
        for sample in mvtec_samples(synthetic_root / category, "test"):
            assert Image.open(sample.path).size == (256, 256)
            if sample.label == 0:
                continue
            mask = load_mask(sample.mask_path, (256, 256))
            assert 12 <= mask.sum() < 0.1 * mask.size, sample.path
            assert mask[16:240, 16:240].sum() == mask.sum(), f"{sample.path} reaches outside the 224 crop"
            assert MVTEC_PREPROCESS.mask(mask).sum() > 0


@pytest.mark.parametrize("category", CATEGORIES)
def test_mask_is_exactly_the_changed_pixels(category):
    for defect in DEFECTS[category]:
        for seed in range(2):
            normal, empty = make_image(category, None, np.random.default_rng(seed))
            defective, mask = make_image(category, defect, np.random.default_rng(seed))
            assert not empty.any()
            change = np.abs(normal.astype(int) - defective).max(axis=2)
            assert not change[~mask].any(), f"{defect}: pixels changed outside the mask"
            # Faint defects are allowed, invisible pixels are not: >= 4 grey levels (_MIN_CHANGE).
            assert (change[mask] >= 4).mean() > 0.99, f"{defect}: not visible everywhere in its mask"


@pytest.mark.parametrize("category", CATEGORIES)
def test_defects_shift_mean_colour_much_less_than_normal_images_vary(category):
    # Otherwise a detector could find defects from the image's mean colour alone.
    def mean_colour(defect, seed):
        return make_image(category, defect, np.random.default_rng(seed))[0].reshape(-1, 3).mean(axis=0)

    spread = np.array([mean_colour(None, seed) for seed in range(100, 120)]).std(axis=0).min()
    shift = max(
        np.abs(mean_colour(defect, seed) - mean_colour(None, seed)).max()
        for defect in DEFECTS[category]
        for seed in range(3)
    )
    assert spread > 4 and shift < 0.5 * spread


def test_make_image_rejects_unknown_names():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="unknown category"):
        make_image("velvet", None, rng)
    with pytest.raises(ValueError, match="has no defect 'missing_piece'"):
        make_image("tile", "missing_piece", rng)
    with pytest.raises(ValueError, match="unknown categories"):
        generate(Path("unused"), categories=("velvet",))


def test_other_image_size(tmp_path):
    root = generate(tmp_path / "small", categories=("disc",), size=128)
    for sample in mvtec_samples(root / "disc", "test"):
        assert Image.open(sample.path).size == (128, 128)
        if sample.mask_path is not None:
            mask = load_mask(sample.mask_path, (128, 128))
            assert mask.any() and mask[8:120, 8:120].sum() == mask.sum()


def test_ensure_synthetic_is_a_no_op_when_current(synthetic_root):
    version = synthetic_root / "VERSION"
    image = synthetic_root / "tile" / "train" / "good" / "000.png"
    before = (version.stat().st_mtime_ns, image.stat().st_mtime_ns)
    start = time.perf_counter()
    assert ensure_synthetic(synthetic_root) == synthetic_root
    assert time.perf_counter() - start < 0.5
    assert (version.stat().st_mtime_ns, image.stat().st_mtime_ns) == before


def test_ensure_synthetic_regenerates_an_outdated_dataset(tmp_path, monkeypatch):
    root = generate(tmp_path / "data", categories=("tile",), size=64)
    (root / "VERSION").write_text("written by an older generator\n")
    (root / "stale.txt").write_text("left over")
    calls = []

    def small_generate(path):
        calls.append(path)
        return generate(path, categories=("tile",), size=64)  # the default set takes seconds

    monkeypatch.setattr(synthetic, "generate", small_generate)
    assert ensure_synthetic(root) == root
    assert calls == [root]
    assert not (root / "stale.txt").exists() and (root / "VERSION").read_text().startswith("patchcore_lite")
    assert not [p for p in tmp_path.iterdir() if p.name != "data"], "temporary folders left behind"


def test_concurrent_generation_is_safe(tmp_path):
    root = tmp_path / "data"
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(lambda _: generate(root, categories=("stripes",), size=64), range(2)))
    assert results == [root, root]
    assert len(mvtec_samples(root / "stripes", "train")) == synthetic.N_TRAIN
    assert [p.name for p in tmp_path.iterdir()] == ["data"]


def test_generate_refuses_to_replace_other_data(tmp_path):
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "holiday.jpg").write_bytes(b"precious")
    with pytest.raises(DataError, match="refusing to replace"):
        generate(tmp_path / "photos", categories=("tile",))
    assert (tmp_path / "photos" / "holiday.jpg").read_bytes() == b"precious"


def test_synthetic_validation_makes_fresh_labelled_images(synthetic_root):
    train = train_test_samples(synthetic_root / "disc")[0][:4]
    model = PatchCore(coreset_ratio=0.1).fit(train, progress=False)
    images, labels = synthetic_validation("disc", model.preprocess, n_normal=3, n_anomalous=4)
    assert images.shape == (7, 3, INPUT_SIZE, INPUT_SIZE) and labels.tolist() == [0, 0, 0, 1, 1, 1, 1]
    again, _ = synthetic_validation("disc", model.preprocess, n_normal=3, n_anomalous=4)
    assert torch.equal(images, again)
    train_images = torch.stack([model.preprocess.image(load_image(s.path)) for s in train])
    assert not any(torch.allclose(v, t) for v in images for t in train_images)
    scores = model.score_batch(images)[0]
    assert scores[labels == 1].mean() > scores[labels == 0].mean()  # the defects are real defects
    with pytest.raises(ValueError, match="unknown category"):
        synthetic_validation("glass", model.preprocess)


def test_toy_point_cloud_is_deterministic_and_checks_its_size():
    a, b = toy_point_cloud(100, seed=5), toy_point_cloud(100, seed=5)
    assert a.shape == (100, 2) and a.dtype == torch.float32 and torch.equal(a, b)
    assert not torch.equal(a, toy_point_cloud(100, seed=6))
    with pytest.raises(ValueError, match="at least 20"):
        toy_point_cloud(10)


# ----------------------------------------------------------------------------- difficulty
# Bands, not exact values: the demo's PatchCore (EfficientNet-Lite0, 10% greedy coreset).


@pytest.fixture(scope="module")
def demo_results(synthetic_root) -> dict[str, Result]:
    """Default PatchCore fit and evaluated once on every category."""
    return {c: fit_evaluate(PatchCore(), synthetic_root / c, progress=False) for c in CATEGORIES}


def test_default_patchcore_does_not_solve_the_data(demo_results):
    image = {c: r.metrics["image_auroc"] for c, r in demo_results.items()}
    assert all(0.75 <= x <= 0.98 for x in image.values()), image
    assert sum(x < 0.97 for x in image.values()) >= 2, image
    assert np.mean([r.metrics["pixel_auroc"] for r in demo_results.values()]) < 0.99


PAPER_INPUT = {"resize": 256, "crop": 224}  # the input the synthetic defects' strengths were set against


@pytest.fixture(scope="module")
def paper_setting_results(synthetic_root) -> dict[str, Result]:
    """PatchCore at the paper's input (resize 256, crop 224), fit and evaluated on every category."""
    model = lambda: PatchCore(**PAPER_INPUT)  # noqa: E731
    return {c: fit_evaluate(model(), synthetic_root / c, progress=False) for c in CATEGORIES}


def test_every_defect_kind_is_found_but_not_all_of_them(paper_setting_results):
    # Each defect kind scores above the median normal image on average; faint ones hide among normal ones.
    # The defects' strengths were set against the paper's 224 input. With the default since the accuracy
    # study (288), tile's faint glaze scores just below the median normal image (README, open work).
    for category, result in paper_setting_results.items():
        normal = np.median(result.scores[result.labels == 0])
        defects = np.array(result.defects)
        for defect in DEFECTS[category]:
            assert result.scores[defects == defect].mean() > normal, (category, defect)


def test_greedy_coreset_beats_random_at_one_percent(synthetic_root):
    # The disc's rare normal patterns (rim notch, bolt holes) are what a random 1% bank misses.
    greedy, random = (
        fit_evaluate(PatchCore(coreset_ratio=0.01, coreset_method=method, **PAPER_INPUT), synthetic_root / "disc",
                     progress=False)
        for method in ("greedy", "random")
    )
    assert greedy.metrics["image_auroc"] >= random.metrics["image_auroc"] + 0.1
    assert greedy.metrics["aupro"] >= random.metrics["aupro"] + 0.02
