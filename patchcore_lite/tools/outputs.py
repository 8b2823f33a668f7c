"""Output files a run can trust: checked before work, written whole or not at all, owned by one run.

* ``check_writable(path)``: before any work, that ``path`` can be created or replaced (a probe file
  is created and deleted in the nearest existing folder), with a ConfigError naming the path.
* ``atomic_write(path, data)`` / ``atomic_save(path, write)``: a temporary file in the same folder,
  renamed into place: a reader sees the old file or the new one, never half of one.
* ``RunLock(folder)``: an exclusive ``fcntl.flock`` on ``folder/.patchcore.lock`` for one run; the
  kernel drops it when the process ends however it ends, so a killed run leaves no stale lock.
* ``earlier_run(folder, names, command)`` / ``remove_outputs``: under that lock, what an earlier run left
  there (its ``run.json`` says which command wrote it), so that a new run refuses, continues or replaces
  it, and never mixes its files with another run's.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import secrets
import shutil
import socket
import stat
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Self

from ..datasets import IMAGE_SUFFIXES, RUN_MANIFEST
from ..errors import ConfigError, DataError, file_kind, shown

LOCK_NAME = ".patchcore.lock"


def check_regular_file(path: Path, what: str) -> Path:
    """Refuse (DataError) a ``path`` that is missing or not a regular file: a FIFO would block, /dev/zero never end."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise DataError(f"{shown(path)}: {what} does not exist; check the path.") from None
    if not stat.S_ISREG(mode):
        raise DataError(f"{shown(path)}: {what} is a {file_kind(mode)}, not a regular file; give a file.")
    return path


def _existing_ancestor(path: Path) -> Path:
    for folder in [path, *path.parents]:
        if folder.exists() or folder.is_symlink():
            return folder
    return Path(".")


def check_writable(path: Path, what: str, folder: bool = False) -> None:
    """Refuse (ConfigError) an output ``path`` that cannot be written, before any work.

    A file must be absent or a regular file (a folder is a folder); the nearest existing folder above it
    must be a folder in which a probe file can be created and deleted (permissions, read-only mounts, /proc).
    """
    if path.exists():
        is_dir = path.is_dir()
        if is_dir != folder:
            kind = "folder" if is_dir else file_kind(path.stat().st_mode)
            raise ConfigError(f"{shown(path)}: {what} is an existing {kind}, not a {'folder' if folder else 'file'}; "
                              f"move it away or choose another path.")
        if not folder and not os.access(path, os.W_OK):
            raise ConfigError(f"{shown(path)}: {what} exists and cannot be replaced (read-only); choose another path.")
    base = _existing_ancestor(path if folder else path.parent)
    if not base.is_dir():
        raise ConfigError(f"{shown(path)}: {what} cannot be created: {shown(base)} is a file, not a folder; "
                          "choose another path.")
    try:
        probe = base / f".patchcore-probe-{secrets.token_hex(4)}"
        os.close(os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        probe.unlink()
    except OSError as exc:
        raise ConfigError(f"{shown(path)}: {what} cannot be written: {shown(base)} does not accept new files "
                          f"({exc.strerror}); choose a writable path.") from None


def refuse_image_folder(folder: Path, what: str, ours: Sequence[str] = ()) -> None:
    """Refuse (ConfigError) an output ``folder`` that already holds image files a run did not write (``ours``
    are the names this command writes there): its overlays and figures would sit among the user's images,
    and the next fit or predict on that folder would read them as data."""
    if not folder.is_dir():
        return
    theirs = sorted(p.name for p in folder.iterdir()
                    if p.suffix.lower() in IMAGE_SUFFIXES and p.name not in ours and p.is_file())
    if theirs:
        listed = ", ".join(theirs[:3]) + (", ..." if len(theirs) > 3 else "")
        raise ConfigError(f"{shown(folder)}: {what} already holds {len(theirs)} image file(s) ({listed}); a run's "
                          "figures would be mixed with them and read back as images next time: choose an empty or "
                          "new folder.")


def atomic_save(path: Path, write: Callable[[IO[bytes]], None]) -> Path:
    """``write(f)`` into a new file beside ``path``, renamed over it: ``path`` is whole or untouched.

    The temporary file is removed on any failure (full disk, Ctrl-C). Permissions follow the umask."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "xb") as f:
            write(f)
            f.flush()
            if os.fstat(f.fileno()).st_size != f.tell():  # a C-level writer (numpy tofile) may not report a short write
                raise OSError(errno.ENOSPC, f"{shown(path)}: written short (disk full?)")
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write(path: Path, data: bytes | str) -> Path:
    payload = data.encode() if isinstance(data, str) else data
    return atomic_save(path, lambda f: f.write(payload))


def write_json(path: Path, record: object) -> Path:
    return atomic_write(path, json.dumps(record, indent=1) + "\n")


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a regular file (check_regular_file first: a device never ends)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


class RunLock(contextlib.AbstractContextManager):
    """Exclusive ownership of an output folder for one run (created if needed).

    ``fcntl.flock`` on ``folder/.patchcore.lock``, not a PID file: the kernel releases it when the holder
    exits or is killed, so there is no stale lock to detect. The file records who holds it (PID, host, start,
    command) for the refusal message; it is left in place (deleting a lock file races with the next run)."""

    def __init__(self, folder: Path, command: str) -> None:
        self.folder, self.command, self.fd = folder, command, -1

    def __enter__(self) -> Self:
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / LOCK_NAME
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = os.pread(self.fd, 4096, 0).decode(errors="replace").strip().replace("\n", "; ")
            os.close(self.fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EACCES):
                raise DataError(f"{shown(self.folder)}: in use by another run ({holder or 'unknown'}); wait for it "
                                "to finish or choose another --out.") from None
            raise
        info = f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}: {self.command}"
        with contextlib.suppress(OSError):  # who holds it is only for messages: a full disk must not stop the run
            os.ftruncate(self.fd, 0)
            os.pwrite(self.fd, info.encode(errors="backslashreplace") + b"\n", 0)
        return self

    def __exit__(self, *exc: object) -> None:
        os.close(self.fd)  # closing the descriptor releases the flock


def _present(folder: Path, names: Sequence[str]) -> list[str]:
    return [name for name in names if (folder / name).exists() or (folder / name).is_symlink()]


def read_record(path: Path) -> object:
    """A JSON record (run.json), or the exception that reading or parsing it raised."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        return exc


def earlier_run(folder: Path, names: Sequence[str], command: str, overwrite: bool = False) -> dict | None:
    """The run.json record of the earlier run of ``command`` (e.g. ``"patchcore_lite predict"``) in ``folder``,
    or None when there is none. Call it under the folder's RunLock; the caller continues, replaces (``overwrite``)
    or refuses that run.

    ``names`` are the entries the command writes. Without ``overwrite``, a folder holding any of them is refused
    (DataError) unless its run.json says ``command`` wrote it: outputs without a run.json (what produced them is
    unknown), or with an unreadable or foreign one. Even with ``overwrite``, a folder that another patchcore_lite
    command owns is refused: its files are not ours to remove."""
    manifest = folder / RUN_MANIFEST
    record = read_record(manifest) if manifest.exists() else None
    writer = record.get("written_by") if isinstance(record, dict) else None
    if writer == command:
        return record
    if isinstance(writer, str) and writer.startswith("patchcore_lite "):
        raise DataError(f"{shown(folder)}: holds the outputs of `{writer}` ({RUN_MANIFEST}), not of `{command}`; "
                        "choose another --out.")
    present = _present(folder, names)
    if overwrite or not present:
        return None
    if record is None:
        raise DataError(f"{shown(folder)}: holds {', '.join(present)} but no {RUN_MANIFEST}, so what produced them is "
                        "unknown; choose another --out, or add --overwrite to replace them.")
    if isinstance(record, Exception):
        raise DataError(f"{shown(manifest)}: unreadable ({record}); choose another --out, or --overwrite.")
    raise DataError(f"{shown(manifest)}: not written by {command}; choose another --out.")


def remove_outputs(folder: Path, names: Sequence[str]) -> None:
    """Remove the entries ``names`` of ``folder`` (an earlier run's outputs, for ``--overwrite``): files and
    links unlinked, folders removed whole. Only plain names: ``../x`` removes nothing outside the folder."""
    for name in names:
        if Path(name).name != name or name in ("", ".", ".."):
            continue
        path = folder / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
