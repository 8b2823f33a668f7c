"""Datasets: where they live, their folder layouts (MVTec AD, Magnetic Tile Defects), loading.

Where data lives: one data root serves the package, the chapters, the tests and the command line:

* ``$PATCHCORE_DATA`` if it is set;
* else the repository's ``data/`` folder, when the package runs from a source checkout;
* else ``$XDG_DATA_HOME/patchcore_lite`` (``~/.local/share/patchcore_lite``) for an installed package.

Nothing else in the package names a data location: everything asks ``data_root()`` or
``locate()`` (``tools.download`` fills the data root from the publishers).

Everything that touches files on disk lives here, so that a bad image or a wrong
folder layout fails with a ``DataError`` that names the file and says how to fix it,
before any features are computed (see ``validate_samples``).

Layouts understood:

* MVTec AD (one category folder)::

      <category>/train/good/*.png
      <category>/test/good/*.png
      <category>/test/<defect>/*.png
      <category>/ground_truth/<defect>/<stem>_mask.png

* Magnetic Tile Defects (Huang et al. 2020)::

      <root>/MT_Free/Imgs/<name>.jpg            normal tiles
      <root>/MT_<Class>/Imgs/<name>.jpg         defective tiles
      <root>/MT_<Class>/Imgs/<name>.png         pixel mask beside each image

Listing rules: only files whose suffix is in ``IMAGE_SUFFIXES`` (any case) are images;
anything else (``readme.txt``, ``Thumbs.db``) is ignored, and so are hidden files such
as macOS ``._000.png`` resource forks, which carry an image suffix but are not images.
A file that has an image suffix but cannot be decoded is an error, not skipped:
silently dropping it would change the dataset without the user noticing.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import numbers
import os
import queue
import stat
import threading
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image, UnidentifiedImageError
from torchvision.transforms import InterpolationMode
from tqdm.auto import tqdm

from .backbone import IMAGENET_MEAN, IMAGENET_STD
from .errors import DataError, check_setting, file_kind, shown

T = TypeVar("T")

# ----------------------------------------------------------------------------- where data lives

_PACKAGE = Path(__file__).resolve().parent
ENV_DATA = "PATCHCORE_DATA"


def data_root() -> Path:
    """The folder under which every dataset lives (see the module docstring); it may not exist yet."""
    env = os.environ.get(ENV_DATA)
    if env:
        return Path(env).expanduser()
    repo = _PACKAGE.parent
    if (repo / "pyproject.toml").is_file() and (repo / "data").is_dir():
        return repo / "data"
    return Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share") / "patchcore_lite"


def locate(*relative: str) -> Path | None:
    """The first of the folders ``relative`` (paths below the data root) that exists, else None.

    ``locate("mvtec_ad/hazelnut", "mvtec_reduced/hazelnut")`` prefers a full download
    and falls back to the reduced development copy.
    """
    root = data_root()
    return next((root / r for r in relative if (root / r).is_dir()), None)


def writable_dir(preferred: Path, name: str) -> Path:
    """``preferred`` if it can be written, else ``$XDG_CACHE_HOME/patchcore_lite/<name>``.

    Generated data (the synthetic set) goes under the data root, unless that root is
    read-only (a shared copy of real datasets, as on CI); then it goes to the user's cache.
    A folder without write bits counts as read-only even for root, who could write anyway.
    """
    existing = next(p for p in (preferred, *preferred.parents) if p.exists())
    if existing.is_dir() and existing.stat().st_mode & 0o222 and os.access(existing, os.W_OK):
        preferred.mkdir(parents=True, exist_ok=True)
        return preferred
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "patchcore_lite" / name
    cache.mkdir(parents=True, exist_ok=True)
    return cache


def real_datasets() -> list[str]:
    """The real data folders present below the data root, e.g. ``["mvtec_reduced/hazelnut", "magnetic_tile"]``."""
    root = data_root()
    found = ["magnetic_tile"] if (root / "magnetic_tile").is_dir() else []
    for collection in ("mvtec_ad", "mvtec_reduced"):  # a download, then the reduced development copy
        if (root / collection).is_dir():
            # Hidden folders are downloads being unpacked (``.extracting-*``), not categories.
            found += [f"{collection}/{c.name}" for c in sorted((root / collection).iterdir())
                      if c.is_dir() and not c.name.startswith(".")]
    return sorted(found)


def data_summary() -> str:
    """One line for a chapter's first output: the real data present, or how to get some."""
    found = real_datasets()
    if found:
        return f"real data in {data_root()}: {', '.join(found)}"
    return (f"no real data in {data_root()}, so this runs on synthetic data only; "
            "to add a real category: python -m patchcore_lite download mvtec_ad hazelnut")


def mvtec_category(name: str) -> Path | None:
    """A real MVTec AD category below the data root: the full download if present, else the reduced copy."""
    return locate(f"mvtec_ad/{name}", f"mvtec_reduced/{name}")


def dataset_label(folder: Path) -> str:
    """How a chapter names a real data folder: "MVTec AD hazelnut (reduced)", "Magnetic Tile Defects"."""
    if folder.name == "magnetic_tile":
        return "Magnetic Tile Defects"
    return f"MVTec AD {folder.name}" + (" (reduced)" if folder.parent.name == "mvtec_reduced" else "")



# ----------------------------------------------------------------------------- layouts

# MVTec AD's 15 categories, in the dataset's (alphabetical) order: the columns of the paper's per-category tables.
MVTEC_CATEGORIES = ("bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather", "metal_nut", "pill",
                    "screw", "tile", "toothbrush", "transistor", "wood", "zipper")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")

_MVTEC_LAYOUT = (
    "MVTec AD layout: <category>/train/good/*.png, <category>/test/<defect>/*.png "
    "(test/good for normal test images) and <category>/ground_truth/<defect>/<stem>_mask.png"
)
_MTD_LAYOUT = (
    "Magnetic Tile Defects layout: <root>/MT_Free/Imgs/<name>.jpg (normal) and "
    "<root>/MT_<Class>/Imgs/<name>.jpg with its mask <name>.png beside it"
)


@dataclass(frozen=True)
class Sample:
    """One image of a dataset split.

    ``mask_path`` is None for normal images, whose mask is all zeros.
    """

    path: Path
    label: int  # 0 normal, 1 anomalous
    defect: str  # "good" for normals, else the defect type
    mask_path: Path | None


# ----------------------------------------------------------------------------- images


def _open_decoded(path: Path) -> Image.Image:
    """Open and fully decode an image, turning every failure into a DataError.

    Only regular files are opened: a FIFO would block, a device never end. A file that cannot be opened
    is called unreadable (with the system's reason), never corrupt."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise DataError(f"{shown(path)}: file not found" + (" (a broken symlink)" if path.is_symlink() else "")
                        + "; check the path.") from None
    except OSError as err:
        raise DataError(f"{shown(path)}: unreadable ({err.strerror}); make it readable or remove it.") from None
    if not stat.S_ISREG(info.st_mode):
        raise DataError(f"{shown(path)}: a {file_kind(info.st_mode)}, not a regular file; give image files only.")
    if info.st_size == 0:  # an interrupted copy: say so rather than "not an image"
        raise DataError(f"{shown(path)}: an empty file (0 bytes); copy it again or remove it from the folder.")
    try:
        with Image.open(path) as img:
            img.load()  # decode now: a truncated file only fails here, not at open
            return img
    except PermissionError as err:
        raise DataError(f"{shown(path)}: unreadable ({err.strerror}); make it readable (chmod a+r) "
                        "or remove it from the folder.") from None
    except UnidentifiedImageError:
        raise DataError(
            f"{shown(path)}: not an image file Pillow can read, although its name ends in "
            f"{path.suffix!r}. Convert it to PNG or remove it from the dataset folder."
        ) from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise DataError(
            f"{shown(path)}: the image is corrupt or truncated ({err}). "
            "Copy or download the file again, or remove it from the dataset folder."
        ) from None


def _is_high_depth(mode: str) -> bool:
    return mode in ("I", "F") or mode.startswith("I;16")


def _to_uint8(array: np.ndarray, mode: str) -> np.ndarray:
    """Scale 16-bit / 32-bit integer data (as 0..65535) or float data (as 0..1) to 0..255."""
    scale = 255.0 if mode == "F" else 1.0 / 257.0  # 65535 / 257 == 255 exactly
    return np.rint(np.clip(array.astype(np.float64) * scale, 0, 255)).astype(np.uint8)


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    if _is_high_depth(img.mode):
        # Pillow's own convert() clips 16-bit values at 255 instead of scaling them.
        return Image.fromarray(_to_uint8(np.asarray(img), img.mode)).convert("RGB")
    if img.has_transparency_data:
        # Composite on black: what shows through transparent pixels is undefined,
        # black is the same for every image.
        rgba = np.asarray(img.convert("RGBA"), dtype=np.uint16)
        rgb = (rgba[..., :3] * rgba[..., 3:] + 127) // 255
        return Image.fromarray(rgb.astype(np.uint8))
    return img.convert("RGB")


def load_image(path: str | os.PathLike) -> Image.Image:
    """Load an image as 8-bit RGB.

    Grayscale becomes three equal channels; 16-bit and 32-bit integer images are
    scaled from 0..65535 to 0..255 and float images from 0..1; images with alpha
    (RGBA, LA, palette with transparency) are composited on black. EXIF rotation
    is not applied, so the pixels stay aligned with their masks.
    """
    return _to_rgb(_open_decoded(Path(path)))


def load_mask(
    path: str | os.PathLike, size: tuple[int, int], image_path: str | os.PathLike | None = None
) -> np.ndarray:
    """Load a ground-truth mask as a bool (H, W) array: True where the defect is.

    ``size`` is the (W, H) of the image the mask belongs to (``PIL.Image.size``);
    ``image_path`` is only used to name that image in the error message. The mask must be binary
    (``mask_region``): anything else is refused with a DataError naming the file and the fix.
    """
    path = Path(path)
    mask = _open_decoded(path)
    if mask.size != tuple(size):
        image = f"its image {shown(image_path)}" if image_path is not None else "its image"
        raise DataError(
            f"{shown(path)}: mask is {mask.size[0]}x{mask.size[1]} pixels but {image} is "
            f"{size[0]}x{size[1]}. A mask must have exactly the size of its image; "
            "re-export the mask at the image's resolution."
        )
    return mask_region(mask, path)


_BINARY_FIX = "save it with 0 for normal pixels and one other value (e.g. 255) for the defect, as PNG"


def _pixel_values(mask: Image.Image) -> np.ndarray:
    """One number per pixel: the grey value, or the colour packed as 0xRRGGBB when channels differ."""
    if mask.mode in ("1", "L") or _is_high_depth(mask.mode):
        return np.asarray(mask)
    rgb = np.asarray(mask.convert("RGBA" if mask.has_transparency_data else "RGB"))[..., :3]
    if (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all():
        return rgb[..., 0]
    return (rgb[..., 0].astype(np.uint32) << 16) | (rgb[..., 1].astype(np.uint32) << 8) | rgb[..., 2]


def _distinct(values: np.ndarray) -> np.ndarray:
    """Sorted distinct values; a bincount for 8-bit masks (MVTec's 1024 x 1024: ~1 ms instead of a sort)."""
    if values.dtype == np.uint8:
        return np.flatnonzero(np.bincount(values.ravel(), minlength=256))
    return np.unique(values)


def _soft_edged(path: Path) -> bool:
    """Whether ``path`` is a mask of the Magnetic Tile Defects layout (``MT_<class>/Imgs/<name>.png``).

    Its publisher's masks have soft edges (in-between grey levels around 388 of the 392 defects), so
    there the region is every nonzero pixel, as this package has always read them (and as its
    recorded results were measured); a background that is not 0 is still refused."""
    return path.parent.name == "Imgs" and path.parent.parent.name.startswith("MT_")


def mask_region(mask: Image.Image, path: Path) -> np.ndarray:
    """The defect region of a binary mask; a DataError for anything else.

    Binary: at most two pixel values, 0 (black) and one other (any grey level, 16-bit value or colour):
    0/255, 0/1, 0/65535, mode "1", a two-colour palette, red on black. An empty mask (all 0) is
    accepted (an anomaly without pixels). Refused: more than two values (grey ramps, anti-aliased edges,
    JPEG artefacts), a background that is not 0, a mask without background, and an alpha channel that
    marks another region than the colours (transparency must agree with them or be absent).
    The one exception is the published Magnetic Tile Defects data (``_soft_edged``).
    """
    values = _pixel_values(mask)
    distinct = _distinct(values)
    name = shown(path)
    if len(distinct) > 2 and not _soft_edged(path):
        examples = ", ".join(str(int(v)) for v in distinct[:4])
        raise DataError(f"{name}: not a binary mask: {len(distinct)} distinct values ({examples}, ...); "
                        f"{_BINARY_FIX} (anti-aliasing and JPEG compression add in-between values).")
    if distinct[0] != 0:
        what = (f"every pixel is {int(distinct[0])}: no background" if len(distinct) == 1
                else f"its background is {int(distinct[0])} (values {int(distinct[0])} and {int(distinct[1])})")
        raise DataError(f"{name}: {what}, where normal pixels must be 0; {_BINARY_FIX}.")
    region = values != 0
    if mask.mode in ("RGBA", "LA", "PA") or mask.has_transparency_data:
        alpha = np.asarray(mask.convert("RGBA"))[..., 3]
        if alpha.min() < 255 and ((alpha > 0) != region).any():
            raise DataError(f"{name}: its transparency marks another region than its colours "
                            f"({int(((alpha > 0) != region).sum())} pixels differ); save it without an alpha "
                            f"channel: {_BINARY_FIX}.")
    return region


# ----------------------------------------------------------------------------- listing


def _image_files(folder: Path) -> list[Path]:
    return sorted(
        p
        for p in folder.iterdir()
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")
    )


RUN_MANIFEST = "run.json"  # written by predict and evaluate into their --out: marks an output folder


@dataclass(frozen=True)
class Unscored:
    """An entry under an input folder that is not scored, and why (listed in OUT/unscored.csv)."""

    path: Path
    reason: str


def is_output_folder(folder: Path) -> bool:
    """Whether ``folder`` holds a predict or evaluate run's outputs (its run.json): never read back as input."""
    try:
        record = json.loads((folder / RUN_MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(record, dict) and str(record.get("written_by")).startswith("patchcore_lite ")


def _file_reason(path: Path, siblings: set[str]) -> str | None:
    """Why a regular file found in a folder is not an image to score, or None if it is one."""
    suffix = path.suffix.lower()
    if path.name.startswith("."):
        return "hidden file"
    if suffix not in IMAGE_SUFFIXES:
        return f"not an image (suffix {suffix!r})" if suffix else "not an image (no suffix)"
    if path.stem.endswith("_mask"):
        return "a mask (*_mask file name)"
    if suffix == ".png" and any(path.stem + s in siblings for s in (".jpg", ".jpeg", ".JPG", ".JPEG")):
        return "a mask (a .png beside the .jpg of the same name: Magnetic Tile Defects layout)"
    return None


def _walk(root: Path, excluded: set[tuple[int, int]]) -> tuple[list[Path], list[Unscored]]:
    """Images below ``root`` (any depth, symlinks followed) and every entry not scored, with its reason.

    A folder is entered once: a symlink to a folder already entered (a cycle back to an ancestor, or a
    second way into the same folder) is listed instead, so the walk ends and no image is scored twice."""
    files: list[Path] = []
    skipped: list[Unscored] = []
    st = os.stat(root)
    entered = {(st.st_dev, st.st_ino): root}

    def visit(folder: Path) -> None:
        try:
            with os.scandir(folder) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as err:
            skipped.append(Unscored(folder, f"folder not readable ({err.strerror})"))
            return
        names = {e.name for e in entries}
        for entry in entries:
            path = Path(entry.path)
            try:
                info = os.stat(path)  # follows symlinks
            except FileNotFoundError:
                skipped.append(Unscored(path, f"broken symlink (to {shown(os.readlink(path))})"))
                continue
            except OSError as err:
                skipped.append(Unscored(path, f"unreadable ({err.strerror})"))
                continue
            if stat.S_ISDIR(info.st_mode):
                key = (info.st_dev, info.st_ino)
                if entry.name.startswith("."):
                    skipped.append(Unscored(path, "hidden folder (not entered)"))
                elif entry.name == "ground_truth":
                    skipped.append(Unscored(path, "masks folder (ground_truth/, not entered)"))
                elif key in excluded or is_output_folder(path):
                    skipped.append(Unscored(path, "output folder of a predict or evaluate run (not entered)"))
                elif key in entered:
                    skipped.append(Unscored(path, f"symlink to a folder already searched ({shown(entered[key])})"))
                else:
                    entered[key] = path
                    visit(path)
            elif stat.S_ISREG(info.st_mode):
                reason = _file_reason(path, names)
                if reason is None:
                    files.append(path)
                else:
                    skipped.append(Unscored(path, reason))
            else:
                skipped.append(Unscored(path, f"not a regular file ({file_kind(info.st_mode)})"))

    visit(root)
    return sorted(files), skipped


def list_inputs(
    paths: Iterable[str | os.PathLike], exclude: Iterable[Path] = ()
) -> tuple[list[Path], list[Unscored]]:
    """The images to score among files and folders, in order, and every entry under the folders that is not.

    Folders are searched at any depth, sorted, following symlinks to files and folders (each folder once:
    ``_walk``). Not scored, and listed with the reason: files without an image suffix, hidden files and
    folders, MVTec masks (``ground_truth/`` folders, ``*_mask`` files), Magnetic Tile Defects masks (a
    ``.png`` beside a ``.jpg`` of the same name), broken symlinks, FIFOs, sockets and devices, unreadable
    folders, and output folders of predict and evaluate (``run.json``) or ``exclude``. A file named explicitly is kept
    (and checked when it is loaded) unless it is not a regular file. Each file is scored once (``_once``). A missing
    path, a folder with no image, or an output folder given as input, is a DataError naming it.
    """
    excluded = set()
    for folder in exclude:
        with contextlib.suppress(OSError):
            info = os.stat(folder)
            excluded.add((info.st_dev, info.st_ino))
    files: list[Path] = []
    skipped: list[Unscored] = []
    for path in map(Path, paths):
        if path.is_dir() and is_output_folder(path):
            raise DataError(f"{shown(path)}: the output folder of a predict or evaluate run ({RUN_MANIFEST}); its "
                            "overlays and figures are not images to read: give the folder of images instead.")
        if path.is_dir():
            found, missed = _walk(path, excluded)
            if not found:
                why = f"; not scored: {', '.join(sorted({u.reason for u in missed}))}" if missed else ""
                raise DataError(
                    f"{shown(path)}: no images to score ({_describe(path)}{why}); expected files ending in "
                    f"{', '.join(IMAGE_SUFFIXES)} (masks and hidden files are skipped)."
                )
            files += found
            skipped += missed
        elif path.exists():
            mode = os.stat(path).st_mode
            if not stat.S_ISREG(mode):
                raise DataError(f"{shown(path)}: a {file_kind(mode)}, not a regular file; give image files only.")
            files.append(path)
        elif path.is_symlink():
            raise DataError(f"{shown(path)}: a broken symlink (to {shown(os.readlink(path))}); fix or remove it.")
        else:
            raise DataError(f"{shown(path)}: no such file or folder.")
    return _once(files, skipped)


def _once(files: list[Path], skipped: list[Unscored]) -> tuple[list[Path], list[Unscored]]:
    """Each image file once, at its first place in the order: a file named twice, or named and also found in a
    folder given, is listed as not scored again (the same file by another path or link counts too)."""
    kept: list[Path] = []
    seen: dict[tuple[int, int], Path] = {}
    for path in files:
        info = os.stat(path)
        key = (info.st_dev, info.st_ino)
        if key in seen:
            skipped.append(Unscored(path, f"the same file as {shown(seen[key])}, scored once"))
        else:
            seen[key] = path
            kept.append(path)
    return kept, skipped


def list_images(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """The images to score among files and folders, in order: ``list_inputs`` without the inventory."""
    return list_inputs(paths)[0]


def _describe(folder: Path) -> str:
    """A short listing of a folder's entries for error messages."""
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir())
    if not names:
        return "it is empty"
    shown = ", ".join(names[:12]) + (f", ... ({len(names)} entries)" if len(names) > 12 else "")
    return f"found: {shown}"


def _require_dir(root: str | os.PathLike) -> Path:
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: no such folder; check the dataset path.")
    return root


def _looks_like_mvtec(folder: Path) -> bool:
    return (folder / "train").is_dir() or (folder / "test").is_dir()


def _looks_like_mtd(folder: Path) -> bool:
    return (folder / "MT_Free").is_dir()


def _category_hint(root: Path) -> str:
    cats = [p.name for p in sorted(root.iterdir()) if p.is_dir() and _looks_like_mvtec(p)]
    if not cats:
        return ""
    return f" {root} looks like a folder of categories ({', '.join(cats[:5])}); pass one of them."


def _mvtec_test_samples(root: Path) -> list[Sample]:
    test = root / "test"
    if not test.is_dir():
        raise DataError(f"{root}: no test/ folder ({_describe(root)}). Expected {_MVTEC_LAYOUT}.")
    # "good" first, then the defect folders alphabetically.
    folders = sorted((p for p in test.iterdir() if p.is_dir()), key=lambda p: (p.name != "good", p.name))
    samples = [_mvtec_test_sample(root, f.name, image) for f in folders for image in _image_files(f)]
    if not samples:
        raise DataError(
            f"{test}: no images in any test/<defect>/ folder ({_describe(test)}). Expected {_MVTEC_LAYOUT}."
        )
    return samples


def _mvtec_test_sample(root: Path, defect: str, image: Path) -> Sample:
    if defect == "good":
        return Sample(image, 0, "good", None)
    mask = root / "ground_truth" / defect / f"{image.stem}_mask.png"
    if not mask.is_file():
        raise DataError(
            f"{image}: defective test image without a ground-truth mask; expected {mask}. "
            "Add the mask, or move the image to test/good/ if it is not defective."
        )
    return Sample(image, 1, defect, mask)


def mvtec_samples(root: str | os.PathLike, split: str) -> list[Sample]:
    """List the ``"train"`` or ``"test"`` samples of one MVTec-AD-layout category folder.

    Train samples come from train/good only. Test samples are test/good first, then
    each defect folder in alphabetical order, files sorted by name. Every defective
    test image must have ``ground_truth/<defect>/<stem>_mask.png``.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', not {split!r}")
    root = _require_dir(root)
    good = root / "train" / "good"
    if not good.is_dir():
        raise DataError(
            f"{root}: no train/good/ folder ({_describe(root)}).{_category_hint(root)} "
            f"Expected {_MVTEC_LAYOUT}."
        )
    if split == "test":
        return _mvtec_test_samples(root)
    images = _image_files(good)
    if not images:
        raise DataError(
            f"{good}: no training images ({_describe(good)}). Put the normal training images "
            f"there, with one of the suffixes {', '.join(IMAGE_SUFFIXES)}."
        )
    return [Sample(p, 0, "good", None) for p in images]


def _split_key(seed: int, path: Path) -> str:
    # A hash instead of a random generator: the split is the same on every Python and
    # NumPy version, and does not depend on the order the files are listed in.
    return hashlib.sha256(f"{seed}:{path.name}".encode()).hexdigest()


def _mtd_images(class_dir: Path) -> list[Path]:
    imgs = class_dir / "Imgs"
    if not imgs.is_dir():
        raise DataError(f"{class_dir}: no Imgs/ folder ({_describe(class_dir)}). Expected {_MTD_LAYOUT}.")
    # Masks are the .png files beside the images, so only JPEGs are images here.
    images = [p for p in _image_files(imgs) if p.suffix.lower() in (".jpg", ".jpeg")]
    if not images:
        raise DataError(f"{imgs}: no .jpg images ({_describe(imgs)}). Expected {_MTD_LAYOUT}.")
    return images


def _mtd_defect_sample(image: Path, defect: str) -> Sample:
    mask = image.with_suffix(".png")
    if not mask.is_file():
        raise DataError(f"{image}: defective image without its mask; expected {mask} beside it.")
    return Sample(image, 1, defect, mask)


def magnetic_tile_samples(
    root: str | os.PathLike, test_fraction: float = 0.2, seed: int = 0
) -> tuple[list[Sample], list[Sample]]:
    """Split Magnetic Tile Defects into (train, test) by the PatchCore paper's protocol.

    A seeded ``test_fraction`` of MT_Free (rounded) are the test normals and the rest
    train; every image of the other MT_<Class> folders is a test anomaly, with defect
    name ``<class>`` in lower case (e.g. "blowhole"). MT_Free's all-zero masks are
    not used. Four MT_Uneven masks are empty in the published data; those images
    keep label 1 (they contribute to image-level metrics, not to pixel positives).
    """
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be between 0 and 1, not {test_fraction}")
    root = _require_dir(root)
    if not _looks_like_mtd(root):
        raise DataError(f"{root}: no MT_Free/ folder ({_describe(root)}). Expected {_MTD_LAYOUT}.")
    normals = sorted(_mtd_images(root / "MT_Free"), key=lambda p: _split_key(seed, p))
    if len(normals) < 2:
        raise DataError(f"{root / 'MT_Free'}: needs at least 2 normal images to split into train and test.")
    n_test = min(max(1, round(test_fraction * len(normals))), len(normals) - 1)
    classes = sorted(p for p in root.glob("MT_*") if p.is_dir() and p.name != "MT_Free")
    if not classes:
        raise DataError(f"{root}: no defect classes MT_<Class>/ besides MT_Free. Expected {_MTD_LAYOUT}.")
    defects = [_mtd_defect_sample(img, c.name[3:].lower()) for c in classes for img in _mtd_images(c)]
    train = [Sample(p, 0, "good", None) for p in sorted(normals[n_test:])]
    test_normals = [Sample(p, 0, "good", None) for p in sorted(normals[:n_test])]
    return train, test_normals + defects


def find_categories(root: str | os.PathLike) -> list[Path]:
    """The category folders under ``root``.

    ``root`` itself if it is one MVTec category or a Magnetic Tile Defects folder,
    otherwise its sub-folders that are (as for the full MVTec AD download).
    """
    root = _require_dir(root)
    if _looks_like_mvtec(root) or _looks_like_mtd(root):
        return [root]
    cats = sorted(p for p in root.iterdir() if p.is_dir() and (_looks_like_mvtec(p) or _looks_like_mtd(p)))
    if not cats:
        raise DataError(
            f"{root}: no dataset categories ({_describe(root)}). Expected a category folder or "
            f"a folder of categories in {_MVTEC_LAYOUT}; or {_MTD_LAYOUT}."
        )
    return cats


def dataset_kind(root: str | os.PathLike) -> str:
    """``"mvtec"`` or ``"mtd"`` for one category / Magnetic Tile Defects folder."""
    root = _require_dir(root)
    if _looks_like_mtd(root):
        return "mtd"
    if _looks_like_mvtec(root):
        return "mvtec"
    raise DataError(
        f"{root}: not a dataset folder ({_describe(root)}).{_category_hint(root)} Expected one "
        f"category in {_MVTEC_LAYOUT}; or {_MTD_LAYOUT}."
    )


def train_test_samples(root: str | os.PathLike, seed: int = 0) -> tuple[list[Sample], list[Sample]]:
    """(train, test) samples of one category folder, MVTec layout or Magnetic Tile Defects.

    ``seed`` only matters for Magnetic Tile Defects, whose split is random.
    """
    if dataset_kind(root) == "mtd":
        return magnetic_tile_samples(root, seed=seed)
    return mvtec_samples(root, "train"), mvtec_samples(root, "test")


# ----------------------------------------------------------------------------- validation


def _sample_problems(sample: Sample) -> list[str]:
    problems = []
    try:
        size = load_image(sample.path).size
    except DataError as err:
        problems.append(str(err))
        size = None
    if sample.mask_path is not None:
        try:
            if size is None:
                _open_decoded(sample.mask_path)  # still report a broken mask
            else:
                load_mask(sample.mask_path, size, image_path=sample.path)
        except DataError as err:
            problems.append(str(err))
    return problems


def validate_samples(samples: Iterable[Sample]) -> None:
    """Decode every image and mask once and report all problems in one DataError.

    Call this before fitting or evaluating, so a bad file found halfway does not
    throw away computed work. Images are fully decoded because only that catches a
    truncated file; decoding runs in threads (Pillow releases the GIL).
    """
    samples = list(samples)
    pool = ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1))
    try:
        problems = [p for found in pool.map(_sample_problems, samples) for p in found]
    finally:  # on Ctrl-C, files not yet decoded are dropped instead of waited for
        pool.shutdown(cancel_futures=True)
    if len(problems) == 1:  # one line, as every other error
        raise DataError(f"{problems[0]} (1 problem in {len(samples)} images; nothing was computed)")
    if problems:
        listing = "\n".join(f"  - {p}" for p in problems)
        raise DataError(
            f"{len(problems)} problem(s) in {len(samples)} images; nothing was computed. "
            f"Fix or remove these files and run again:\n{listing}"
        )


# ----------------------------------------------------------------------------- tensors


def _positive_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value > 0


def check_size(resize: object, crop: object) -> None:
    """Refuse a resize that is not a positive int or (h, w), or a crop that does not fit in it (ConfigError)."""
    sides = list(resize) if isinstance(resize, (tuple, list)) else [resize] * 2
    positive = len(sides) == 2 and all(_positive_int(v) for v in sides)
    check_setting(positive, "resize", resize, "a positive int (shorter side) or a pair (h, w) of them")
    fits = crop is None or (_positive_int(crop) and crop <= min(sides))  # type: ignore[operator]
    check_setting(fits, "crop", crop, f"None or a positive int up to the resized size {min(sides)}")


@dataclass(frozen=True)
class Preprocess:
    """Image -> network input, and mask -> the same pixel grid.

    ``resize``: an int resizes the shorter side to it keeping the aspect ratio (as
    torchvision ``Resize(256)``); an (h, w) pair resizes to exactly that size.
    ``crop``: a centre square crop of that side, or None for no crop.
    """

    resize: int | tuple[int, int] = 256
    crop: int | None = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self) -> None:
        # Accept lists (as read back from JSON) but store tuples, so instances compare equal.
        check_size(self.resize, self.crop)
        if not isinstance(self.resize, numbers.Integral):
            object.__setattr__(self, "resize", tuple(int(v) for v in self.resize))
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError("mean and std need three values each, std positive")

    def _geometry(self, img: Image.Image, interpolation: InterpolationMode) -> Image.Image:
        size = [self.resize] if isinstance(self.resize, int) else list(self.resize)
        img = TF.resize(img, size, interpolation=interpolation, antialias=True)
        return img if self.crop is None else TF.center_crop(img, [self.crop, self.crop])

    def image(self, img: Image.Image) -> torch.Tensor:
        """RGB PIL image -> (3, h, w) float32, normalised; bilinear antialiased resize."""
        resized = self._geometry(img, InterpolationMode.BILINEAR)
        tensor = TF.to_dtype(TF.pil_to_tensor(resized), torch.float32, scale=True)
        return TF.normalize(tensor, list(self.mean), list(self.std))

    def mask(self, mask: np.ndarray) -> torch.Tensor:
        """Bool (H, W) mask -> (h, w) float32 of 0/1 on the same grid as ``image``.

        Nearest-neighbour resize keeps the mask binary and every defect pixel counted.
        (The official PatchCore code resizes masks bilinearly and then truncates to
        int, which drops the partly covered pixels at each defect's edge.)
        """
        pil = Image.fromarray(np.asarray(mask, dtype=bool).astype(np.uint8) * 255)
        resized = self._geometry(pil, InterpolationMode.NEAREST)
        return (TF.pil_to_tensor(resized)[0] > 0).to(torch.float32)

    def unnormalize(self, image: torch.Tensor) -> np.ndarray:
        """(3, h, w) network input -> (h, w, 3) float array in [0, 1] for plotting."""
        mean = torch.tensor(self.mean).view(3, 1, 1)
        std = torch.tensor(self.std).view(3, 1, 1)
        rgb = (image.detach().cpu().float() * std + mean).clamp(0, 1)
        return rgb.permute(1, 2, 0).numpy()


def protocol(kind: str, size: int) -> Preprocess:
    """The input geometry of a ``size`` x ``size`` network input for a dataset kind: MVTec AD resized
    to ``size * 256 / 224`` and centre-cropped to ``size`` (the paper's 256 -> 224, Sec. 4.1, scaled);
    Magnetic Tile Defects, whose tiles vary in size and have defects at their edges, resized whole
    (a 224 crop of the 256 resize would cut 43 of the 392 defects)."""
    if kind == "mtd":
        return Preprocess(resize=(size, size), crop=None)
    return Preprocess(resize=round(size * 256 / 224), crop=size)


INPUT_SIZE = 288  # PatchCore's default input: the accuracy study's winner (chapter 9); the paper's is 224
MVTEC_PREPROCESS = protocol("mvtec", INPUT_SIZE)
MTD_PREPROCESS = protocol("mtd", INPUT_SIZE)


class ImageDataset(torch.utils.data.Dataset):
    """Samples -> dicts of ``image`` (3, h, w), ``mask`` (h, w), ``label``, ``path``, ``defect``."""

    def __init__(self, samples: list[Sample], preprocess: Preprocess) -> None:
        self.samples = list(samples)
        self.preprocess = preprocess

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        sample = self.samples[index]
        img = load_image(sample.path)
        if sample.mask_path is None:
            mask = np.zeros((img.height, img.width), dtype=bool)
        else:
            mask = load_mask(sample.mask_path, img.size, image_path=sample.path)
        return {
            "image": self.preprocess.image(img),
            "mask": self.preprocess.mask(mask),
            "label": sample.label,
            "path": str(sample.path),
            "defect": sample.defect,
        }


Data = torch.Tensor | torch.utils.data.Dataset | Sequence[Sample] | Sequence[str | Path]


@dataclass
class Batch:
    """What the loader yields: ``images`` (B, 3, H, W) normalised, ``masks`` (B, H, W) bool for
    images read from files (all False where a sample has no mask; None for tensors), and
    ``start``, the position of ``images[0]`` in the data."""

    images: torch.Tensor
    masks: torch.Tensor | None
    start: int


def image_batches(
    data: Data, preprocess: Preprocess, batch_size: int, progress: bool = False, desc: str = "",
    prefetch: int | None = None,
) -> Iterator[Batch]:
    """The package's one batch loop: ``Batch``es from tensors, an ``ImageDataset``, samples or paths, in order.

    Every detector's ``fit`` and ``predict``, the evaluation, the command line, the chapters'
    experiments and the benchmarks read images through it. Files are checked before the first
    batch, so a bad image stops the run before any work is done rather than halfway through it.
    Image files are decoded ``prefetch`` batches ahead by a background thread (``prefetched``), so
    decoding overlaps the network and the search; 0 decodes in the caller's thread; None:
    ``default_prefetch()``. The batches are the same either way.
    """
    if isinstance(data, torch.Tensor):
        parts: Iterable = ((chunk, None) for chunk in data.split(batch_size))
        total = -(-len(data) // batch_size)
    else:
        if not isinstance(data, torch.utils.data.Dataset):
            samples = [s if isinstance(s, Sample) else Sample(Path(s), 0, "good", None) for s in data]
            validate_samples(samples)
            data = ImageDataset(samples, preprocess)
        loader = torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=False)
        decoded = ((b["image"], b["mask"].bool()) if isinstance(b, dict) else (b, None) for b in loader)
        depth = default_prefetch() if prefetch is None else prefetch
        parts = prefetched(decoded, depth) if depth else decoded
        total = len(loader)
    start = 0
    for images, masks in tqdm(parts, total=total, desc=desc, disable=not progress, unit="batch"):
        yield Batch(images, masks, start)
        start += len(images)


def default_prefetch() -> int:
    """1 (decode a batch ahead in a thread) where this process has a core that torch's threads leave
    free, else 0. Without a free core the decoding thread only takes time from the network and the
    search: on 2 cores and 2 torch threads, ``benchmarks/bench_pipeline.py`` measured 14.2 images/s
    with it and 15.1 without (RESULTS.md)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return int(cores > torch.get_num_threads())


@dataclass
class _Failed:
    """An exception raised while producing, carried to the consumer."""

    error: BaseException


_DONE = object()


def prefetched(items: Iterable[T], depth: int = 1) -> Iterator[T]:
    """The items of ``items``, in order, produced by a background thread at most ``depth`` items ahead.

    Memory stays bounded (``depth`` items queued, one in the making); an exception in the
    producer is raised again here, with its message and traceback; closing this generator early
    stops the producer at its next item.
    """
    if depth < 1:
        raise ValueError(f"prefetch depth must be >= 1, got {depth}")
    ready: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def offer(item: object) -> bool:
        while not stop.is_set():
            try:
                ready.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not offer(item):
                    return
            offer(_DONE)
        except BaseException as exc:  # noqa: BLE001  (carried to the consumer, raised there)
            offer(_Failed(exc))

    worker = threading.Thread(target=produce, name="patchcore_lite-prefetch", daemon=True)
    worker.start()
    try:
        while (item := ready.get()) is not _DONE:
            if isinstance(item, _Failed):
                raise item.error
            yield item
    finally:
        stop.set()
        worker.join()
