"""PatchCore end to end: fit, predict, save/load, and its guards."""

import json
import os
import stat
import zipfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from patchcore_lite.datasets import INPUT_SIZE, ImageDataset, train_test_samples
from patchcore_lite.errors import ConfigError, DataError, ModelFileError
from patchcore_lite.evaluation import fit_evaluate
from patchcore_lite.knn import NearestNeighbors
from patchcore_lite.metrics import image_auroc
from patchcore_lite.model import PatchCore, PatchCoreConfig
from patchcore_lite.scoring import scores_and_maps


@pytest.fixture(scope="module")
def fitted(synthetic_root: Path):
    """A PatchCore fit on one synthetic category with the default (pretrained, offline) backbone."""
    category = sorted(p for p in synthetic_root.iterdir() if p.is_dir())[0]
    train, test = train_test_samples(category)
    return PatchCore(coreset_ratio=0.1).fit(train, progress=False), train, test


def test_bank_is_the_coreset_of_all_training_patches(fitted):
    model, train, _ = fitted
    assert model.n_train_patches == len(train) * (INPUT_SIZE // 8) ** 2
    assert len(model.memory_bank) == int(model.n_train_patches * 0.1)
    assert model.memory_bank.shape[1] == sum(model.backbone.channels)


def test_predict_gives_scores_and_input_sized_maps(fitted):
    model, _, test = fitted
    pred = model.predict(test[:3], progress=False)
    assert pred.scores.shape == (3,) and pred.maps.shape == (3, INPUT_SIZE, INPUT_SIZE)
    assert np.isfinite(pred.maps).all() and (pred.maps >= 0).all()
    # The scores and maps of score_batch, in the order given, from samples or from paths.
    images = torch.stack([item["image"] for item in ImageDataset(test[:3], model.preprocess)])
    scores, maps = model.score_batch(images)
    np.testing.assert_allclose(pred.scores, scores.numpy(), rtol=1e-5)
    np.testing.assert_allclose(pred.maps, maps.numpy(), rtol=1e-5, atol=1e-5)
    reversed_paths = [str(s.path) for s in test[:3]][::-1]
    np.testing.assert_allclose(model.predict(reversed_paths, progress=False).scores, pred.scores[::-1], rtol=1e-5)


def test_training_images_score_lower_than_anomalies(fitted):
    model, train, test = fitted
    normal = model.predict(train[:4], progress=False).scores
    anomalous = model.predict([s for s in test if s.label == 1][:4], progress=False).scores
    assert normal.max() < anomalous.min()


def test_score_features_scores_patch_features_against_any_bank(fitted):
    model, _, test = fitted
    images = torch.stack([item["image"] for item in ImageDataset(test[-2:], model.preprocess)])
    features = model.extract(images)
    scores, maps = model.score_batch(images)
    same_scores, small_maps = model.score_features(features, (56, 56))
    torch.testing.assert_close(same_scores, scores)
    assert small_maps.shape == (2, 56, 56)
    # Without a PatchCore: the same eq. 6-7 and maps against an index built on its own.
    index = NearestNeighbors(model.memory_bank.clone(), model.config.knn_backend, model.config.knn_index)
    other_scores, other_maps = scores_and_maps(features, index, (INPUT_SIZE, INPUT_SIZE), **model.config.scoring)
    torch.testing.assert_close(other_scores, scores)
    torch.testing.assert_close(other_maps, maps)


def test_every_search_finds_the_same_exact_scores(fitted):
    """exact and torch flat, and ivf probing every list (exhaustive), equal the default faiss flat search."""
    model, _, test = fitted
    images = torch.stack([item["image"] for item in ImageDataset(test[-3:], model.preprocess)])
    scores, maps = model.score_batch(images)
    try:
        for backend, index, nprobe in [("exact", "flat", 1), ("torch", "flat", 1), ("faiss", "ivf", 10_000)]:
            other_scores, other_maps = model.set_search(backend, index, nprobe).score_batch(images)
            torch.testing.assert_close(other_scores, scores, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(other_maps, maps, rtol=1e-4, atol=1e-4)
        _, approx_maps = model.set_search("faiss", "ivf", nprobe=1).score_batch(images)
        assert model.index.index_type == "ivf"
        assert (approx_maps >= maps - 1e-4).all()  # approximate: never below the exact distance
    finally:
        model.set_search()
    assert torch.equal(model.score_batch(images)[0], scores)


def test_predict_is_deterministic(fitted, synthetic_root: Path):
    model, train, test = fitted
    again = PatchCore(coreset_ratio=0.1).fit(train, progress=False)
    assert torch.equal(again.memory_bank, model.memory_bank)
    assert np.array_equal(again.predict(test[:2], progress=False).scores, model.predict(test[:2], progress=False).scores)


def test_save_load_round_trip(fitted, tmp_path: Path):
    model, _, test = fitted
    path = model.save(tmp_path / "m.npz")
    loaded = PatchCore.load(path)
    assert loaded.config == model.config
    a, b = model.predict(test[:2], progress=False), loaded.predict(test[:2], progress=False)
    assert np.array_equal(a.scores, b.scores) and np.array_equal(a.maps, b.maps)


def _rewrite_meta(src: Path, dst: Path, change) -> None:
    with np.load(src) as f:
        bank, meta = f["memory_bank"], json.loads(f["meta"].tobytes())
    change(meta)
    np.savez(dst, memory_bank=bank, meta=np.frombuffer(json.dumps(meta).encode(), np.uint8))


def test_model_files_from_elsewhere_are_refused(fitted, tmp_path: Path):
    model, _, _ = fitted
    good = model.save(tmp_path / "good.npz")

    other_version = tmp_path / "v99.npz"
    _rewrite_meta(good, other_version, lambda m: m.update(format_version=99, package_version="9.9"))
    with pytest.raises(ModelFileError, match="format 99 .*9.9"):
        PatchCore.load(other_version)

    other_weights = tmp_path / "weights.npz"
    _rewrite_meta(good, other_weights, lambda m: m.update(backbone_fingerprint=1.0))
    with pytest.raises(ModelFileError, match="other efficientnet_lite0 weights"):
        PatchCore.load(other_weights)

    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(good.read_bytes()[:1000])
    with pytest.raises(ModelFileError, match="truncated.npz"):
        PatchCore.load(truncated)

    pickled = tmp_path / "pickled.npz"
    np.savez(pickled, memory_bank=np.array([object()], dtype=object), meta=np.zeros(3, np.uint8))
    with pytest.raises(ModelFileError, match="pickled.npz"):
        PatchCore.load(pickled)  # object arrays would need unpickling: never done

    with pytest.raises(ModelFileError, match="missing.npz"):
        PatchCore.load(tmp_path / "missing.npz")


def _write_model(path: Path, bank: np.ndarray, meta: object) -> Path:
    np.savez(path, memory_bank=bank, meta=np.frombuffer(json.dumps(meta).encode(), np.uint8))
    return path


def _good_parts(fitted, tmp_path: Path) -> tuple[np.ndarray, dict]:
    with np.load(fitted[0].save(tmp_path / "good.npz")) as f:
        return f["memory_bank"], json.loads(f["meta"].tobytes())


def _damage(bank: np.ndarray, meta: dict, case: str) -> tuple[np.ndarray, object]:
    """A hand-made damaged or foreign model file's contents for each case."""
    config = meta["config"]
    return {
        "meta is a list": (bank, [meta]),
        "unknown backbone": (bank, {**meta, "config": {**config, "backbone": "vgg16"}}),
        "unknown layer": (bank, {**meta, "config": {**config, "layers": ["layer2", "layer9"]}}),
        "settings out of range": (bank, {**meta, "config": {**config, "reweight_b": 1}}),
        "empty bank": (bank[:0], meta),
        "1-d bank": (bank[0], meta),
        "integer bank": (bank.astype(np.int64), meta),
        "non-finite bank": (np.where(np.arange(bank.shape[1]) == 3, np.nan, bank).astype(np.float32), meta),
        "missing config": (bank, {k: v for k, v in meta.items() if k != "config"}),
        "missing fingerprint": (bank, {k: v for k, v in meta.items() if k != "backbone_fingerprint"}),
        "count not a number": (bank, {**meta, "n_train_patches": "many"}),
        "newer format": (bank, {**meta, "format_version": 2, "package_version": "0.9.0"}),
        "no format": (bank, {k: v for k, v in meta.items() if k != "format_version"}),
    }[case]


_EXPECTED = {
    "meta is a list": "metadata is a JSON list, not an object",
    "unknown backbone": r"invalid settings \(backbone = 'vgg16': must be one of",
    "unknown layer": r"invalid settings \(layers = .*unknown: layer9",
    "settings out of range": r"invalid settings \(reweight_b = 1",
    "empty bank": r"memory bank is damaged: shape \(0, {D}\)",
    "1-d bank": r"memory bank is damaged: shape \({D},\)",
    "integer bank": "memory bank is damaged: .*dtype int64",
    "non-finite bank": "memory bank is damaged",
    "missing config": "metadata lacks config",
    "missing fingerprint": "metadata lacks backbone_fingerprint",
    "count not a number": "n_train_patches 'many' is not a number",
    "newer format": r"model format 2 \(written by patchcore_lite 0.9.0\).*reads format 1: upgrade patchcore_lite",
    "no format": "model format None .*: re-fit",
}


@pytest.mark.parametrize("case", list(_EXPECTED))
def test_damaged_or_foreign_model_files_are_refused_before_the_backbone_is_built(
    case: str, fitted, tmp_path: Path, monkeypatch
):
    bank, meta = _damage(*_good_parts(fitted, tmp_path), case)
    path = _write_model(tmp_path / "damaged.npz", bank, meta)
    monkeypatch.setattr("patchcore_lite.detector.Backbone", lambda *a, **k: pytest.fail("backbone built"))
    expected = _EXPECTED[case].replace("{D}", str(fitted[0].memory_bank.shape[1]))  # the default feature width
    with pytest.raises(ModelFileError, match=f"{path}.*{expected}"):
        PatchCore.load(path)


def test_a_bank_of_the_wrong_width_is_refused(fitted, tmp_path: Path):
    bank, meta = _good_parts(fitted, tmp_path)
    path = _write_model(tmp_path / "wide.npz", np.hstack([bank, bank[:, :1]]), meta)
    d = bank.shape[1]
    with pytest.raises(ModelFileError, match=rf"wide.npz: the memory bank holds {d + 1}-dimensional features, .* gives {d}"):
        PatchCore.load(path)


def test_save_is_atomic_with_normal_permissions(fitted, tmp_path: Path):
    model, _, _ = fitted
    old_umask = os.umask(0o022)
    try:
        path = model.save(tmp_path / "m.npz")
    finally:
        os.umask(old_umask)
    assert zipfile.is_zipfile(path) and not list(tmp_path.glob("*.tmp"))
    assert stat.S_IMODE(path.stat().st_mode) == 0o644  # as any file written under that umask


def test_a_failed_save_leaves_the_existing_model_untouched(fitted, tmp_path: Path, monkeypatch):
    model, _, _ = fitted
    path = tmp_path / "m.npz"
    path.write_bytes(b"the model from yesterday")

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(np, "savez", disk_full)
    with pytest.raises(OSError, match="No space left"):
        model.save(path)
    assert path.read_bytes() == b"the model from yesterday"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.npz"]  # no temporary file left behind


@pytest.mark.parametrize("settings, message", [
    ({"coreset_ratio": 0}, r"coreset_ratio = 0: must be in \(0, 1\]"),
    ({"coreset_ratio": 1.5}, "coreset_ratio = 1.5"),
    ({"feature_mode": "max"}, "feature_mode = 'max': must be one of avgpool, official"),
    ({"knn_backend": "torch", "knn_index": "ivf"}, "torch backend is exact"),
    ({"knn_index": "hnsw"}, "knn_index = 'hnsw': must be one of flat, ivf, ivfpq"),
    ({"knn_backend": "annoy"}, "knn_backend = 'annoy': must be one of exact, faiss, torch"),
    ({"knn_nprobe": 0}, "knn_nprobe = 0"),
    ({"backbone": "vgg"}, "backbone = 'vgg': must be one of efficientnet_lite0"),
    ({"layers": ("layer9",)}, "unknown: layer9"),
    ({"layers": ()}, "layers = .*non-empty"),
    ({"crop": 0, "resize": 256}, "crop = 0: must be None or a positive int up to the resized size 256"),
    ({"resize": (224, -1)}, "resize = "),
    ({"sigma": 0.0}, "sigma = 0.0: must be > 0"),
    ({"sigma": -4}, "sigma = -4"),
    ({"k": 0}, "k = 0: must be an integer >= 1"),
    ({"reweight_b": 0}, "reweight_b = 0"),
    ({"reweight_b": 1}, r"reweight_b = 1: must be an integer >= 2 \(eq. 7: .* reweight=False"),
    ({"patch_size": 0}, "patch_size = 0"),
    ({"batch_size": 2.5}, "batch_size = 2.5"),
    ({"seed": -1}, "seed = -1: must be an integer >= 0"),
    ({"coreset_method": "kmeans"}, "coreset_method = 'kmeans': must be one of greedy, random"),
    ({"projection_eps": 2.0}, "projection_eps = 2.0"),
])
def test_bad_settings_are_refused_when_the_config_is_built(settings: dict, message: str):
    with pytest.raises(ConfigError, match=message):
        PatchCoreConfig(**settings)


def test_unfitted_model_and_bad_settings():
    model = PatchCore(pretrained=False)
    with pytest.raises(RuntimeError, match="fit"):
        model.predict(torch.zeros(1, 3, 64, 64))
    with pytest.raises(RuntimeError, match="fit"):
        model.score_features(torch.zeros(1, 2, 2, 8), (16, 16))
    with pytest.raises(ValueError, match="empty"):
        model.fit([])


def test_a_corrupt_training_image_stops_fit_before_any_work(tmp_path: Path, synthetic_root: Path):
    category = sorted(p for p in synthetic_root.iterdir() if p.is_dir())[0]
    train, _ = train_test_samples(category)
    bad = tmp_path / "broken.png"
    bad.write_bytes(train[0].path.read_bytes()[:200])
    model = PatchCore(pretrained=False)
    with pytest.raises(DataError, match="broken.png"):
        model.fit([*(s.path for s in train[:3]), bad], progress=False)
    assert model.memory_bank is None


def test_end_to_end_auroc_on_synthetic_data(synthetic_root: Path):
    """Every synthetic category: most anomalies are found (measured: image 0.80-0.97, pixel 0.89-0.99;
    the data is made so that faint defects are missed, see test_synthetic.py)."""
    for category in sorted(p for p in synthetic_root.iterdir() if p.is_dir()):
        result = fit_evaluate(PatchCore(coreset_ratio=0.1), category, progress=False)
        assert result.metrics["image_auroc"] >= 0.75, (category.name, result.metrics)
        assert result.metrics["pixel_auroc"] >= 0.85, (category.name, result.metrics)


def test_official_feature_mode_end_to_end(synthetic_root: Path):
    category = sorted(p for p in synthetic_root.iterdir() if p.is_dir())[0]
    model = PatchCore(coreset_ratio=0.1, feature_mode="official", embed_dim=256, target_dim=256)
    result = fit_evaluate(model, category, progress=False)
    assert model.memory_bank.shape[1] == 256
    # measured on disc: image 0.925, pixel 0.988
    assert result.metrics["image_auroc"] >= 0.85 and result.metrics["pixel_auroc"] >= 0.95


def test_real_hazelnut(mvtec_reduced):
    root = mvtec_reduced("hazelnut")
    result = fit_evaluate(PatchCore(), root, progress=False)
    assert result.metrics["image_auroc"] >= 0.9 and result.metrics["pixel_auroc"] >= 0.9
    assert image_auroc(result.labels, result.scores) == result.metrics["image_auroc"]


def test_squared_distances_score_as_the_official_code(fitted):
    """squared=True: eq. 6's patch scores squared (official), the same image ranking, other maps."""
    model, _, test = fitted
    images = torch.stack([item["image"] for item in ImageDataset(test[:6] + test[-6:], model.preprocess)])
    features = model.extract(images)
    index = model._check_fitted()
    plain = replace(model.config, reweight=False)
    squared = replace(plain, squared=True)
    s_plain, m_plain = scores_and_maps(features, index, (224, 224), **plain.scoring)
    s_squared, m_squared = scores_and_maps(features, index, (224, 224), **squared.scoring)
    torch.testing.assert_close(s_squared, s_plain.square(), rtol=1e-5, atol=1e-6)
    assert torch.equal(s_squared.argsort(), s_plain.argsort())
    assert not torch.allclose(m_squared, m_plain.square(), rtol=1e-3)  # blur of squares != square of blur
