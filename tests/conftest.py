"""Shared fixtures: the real data beside the repository, and the synthetic dataset.

Real data lives in ``<repo>/../shared/data`` (set ``PATCHCORE_SHARED_DATA`` to use
another folder). It is not part of the repository, so every test that needs it
skips cleanly when it is absent.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from patchcore_lite.synthetic import generate

REPO = Path(__file__).resolve().parents[1]


def _require(path: Path) -> Path:
    if not path.is_dir():
        pytest.skip(f"real data not found at {path}: these tests need ../shared/data (see data/README.md)")
    return path


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The folder of real datasets (may not exist; the fixtures below skip then)."""
    return Path(os.environ.get("PATCHCORE_SHARED_DATA", REPO.parent / "shared" / "data"))


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
