"""Shared fixtures: the real data under the package's data root, and the synthetic dataset.

Real data is looked up below ``patchcore_lite.datasets.data_root()`` (``$PATCHCORE_DATA``,
else the repository's ``data/``). A fresh clone has none, so every test that needs it
skips cleanly when it is absent.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from patchcore_lite.datasets import data_root
from patchcore_lite.teaching.synthetic import generate


def _require(path: Path) -> Path:
    if not path.is_dir():
        pytest.skip(f"real data not found at {path}: set PATCHCORE_DATA to a folder with it (see data/README.md)")
    return path


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The folder of real datasets (may not hold them; the fixtures below skip then)."""
    return data_root()


@pytest.fixture(scope="session")
def mvtec_reduced(shared_data: Path) -> Callable[[str], Path]:
    """``mvtec_reduced("hazelnut")``: one reduced MVTec AD category folder, or skip the test."""
    return lambda category: _require(shared_data / "mvtec_reduced" / category)


@pytest.fixture(scope="session")
def magnetic_tile(shared_data: Path) -> Path:
    """The complete Magnetic Tile Defects folder, or skip the test."""
    return _require(shared_data / "magnetic_tile")


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default synthetic dataset (all categories), generated once per session. Read only."""
    return generate(tmp_path_factory.mktemp("synthetic") / "data")
