"""One data root: where every dataset is looked up, and where generated data may be written."""

from pathlib import Path

import pytest

from patchcore_lite import datasets
from patchcore_lite.datasets import (
    data_root,
    data_summary,
    dataset_label,
    locate,
    mvtec_category,
    writable_dir,
)
from patchcore_lite.teaching.synthetic import default_root


@pytest.fixture
def root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("PATCHCORE_DATA", str(tmp_path / "data"))
    return tmp_path / "data"


def test_the_environment_variable_chooses_the_root(root: Path):
    assert data_root() == root


def test_without_the_variable_a_checkout_uses_its_data_folder(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("PATCHCORE_DATA", raising=False)
    repo = Path(datasets.__file__).resolve().parents[1]
    assert data_root() == repo / "data"


def test_locate_prefers_the_first_existing_folder(root: Path):
    assert locate("mvtec_ad/hazelnut", "mvtec_reduced/hazelnut") is None
    (root / "mvtec_reduced" / "hazelnut").mkdir(parents=True)
    assert mvtec_category("hazelnut") == root / "mvtec_reduced" / "hazelnut"
    (root / "mvtec_ad" / "hazelnut").mkdir(parents=True)
    assert mvtec_category("hazelnut") == root / "mvtec_ad" / "hazelnut"
    assert dataset_label(root / "mvtec_reduced" / "hazelnut") == "MVTec AD hazelnut (reduced)"
    assert dataset_label(root / "mvtec_ad" / "hazelnut") == "MVTec AD hazelnut"


def test_the_summary_names_what_is_there_or_how_to_get_it(root: Path):
    assert "python -m patchcore_lite download mvtec_ad" in data_summary()
    (root / "magnetic_tile").mkdir(parents=True)
    (root / "mvtec_ad" / "bottle").mkdir(parents=True)
    assert data_summary() == f"real data in {root}: magnetic_tile, mvtec_ad/bottle"


def test_generated_data_goes_to_the_cache_when_the_root_is_read_only(root: Path, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert default_root() == root / "synthetic"  # writable: under the data root
    (root / "synthetic").rmdir()
    root.chmod(0o555)  # no write bits: respected even when running as root
    try:
        assert writable_dir(root / "synthetic", "synthetic") == tmp_path / "cache" / "patchcore_lite" / "synthetic"
        assert not (root / "synthetic").exists()
    finally:
        root.chmod(0o755)
