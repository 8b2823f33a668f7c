"""Where data lives, and how real datasets get there.

One data root serves the package, the chapters, the tests and the command line:

* ``$PATCHCORE_DATA`` if it is set;
* else the repository's ``data/`` folder, when the package runs from a source checkout;
* else ``$XDG_DATA_HOME/patchcore_lite`` (``~/.local/share/patchcore_lite``) for an installed package.

Below it each dataset has a fixed folder (``DATASETS``): ``mvtec_ad/<category>`` for a
downloaded MVTec AD category, ``magnetic_tile`` for Magnetic Tile Defects. Nothing else
in the package names a data location: everything asks ``data_root()`` or ``locate()``.
"""

from __future__ import annotations

import os
from pathlib import Path

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
            found += [f"{collection}/{c.name}" for c in sorted((root / collection).iterdir()) if c.is_dir()]
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
