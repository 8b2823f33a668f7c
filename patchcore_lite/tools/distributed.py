"""Beyond one machine: the command line's ``evaluate`` and ``predict`` on a Ray cluster, and a
memory bank sharded across Ray actors (chapter 10).

Ray (https://docs.ray.io) is imported in this module only, inside its functions, and only
when ``--ray`` is given: without it nothing changes and Ray is not imported.

* ``connect``: a local Ray instance (``--ray``) or a running cluster (``--ray HOST:PORT``, started
  by ``ray start --head``), with Ray's token authentication on. The address is probed with a
  plain TCP connect first, so a wrong one fails in milliseconds, not after Ray's 820 s of retries.
* ``evaluate_categories``: one Ray task per category, each the single-process ``fit_evaluate``.
* ``predict_outputs``: a Ray Data pipeline (``map_batches`` over an actor pool that loads the
  model once per worker) scoring the command line's very batches; the driver writes them in
  input order, so ``scores.csv``, maps, overlays and ``--resume`` stay as without Ray.
* ``ShardedNearestNeighbors``: ``knn.NearestNeighbors``'s interface over a bank split across
  actors; each shard returns its k nearest (squared distance, global index), the driver keeps
  the k smallest by (distance, index). Equal to the unsharded exact search, ties included.

Identical numbers: a task or actor sets torch's and faiss's thread count to the driver's
(``threads``): matrix products sum in another order on another thread count, which moves scores
in the 7th digit. Ray asks each for ``min(threads, CPUs of the largest node)`` CPUs, so that a task
never waits for a node that does not exist.

Every node reads the images, the model file and ``--weights`` by the paths given: run on a
shared filesystem, or with the same paths on every machine.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import torch

from ..datasets import ImageDataset, Sample
from ..errors import ConfigError, PatchCoreError
from ..evaluation import Result, fit_evaluate
from ..knn import NearestNeighbors
from ..model import PatchCore, PatchCoreConfig
from . import cli

PROBE_TIMEOUT_S = 2.0
JOIN_WAIT_S = "5"  # Ray's GCS wait when joining (default 41 s per try, 20 tries) once the port answered
AGENT_WAIT_MS = "120000"  # a local raylet's wait for its agents (Ray: 30 s); their imports take longer on a busy machine
SHARD_ALIGN = 1024  # faiss and the torch backend walk the bank in 1024-row tiles: shards start on a tile
RETRIES = 1  # a worker that dies is replaced, and its work redone, once; a second death stops the run
QUIET = logging.WARNING  # Ray's own INFO lines ("Connecting to existing Ray cluster ...") stay off the terminal


class ClusterError(PatchCoreError):
    """A Ray cluster that cannot be reached or refuses us, or a worker that died (says what to do)."""


# ---- connecting -----------------------------------------------------------------------------
@contextlib.contextmanager
def session(address: str | None) -> Iterator[None]:
    """``connect`` for the length of a command; disconnects only a connection it made."""
    os.environ.setdefault("RAY_AUTH_MODE", "token")  # read once, when Ray is imported
    try:
        import ray
    except ImportError:
        raise ClusterError("--ray needs Ray: pip install 'ray[data]==2.60.0' (or patchcore-lite[ray])") from None
    made = not ray.is_initialized()
    if made:
        connect(address)
    try:
        yield
    finally:
        if made:
            ray.shutdown()


def connect(address: str | None) -> None:
    """Start a local Ray instance (``address`` None or "") or join the cluster at ``HOST:PORT``.

    Token authentication stays on: Ray 2.60 turns it on for a local start but never for an
    explicit address, so it is asked for before Ray is imported; the token is ``$RAY_AUTH_TOKEN``
    or ``~/.ray/auth_token``, the head's. A ClusterError names the address and the fix."""
    os.environ.setdefault("RAY_AUTH_MODE", "token")  # before Ray is imported
    if address:
        host, port = check_address(address)
    import ray

    try:
        if address:
            with _env(RAY_gcs_server_port_wait_time_s=JOIN_WAIT_S):  # for the join only: it also bounds a local start
                ray.init(address=f"{host}:{port}", log_to_driver=False, logging_level=QUIET)
        else:  # "local": a new instance, never a cluster someone else started on this machine
            with _env(RAY_agent_register_timeout_ms=os.environ.get("RAY_agent_register_timeout_ms", AGENT_WAIT_MS)):
                ray.init(address="local", include_dashboard=False, log_to_driver=False, logging_level=QUIET)
    except ConnectionError as exc:
        raise ClusterError(_connect_message(address or "a local instance", exc)) from None
    except Exception as exc:  # Ray raises a bare Exception when a node's start times out
        if "timed out during startup" not in str(exc):
            raise
        raise ClusterError("Ray's local start timed out: its raylet waits a fixed 15 s for its agents, whose imports "
                           "took longer on this busy machine (ray-project/ray#65983); retry when it is less loaded, "
                           "or start a cluster with `ray start --head` and give its address to --ray") from None
    from ray.data import DataContext

    logging.getLogger("ray.data").setLevel(logging.CRITICAL)  # the command reports each image and any error itself

    context = DataContext.get_current()
    context.execution_options.preserve_order = True  # predict writes rows in input order
    context.enable_progress_bars = False  # the driver prints each image as it is written
    context.print_on_execution_start = False


def check_address(address: str) -> tuple[str, int]:
    """``HOST:PORT`` parsed, and answering on its port (the command line asks before any work)."""
    host, port = parse_address(address)
    probe(host, port)
    return host, port


def parse_address(address: str) -> tuple[str, int]:
    """``HOST:PORT`` as (host, port); a ConfigError for anything else."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"--ray {address!r}: give HOST:PORT, e.g. 127.0.0.1:6379 (what `ray start --head` printed)")
    return host, int(port)


def probe(host: str, port: int) -> None:
    """A plain TCP connect to the cluster's GCS port: milliseconds, where ``ray.init`` would retry for minutes."""
    try:
        socket.create_connection((host, port), timeout=PROBE_TIMEOUT_S).close()
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise ClusterError(f"cannot reach a Ray cluster at {host}:{port} ({reason}): start one there with "
                           f"`ray start --head --port={port}`, or drop the address to start a local one") from None


def _connect_message(where: str, exc: BaseException) -> str:
    causes: list[str] = []
    while exc is not None and len(causes) < 10:
        causes.append(str(exc))
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    if any("InvalidAuthToken" in c for c in causes):
        return (f"the Ray cluster at {where} refused our token: set RAY_AUTH_TOKEN (or ~/.ray/auth_token) "
                "to the head node's token, and RAY_AUTH_MODE=token on every node")
    return f"cannot connect to Ray at {where}: {causes[0].splitlines()[0]}"


@contextlib.contextmanager
def _env(**values: str) -> Iterator[None]:
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


def cpus_per_worker(threads: int) -> int:
    """CPUs a task or actor asks Ray for: its threads, but at most the largest node's CPUs."""
    import ray

    largest = max(int(n["Resources"].get("CPU", 0)) for n in ray.nodes() if n["Alive"])
    return max(1, min(threads, largest))


def _set_threads(threads: int) -> None:
    """The driver's thread count in a worker: Ray's OMP_NUM_THREADS is read once per process, by torch's first use."""
    torch.set_num_threads(threads)
    faiss.omp_set_num_threads(threads)


# ---- many categories ------------------------------------------------------------------------
def _fit_evaluate_task(root: str, checked: tuple[PatchCoreConfig, list[Sample], list[Sample]], weights: str | None,
                       device: str, seed: int, holdout: float, keep_maps: bool, threads: int
                       ) -> tuple[Result, int, str, str]:
    """One category's fit and evaluation in a Ray worker, on the samples the driver checked: the result,
    the bank's size, the node and which search ran."""
    import ray

    _set_threads(threads)
    config, train, test = checked
    model = PatchCore(config, weights_path=weights, device=device)
    result = fit_evaluate(model, root, seed=seed, progress=False, keep_maps=keep_maps, holdout=holdout,
                          samples=(train, test))
    assert model.memory_bank is not None
    return result, len(model.memory_bank), ray.get_runtime_context().get_node_id(), model._check_fitted().describe()


def evaluate_categories(
    roots: Sequence[Path], checked: Sequence[tuple[PatchCoreConfig, list[Sample], list[Sample]]],
    weights: Path | None, device: str, seed: int,
    holdout: float, keep_maps: bool, threads: int,
) -> Iterator[tuple[int, Result, int, str, str]]:
    """Fit and evaluate every category (its settings and checked samples, ``checked``) as a Ray task; yields
    (position, result, bank size, node id, search description)
    as each finishes. A task whose worker dies is run again once; a second failure is a ClusterError."""
    import ray

    task = ray.remote(_fit_evaluate_task).options(
        num_cpus=cpus_per_worker(threads), num_gpus=int(device == "cuda"), max_retries=RETRIES)
    pending = {task.remote(str(root), category, None if weights is None else str(weights), device, seed, holdout,
                           keep_maps, threads): i for i, (root, category) in enumerate(zip(roots, checked))}
    while pending:
        [ready], _ = ray.wait(list(pending), num_returns=1)
        i = pending.pop(ready)
        try:
            result, bank, node, search = ray.get(ready)
        except ray.exceptions.RayError as exc:
            for ref in pending:
                ray.cancel(ref)
            raise _user_error(exc, f"{roots[i].name}: ") from None
        yield i, result, bank, node, search


def _user_error(exc: Exception, where: str = "") -> Exception:
    """What a failed task or actor call means to the user: the error it raised, if it is one of the
    command line's own (bad input, unreadable file), else a ClusterError naming Ray's."""
    import ray

    cause = exc.cause if isinstance(exc, ray.exceptions.RayTaskError) else None
    if isinstance(cause, PatchCoreError | OSError):
        return cause
    if cause is not None:
        return ClusterError(f"{where}a Ray worker failed: {type(cause).__name__}: {str(cause).splitlines()[0]}")
    return ClusterError(f"{where}a Ray worker died and its retry failed too ({type(exc).__name__})")


# ---- large image streams --------------------------------------------------------------------
COLUMNS = ("index", *cli.COLUMNS, "name", "map_npy", "overlay_png")  # a Ray Data row: one image's outputs


class _Scorer:
    """The Ray Data actor: loads the model once per worker, then scores one chunk (one of the
    command line's batches) per call and returns what predict writes for each image."""

    def __init__(self, model: str, weights: str | None, device: str, threads: int, threshold_text: str,
                 with_maps: bool, overlays: bool):
        _set_threads(threads)
        self.model = PatchCore.load(model, weights_path=weights, device=device)
        self.options = threshold_text, with_maps, overlays

    def __call__(self, rows: dict[str, np.ndarray]) -> dict[str, list]:
        out: dict[str, list] = {c: [] for c in COLUMNS}
        for start, joined in zip(rows["start"], rows["paths"]):
            chunk = [Path(p) for p in str(joined).split("\n")]
            dataset = ImageDataset([Sample(p, 0, "good", None) for p in chunk], self.model.preprocess)  # checked
            (batch, scores, maps), = self.model.scored_batches(dataset, progress=False)
            for i, o in enumerate(cli.batch_outputs(self.model, chunk, int(start), batch, scores, maps, *self.options)):
                for column, value in zip(COLUMNS, (int(start) + i, *o.row, o.name, o.map_npy, o.overlay_png)):
                    out[column].append(value)
        return out


def predict_outputs(
    files: Sequence[Path], first: int, model: Path, weights: Path | None, device: str, batch_size: int,
    threshold_text: str, with_maps: bool, overlays: bool, threads: int, workers: int | None = None,
) -> Iterator[tuple[int, list[Any]]]:
    """(first image, outputs (``cli.ImageOutput``)) of ``files[first:]``, batch by batch in input order, scored by
    ``workers`` actors (default: as many as the cluster's CPUs allow) in a Ray Data pipeline.

    Rows of the dataset are the command line's batches (``files[s:s + batch_size]`` from ``first``),
    one per actor call: the same images share a forward pass as without Ray, so the numbers are the
    same. Memory stays flat: the driver holds one batch's outputs at a time, each actor one model.
    A worker that dies is replaced and its chunk redone once; a second death is a ClusterError,
    after everything before it was yielded."""
    import ray

    cpus = cpus_per_worker(threads)
    workers = workers or max(1, int(ray.cluster_resources().get("CPU", 1)) // cpus)
    chunks = [{"start": s, "paths": "\n".join(map(str, files[s : s + batch_size]))}
              for s in range(first, len(files), batch_size)]
    if not chunks:
        return
    # One block per batch: each batch reaches the driver, and scores.csv, as soon as it is scored.
    dataset = ray.data.from_items(chunks, override_num_blocks=len(chunks)).map_batches(
        _Scorer, batch_size=1, compute=ray.data.ActorPoolStrategy(size=workers), num_cpus=cpus,
        num_gpus=int(device == "cuda"),
        fn_constructor_args=(str(model), None if weights is None else str(weights), device, threads, threshold_text,
                             with_maps, overlays),
        max_restarts=RETRIES, max_task_retries=RETRIES)  # Ray Data's default, -1, retries a fatal chunk forever
    batch: list[cli.ImageOutput] = []
    try:
        for row in dataset.iter_rows():
            batch.append(cli.ImageOutput(tuple(row[c] for c in cli.COLUMNS), row["name"],  # type: ignore[arg-type]
                                     row["map_npy"], row["overlay_png"]))
            index = int(row["index"])
            if (index - first + 1) % batch_size == 0 or index == len(files) - 1:
                yield index + 1 - len(batch), batch
                batch = []
    except ray.exceptions.RayError as exc:
        raise _user_error(exc) from None


# ---- a sharded memory bank ------------------------------------------------------------------
def shard_bounds(rows: int, shards: int, align: int = SHARD_ALIGN) -> list[tuple[int, int]]:
    """``rows`` bank rows as at most ``shards`` contiguous ranges starting at multiples of ``align``.

    faiss's flat index (and the torch backend) take the bank 1024 rows at a time: a shard that
    starts on such a tile sees the very tiles of the whole bank, so its sums round the same."""
    if shards < 1:
        raise ConfigError(f"shards = {shards}: must be an integer >= 1")
    per = -(-rows // shards)
    per = -(-per // align) * align
    return [(s, min(rows, s + per)) for s in range(0, rows, per)]


def merge_shards(parts: Sequence[tuple[np.ndarray, np.ndarray]], k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The global k nearest from each shard's k nearest (squared distances, global indices):
    smallest squared distance first, ties to the lowest index; then the root, as ``NearestNeighbors.search``.

    Merged on squares: two different float32 squares can share a root, and a merge on roots would
    then break a tie the unsharded search never saw."""
    sq = np.concatenate([p[0] for p in parts], axis=1)
    idx = np.concatenate([p[1] for p in parts], axis=1)
    order = np.lexsort((idx, sq), axis=1)[:, :k]  # the last key (sq) sorts first
    sq, idx = np.take_along_axis(sq, order, 1), np.take_along_axis(idx, order, 1)
    return torch.from_numpy(sq).clamp_min_(0).sqrt_(), torch.from_numpy(idx)


class BankShard:
    """Rows ``[offset, offset + len(bank))`` of a memory bank with their own exact index; a Ray actor
    in ``ShardedNearestNeighbors``, or a plain object (``remote=False``)."""

    def __init__(self, bank: np.ndarray, offset: int, backend: str, threads: int | None):
        if threads is not None:
            _set_threads(threads)
        self.offset = offset
        self.index = NearestNeighbors(bank, backend)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """This shard's ``min(k, rows)`` nearest: squared distances and global indices."""
        sq, idx = self.index.search_squared(queries, min(k, len(self.index)))
        return sq.numpy(), idx.numpy() + self.offset

    def node(self) -> str:
        """The Ray node this shard lives on (where it is an actor)."""
        import ray

        return ray.get_runtime_context().get_node_id()

    def rows(self, idx: np.ndarray) -> np.ndarray:
        """Bank rows by global index."""
        return self.index.bank.numpy()[idx - self.offset]


class ShardedNearestNeighbors:
    """``knn.NearestNeighbors`` (exact, flat) over a bank split into ``shards`` Ray actors.

    ``search(queries, k)`` sends the queries once (``ray.put``) to every shard and merges their
    candidates (``merge_shards``): the same distances and indices as the unsharded search at the same
    thread count, for any k. ``bank[idx]`` fetches rows from their shards (eq. 7 needs them), so a
    ``PatchCore`` scores with it as with its own index (``model.index = ShardedNearestNeighbors(...)``).
    Traffic per query block: the queries to each node, 12 bytes per query and neighbour back from each shard.
    ``remote=False`` keeps the shards in this process (the chapter's exactness check without a cluster).
    """

    def __init__(self, bank: torch.Tensor | np.ndarray, shards: int = 2, backend: str = "faiss",
                 threads: int | None = None, remote: bool = True):
        bank = np.ascontiguousarray(torch.as_tensor(bank).float().numpy())
        self.bounds = shard_bounds(len(bank), shards)
        self.width, self.remote = bank.shape[1], remote
        if remote:
            import ray

            actor = ray.remote(BankShard).options(num_cpus=cpus_per_worker(threads or 1))
            self.shards = [actor.remote(bank[s:e], s, backend, threads) for s, e in self.bounds]
        else:
            self.shards = [BankShard(bank[s:e], s, backend, threads) for s, e in self.bounds]

    def _call(self, method: str, per_shard: Sequence[tuple]) -> list[Any]:
        """``shard.method(*args)`` on every shard, with its own args, in parallel when remote."""
        if not self.remote:
            return [getattr(shard, method)(*args) for shard, args in zip(self.shards, per_shard)]
        import ray

        return ray.get([getattr(shard, method).remote(*args) for shard, args in zip(self.shards, per_shard)])

    def search(self, queries: torch.Tensor | np.ndarray, k: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """Distances (N, k) float32 (Euclidean, ascending) and global bank indices (N, k) int64."""
        queries = np.ascontiguousarray(torch.as_tensor(queries).float().numpy())
        if queries.ndim != 2 or queries.shape[1] != self.width:
            raise ValueError(f"queries must be (N, {self.width}), got shape {queries.shape}")
        if not 1 <= k <= len(self):
            raise ValueError(f"k must be in [1, {len(self)}], got {k}")
        if self.remote:  # into the object store once, read by every shard (zero-copy on one node)
            import ray

            queries = ray.put(queries)
        return merge_shards(self._call("search", [(queries, k)] * len(self.shards)), k)

    @property
    def bank(self) -> _ShardedRows:
        """``bank[idx]`` (rows fetched from their shards) and ``len(bank)``, as scoring uses a bank."""
        return _ShardedRows(self)

    def __len__(self) -> int:
        return self.bounds[-1][1]

    def close(self) -> None:
        """End the shard actors (their CPUs are held until then)."""
        if self.remote:
            import ray

            for shard in self.shards:
                ray.kill(shard)
        self.shards = []


class _ShardedRows:
    def __init__(self, index: ShardedNearestNeighbors):
        self.index = index

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, idx: torch.Tensor) -> torch.Tensor:
        flat = torch.as_tensor(idx).reshape(-1).numpy()
        out = np.empty((len(flat), self.index.width), dtype=np.float32)
        owner = np.searchsorted([e for _, e in self.index.bounds], flat, side="right")
        wanted = [flat[owner == j] for j in range(len(self.index.bounds))]
        rows = self.index._call("rows", [(w,) for w in wanted])
        for j, part in enumerate(rows):
            out[owner == j] = part
        return torch.from_numpy(out).reshape(*torch.as_tensor(idx).shape, self.index.width)
