"""Downloads against a local HTTP server: resume, hash, unsafe archives, counts, errors; no internet.

Each test serves archives built here (a tiny MVTec AD category, a tiny Magnetic Tile Defects
zip) from a ``http.server`` thread on 127.0.0.1 with Range support, and patches the registry
entry so that its published counts and hash describe those archives.
"""

from __future__ import annotations

import hashlib
import io
import socket
import tarfile
import threading
import zipfile
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from patchcore_lite.datasets import MVTEC_CATEGORIES, real_datasets
from patchcore_lite.tools import download as dl
from patchcore_lite.tools.cli import main

# A tiny MVTec AD category: 3 train/good, 1 test/good, 2 test/crack with their masks.
TINY = {
    **{f"tiny/train/good/{i:03d}.png": f"train {i}".encode() * 50 for i in range(3)},
    "tiny/test/good/000.png": b"good" * 50,
    **{f"tiny/test/crack/{i:03d}.png": f"crack {i}".encode() * 50 for i in range(2)},
    **{f"tiny/ground_truth/crack/{i:03d}_mask.png": f"mask {i}".encode() * 50 for i in range(2)},
}
TINY_COUNTS = {"train/good": 3, "test/good": 1, "test/defective": 2}


class Server:
    """What the test HTTP server serves and what it was asked."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.requests: list[tuple[str, str | None]] = []  # (path, Range header)
        self.drop_after: int | None = None  # send only this many bytes, once, then hang up
        self.honour_range = True
        self.url = ""


class Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        state: Server = self.server.state  # type: ignore[attr-defined]
        name, wanted = self.path.lstrip("/"), self.headers.get("Range")
        state.requests.append((name, wanted))
        if name not in state.files:
            self.send_error(404)
            return
        data = state.files[name]
        start = int(wanted[len("bytes="):].split("-")[0]) if wanted and state.honour_range else 0
        if start >= len(data) > 0 and wanted:
            self.send_error(416)
            return
        self.send_response(206 if start else 200)
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        body = data[start:]
        if state.drop_after is not None:  # a dropped connection: part of the body, then EOF
            body, state.drop_after = body[: state.drop_after], None
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.state = Server()  # type: ignore[attr-defined]
    httpd.state.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield httpd.state
    httpd.shutdown()
    httpd.server_close()


def tar_xz(members: dict[str, bytes], links: dict[str, tuple[bytes, str]] | None = None) -> bytes:
    """A .tar.xz of regular files, plus links {name: (tarfile.SYMTYPE or LNKTYPE, target)}."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:xz") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        for name, (kind, target) in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type, info.linkname = kind, target
            tf.addfile(info)
    return buffer.getvalue()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def register_tiny(monkeypatch, archive: bytes, sha: str | None = "from archive", counts=TINY_COUNTS) -> None:
    """Make ``mvtec_ad`` a dataset of one category ``tiny`` whose archive is ``archive``."""
    entry = dl.Archive("tiny.tar.xz", "https://publisher.invalid/tiny.tar.xz", "1 kB",
                       sha256(archive) if sha == "from archive" else sha)
    parts = {"tiny": dl.Part("mvtec_ad/tiny", "tiny", entry, dict(counts))}
    monkeypatch.setitem(dl.DATASETS, "mvtec_ad", replace(dl.DATASETS["mvtec_ad"], parts=parts, whole=None))


def fetch(server: Server, root: Path, *extra: str) -> int:
    return main(["download", "mvtec_ad", "tiny", "--mirror", server.url, "--root", str(root), *extra])


def tree(root: Path) -> list[str]:
    """Every file and folder below root (hidden ones too)."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")) if root.exists() else []


def assert_installed(root: Path) -> None:
    for name, data in TINY.items():
        assert (root / "mvtec_ad" / name).read_bytes() == data
    assert [p.name for p in root.iterdir()] == ["mvtec_ad"]  # no downloads/ folder, archive, or .part left
    assert [p.name for p in (root / "mvtec_ad").iterdir()] == ["tiny"]  # no .extracting-* folder left


def test_download_end_to_end_through_the_cli_then_again_does_nothing(server, monkeypatch, tmp_path, capsys):
    archive = tar_xz(TINY)
    server.files["tiny.tar.xz"] = archive
    register_tiny(monkeypatch, archive)
    root = tmp_path / "data"
    assert fetch(server, root) == 0
    out = capsys.readouterr().out
    assert "CC BY-NC-SA 4.0" in out and "tiny.tar.xz: 1 kB" in out  # licence and size before the transfer
    assert_installed(root)
    assert server.requests == [("tiny.tar.xz", None)]

    assert fetch(server, root) == 0
    assert "already complete" in capsys.readouterr().out
    assert len(server.requests) == 1  # nothing fetched the second time
    assert dl.download("mvtec_ad", ["tiny"], root=root, progress=False) == [root / "mvtec_ad" / "tiny"]


def test_a_dropped_connection_resumes_with_a_range_request(server, monkeypatch, tmp_path):
    archive = tar_xz(TINY)
    server.files["tiny.tar.xz"], server.drop_after = archive, 100
    register_tiny(monkeypatch, archive)
    root = tmp_path / "data"
    assert fetch(server, root) == 0
    assert server.requests == [("tiny.tar.xz", None), ("tiny.tar.xz", "bytes=100-")]
    assert_installed(root)  # the hash of the joined file matched, and every member is intact


def test_an_interrupted_run_leaves_only_a_part_file_that_the_next_run_resumes(server, monkeypatch, tmp_path, capsys):
    archive = tar_xz(TINY)
    server.files["tiny.tar.xz"], server.drop_after = archive, 100
    register_tiny(monkeypatch, archive)
    monkeypatch.setattr(dl, "_ATTEMPTS", 1)
    root = tmp_path / "data"
    assert fetch(server, root) == 2
    assert "run the command again to resume" in capsys.readouterr().err.lower()
    assert tree(root) == ["downloads", "downloads/tiny.tar.xz.part"]
    assert (root / "downloads" / "tiny.tar.xz.part").read_bytes() == archive[:100]
    assert fetch(server, root) == 0
    assert server.requests[-1] == ("tiny.tar.xz", "bytes=100-")
    assert_installed(root)


def test_a_server_that_ignores_range_restarts_the_file(server, monkeypatch, tmp_path):
    archive = tar_xz(TINY)
    server.files["tiny.tar.xz"], server.honour_range = archive, False
    register_tiny(monkeypatch, archive)
    root = tmp_path / "data"
    (root / "downloads").mkdir(parents=True)
    stale = b"stale bytes of another transfer"
    (root / "downloads" / "tiny.tar.xz.part").write_bytes(stale)
    assert fetch(server, root) == 0
    assert server.requests == [("tiny.tar.xz", f"bytes={len(stale)}-")]
    assert_installed(root)


def test_a_wrong_hash_is_refused_before_unpacking(server, monkeypatch, tmp_path, capsys):
    archive = tar_xz(TINY)
    server.files["tiny.tar.xz"] = archive
    register_tiny(monkeypatch, archive, sha="0" * 64)
    root = tmp_path / "data"
    assert fetch(server, root) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: ") and f"SHA-256 {sha256(archive)}" in err and "0" * 64 in err
    assert "https://publisher.invalid/tiny.tar.xz" in err and "--mirror" in err  # what to do next
    assert tree(root) == []  # no category, no archive, no folders


@pytest.mark.parametrize("name, links", [
    ("tiny/../../escaped.txt", None),
    ("/tmp/escaped.txt", None),
    ("tiny/train/good/link", {"tiny/train/good/link": (tarfile.SYMTYPE, "../../../../escaped.txt")}),
    ("tiny/train/good/abs", {"tiny/train/good/abs": (tarfile.SYMTYPE, "/etc/passwd")}),
    ("tiny/train/good/hard", {"tiny/train/good/hard": (tarfile.LNKTYPE, "../escaped.txt")}),
], ids=["dotdot", "absolute", "symlink-out", "symlink-absolute", "hardlink-out"])
def test_members_that_would_land_outside_are_refused(name, links, server, monkeypatch, tmp_path, capsys):
    members = {**TINY, name: b"escaped"} if links is None else TINY
    archive = tar_xz(members, links)
    server.files["tiny.tar.xz"] = archive
    register_tiny(monkeypatch, archive, sha=None)
    root = tmp_path / "deep" / "data"
    assert fetch(server, root) == 2
    err = capsys.readouterr().err
    assert "outside the folder" in err and repr(name) in err
    assert tree(tmp_path) == []  # nothing escaped, nothing half-installed, no folder left


@pytest.mark.parametrize("dropped, message", [
    ("train/good/002.png", "train/good: 2 images, published 3"),  # a count that differs from the registry's
    ("001_mask.png", "001_mask.png"),  # a defective image without its mask
])
def test_an_incomplete_layout_is_not_installed(dropped, message, server, monkeypatch, tmp_path, capsys):
    archive = tar_xz({k: v for k, v in TINY.items() if not k.endswith(dropped)})
    server.files["tiny.tar.xz"] = archive
    register_tiny(monkeypatch, archive, sha=None)
    root = tmp_path / "data"
    assert fetch(server, root) == 2
    assert message in capsys.readouterr().err
    assert tree(root) == []


def test_a_file_that_is_no_archive_is_refused(server, monkeypatch, tmp_path, capsys):
    server.files["tiny.tar.xz"] = b"<html>the publisher's login page</html>"
    register_tiny(monkeypatch, server.files["tiny.tar.xz"], sha=None)
    root = tmp_path / "data"
    assert fetch(server, root) == 2
    assert "could not be unpacked" in capsys.readouterr().err
    assert tree(root) == []


def test_all_categories_missing_come_in_the_whole_archive_with_its_hash(server, monkeypatch, tmp_path):
    second = {k.replace("tiny/", "wee/", 1): v for k, v in TINY.items()}
    archive = tar_xz({**TINY, **second, "license.txt": b"CC BY-NC-SA 4.0"})
    server.files["whole.tar.xz"] = archive
    whole = dl.Archive("whole.tar.xz", "https://publisher.invalid/whole.tar.xz", "2 kB", sha256(archive))
    unused = dl.Archive("unused.tar.xz", "https://publisher.invalid/unused.tar.xz", "1 kB", None)
    parts = {c: dl.Part(f"mvtec_ad/{c}", c, unused, TINY_COUNTS) for c in ("tiny", "wee")}
    monkeypatch.setitem(dl.DATASETS, "mvtec_ad", replace(dl.DATASETS["mvtec_ad"], parts=parts, whole=whole))
    root = tmp_path / "data"
    assert dl.download("mvtec_ad", root=root, mirror=server.url, progress=False) == [
        root / "mvtec_ad" / "tiny", root / "mvtec_ad" / "wee"]
    assert server.requests == [("whole.tar.xz", None)]
    assert (root / "mvtec_ad" / "wee" / "test" / "good" / "000.png").read_bytes() == TINY["tiny/test/good/000.png"]
    assert [p.name for p in root.iterdir()] == ["mvtec_ad"]
    assert sorted(p.name for p in (root / "mvtec_ad").iterdir()) == ["tiny", "wee"]


def test_a_refused_connection_is_one_line_and_creates_nothing(monkeypatch, tmp_path, capsys):
    register_tiny(monkeypatch, tar_xz(TINY))
    with socket.socket() as s:  # a port that nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    root = tmp_path / "data"
    assert main(["download", "mvtec_ad", "tiny", "--mirror", f"http://127.0.0.1:{port}", "--root", str(root)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("error: could not fetch ")
    assert f"http://127.0.0.1:{port}/tiny.tar.xz" in err[0] and str(root / "downloads" / "tiny.tar.xz") in err[0]
    assert not root.exists()


def test_http_errors_and_unknown_names_are_one_clear_line(server, monkeypatch, tmp_path, capsys):
    register_tiny(monkeypatch, tar_xz(TINY))
    root = tmp_path / "data"
    assert fetch(server, root) == 2  # the mirror lacks the file
    assert "HTTP 404" in capsys.readouterr().err and not root.exists()
    assert main(["download", "mvtec_ad", "bottel", "--root", str(root)]) == 2
    assert "no category bottel" in capsys.readouterr().err
    assert main(["download", "mvtecad", "--root", str(root)]) == 2
    assert "mvtec_ad, mtd" in capsys.readouterr().err


def test_an_incomplete_folder_already_there_is_left_alone(server, monkeypatch, tmp_path, capsys):
    register_tiny(monkeypatch, tar_xz(TINY))
    (tmp_path / "mvtec_ad" / "tiny" / "train" / "good").mkdir(parents=True)
    assert fetch(server, tmp_path) == 2
    assert "exists but is not the published MVTec AD" in capsys.readouterr().err
    assert server.requests == []


def test_magnetic_tile_zip_from_a_local_mirror_folder(monkeypatch, tmp_path):
    top = "Magnetic-tile-defect-datasets.-master"  # as GitHub names a branch archive fetched by hand
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    with zipfile.ZipFile(mirror / "magnetic_tile.zip", "w") as zf:
        for i in range(3):
            zf.writestr(f"{top}/MT_Free/Imgs/free_{i}.jpg", b"jpg")
        for i in range(2):
            zf.writestr(f"{top}/MT_Crack/Imgs/crack_{i}.jpg", b"jpg")
            zf.writestr(f"{top}/MT_Crack/Imgs/crack_{i}.png", b"png")
        zf.writestr(f"{top}/README.md", b"readme")
    part = dl.DATASETS["mtd"].parts["magnetic_tile"]
    parts = {"magnetic_tile": replace(part, counts={"MT_Free": 3, "MT_Crack": 2})}
    monkeypatch.setitem(dl.DATASETS, "mtd", replace(dl.DATASETS["mtd"], parts=parts))
    monkeypatch.setenv(dl.ENV_MIRROR, str(mirror))
    root = tmp_path / "data"
    assert dl.download("mtd", root=root, progress=False) == [root / "magnetic_tile"]
    assert sorted(p.name for p in (root / "magnetic_tile" / "MT_Crack" / "Imgs").iterdir()) == [
        "crack_0.jpg", "crack_0.png", "crack_1.jpg", "crack_1.png"]
    assert [p.name for p in root.iterdir()] == ["magnetic_tile"]
    monkeypatch.setenv("PATCHCORE_DATA", str(root))
    assert real_datasets() == ["magnetic_tile"]


def test_the_registry_is_complete():
    mvtec = dl.DATASETS["mvtec_ad"]
    assert tuple(mvtec.parts) == MVTEC_CATEGORIES  # the 15 categories, in the order the paper's tables use
    assert sum(sum(p.counts.values()) for p in mvtec.parts.values()) == 5354  # the paper's total
    assert sum(p.counts["train/good"] for p in mvtec.parts.values()) == 3629
    assert all(p.archive.url.endswith(f"/{p.archive.file}") for p in mvtec.parts.values())
    assert mvtec.whole is not None and len(mvtec.whole.sha256 or "") == 64
    assert sum(dl.DATASETS["mtd"].parts["magnetic_tile"].counts.values()) == 1344
