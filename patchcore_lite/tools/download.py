"""How real datasets reach the data root (``datasets.data_root()``).

Below the data root each dataset has a fixed folder (``DATASETS``): ``mvtec_ad/<category>``
for a downloaded MVTec AD category, ``magnetic_tile`` for Magnetic Tile Defects.

``download()`` (``python -m patchcore_lite download``) fetches a dataset from its publisher
into those folders, in the manner of d2l's ``DATA_HUB`` and torchvision's datasets: one
registry (``DATASETS``) of URLs, licences, sizes and hashes; a transfer that resumes from a
``.part`` file; the SHA-256 checked before unpacking where one is published; members that
would land outside the target refused; and the unpacked folders checked against the
published image counts before they are renamed into place, so a folder that exists is complete.
"""

from __future__ import annotations

import hashlib
import http.client
import lzma
import os
import posixpath
import shutil
import tarfile
import tempfile
import zipfile
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from urllib.error import HTTPError, URLError
from urllib.request import Request, urlopen

from tqdm.auto import tqdm

from .. import __version__
from ..datasets import ENV_DATA, data_root
from ..errors import DataError, DownloadError

ENV_MIRROR = "PATCHCORE_MIRROR"

# ----------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class Archive:
    """One file a publisher serves."""

    file: str  # saved as <data root>/downloads/<file>; fetched as <mirror>/<file> from a mirror
    url: str  # the publisher's address
    size: str  # printed before downloading
    sha256: str | None  # None where no trustworthy hash is published: the count check stands in


@dataclass(frozen=True)
class Part:
    """One folder that a download puts below the data root, with the image counts it must hold."""

    folder: str  # below the data root, e.g. "mvtec_ad/bottle"
    inside: str  # its top folder inside the archive
    archive: Archive
    counts: dict[str, int]  # published counts, keyed as the dataset's ``count`` reports them


@dataclass(frozen=True)
class Dataset:
    """A dataset's publisher, licence and citation, and the parts it downloads as."""

    title: str
    homepage: str
    licence: str
    citation: str
    count: Callable[[Path], dict[str, int]]  # image counts found in one part's folder
    parts: dict[str, Part]  # MVTec AD: one per category; Magnetic Tile Defects: one
    whole: Archive | None = None  # every part in one file: used when all are missing


def _mvtec_counts(folder: Path) -> dict[str, int]:
    """Images per split of one MVTec AD category; a defective image without its mask raises DataError."""
    from ..datasets import (
        mvtec_samples,  # here: it imports torch, and every chapter imports this module
    )

    test = Counter(s.label for s in mvtec_samples(folder, "test"))
    return {"train/good": len(mvtec_samples(folder, "train")), "test/good": test[0], "test/defective": test[1]}


def _mtd_counts(folder: Path) -> dict[str, int]:
    """Images per ``MT_<Class>`` folder; a defective image without its .png mask raises DataError."""
    from ..datasets import magnetic_tile_samples

    train, test = magnetic_tile_samples(folder)
    return dict(Counter(s.path.parent.parent.name for s in train + test))


# The addresses MVTec's download page links to (www.mvtec.com/company/research/datasets/mvtec-ad/downloads).
_MYDRIVE = "https://www.mydrive.ch/shares/38536/3830184030e49fe74747669442f0f282/download/"
_MVTEC_CATEGORIES = {
    # category: train/good, test/good, test defective images (Bergmann et al., CVPR 2019, Table 1),
    # approximate archive size, address. MVTec publishes no hash for these archives.
    "bottle": (209, 20, 63, "148 MB", _MYDRIVE + "420937370-1629951468/bottle.tar.xz"),
    "cable": (224, 58, 92, "481 MB", _MYDRIVE + "420937413-1629951498/cable.tar.xz"),
    "capsule": (219, 23, 109, "385 MB", _MYDRIVE + "420937454-1629951595/capsule.tar.xz"),
    "carpet": (280, 28, 89, "705 MB", _MYDRIVE + "420937484-1629951672/carpet.tar.xz"),
    "grid": (264, 21, 57, "153 MB", _MYDRIVE + "420937487-1629951814/grid.tar.xz"),
    "hazelnut": (391, 40, 70, "588 MB", _MYDRIVE + "420937545-1629951845/hazelnut.tar.xz"),
    "leather": (245, 32, 92, "500 MB", _MYDRIVE + "420937607-1629951964/leather.tar.xz"),
    "metal_nut": (220, 22, 93, "157 MB", _MYDRIVE + "420937637-1629952063/metal_nut.tar.xz"),
    "pill": (267, 26, 141, "262 MB", "https://www.mydrive.ch/shares/43421/11a215a5749fcfb75e331ddd5f8e43ee/"
             "download/420938129-1629953099/pill.tar.xz"),
    "screw": (320, 41, 119, "186 MB", _MYDRIVE + "420938130-1629953152/screw.tar.xz"),
    "tile": (230, 33, 84, "335 MB", _MYDRIVE + "420938133-1629953189/tile.tar.xz"),
    "toothbrush": (60, 12, 30, "104 MB", _MYDRIVE + "420938134-1629953256/toothbrush.tar.xz"),
    "transistor": (213, 60, 40, "384 MB", _MYDRIVE + "420938166-1629953277/transistor.tar.xz"),
    "wood": (247, 19, 60, "474 MB", _MYDRIVE + "420938383-1629953354/wood.tar.xz"),
    "zipper": (240, 32, 119, "152 MB", _MYDRIVE + "420938385-1629953449/zipper.tar.xz"),
}
# The whole dataset in one file. Its SHA-256 is the one anomalib records and checks (openvinotoolkit/anomalib,
# src/anomalib/data/datamodules/image/mvtecad.py, DOWNLOAD_INFO.hashsum; sha256 in data/utils/download.py).
_MVTEC_WHOLE = Archive(
    "mvtec_anomaly_detection.tar.xz", _MYDRIVE + "420938113-1629952094/mvtec_anomaly_detection.tar.xz",
    "4.9 GiB", "cf4313b13603bec67abb49ca959488f7eedce2a9f7795ec54446c649ac98cd3d",
)
# The authors' repository (the dot ends its name) at its last commit, 2020-05-09, so the content cannot
# change under the counts below. No hash is published, and GitHub builds the zip on request without
# promising the same bytes each time: the count check after unpacking is the check.
_MTD_COMMIT = "cc4eb530b57b9cb7225bf76023873043ffd50655"
_MTD_REPO = "https://github.com/abin24/Magnetic-tile-defect-datasets."

DATASETS: dict[str, Dataset] = {
    "mvtec_ad": Dataset(
        title="MVTec AD",
        homepage="https://www.mvtec.com/company/research/datasets/mvtec-ad",
        licence="CC BY-NC-SA 4.0, (c) MVTec Software GmbH: non-commercial use only, adaptations under the "
        "same licence (https://creativecommons.org/licenses/by-nc-sa/4.0/)",
        citation="P. Bergmann, M. Fauser, D. Sattlegger, C. Steger: MVTec AD - A Comprehensive Real-World "
        "Dataset for Unsupervised Anomaly Detection. CVPR 2019, 9584-9592",
        count=_mvtec_counts,
        parts={
            name: Part(f"mvtec_ad/{name}", name, Archive(f"{name}.tar.xz", url, size, None),
                       {"train/good": train, "test/good": good, "test/defective": defective})
            for name, (train, good, defective, size, url) in _MVTEC_CATEGORIES.items()
        },
        whole=_MVTEC_WHOLE,
    ),
    "mtd": Dataset(
        title="Magnetic Tile Defects",
        homepage=_MTD_REPO,
        licence="none stated; the authors ask that you cite their paper (below)",
        citation="Y. Huang, C. Qiu, K. Yuan: Surface defect saliency of magnetic tile. The Visual Computer 36, "
        "85-96 (2020), doi:10.1007/s00371-018-1588-5",
        count=_mtd_counts,
        parts={"magnetic_tile": Part(
            "magnetic_tile", f"Magnetic-tile-defect-datasets.-{_MTD_COMMIT}",
            Archive("magnetic_tile.zip", f"{_MTD_REPO}/archive/{_MTD_COMMIT}.zip", "about 53 MB", None),
            {"MT_Free": 952, "MT_Blowhole": 115, "MT_Break": 85, "MT_Crack": 57, "MT_Fray": 32, "MT_Uneven": 103},
        )},
    ),
}

# ----------------------------------------------------------------------------- download

DOWNLOADS = "downloads"  # below the data root: archives in transit, or fetched by hand
_ATTEMPTS = 5  # transfers per file, each resuming where the previous one dropped
_TIMEOUT_S = 60
_CHUNK = 1 << 20
# The "data" filter refuses special files and drops set-uid bits (Python 3.10.12+, 3.11.4+, 3.12+).
_TAR_FILTER = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}


def download(name: str, categories: list[str] | None = None, root: str | os.PathLike | None = None,
             mirror: str | None = None, progress: bool = True) -> list[Path]:
    """Fetch a dataset of ``DATASETS`` (``"mvtec_ad"``, ``"mtd"``) below ``root``; return its folders.

    ``categories``: MVTec AD categories (default: all 15). ``root``: default ``data_root()``.
    ``mirror``: fetch ``<mirror>/<archive file>`` instead of the publisher's URL (default
    ``$PATCHCORE_MIRROR``); a local folder or a ``file://`` URL works too. Folders that are
    already complete are left alone. Failures raise ``DownloadError`` saying what to do next.
    """
    dataset = DATASETS.get(name)
    if dataset is None:
        raise DownloadError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASETS)}.")
    parts = _select(dataset, categories)
    root = Path(root).expanduser() if root is not None else data_root()
    mirror = mirror or os.environ.get(ENV_MIRROR)
    missing = [p for p in parts if not _complete(dataset, p, root)]
    if dataset.whole and missing and len(missing) == len(dataset.parts):  # one file, with a published hash
        _install(dataset, dataset.whole, missing, root, mirror, progress)
    else:
        for part in missing:
            _install(dataset, part.archive, [part], root, mirror, progress)
    return [root / p.folder for p in parts]


def _select(dataset: Dataset, categories: list[str] | None) -> list[Part]:
    """The parts asked for (all when none is named), each once."""
    if not categories:
        return list(dataset.parts.values())
    unknown = [c for c in categories if c not in dataset.parts]
    if unknown:
        raise DownloadError(f"{dataset.title} has no category {', '.join(unknown)}; choose from: "
                            f"{', '.join(dataset.parts)} (none: all).")
    return [dataset.parts[c] for c in dict.fromkeys(categories)]


def _summary(counts: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in counts.items())


def _layout_problem(dataset: Dataset, part: Part, folder: Path) -> str | None:
    """What differs between ``folder`` and the published counts, or None."""
    try:
        found = dataset.count(folder)
    except DataError as err:
        return str(err)
    keys = [*part.counts, *(k for k in found if k not in part.counts)]
    wrong = [f"{k}: {found.get(k, 0)} images, published {part.counts.get(k, 0)}"
             for k in keys if found.get(k, 0) != part.counts.get(k, 0)]
    return "; ".join(wrong) or None


def _complete(dataset: Dataset, part: Part, root: Path) -> bool:
    """True if the part's folder holds the published counts, False if it is absent; else DownloadError."""
    folder = root / part.folder
    if not folder.exists():
        return False
    problem = _layout_problem(dataset, part, folder)
    if problem:
        raise DownloadError(f"{folder} exists but is not the published {dataset.title} ({problem}). "
                            "Move or delete it, then run the download again.")
    print(f"{folder}: already complete ({_summary(part.counts)}); nothing to download")
    return True


def _source(archive: Archive, mirror: str | None) -> str:
    """The publisher's URL, or ``<mirror>/<file>``; a mirror without a scheme is a local folder."""
    if not mirror:
        return archive.url
    if "://" not in mirror:
        mirror = Path(mirror).expanduser().resolve().as_uri()
    return f"{mirror.rstrip('/')}/{archive.file}"


def _install(dataset: Dataset, archive: Archive, parts: list[Part], root: Path, mirror: str | None,
             progress: bool) -> None:
    """Fetch one archive, check its hash, unpack it and move its checked parts into place."""
    url = _source(archive, mirror)
    saved = root / DOWNLOADS / archive.file
    hint = (f"fetch {archive.url} by hand and save it as {saved}, then run the same command again; "
            f"or fetch from a copy with --mirror URL (or ${ENV_MIRROR})")
    print(f"{dataset.title} ({dataset.homepage}): licence {dataset.licence}. Cite: {dataset.citation}.")
    print(f"{archive.file}: {archive.size}, from {url}")
    try:
        with _tidying(saved.parent, (root / parts[0].folder).parent):
            if saved.is_file():
                print(f"using {saved}, which is already here")
            else:
                _fetch(url, saved, progress, hint)
            try:
                _check_sha256(saved, archive.sha256, url)
                _unpack_into_place(dataset, saved, parts, root)
            except DownloadError as err:  # a complete but bad file cannot be resumed: fetch it afresh
                saved.unlink(missing_ok=True)
                raise DownloadError(f"{str(err).rstrip('.')}. {saved} was deleted: run the command again, "
                                    f"or {hint}.") from None
            saved.unlink()  # unpacked and checked: the archive is not needed any more
    except OSError as err:  # network errors are DownloadErrors by now: this is the local disk
        raise DownloadError(f"could not write below {root} ({err}); free some space, or choose a writable "
                            f"data root with --root DIR (or ${ENV_DATA})") from None
    for part in parts:
        print(f"{root / part.folder}: complete ({_summary(part.counts)})")


@contextmanager
def _tidying(downloads: Path, parent: Path) -> Iterator[None]:
    """Afterwards remove ``downloads`` if empty, and the folders above it or ``parent`` created meanwhile if empty.

    A failed download then leaves nothing behind but a ``.part`` file to resume from, and a
    successful one no empty ``downloads/`` folder; folders the user made stay.
    """
    new = {d for top in (downloads, parent) for d in (top, *top.parents) if not d.exists()}
    try:
        yield
    finally:
        for d in sorted(new | {downloads}, key=lambda d: len(d.parts), reverse=True):
            with suppress(OSError):  # not empty: it holds a dataset, or a .part file to resume from
                d.rmdir()


def _fetch(url: str, dest: Path, progress: bool, hint: str) -> None:
    """Download ``url`` to ``dest`` through ``dest.part``, resuming when the connection drops."""
    part = dest.with_name(dest.name + ".part")
    for _ in range(_ATTEMPTS):
        if _transfer(url, part, progress, hint):
            part.replace(dest)
            return
    raise DownloadError(f"{url}: the connection dropped {_ATTEMPTS} times; {part} keeps what arrived. "
                        f"Run the command again to resume, or {hint}.")


def _transfer(url: str, part: Path, progress: bool, hint: str) -> bool:
    """One request, appending to ``part`` from where it ends; True once it holds the whole file."""
    start = part.stat().st_size if part.is_file() else 0
    response = _open(url, start, hint)
    if response is None:
        return True
    with response:
        if start and response.status != 206:  # the server ignored the Range header: start again
            start = 0
        length = response.headers.get("Content-Length")
        total = start + int(length) if length else None
        part.parent.mkdir(parents=True, exist_ok=True)  # only now: a refused connection creates nothing
        with open(part, "ab" if start else "wb") as out, tqdm(
            total=total, initial=start, unit="B", unit_scale=True, unit_divisor=1024, desc=part.name[:-5],
            disable=not progress,
        ) as bar:
            for chunk in _chunks(response):
                out.write(chunk)
                bar.update(len(chunk))
    return total is None or part.stat().st_size == total


def _chunks(response: http.client.HTTPResponse) -> Iterator[bytes]:
    """The body in chunks; a dropped connection just ends it early (the size check notices)."""
    try:
        while chunk := response.read(_CHUNK):
            yield chunk
    except (OSError, http.client.HTTPException):
        return


def _open(url: str, start: int, hint: str) -> http.client.HTTPResponse | None:
    """The response to a request for ``url`` from byte ``start``; None if ``start`` is already the end."""
    headers = {"User-Agent": f"patchcore_lite/{__version__}"}
    if start:
        headers["Range"] = f"bytes={start}-"
    try:
        return urlopen(Request(url, headers=headers), timeout=_TIMEOUT_S)
    except HTTPError as err:
        err.close()
        if err.code == 416 and start:  # nothing after byte `start`: the .part is the whole file
            return None
        raise DownloadError(f"{url}: the server answered HTTP {err.code} {err.reason}; {hint}.") from None
    except (URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise DownloadError(f"could not fetch {url} ({reason}). Check the network and run the command "
                            f"again, or {hint}.") from None


def _check_sha256(path: Path, expected: str | None, url: str) -> None:
    """Refuse a file whose SHA-256 is not the published one (before anything is unpacked)."""
    if expected is None:  # none published: the count check after unpacking stands in
        return
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    if digest.hexdigest() != expected:
        raise DownloadError(f"{path} (from {url}) has SHA-256 {digest.hexdigest()}, not the published {expected}")


def _unpack_into_place(dataset: Dataset, archive_file: Path, parts: list[Part], root: Path) -> None:
    """Unpack into a hidden folder beside the targets; rename the parts into place once all are checked.

    The rename is atomic, so an interrupted run never leaves a half category that looks valid.
    """
    parent = (root / parts[0].folder).parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".extracting-", dir=parent))
    try:
        _unpack(archive_file, tmp)
        sources = [_unpacked(tmp, part, archive_file, alone=len(parts) == 1) for part in parts]
        for part, src in zip(parts, sources):
            problem = _layout_problem(dataset, part, src)
            if problem:
                raise DownloadError(f"{archive_file}: {part.inside}/ is not the published {dataset.title} "
                                    f"({problem})")
        for part, src in zip(parts, sources):
            src.rename(root / part.folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _unpacked(tmp: Path, part: Part, archive_file: Path, alone: bool) -> Path:
    """The part's folder in the unpacked archive.

    A GitHub zip names its top folder after the ref it was made from (``...-master`` when
    fetched by hand), so the only top folder of a one-part archive stands for the expected name.
    """
    tops = sorted(p for p in tmp.iterdir() if p.is_dir())
    if (tmp / part.inside).is_dir():
        return tmp / part.inside
    if alone and len(tops) == 1:
        return tops[0]
    found = ", ".join(p.name for p in tops) or "no folder"
    raise DownloadError(f"{archive_file} has no folder {part.inside}/ (found: {found})")


def _unpack(archive_file: Path, dest: Path) -> None:
    """Unpack a .zip, .tar.xz or .tar.gz into ``dest``, refusing members that would land outside it."""
    try:
        if archive_file.suffix == ".zip":
            with zipfile.ZipFile(archive_file) as zf:
                for info in zf.infolist():
                    _check_inside(info.filename, info.filename, archive_file)
                zf.extractall(dest)  # zipfile writes a symlink member as a plain file: no link can point out
        else:
            with tarfile.open(archive_file) as tf:
                tf.extractall(dest, members=_checked_members(tf, archive_file), **_TAR_FILTER)
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, lzma.LZMAError, zlib.error, OSError) as err:
        raise DownloadError(f"{archive_file} could not be unpacked ({err})") from None


def _checked_members(tf: tarfile.TarFile, archive_file: Path) -> Iterator[tarfile.TarInfo]:
    """The members in archive order, each checked before it is extracted (one pass over a large .xz)."""
    for member in tf:
        _check_inside(member.name, member.name, archive_file)
        if member.issym():
            _check_inside(posixpath.join(posixpath.dirname(member.name), member.linkname), member.name, archive_file)
        elif member.islnk():
            _check_inside(member.linkname, member.name, archive_file)
        yield member


def _check_inside(path: str, member: str, archive_file: Path) -> None:
    """Refuse a member whose path, or link target, is absolute or climbs out with ``..``."""
    normal = posixpath.normpath(path)
    if path.startswith(("/", "\\")) or normal == ".." or normal.startswith("../"):
        raise DownloadError(f"{archive_file}: member {member!r} would reach {path!r}, outside the folder it "
                            "is unpacked into; refused, nothing was installed")
