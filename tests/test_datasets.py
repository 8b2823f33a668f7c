"""Tests for patchcore_lite.datasets: layouts, image modes, broken files, preprocessing."""

from __future__ import annotations

import os
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from patchcore_lite.datasets import (
    INPUT_SIZE,
    MTD_PREPROCESS,
    MVTEC_PREPROCESS,
    ImageDataset,
    Preprocess,
    Sample,
    dataset_kind,
    default_prefetch,
    find_categories,
    image_batches,
    list_images,
    load_image,
    load_mask,
    magnetic_tile_samples,
    mvtec_samples,
    prefetched,
    protocol,
    train_test_samples,
    validate_samples,
)
from patchcore_lite.errors import DataError


def write_image(path: Path, array: np.ndarray | None = None, size: tuple[int, int] = (32, 24), **save) -> Path:
    """Write an image (default: random RGB noise of ``size`` = (W, H)) and return its path."""
    if array is None:
        array = np.random.default_rng(len(str(path))).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, **save)
    return path


def write_mask(path: Path, size: tuple[int, int] = (32, 24)) -> Path:
    mask = np.zeros((size[1], size[0]), dtype=np.uint8)
    mask[5:10, 5:12] = 255
    return write_image(path, mask)


def make_category(root: Path, n_train: int = 3, defects: dict[str, int] | None = None) -> Path:
    """A tiny MVTec AD category: train/good, test/good, test/<defect> with masks."""
    (root / "train" / "good").mkdir(parents=True)
    for i in range(n_train):
        write_image(root / "train" / "good" / f"{i:03d}.png")
    for i in range(2):
        write_image(root / "test" / "good" / f"{i:03d}.png")
    for defect, count in ({"scratch": 2, "hole": 1} if defects is None else defects).items():
        for i in range(count):
            write_image(root / "test" / defect / f"{i:03d}.png")
            write_mask(root / "ground_truth" / defect / f"{i:03d}_mask.png")
    return root


def make_mtd(root: Path, n_free: int = 10, defects: dict[str, int] | None = None) -> Path:
    """A tiny Magnetic Tile Defects folder: MT_<Class>/Imgs/<name>.jpg with <name>.png beside it."""
    for cls, count in {"Free": n_free, **({"Crack": 3, "Blowhole": 2} if defects is None else defects)}.items():
        for i in range(count):
            imgs = root / f"MT_{cls}" / "Imgs"
            write_image(imgs / f"exp{i}_num_{i}.jpg", np.full((20, 30), 120, np.uint8))
            write_image(imgs / f"exp{i}_num_{i}.png", np.zeros((20, 30), np.uint8))
    return root


# ----------------------------------------------------------------------------- images to score


def test_list_images_scores_images_only_never_masks_or_hidden_files(tmp_path):
    category = make_category(tmp_path / "widget")
    (category / "test" / "good" / "._000.png").write_bytes(b"macOS resource fork")
    (category / "test" / "notes.txt").write_text("not an image")
    write_image(category / ".thumbnails" / "000.png")
    write_image(category / "test" / "scratch" / "000_mask.png")  # a mask outside ground_truth/
    mtd = make_mtd(tmp_path / "mtd", n_free=2, defects={"Crack": 1})
    single = write_image(tmp_path / "single.PNG")

    in_category = ["test/good/000.png", "test/good/001.png", "test/hole/000.png", "test/scratch/000.png",
                   "test/scratch/001.png", "train/good/000.png", "train/good/001.png", "train/good/002.png"]
    in_mtd = ["MT_Crack/Imgs/exp0_num_0.jpg", "MT_Free/Imgs/exp0_num_0.jpg", "MT_Free/Imgs/exp1_num_1.jpg"]
    assert list_images([category, mtd, single]) == [
        *(category / f for f in in_category), *(mtd / f for f in in_mtd), single  # MTD: the .png beside a .jpg is its mask
    ]


def test_list_images_refuses_missing_paths_and_folders_without_images(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"empty: no images to score \(it is empty\)"):
        list_images([tmp_path / "empty"])
    masks_only = tmp_path / "masks"
    write_mask(masks_only / "ground_truth" / "crack" / "000_mask.png")
    with pytest.raises(DataError, match="masks: no images to score"):
        list_images([masks_only])
    with pytest.raises(DataError, match="nowhere.png: no such file or folder"):
        list_images([tmp_path / "nowhere.png"])


# ----------------------------------------------------------------------------- MVTec layout


def test_mvtec_samples_lists_images_with_labels_and_masks(tmp_path):
    root = make_category(tmp_path / "widget")
    (root / "train" / "good" / "readme.txt").write_text("not an image")
    (root / "train" / "good" / "._000.png").write_bytes(b"macOS resource fork")

    train = mvtec_samples(root, "train")
    test = mvtec_samples(root, "test")

    assert [s.path.name for s in train] == ["000.png", "001.png", "002.png"]
    assert all(s.label == 0 and s.defect == "good" and s.mask_path is None for s in train)
    assert [(s.defect, s.path.name, s.label) for s in test] == [
        ("good", "000.png", 0),
        ("good", "001.png", 0),
        ("hole", "000.png", 1),
        ("scratch", "000.png", 1),
        ("scratch", "001.png", 1),
    ]
    assert test[3].mask_path == root / "ground_truth" / "scratch" / "000_mask.png"
    assert train_test_samples(root) == (train, test)


def test_missing_train_folder_says_what_layout_is_expected(tmp_path):
    (tmp_path / "widget" / "test" / "good").mkdir(parents=True)
    with pytest.raises(DataError, match="no train/good/") as err:
        mvtec_samples(tmp_path / "widget", "train")
    assert "widget" in str(err.value) and "MVTec AD layout" in str(err.value) and "test/" in str(err.value)


def test_empty_train_good_is_an_error(tmp_path):
    root = make_category(tmp_path / "widget", n_train=0)
    (root / "train" / "good" / "notes.txt").write_text("x")
    with pytest.raises(DataError, match="no training images") as err:
        mvtec_samples(root, "train")
    assert str(root / "train" / "good") in str(err.value) and "notes.txt" in str(err.value)


def test_missing_mask_names_the_image_and_the_expected_mask(tmp_path):
    root = make_category(tmp_path / "widget")
    (root / "ground_truth" / "hole" / "000_mask.png").unlink()
    with pytest.raises(DataError, match="without a ground-truth mask") as err:
        mvtec_samples(root, "test")
    assert str(root / "test" / "hole" / "000.png") in str(err.value)
    assert "000_mask.png" in str(err.value)


def test_test_folder_without_images_is_an_error(tmp_path):
    root = make_category(tmp_path / "widget", defects={})
    for image in (root / "test" / "good").iterdir():
        image.unlink()
    with pytest.raises(DataError, match="no images in any test"):
        mvtec_samples(root, "test")


def test_non_image_with_image_suffix_is_reported_not_skipped(tmp_path):
    root = make_category(tmp_path / "widget")
    (root / "train" / "good" / "bad.png").write_text("this is text")
    train = mvtec_samples(root, "train")
    assert "bad.png" in [s.path.name for s in train]
    with pytest.raises(DataError, match="bad.png"):
        validate_samples(train)


def test_bad_split_name(tmp_path):
    with pytest.raises(ValueError, match="split"):
        mvtec_samples(make_category(tmp_path / "widget"), "val")


# ----------------------------------------------------------------------------- finding datasets


def test_find_categories_and_dataset_kind(tmp_path):
    a = make_category(tmp_path / "all" / "bottle")
    b = make_category(tmp_path / "all" / "cable")
    (tmp_path / "all" / "license.txt").write_text("x")
    (tmp_path / "all" / "docs").mkdir()
    mtd = make_mtd(tmp_path / "mtd", n_free=2, defects={"Crack": 1})

    assert find_categories(tmp_path / "all") == [a, b]
    assert find_categories(a) == [a]
    assert find_categories(mtd) == [mtd]
    assert dataset_kind(a) == "mvtec"
    assert dataset_kind(mtd) == "mtd"


def test_dataset_kind_of_a_folder_of_categories_says_pass_one(tmp_path):
    make_category(tmp_path / "all" / "bottle")
    with pytest.raises(DataError, match="folder of categories") as err:
        dataset_kind(tmp_path / "all")
    assert "bottle" in str(err.value) and "MT_Free" in str(err.value)


def test_unknown_layout_and_missing_folder(tmp_path):
    (tmp_path / "photos").mkdir()
    write_image(tmp_path / "photos" / "a.png")
    with pytest.raises(DataError, match="not a dataset folder") as err:
        dataset_kind(tmp_path / "photos")
    assert "a.png" in str(err.value) and "train/good" in str(err.value)
    with pytest.raises(DataError, match="no dataset categories"):
        find_categories(tmp_path / "photos")
    with pytest.raises(DataError, match="no such folder"):
        train_test_samples(tmp_path / "nowhere")


# ----------------------------------------------------------------------------- Magnetic Tile Defects


def test_magnetic_tile_split_follows_the_paper_protocol(tmp_path):
    root = make_mtd(tmp_path / "mtd", n_free=20)
    train, test = magnetic_tile_samples(root, seed=0)

    test_normals = [s for s in test if s.label == 0]
    assert len(test_normals) == 4 and len(train) == 16  # 20% of 20 normals
    assert not {s.path for s in train} & {s.path for s in test_normals}
    assert {s.path for s in train} | {s.path for s in test_normals} == set((root / "MT_Free" / "Imgs").glob("*.jpg"))
    assert Counter(s.defect for s in test if s.label == 1) == {"crack": 3, "blowhole": 2}
    assert all(s.mask_path == s.path.with_suffix(".png") for s in test if s.label == 1)
    assert all(s.mask_path is None for s in train + test_normals)
    assert test[:4] == test_normals  # normals first


def test_magnetic_tile_split_is_seeded(tmp_path):
    root = make_mtd(tmp_path / "mtd", n_free=20)
    assert magnetic_tile_samples(root, seed=3) == magnetic_tile_samples(root, seed=3)
    splits = {tuple(s.path for s in magnetic_tile_samples(root, seed=seed)[0]) for seed in range(5)}
    assert len(splits) > 1
    assert train_test_samples(root, seed=3) == magnetic_tile_samples(root, seed=3)


def test_magnetic_tile_missing_mask_and_bad_fraction(tmp_path):
    root = make_mtd(tmp_path / "mtd")
    (root / "MT_Crack" / "Imgs" / "exp1_num_1.png").unlink()
    with pytest.raises(DataError, match="exp1_num_1.jpg"):
        magnetic_tile_samples(root)
    with pytest.raises(ValueError, match="test_fraction"):
        magnetic_tile_samples(root, test_fraction=1.0)


def test_magnetic_tile_without_defect_classes_is_an_error(tmp_path):
    root = make_mtd(tmp_path / "mtd", defects={})
    with pytest.raises(DataError, match="no defect classes"):
        magnetic_tile_samples(root)


# ----------------------------------------------------------------------------- image modes


def _round_trip(tmp_path: Path, img: Image.Image, name: str = "img.png") -> np.ndarray:
    img.save(tmp_path / name)
    out = load_image(tmp_path / name)
    assert out.mode == "RGB" and out.size == img.size
    return np.asarray(out)


def test_grayscale_becomes_three_equal_channels(tmp_path):
    rgb = _round_trip(tmp_path, Image.fromarray(np.array([[0, 77, 255]], np.uint8)))
    assert rgb.tolist() == [[[0, 0, 0], [77, 77, 77], [255, 255, 255]]]


def test_bilevel_image(tmp_path):
    rgb = _round_trip(tmp_path, Image.fromarray(np.array([[False, True]])))
    assert rgb[0, :, 0].tolist() == [0, 255]


def test_16_bit_png_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 257 * 100, 32768, 65535]], np.uint16)
    rgb = _round_trip(tmp_path, Image.fromarray(values))
    assert rgb[0, :, 0].tolist() == [0, 100, 128, 255]
    assert (rgb[..., 0] == rgb[..., 2]).all()


def test_32_bit_integer_and_float_tiffs(tmp_path):
    as_int = _round_trip(tmp_path, Image.fromarray(np.array([[0, 257 * 50, 65535]], np.int32)), "i.tif")
    as_float = _round_trip(tmp_path, Image.fromarray(np.array([[0.0, 0.5, 1.0, 2.0]], np.float32)), "f.tif")
    assert as_int[0, :, 0].tolist() == [0, 50, 255]
    assert as_float[0, :, 0].tolist() == [0, 128, 255, 255]


def test_alpha_is_composited_on_black(tmp_path):
    rgba = np.array([[[200, 100, 50, 255], [200, 100, 50, 128], [200, 100, 50, 0]]], np.uint8)
    assert _round_trip(tmp_path, Image.fromarray(rgba)).tolist() == [[[200, 100, 50], [100, 50, 25], [0, 0, 0]]]
    la = Image.fromarray(np.array([[[200, 128]]], np.uint8), mode="LA")
    assert _round_trip(tmp_path, la, "la.png").tolist() == [[[100, 100, 100]]]


def test_palette_images(tmp_path):
    img = Image.fromarray(np.array([[0, 1]], np.uint8), mode="P")
    img.putpalette([10, 20, 30, 40, 50, 60])
    assert _round_trip(tmp_path, img).tolist() == [[[10, 20, 30], [40, 50, 60]]]
    img.info["transparency"] = 1
    assert _round_trip(tmp_path, img, "t.png").tolist() == [[[10, 20, 30], [0, 0, 0]]]


# ----------------------------------------------------------------------------- broken files


def test_random_bytes_with_png_suffix(tmp_path):
    path = tmp_path / "noise.png"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 500, dtype=np.uint8).tobytes())
    with pytest.raises(DataError, match="noise.png") as err:
        load_image(path)
    assert "Convert it to PNG or remove it" in str(err.value)


@pytest.mark.parametrize("name", ["cut.png", "cut.jpg"])
def test_truncated_files_are_caught(tmp_path, name):
    path = write_image(tmp_path / name, size=(128, 128))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=f"{name}: the image is corrupt or truncated"):
        load_image(path)


def test_empty_file_is_called_empty(tmp_path):
    """An interrupted copy leaves 0 bytes: the message says so, not that the format is wrong."""
    path = tmp_path / "copied.png"
    path.touch()
    with pytest.raises(DataError, match=r"copied.png: an empty file \(0 bytes\)"):
        load_image(path)


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="gone.png: file not found"):
        load_image(tmp_path / "gone.png")


# ----------------------------------------------------------------------------- masks


def test_mask_any_nonzero_pixel_is_anomalous(tmp_path):
    gray = write_image(tmp_path / "g.png", np.array([[0, 1, 1]], np.uint8))
    colour = write_image(tmp_path / "c.png", np.array([[[0, 0, 0], [9, 0, 3], [9, 0, 3]]], np.uint8))
    bilevel = write_image(tmp_path / "b.png", np.array([[False, True, False]]))
    assert load_mask(gray, (3, 1)).tolist() == [[False, True, True]]
    assert load_mask(colour, (3, 1)).tolist() == [[False, True, True]]
    assert load_mask(bilevel, (3, 1)).tolist() == [[False, True, False]]
    assert load_mask(gray, (3, 1)).dtype == bool


def test_a_mask_with_a_third_value_is_refused_except_in_the_magnetic_tile_layout(tmp_path):
    """Masks are binary (issue 21): {0, 1, 255} is refused naming the file; the published Magnetic Tile
    Defects masks have soft edges and are read as every nonzero pixel."""
    ramp = np.array([[0, 1, 255]], np.uint8)
    with pytest.raises(DataError, match=r"g\.png: not a binary mask: 3 distinct values"):
        load_mask(write_image(tmp_path / "g.png", ramp), (3, 1))
    mtd = write_image(tmp_path / "MT_Crack" / "Imgs" / "exp1_num_1.png", ramp)
    assert load_mask(mtd, (3, 1)).tolist() == [[False, True, True]]
    with pytest.raises(DataError, match="its background is 1"):
        load_mask(write_image(tmp_path / "MT_Crack" / "Imgs" / "exp1_num_2.png", np.array([[1, 2, 255]], np.uint8)), (3, 1))


def test_mask_of_another_size_names_both_files_and_sizes(tmp_path):
    mask = write_mask(tmp_path / "000_mask.png", size=(30, 20))
    with pytest.raises(DataError) as err:
        load_mask(mask, (32, 24), image_path=tmp_path / "000.png")
    assert all(part in str(err.value) for part in ("000_mask.png", "30x20", "000.png", "32x24"))


def test_validate_samples_reports_every_problem_at_once(tmp_path):
    root = make_category(tmp_path / "widget", defects={"scratch": 3})
    (root / "test" / "good" / "000.png").write_bytes(b"junk")
    write_mask(root / "ground_truth" / "scratch" / "001_mask.png", size=(10, 10))
    cut = root / "test" / "scratch" / "002.png"
    cut.write_bytes(cut.read_bytes()[:60])
    samples = mvtec_samples(root, "train") + mvtec_samples(root, "test")

    with pytest.raises(DataError, match=r"^3 problem\(s\) in 8 images; nothing was computed") as err:
        validate_samples(samples)
    message = str(err.value)
    assert str(root / "test" / "good" / "000.png") in message
    assert str(root / "ground_truth" / "scratch" / "001_mask.png") in message
    assert str(cut) in message
    validate_samples(mvtec_samples(root, "train"))  # the good ones pass


def test_one_problem_is_one_line(tmp_path):
    image = write_image(tmp_path / "a.png")
    (tmp_path / "b.png").write_bytes(b"junk")
    with pytest.raises(DataError) as err:
        validate_samples([Sample(image, 0, "good", None), Sample(tmp_path / "b.png", 0, "good", None)])
    assert "\n" not in str(err.value) and str(err.value).endswith("(1 problem in 2 images; nothing was computed)")


def test_validate_samples_checks_the_mask_of_a_broken_image(tmp_path):
    image = tmp_path / "a.png"
    image.write_bytes(b"junk")
    mask = tmp_path / "a_mask.png"
    mask.write_bytes(b"junk too")
    with pytest.raises(DataError, match=r"^2 problem") as err:
        validate_samples([Sample(image, 1, "x", mask)])
    assert "a_mask.png" in str(err.value)


# ----------------------------------------------------------------------------- preprocessing


def test_preprocess_shorter_side_resize_then_centre_crop():
    img = Image.new("RGB", (400, 300))
    assert Preprocess(crop=None).image(img).shape == (3, 256, 341)
    assert MVTEC_PREPROCESS.image(img).shape == (3, INPUT_SIZE, INPUT_SIZE)
    assert Preprocess(resize=(100, 120), crop=None).image(img).shape == (3, 100, 120)
    assert MTD_PREPROCESS.image(img).shape == (3, INPUT_SIZE, INPUT_SIZE)
    assert MVTEC_PREPROCESS.mask(np.zeros((300, 400), bool)).shape == (INPUT_SIZE, INPUT_SIZE)
    assert MTD_PREPROCESS.mask(np.zeros((300, 400), bool)).shape == (INPUT_SIZE, INPUT_SIZE)
    # the paper's protocol at 224 (Sec. 4.1), and the study's winner scaled from it
    assert (protocol("mvtec", 224).resize, protocol("mvtec", 224).crop) == (256, 224)
    assert (MVTEC_PREPROCESS.resize, MVTEC_PREPROCESS.crop, INPUT_SIZE) == (329, 288, 288)


def test_preprocess_normalises_and_unnormalises():
    pre = Preprocess(resize=32, crop=None)
    x = pre.image(Image.new("RGB", (32, 32), (255, 0, 128)))
    assert x.dtype == torch.float32
    expected = [(1 - 0.485) / 0.229, (0 - 0.456) / 0.224, (128 / 255 - 0.406) / 0.225]
    assert torch.allclose(x[:, 5, 5], torch.tensor(expected), atol=1e-5)
    assert np.allclose(pre.unnormalize(x)[5, 5], [1, 0, 128 / 255], atol=1e-6)


def test_mask_stays_binary_and_aligned_with_the_image():
    image = np.zeros((300, 400, 3), np.uint8)
    image[100:180, 150:260] = 255
    mask = image[..., 0] > 0
    for pre in (MVTEC_PREPROCESS, MTD_PREPROCESS, Preprocess(resize=(97, 131), crop=80)):
        m = pre.mask(mask)
        assert m.dtype == torch.float32 and set(m.unique().tolist()) <= {0.0, 1.0}
        bright = torch.from_numpy(pre.unnormalize(pre.image(Image.fromarray(image)))[..., 0] > 0.5)
        iou = (bright & (m > 0)).sum() / (bright | (m > 0)).sum()
        assert iou > 0.9


def test_mask_resize_is_nearest_neighbour_not_dilated():
    mask = np.zeros((300, 400), bool)
    mask[100:180, 150:260] = True
    resized = Preprocess(crop=None).mask(mask)  # 256x341, every side scaled by 256/300
    assert resized.mean().item() == pytest.approx(mask.mean(), rel=0.02)


def test_preprocess_rejects_impossible_sizes_and_accepts_lists():
    with pytest.raises(ValueError, match="crop"):
        Preprocess(resize=(200, 300), crop=224)
    with pytest.raises(ValueError, match="resize"):
        Preprocess(resize=0)
    assert Preprocess(resize=[224, 224], crop=None, mean=[0.5] * 3, std=[0.5] * 3) == Preprocess(
        resize=(224, 224), crop=None, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)
    )


def test_image_dataset_items_and_batches(tmp_path):
    root = make_category(tmp_path / "widget")
    dataset = ImageDataset(mvtec_samples(root, "test"), Preprocess(resize=24, crop=16))
    normal, defective = dataset[0], dataset[3]
    assert normal["image"].shape == (3, 16, 16) and normal["mask"].shape == (16, 16)
    assert normal["mask"].sum() == 0 and normal["label"] == 0 and normal["defect"] == "good"
    assert defective["mask"].sum() > 0 and defective["label"] == 1 and defective["defect"] == "scratch"
    assert defective["path"] == str(root / "test" / "scratch" / "000.png")
    batch = next(iter(torch.utils.data.DataLoader(dataset, batch_size=5)))
    assert batch["image"].shape == (5, 3, 16, 16) and batch["label"].tolist() == [0, 0, 1, 1, 1]


# ----------------------------------------------------------------------------- real data


@pytest.mark.parametrize("category", ["hazelnut", "transistor"])
def test_reduced_mvtec_categories(mvtec_reduced, category):
    root = mvtec_reduced(category)
    train, test = train_test_samples(root)
    assert dataset_kind(root) == "mvtec" and len(train) == 50
    counts = Counter(s.defect for s in test)
    assert counts["good"] == 2 and len(counts) == 5 and all(n == 2 for n in counts.values())
    validate_samples(test)  # masks exist, decode and match their image sizes
    item = ImageDataset(test, MVTEC_PREPROCESS)[2]
    assert item["image"].shape == (3, INPUT_SIZE, INPUT_SIZE) and item["mask"].sum() > 0


def test_real_magnetic_tile_counts_and_split(magnetic_tile):
    assert dataset_kind(magnetic_tile) == "mtd"
    train, test = train_test_samples(magnetic_tile)
    counts = Counter(s.defect for s in test)
    assert len(train) == 762 and counts["good"] == 190  # 952 normal, 20% held out
    assert counts == {"good": 190, "blowhole": 115, "break": 85, "crack": 57, "fray": 32, "uneven": 103}
    assert train_test_samples(magnetic_tile)[0] == train


def test_real_magnetic_tile_masks_match_images(magnetic_tile):
    _, test = magnetic_tile_samples(magnetic_tile)
    defective = [s for s in test if s.label == 1]
    validate_samples(defective)
    # Published data: four MT_Uneven masks are empty; we keep them as anomalies.
    uneven = [s for s in defective if s.defect == "uneven"]
    empty = [s.path.name for s in uneven if not load_mask(s.mask_path, load_image(s.path).size).any()]
    assert len(empty) == 4


# ----------------------------------------------------------------------------- prefetching loader


def test_prefetching_gives_the_same_batches_in_the_same_order(tmp_path):
    root = make_category(tmp_path / "cat", n_train=2)
    samples = train_test_samples(root)[1]  # 5 test images with labels and masks
    preprocess = Preprocess(resize=20, crop=16)
    runs = [list(image_batches(samples, preprocess, 2, prefetch=depth)) for depth in (0, 1, 2)]
    for run in runs[1:]:
        assert [b.start for b in run] == [b.start for b in runs[0]] == [0, 2, 4]
        for a, b in zip(run, runs[0]):
            assert torch.equal(a.images, b.images) and torch.equal(a.masks, b.masks)


def test_the_loader_prefetches_only_where_torch_leaves_a_core_free(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert default_prefetch() == 0  # both cores busy with the network and the search
        torch.set_num_threads(1)
        assert default_prefetch() == 1
    finally:
        torch.set_num_threads(threads)


def counted(n: int, made: list[int]):
    """0 .. n-1, noting in ``made`` each item as it is produced."""
    for i in range(n):
        made.append(i)
        yield i


def test_prefetch_stays_at_most_depth_ahead():
    made: list[int] = []
    for depth in (1, 2):
        made.clear()
        for seen, item in enumerate(prefetched(counted(10, made), depth)):
            time.sleep(0.01)  # give the producer every chance to run ahead
            assert item == seen and len(made) <= seen + depth + 2  # queued + one being made
        assert made == list(range(10))


def test_an_error_in_the_decoder_surfaces_with_its_message(tmp_path):
    def items():
        yield 1
        raise DataError(f"{tmp_path / 'bad.png'} cannot be decoded: re-export it as PNG")

    got = []
    with pytest.raises(DataError, match="bad.png cannot be decoded: re-export"):
        for item in prefetched(items()):
            got.append(item)
    assert got == [1]  # what came before the error was delivered


def test_closing_early_stops_the_producer():
    made: list[int] = []
    batches = prefetched(counted(1000, made), 1)
    assert next(batches) == 0
    batches.close()  # joins the producer
    assert len(made) <= 3
    with pytest.raises(ValueError, match="depth"):
        next(prefetched(counted(3, made), 0))
