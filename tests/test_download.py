"""``cctl-rec download``: against an HTTP server on loopback that serves ``../shared/datasets``' copies
(no test needs the internet). Right bytes land; a wrong checksum, a 404, an unreachable host, a
connection cut short or a server error give one line and exit 2 or 1, and leave no partial file."""

import functools
import hashlib
import http.server
import os
import shutil
import socket
import threading

import pytest

from cctl_rec.cli import main
from cctl_rec.commands import download as dl

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.normpath(os.path.join(REPO, "..", "shared", "datasets"))
LOCAL_DIR = {"amazon-books-movies": "amazon-books-movies", "disencdr": "disencdr-amazon"}
needs_shared = pytest.mark.skipif(not os.path.isdir(SHARED), reason="../shared/datasets is not here")


class _Handler(http.server.SimpleHTTPRequestHandler):
    requests: list = []

    def log_message(self, *args) -> None:  # quiet
        pass

    def do_GET(self) -> None:
        type(self).requests.append(self.path)
        if self.path.startswith("/cut/"):  # promises the whole file, sends half, hangs up
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()
            self.wfile.write(b"x" * 500)
            self.wfile.flush()
            self.close_connection = True
            return
        if self.path.startswith("/busy/"):
            self.send_error(503, "Service Unavailable")
            return
        super().do_GET()


@pytest.fixture
def serve():
    """serve(directory) -> base URL of a ThreadingHTTPServer on 127.0.0.1, a random port."""
    servers = []

    def start(directory: str) -> str:
        handler = type("H", (_Handler,), {"requests": []})
        srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=directory))
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        servers.append(srv)
        start.requests = handler.requests
        return f"http://127.0.0.1:{srv.server_address[1]}"

    yield start
    for srv in servers:
        srv.shutdown()
        srv.server_close()


def _files(d):
    return sorted(os.path.relpath(os.path.join(r, f), d) for r, _, fs in os.walk(d) for f in fs)


def _one_error_line(capsys) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if not line.startswith("[rank")]
    assert len(err) == 1, err
    assert err[0].startswith("cctl-rec download: error: ")
    return err[0]


def _no_partial(out):
    assert not [f for f in _files(out) if f.endswith(".part")] if os.path.isdir(out) else True
    assert not os.path.exists(os.path.join(out, dl.MANIFEST))


@needs_shared
@pytest.mark.parametrize("name", ["amazon-books-movies", "disencdr"])
def test_pins_are_the_shared_copies_and_default_urls_the_pinned_commits(name):
    src = dl.SOURCES[name]
    local = os.path.join(SHARED, LOCAL_DIR[name])
    assert sorted(f.path for f in src.files) == sorted(p.replace(os.sep, "/") for p in _files(local)
                                                         if p != "README.md")
    for f in src.files:
        data = open(os.path.join(local, *f.path.split("/")), "rb").read()
        assert (hashlib.sha256(data).hexdigest(), len(data)) == (f.sha256, f.size), f.path
        assert src.default_url(f) == f"https://raw.githubusercontent.com/{src.repo}/{src.commit}/{f.remote}"
    # shared/datasets/README.md names the repositories and commits
    readme = open(os.path.join(SHARED, "README.md")).read()
    assert f"{src.repo} @{src.commit[:7]}" in readme


@needs_shared
@pytest.mark.parametrize("name", ["amazon-books-movies", "disencdr"])
def test_download_from_a_loopback_mirror(tmp_path, serve, capsys, name):
    base = serve(SHARED)
    out = tmp_path / "raw"
    assert main(["download", name, "--out", str(out), "--base-url", f"{base}/{LOCAL_DIR[name]}/"]) == 0
    local = os.path.join(SHARED, LOCAL_DIR[name])
    got = [f for f in _files(out) if f != dl.MANIFEST]
    assert got == sorted(p for p in _files(local) if p != "README.md")
    for f in got:
        assert (out / f).read_bytes() == open(os.path.join(local, f), "rb").read()
    assert "wrote " in capsys.readouterr().out
    manifest = __import__("json").loads((out / dl.MANIFEST).read_text())
    assert manifest["source"]["repo"] == dl.SOURCES[name].repo and len(manifest["files"]) == len(got)
    # a rerun checks what is there and fetches nothing
    n = len(serve.requests)
    assert main(["download", name, "--out", str(out), "--base-url", f"{base}/{LOCAL_DIR[name]}"]) == 0
    assert len(serve.requests) == n


@needs_shared
def test_default_urls_through_a_github_shaped_server(tmp_path, serve, monkeypatch):
    """The default path (GITHUB_RAW/repo/commit/remote path) against loopback laid out like GitHub."""
    root = tmp_path / "gh"
    for name in dl.SOURCES:
        src = dl.SOURCES[name]
        for f in src.files:
            dst = root / src.repo / src.commit / f.remote
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.symlink(os.path.join(SHARED, LOCAL_DIR[name], *f.path.split("/")), dst)
    monkeypatch.setattr(dl, "GITHUB_RAW", serve(str(root)) + "/")
    out = tmp_path / "amazon"
    assert main(["download", "amazon-books-movies", "--out", str(out)]) == 0
    assert (out / "Amazon-Movies-Dense.inter").stat().st_size == 2023014
    assert any(p.endswith("/data/Amazon-Dense-Subset/Amazon-Books-Dense.inter") for p in serve.requests)
    out = tmp_path / "disencdr"
    assert main(["download", "disencdr", "--out", str(out)]) == 0
    assert (out / "sport_phone" / "train.txt").stat().st_size == 612708 and (out / "LICENSE.txt").exists()


@needs_shared
def test_wrong_checksum_is_one_line_exit_2_nothing_half_written(tmp_path, serve, capsys):
    mirror = tmp_path / "mirror"
    shutil.copytree(os.path.join(SHARED, "amazon-books-movies"), mirror)
    bad = mirror / "Amazon-Movies-Dense.inter"
    data = bytearray(bad.read_bytes())
    data[100] ^= 1  # same size, one bit off
    os.chmod(bad, 0o644)
    bad.write_bytes(bytes(data))
    out = tmp_path / "raw"
    assert main(["download", "amazon-books-movies", "--out", str(out), "--base-url", serve(str(mirror))]) == 2
    line = _one_error_line(capsys)
    assert "Amazon-Movies-Dense.inter: sha256 " in line and "!= pinned 708e9027" in line
    assert not (out / "Amazon-Movies-Dense.inter").exists()
    _no_partial(out)
    # a longer file: stopped at the pinned size, named by its size
    bad.write_bytes(bytes(data) + b"more\n" * 10)
    assert main(["download", "amazon-books-movies", "--out", str(out), "--base-url", serve(str(mirror))]) == 2
    assert "more than 2023014 bytes, expected 2023014" in _one_error_line(capsys)
    _no_partial(out)


def test_404_is_one_line_exit_2(tmp_path, serve, capsys):
    out = tmp_path / "raw"
    assert main(["download", "disencdr", "--out", str(out), "--base-url", serve(str(tmp_path)) + "/nothing"]) == 2
    line = _one_error_line(capsys)
    assert "/nothing/LICENSE.txt: HTTP 404" in line and "a wrong --base-url" in line
    _no_partial(out)
    assert not os.path.exists(out / "LICENSE.txt")


def _closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def test_unreachable_host_is_one_line_exit_1(tmp_path, capsys):
    out = tmp_path / "raw"
    base = f"http://127.0.0.1:{_closed_port()}/x"
    assert main(["download", "amazon-books-movies", "--out", str(out), "--base-url", base, "--retries", "0"]) == 1
    line = _one_error_line(capsys)
    assert f"{base}/Amazon-Books-Dense.inter: " in line and "refused" in line.lower() and "after 1 try;" in line
    _no_partial(out)
    assert _files(out) == []


def test_cut_connection_and_server_errors_are_retried_then_exit_1(tmp_path, serve, capsys, monkeypatch):
    waits = []
    monkeypatch.setattr(dl.time, "sleep", waits.append)
    base = serve(str(tmp_path))
    out = tmp_path / "raw"
    assert main(["download", "amazon-books-movies", "--out", str(out), "--base-url", base + "/cut",
                 "--retries", "0"]) == 1
    assert "/cut/Amazon-Books-Dense.inter: connection closed after 500 of 1000 bytes" in _one_error_line(capsys)
    _no_partial(out)
    assert main(["download", "amazon-books-movies", "--out", str(out), "--base-url", base + "/busy",
                 "--retries", "2"]) == 1
    line = _one_error_line(capsys)
    assert "/busy/Amazon-Books-Dense.inter: HTTP 503" in line and "after 3 tries" in line
    assert waits == [1.0, 2.0]
    assert sum(p.startswith("/busy/") for p in serve.requests) == 3
    _no_partial(out)


@needs_shared
def test_a_different_file_in_out_is_refused_before_fetching(tmp_path, serve, capsys):
    out = tmp_path / "raw"
    out.mkdir()
    (out / "dense_users.txt").write_text("mine\n")
    base = serve(SHARED)
    assert main(["download", "amazon-books-movies", "--out", str(out), "--base-url", base + "/amazon-books-movies"]) == 2
    assert "dense_users.txt exists and is not the pinned file" in _one_error_line(capsys)
    assert serve.requests == [] and (out / "dense_users.txt").read_text() == "mine\n"


@pytest.mark.parametrize("argv,match", [
    (["--out", "s3://bucket/raw"], "--out s3://bucket/raw: this option takes a local path"),
    (["--out", "{tmp}/f"], "exists and is not a directory"),
    (["--out", "{tmp}/o", "--base-url", "ftp://host/x"], "expected an http://, https:// or file:// URL"),
    (["--out", "{tmp}/o", "--retries", "-1"], "--retries >= 0"),
])
def test_bad_options_are_one_line_exit_2(tmp_path, capsys, argv, match):
    (tmp_path / "f").write_text("x")
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert main(["download", "amazon-books-movies", *argv]) == 2
    assert match in _one_error_line(capsys)


@needs_shared
def test_file_url_mirror(tmp_path):
    out = tmp_path / "raw"
    base = "file://" + os.path.join(SHARED, "amazon-books-movies")
    assert main(["download", "amazon-books-movies", "--out", str(out), "--base-url", base]) == 0
    assert (out / "dense_users.txt").stat().st_size == 22125
    assert main(["download", "amazon-books-movies", "--out", str(tmp_path / "o2"), "--base-url",
                 "file://" + str(tmp_path / "none")]) == 2
