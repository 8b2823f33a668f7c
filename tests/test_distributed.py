"""Ray (tools/distributed.py, ``--ray``): real clusters on the loopback interface, results equal to one process.

The cluster tests share one two-node cluster for the module (``ray start --head`` and ``ray start
--address``, one CPU each, started in a loopback-only network namespace and stopped by PID; about
30 s to start on a busy 2-core machine). They carry the ``ray`` mark (``-m "not ray"`` deselects
them) and skip, with the reason, where the namespace cannot be made (not root), Ray is not
installed, or the cluster cannot be started. Workers are killed (SIGKILL) mid-task: ``evaluate``'s
task runs again once and the table is unchanged; killed twice, the run stops with one line naming what
is kept; ``predict``'s Ray Data actor killed while it scores is replaced and its batch scored again (the
files are unchanged), and killed again the run stops, says how many images are kept, and ``--resume``
finishes it. The same holds for a kill during an actor's start (its model load): Ray starts the actor
again, and if every start is killed the run stops with the same one line.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
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
from patchcore_lite.tools.outputs import LOCK_NAME

# Before anything imports Ray, which reads them once per process: token authentication on, with a
# throw-away token for every cluster of this session (nothing reads or writes ~/.ray/auth_token),
# and Ray's files in a short folder of our own (Unix socket paths are limited to 107 bytes).
os.environ["RAY_AUTH_MODE"] = "token"
os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(32))
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
# A raylet waits 30 s for its agents to start; on a busy 2-core machine their imports take longer.
os.environ.setdefault("RAY_agent_register_timeout_ms", "180000")

SMALL = ["--resize", "64", "--crop", "64", "--coreset-ratio", "0.1", "--batch-size", "4", "--random-init"]
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
            try:
                cluster = LocalCluster(temp, nodes=2, cpus=1)
            except RuntimeError as exc:  # `ray start` failed three times: say why, do not fail the suite
                pytest.skip(f"could not start a two-node Ray cluster on this machine: {str(exc)[:500]}")
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
    """Every output file's bytes (the lock file names its run's command, and so differs)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != LOCK_NAME}


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
    assert main(["evaluate", str(categories), "--out", str(tmp_path), "--ray", "no-port-here", *SMALL]) == 2
    assert "give HOST:PORT" in capsys.readouterr().err
    assert not any(tmp_path.iterdir()), "nothing written before the address was checked"


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
    out = capsys.readouterr().out
    nodes = {line.split("node ")[1] for line in out.splitlines() if "done on node" in line}
    assert len(nodes) == 2, "one task per node expected (one CPU each)"
    assert out.count("\nsearch: ") == 4  # which search ran, printed for every category in both runs
    assert _table(tmp_path / "ray") == _table(tmp_path / "one")  # to the last digit
    assert sorted(r["name"] for r in _table(tmp_path / "one")) == sorted(CATEGORIES[:2])


class Killer(threading.Thread):
    """Kills (SIGKILL) every process of the cluster whose title starts with ``title`` (Ray names a worker
    ``ray::FUNCTION`` while it runs that task), at most ``limit`` times, until stopped."""

    def __init__(self, title: str, limit: int):
        super().__init__(daemon=True)
        self.title, self.limit, self.killed, self.done = title.encode(), limit, [], threading.Event()

    def run(self) -> None:
        while len(self.killed) < self.limit and not self.done.wait(0.05):
            for proc in Path("/proc").glob("[0-9]*"):
                with contextlib.suppress(OSError):
                    if proc.joinpath("cmdline").read_bytes().startswith(self.title):
                        os.kill(int(proc.name), signal.SIGKILL)
                        self.killed.append(int(proc.name))
                        break

    def __enter__(self) -> Killer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.done.set()
        self.join()


@pytest.mark.ray
def test_a_task_whose_worker_is_killed_runs_again_with_the_same_table(cluster, categories: Path, tmp_path: Path,
                                                                     capsys):
    """SIGKILL of a fit-and-evaluate task's worker mid-run: Ray starts the task again (once), and the table
    still equals one process's."""
    assert main(["evaluate", str(categories), "--out", str(tmp_path / "one"), *SMALL]) == 0
    with Killer("ray::_fit_evaluate_task", limit=1) as killer:
        code = main(["evaluate", str(categories), "--out", str(tmp_path / "ray"), "--ray", cluster.address, *SMALL])
    assert len(killer.killed) == 1 and code == 0, capsys.readouterr().err
    assert _table(tmp_path / "ray") == _table(tmp_path / "one")


@pytest.mark.ray
def test_a_task_killed_twice_stops_the_run_and_says_what_is_kept(cluster, categories: Path, tmp_path: Path, capsys):
    with Killer("ray::_fit_evaluate_task", limit=10) as killer:
        code = main(["evaluate", str(categories), "--out", str(tmp_path), "--ray", cluster.address, *SMALL])
    err = capsys.readouterr().err
    assert code == 2 and len(killer.killed) >= 2, err
    assert err.count("\n") == 1 and "a Ray worker died and its retry failed too" in err, err
    assert "0 of 2 categories evaluated" in err and "--overwrite" in err, err


@pytest.mark.ray
def test_predict_on_two_nodes_resumes_a_cut_run_to_the_same_bytes(cluster, model_file: Path, images: list[str],
                                                                   tmp_path: Path):
    """A run cut in its second batch (batch size 4), continued with ``--resume --ray``: the cluster scores
    from that batch's start to the end (12 of 16 images, on both nodes) and every file equals one
    process's run. One Ray run covers a fresh run's path too (``first`` = 0 is the same code) at half
    the cost of two: each run starts its actors, a fresh worker process each."""
    common = ["--model", str(model_file), "--threshold", "auto", "--overlays"]
    assert main(["predict", *images, "--out", str(tmp_path / "one"), *common]) == 0
    one = _files(tmp_path / "one")
    assert len(one) >= 32  # scores.csv, run.json, threshold.json, maps, overlays, contact sheet
    cut = tmp_path / "ray"
    shutil.copytree(tmp_path / "one", cut)
    scores = cut / "scores.csv"
    scores.write_bytes(b"".join(scores.read_bytes().splitlines(keepends=True)[:7]))  # the header and 6 rows
    for path in [*cut.glob("maps/*"), *cut.glob("overlays/*")]:
        if int(path.name[:6]) >= 4:  # what the cut run had not written yet (the second batch's, and after)
            path.unlink()
    (cut / "contact_sheet.png").unlink(missing_ok=True)
    assert main(["predict", *images, "--out", str(cut), "--ray", cluster.address, "--resume", *common]) == 0
    assert _files(cut) == one


SCORER_CALL = "ray::MapWorker(MapBatches(_Scorer)).submit"  # Ray's title of a predict actor while it scores
SCORER_START = "ray::MapWorker(MapBatches(_Scorer)).__init__"  # ... while it loads the model


@pytest.fixture(scope="module")
def one_process_files(model_file: Path, images: list[str], tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The files of ``predict --model M`` in one process (batch size 4, the model's: 4 batches of 4)."""
    out = tmp_path_factory.mktemp("one_predict")
    assert main(["predict", *images, "--out", str(out), "--model", str(model_file)]) == 0
    return _files(out)


@pytest.mark.ray
def test_a_predict_actor_killed_while_scoring_is_replaced_and_the_files_are_the_same(cluster, model_file: Path,
                                                                                  images: list[str], tmp_path: Path,
                                                                                  one_process_files: dict, capsys):
    with Killer(SCORER_CALL, limit=1) as killer:
        code = main(["predict", *images, "--out", str(tmp_path), "--ray", cluster.address, "--model", str(model_file)])
    assert len(killer.killed) == 1 and code == 0, capsys.readouterr().err
    assert _files(tmp_path) == one_process_files


@pytest.mark.ray
def test_a_predict_actor_killed_while_loading_the_model_starts_again_and_the_files_are_the_same(
        cluster, model_file: Path, images: list[str], tmp_path: Path, one_process_files: dict, capsys):
    with Killer(SCORER_START, limit=1) as killer:
        code = main(["predict", *images, "--out", str(tmp_path), "--ray", cluster.address, "--model", str(model_file)])
    assert len(killer.killed) == 1 and code == 0, capsys.readouterr().err
    assert _files(tmp_path) == one_process_files


@pytest.mark.ray
def test_a_predict_actor_killed_at_every_start_stops_the_run_with_one_line(cluster, model_file: Path,
                                                                           images: list[str], tmp_path: Path, capsys):
    """No actor ever loads the model: one line, exit 2, nothing scored, and the command that continues."""
    cut = ["predict", *images, "--out", str(tmp_path), "--ray", cluster.address, "--model", str(model_file)]
    with Killer(SCORER_START, limit=10) as killer:
        code = main(cut)
    err = capsys.readouterr().err
    assert code == 2 and len(killer.killed) >= 2, err
    assert err.count("\n") == 1 and "a Ray worker died and its retry failed too" in err, err
    assert "0 of 16 images are scored and kept" in err and err.rstrip().endswith("--resume"), err


@pytest.mark.ray
def test_a_predict_actor_killed_again_stops_the_run_and_resume_finishes_it(cluster, model_file: Path,
                                                                           images: list[str], tmp_path: Path,
                                                                           one_process_files: dict, capsys):
    """Every replacement killed too: one line, exit 2, saying how many images are scored and kept;
    ``--resume`` (no kills) then ends with the files of a run that was never cut."""
    cut = ["predict", *images, "--out", str(tmp_path), "--ray", cluster.address, "--model", str(model_file)]
    with Killer(SCORER_CALL, limit=10) as killer:
        code = main(cut)
    err = capsys.readouterr().err
    assert code == 2 and len(killer.killed) >= 2, err
    assert err.count("\n") == 1 and "a Ray worker died and its retry failed too" in err, err
    assert "of 16 images are scored and kept" in err and "--resume" in err, err
    assert main([*cut, "--resume"]) == 0
    assert _files(tmp_path) == one_process_files


@pytest.mark.ray
def test_sharded_search_on_two_nodes_equals_the_single_index(cluster, images: list[str]):
    """On the cluster, the model's own bank and index (ties and the torch backend are checked in process above)."""
    import ray

    ray.init(address=cluster.address, log_to_driver=False)
    threads = torch.get_num_threads()
    try:
        # A whole model scoring through the shards (eq. 6 and 7): every patch kept, so the bank spans 2 tiles.
        train = sorted((Path(images[0]).parent / "train" / "good").glob("*.png"))
        model = PatchCore(resize=96, crop=96, coreset_ratio=1.0, coreset_method="random", pretrained=False)
        model.fit(train, progress=False)
        bank = model.memory_bank
        assert bank is not None and len(bank) > 1024
        single, sharded = model.index, ShardedNearestNeighbors(bank, 2, threads=threads)
        nodes = ray.get([shard.node.remote() for shard in sharded.shards])
        assert len(set(nodes)) == 2, "one shard per node expected (one CPU each)"
        queries = torch.cat([bank[[5, 1030, 1100]], bank[:300] + 0.01 * torch.randn(300, bank.shape[1])])
        for k in (1, 9):
            (d0, i0), (d1, i1) = single.search(queries, k), sharded.search(queries, k)
            assert torch.equal(d0, d1) and torch.equal(i0, i1), k
        test = sorted(Path(images[0]).rglob("*.png"))[:6]
        own = model.predict(test, progress=False)
        model.index = sharded
        via_shards = model.predict(test, progress=False)
        assert np.array_equal(own.scores, via_shards.scores) and np.array_equal(own.maps, via_shards.maps)
        sharded.close()
    finally:
        ray.shutdown()
