"""Ray (tools/distributed.py, ``--ray``): real clusters on the loopback interface, results equal to one process.

The cluster tests share one two-node cluster (``ray start --head`` and ``ray start --address``, one
CPU each, started in a loopback-only network namespace and stopped by PID): each cluster costs about
20 s. They carry the ``ray`` mark (``-m "not ray"`` deselects them) and skip, with the reason, where
the namespace cannot be made (not root) or Ray is not installed.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from ray_cluster import LocalCluster, free_port, loopback_netns

from patchcore_lite.knn import NearestNeighbors
from patchcore_lite.model import PatchCore
from patchcore_lite.teaching.synthetic import CATEGORIES, generate
from patchcore_lite.tools.cli import main
from patchcore_lite.tools.distributed import ShardedNearestNeighbors, merge_shards, shard_bounds

# Before anything imports Ray, which reads them once per process: token authentication on, with a
# throw-away token for every cluster of this session (nothing reads or writes ~/.ray/auth_token),
# and Ray's files in a short folder of our own (Unix socket paths are limited to 107 bytes).
os.environ["RAY_AUTH_MODE"] = "token"
os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(32))
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
# A raylet waits 30 s for its agents to start; on a busy 2-core machine their imports take longer.
os.environ.setdefault("RAY_agent_register_timeout_ms", "180000")

SMALL = ["--resize", "64", "--crop", "64", "--coreset-ratio", "0.1", "--batch-size", "4"]
TIMINGS = ("fit_s", "predict_s", "images_per_s")


@pytest.fixture(scope="module")
def categories(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder of two small synthetic categories, cut to 10 training and 8 test images each (the
    cluster tests' time is mostly scoring on a busy 2-core machine)."""
    full = generate(tmp_path_factory.mktemp("ray_full") / "data", categories=CATEGORIES[:2], size=64)
    root = tmp_path_factory.mktemp("ray") / "data"
    for category in CATEGORIES[:2]:
        src, dst = full / category, root / category
        keep = [*sorted((src / "train" / "good").iterdir())[:10], *sorted((src / "test" / "good").iterdir())[:4]]
        for defect in sorted(p for p in (src / "test").iterdir() if p.name != "good")[:2]:
            for image in sorted(defect.iterdir())[:2]:
                keep += [image, src / "ground_truth" / defect.name / f"{image.stem}_mask.png"]
        for path in keep:
            (dst / path.relative_to(src)).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(path, dst / path.relative_to(src))
    return root


@pytest.fixture(scope="module")
def model_file(categories: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ray_model") / "m.npz"
    assert main(["fit", str(categories / CATEGORIES[0]), "--model", str(path), *SMALL]) == 0
    return path


@pytest.fixture(scope="module")
def images(categories: Path) -> list[str]:
    return [str(categories / c / "test") for c in CATEGORIES[:2]]


@pytest.fixture(scope="module")
def cluster():
    """A two-node Ray cluster in a loopback-only network namespace; every process it started is stopped."""
    ray = pytest.importorskip("ray", reason="the Ray tests need ray[data] (requirements.txt)")
    temp = Path(tempfile.mkdtemp(prefix="pclray", dir="/tmp"))
    os.environ["RAY_TMPDIR"] = str(temp)
    try:
        with loopback_netns():
            cluster = LocalCluster(temp, nodes=2, cpus=1)
            try:
                yield cluster
            finally:
                ray.shutdown()  # a driver a test left connected
                survivors = cluster.stop()
            assert not survivors, f"Ray processes left running: {survivors}"
    except OSError as exc:  # raised before the yield: no namespace, so no cluster
        pytest.skip(f"the Ray tests need a loopback-only network namespace (root): {exc}")
    finally:
        os.environ.pop("RAY_TMPDIR", None)
        shutil.rmtree(temp, ignore_errors=True)


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _table(folder: Path) -> list[dict]:
    import json

    return [{k: v for k, v in row.items() if k not in TIMINGS} for row in json.loads((folder / "results.json").read_text())]


# ---- without a cluster ----------------------------------------------------------------------------
def test_without_ray_the_commands_never_import_it(categories: Path, tmp_path: Path):
    code = ("import sys; from patchcore_lite.tools.cli import main; import patchcore_lite.tools.distributed; "
            f"assert main(['evaluate', {str(categories / CATEGORIES[0])!r}, '--out', {str(tmp_path)!r}, "
            f"*{SMALL!r}]) == 0; assert 'ray' not in sys.modules, 'Ray was imported'")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]


def test_an_address_nobody_listens_on_is_one_line_and_exit_2_at_once(categories: Path, tmp_path: Path, capsys):
    pytest.importorskip("ray", reason="needs ray[data] (requirements.txt)")
    port = free_port()  # bound and released: nothing listens there now
    start = time.monotonic()
    assert main(["evaluate", str(categories), "--out", str(tmp_path), "--ray", f"127.0.0.1:{port}", *SMALL]) == 2
    assert time.monotonic() - start < 60  # Ray's own retries would take 820 s
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"cannot reach a Ray cluster at 127.0.0.1:{port}" in err and "ray start" in err
    assert main(["evaluate", str(categories), "--ray", "no-port-here", *SMALL]) == 2
    assert "give HOST:PORT" in capsys.readouterr().err


def test_shards_start_on_1024_row_tiles_and_cover_the_bank():
    assert shard_bounds(5000, 2) == [(0, 3072), (3072, 5000)]
    assert shard_bounds(5000, 3) == [(0, 2048), (2048, 4096), (4096, 5000)]
    assert shard_bounds(100, 4) == [(0, 100)]  # a bank smaller than a tile stays whole


def test_the_merge_orders_by_squared_distance_then_index():
    parts = [(np.array([[1.0, 4.0]], np.float32), np.array([[7, 3]])), (np.array([[1.0, 2.0]], np.float32),
                                                                        np.array([[2, 9]]))]
    dist, idx = merge_shards(parts, 3)
    assert idx.tolist() == [[2, 7, 9]] and dist.tolist() == [[1.0, 1.0, np.sqrt(2, dtype=np.float32)]]


def _bank_with_ties(rows: int = 5000, dim: int = 48, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A random bank with rows duplicated across shard boundaries (exact ties), and queries on them."""
    rng = np.random.default_rng(seed)
    bank = np.maximum(rng.normal(size=(rows, dim)) @ rng.normal(size=(dim, dim)), 0).astype(np.float32)
    bank[[3100, 4500, 2000]] = bank[[5, 5, 1030]]
    queries = np.concatenate([bank[[5, 1030, 17]], rng.normal(size=(300, dim)).astype(np.float32)])
    return bank, queries


@pytest.mark.parametrize("backend", ["faiss", "torch"])
@pytest.mark.parametrize("shards", [2, 3])
def test_sharded_search_in_process_equals_the_single_index(backend: str, shards: int):
    bank, queries = _bank_with_ties()
    single, sharded = NearestNeighbors(bank, backend), ShardedNearestNeighbors(bank, shards, backend, remote=False)
    for k in (1, 9):
        (d0, i0), (d1, i1) = single.search(queries, k), sharded.search(queries, k)
        assert torch.equal(d0, d1) and torch.equal(i0, i1)
    assert single.search(queries[:1], 3)[1].tolist() == [[5, 3100, 4500]]  # ties: lowest index first
    idx = torch.tensor([[0, 4999], [3071, 3072]])
    assert torch.equal(sharded.bank[idx], single.bank[idx]) and len(sharded.bank) == len(bank)


# ---- on a two-node cluster -------------------------------------------------------------------------
@pytest.mark.ray
def test_evaluate_on_two_nodes_gives_the_single_process_table(cluster, categories: Path, tmp_path: Path, capsys):
    assert main(["evaluate", str(categories), "--out", str(tmp_path / "one"), *SMALL]) == 0
    assert main(["evaluate", str(categories), "--out", str(tmp_path / "ray"), "--ray", cluster.address, *SMALL]) == 0
    nodes = {line.split("node ")[1] for line in capsys.readouterr().out.splitlines() if "done on node" in line}
    assert len(nodes) == 2, "one task per node expected (one CPU each)"
    assert _table(tmp_path / "ray") == _table(tmp_path / "one")  # to the last digit
    assert sorted(r["name"] for r in _table(tmp_path / "one")) == sorted(CATEGORIES[:2])


@pytest.mark.ray
def test_predict_on_two_nodes_writes_the_same_bytes(cluster, model_file: Path, images: list[str], tmp_path: Path):
    common = ["--model", str(model_file), "--threshold", "auto", "--overlays"]
    assert main(["predict", *images, "--out", str(tmp_path / "one"), *common]) == 0
    assert main(["predict", *images, "--out", str(tmp_path / "ray"), "--ray", cluster.address, *common]) == 0
    one, ray_files = _files(tmp_path / "one"), _files(tmp_path / "ray")
    assert len(one) >= 32 and ray_files == one  # scores.csv, run.json, threshold.json, maps, overlays, contact sheet


@pytest.mark.ray
def test_a_worker_that_dies_stops_the_run_and_resume_finishes_it(cluster, model_file: Path, images: list[str],
                                                                 tmp_path: Path, capsys):
    common = ["--model", str(model_file), "--threshold", "auto"]
    assert main(["predict", *images, "--out", str(tmp_path / "one"), *common]) == 0
    out = tmp_path / "ray"
    stop = threading.Event()

    def kill_scorers() -> None:  # the OOM killer's way: SIGKILL, every scorer actor, again after its restart
        while not stop.wait(0.2):
            for pid in cluster.workers("_Scorer"):
                os.kill(pid, 9)

    killer = threading.Thread(target=kill_scorers, daemon=True)
    killer.start()
    try:
        assert main(["predict", *images, "--out", str(out), "--ray", cluster.address, *common]) == 2
    finally:
        stop.set()
        killer.join()
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "died" in err and "--resume" in err, err
    scored = (out / "scores.csv").read_text().splitlines()
    reference = (tmp_path / "one" / "scores.csv").read_text().splitlines()
    assert scored == reference[: len(scored)] and f"{len(scored) - 1} of {len(reference) - 1} images" in err
    assert main(["predict", *images, "--out", str(out), "--ray", cluster.address, "--resume", *common]) == 0
    assert _files(out) == _files(tmp_path / "one")


@pytest.mark.ray
def test_sharded_search_on_two_nodes_equals_the_single_index(cluster, images: list[str]):
    import ray

    ray.init(address=cluster.address, log_to_driver=False)
    threads = torch.get_num_threads()
    try:
        bank, queries = _bank_with_ties()
        for backend in ("faiss", "torch"):
            single, sharded = NearestNeighbors(bank, backend), ShardedNearestNeighbors(bank, 2, backend, threads)
            for k in (1, 9):
                (d0, i0), (d1, i1) = single.search(queries, k), sharded.search(queries, k)
                assert torch.equal(d0, d1) and torch.equal(i0, i1), (backend, k)
            sharded.close()
        # A whole model scoring through the shards (eq. 6 and 7): every patch kept, so the bank spans 2 tiles.
        train = sorted((Path(images[0]).parent / "train" / "good").glob("*.png"))
        model = PatchCore(resize=128, crop=128, coreset_ratio=1.0, coreset_method="random").fit(train, progress=False)
        assert model.memory_bank is not None and len(model.memory_bank) > 1024
        test = sorted(Path(images[0]).rglob("*.png"))[:6]
        own = model.predict(test, progress=False)
        model.index = ShardedNearestNeighbors(model.memory_bank, 2, threads=threads)
        via_shards = model.predict(test, progress=False)
        assert np.array_equal(own.scores, via_shards.scores) and np.array_equal(own.maps, via_shards.maps)
        model.index.close()
    finally:
        ray.shutdown()
