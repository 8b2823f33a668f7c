"""Real Ray clusters for the tests, on the loopback interface only, every process stopped by PID.

* ``loopback_netns()``: this process (and everything it starts) moves into a new network namespace
  whose only interface is ``lo``: Ray then binds and talks on 127.0.0.1 and nothing else (on Linux
  it otherwise swaps 127.0.0.1 for the machine's own address). Needs root; the caller skips if not.
* ``LocalCluster``: ``ray start --head`` and ``ray start --address`` (one CPU each) with token
  authentication on and a throw-away token; ``stop()`` ends exactly the processes it started, in
  ``ray stop``'s order (raylets, then agents and workers, then the GCS): all at once, some hang.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

CLONE_NEWNET = 0x40000000
PR_SET_CHILD_SUBREAPER = 36
RAY = str(Path(sys.executable).with_name("ray"))
_libc = ctypes.CDLL(None, use_errno=True)


def loopback_only() -> bool:
    """True inside a network namespace whose only interface is lo (/sys/class/net would still list eth0)."""
    return [name for _, name in socket.if_nameindex()] == ["lo"]


@contextlib.contextmanager
def loopback_netns() -> Iterator[None]:
    """Run the block in a new loopback-only network namespace (already in one: stay); OSError if refused."""
    if loopback_only():
        yield
        return
    old = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        if _libc.unshare(CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"unshare(CLONE_NEWNET): {os.strerror(ctypes.get_errno())}")
        subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
        yield
    finally:
        _libc.setns(old, CLONE_NEWNET)
        os.close(old)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _own_priority_group() -> None:
    """In the child before exec (after its setsid): its own scheduling group, at nice -10.

    With autogroup scheduling (Linux's default) CPU time is shared between sessions first, and a
    process's nice counts only inside its session: a node started in the tests' session would share that
    session's part of the machine, however nice. Root only; otherwise the default, and the retries."""
    with contextlib.suppress(OSError):
        Path("/proc/self/autogroup").write_text("-10")


def _lower_priority(pids: list[int]) -> None:
    """Back to nice 0 for the node's scheduling group (its processes, and the workers they will start)."""
    for pid in pids:
        with contextlib.suppress(OSError):
            Path(f"/proc/{pid}/autogroup").write_text("0")
            return


def _stat(pid: int) -> tuple[str, int] | None:
    """(state, parent) of a process, None once it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    state, ppid = text[text.rindex(")") + 2 :].split()[:2]
    return state, int(ppid)


def descendants(pid: int) -> list[int]:
    kids: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (st := _stat(int(entry))):
            kids.setdefault(st[1], []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for child in kids.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def alive(pids: list[int]) -> list[int]:
    return [p for p in pids if (st := _stat(p)) is not None and st[0] != "Z"]


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


class LocalCluster:
    """A head and ``nodes - 1`` worker nodes on this machine, ``cpus`` CPUs each; ``address`` for ``--ray``.

    The daemons ``ray start`` leaves behind are re-parented to this process (a child subreaper), so
    they stay findable as its descendants and are stopped by PID."""

    def __init__(self, temp_dir: Path, nodes: int = 2, cpus: int = 1):
        if not loopback_only():
            raise RuntimeError("refusing to start Ray outside a loopback-only network namespace")
        if _libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")
        self.address = f"127.0.0.1:{free_port()}"
        self.pids: list[int] = []
        common = ["--num-cpus", str(cpus), "--disable-usage-stats", "--node-ip-address=127.0.0.1"]
        try:
            self._start(["--head", f"--port={self.address.split(':')[1]}", "--include-dashboard=false",
                         f"--temp-dir={temp_dir}", *common])
            for _ in range(nodes - 1):
                self._start([f"--address={self.address}", *common])
        except BaseException:
            self.stop()
            raise

    def _start(self, args: list[str], tries: int = 3) -> None:
        """``ray start ARGS`` at a raised CPU priority; again after a failure.

        A raylet waits a fixed 15 s for its agents to write their port files, then aborts, and `ray
        start` fails 30 s later ("The current node timed out during startup"; ray-project/ray#65983).
        Neither wait has a setting in Ray 2.60 (``RAY_agent_register_timeout_ms`` covers only the
        agents' later registration). On a loaded 2-core machine the agents' imports took longer than
        15 s, every time; started in a scheduling group of their own at nice -10 they finish in
        time, and the group goes back to nice 0 as soon as the node is up."""
        for attempt in range(tries):
            before = set(descendants(os.getpid()))
            run = subprocess.run([RAY, "start", *args], capture_output=True, text=True, timeout=180,
                                 start_new_session=True, preexec_fn=_own_priority_group)
            new = [p for p in descendants(os.getpid()) if p not in before]
            _lower_priority(new)  # the node is up: it competes as an equal again
            if run.returncode == 0:
                self.pids += new
                return
            _stop(new, grace=2.0)
        raise RuntimeError(f"ray start {' '.join(args)} failed {tries} times ({run.returncode}):\n{run.stderr[-3000:]}")

    def stop(self, grace: float = 5.0) -> list[int]:
        """Stop exactly this cluster's processes (and the workers they started); return any that survived."""
        self.pids += [p for p in descendants(os.getpid()) if p not in self.pids and "ray" in cmdline(p)]
        return _stop(self.pids, grace)


def _stop(pids: list[int], grace: float) -> list[int]:
    """SIGTERM, then SIGKILL after ``grace`` s, group by group in ``ray stop``'s order; the survivors."""
    names = {p: cmdline(p) for p in pids}
    raylets = [p for p in pids if "raylet/raylet" in names[p]]
    gcs = [p for p in pids if "gcs_server" in names[p]]
    for group in (raylets, [p for p in pids if p not in raylets + gcs], gcs):
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 2.0)):
            for pid in alive(group):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            deadline = time.monotonic() + wait
            while alive(group) and time.monotonic() < deadline:
                _reap()
                time.sleep(0.05)
    _reap()
    return alive(pids)


def _reap() -> None:
    """Collect exited children: as a subreaper this process inherits the daemons and must wait() for them."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
