"""fetch through the real daemon, from an HTTP file server in the test (Range, cut responses, keep-alive)."""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import DaemonProcess, read_sidecar, sidecar_state, wait_for

Start = Callable[..., DaemonProcess]
WriteConfig = Callable[[str], Path]


class FileServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.files: dict[str, bytes] = {}
        self.cut_after: dict[str, list[int]] = {}  # name -> bytes after which each next response stops
        self.ignore_range = False
        self.chunk_delay_seconds = 0.0
        self.pings = 0
        self.requests: list[tuple[str, str | None, int]] = []  # (path, Range header, status)
        self.lock = threading.Lock()

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def served(self, name: str) -> list[tuple[str | None, int]]:
        with self.lock:
            return [(r, s) for p, r, s in self.requests if p == f"/{name}"]


class _Handler(BaseHTTPRequestHandler):
    server: FileServer

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        srv = self.server
        name = self.path.lstrip("/")
        if name == "keep_alive":
            with srv.lock:
                srv.pings += 1
            self._reply(200, b"{}", {})
            return
        data = srv.files.get(name)
        header = self.headers.get("Range")
        if data is None:
            self._log(header, 404)
            self._reply(404, b"not found", {})
            return
        start = 0
        if header and not srv.ignore_range:
            start = int(header.removeprefix("bytes=").split("-")[0])
        status = 206 if start else 200
        self._log(header, status)
        body = data[start:]
        extra = {"Content-Range": f"bytes {start}-{len(data) - 1}/{len(data)}"} if start else {}
        with srv.lock:
            cuts = srv.cut_after.get(name) or []
            cut = cuts.pop(0) if cuts else None
        self._reply(status, body, extra, cut)

    def _log(self, header: str | None, status: int) -> None:
        with self.server.lock:
            self.server.requests.append((self.path, header, status))

    def _reply(self, status: int, body: bytes, headers: dict[str, str], cut: int | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        limit = len(body) if cut is None else min(cut, len(body))
        for offset in range(0, limit, 65536):
            self.wfile.write(body[offset : min(offset + 65536, limit)])
            if self.server.chunk_delay_seconds:
                time.sleep(self.server.chunk_delay_seconds)  # a slow server's pacing: not synchronisation
        if cut is not None:
            self.close_connection = True


@pytest.fixture
def server() -> Iterator[FileServer]:
    srv = FileServer()
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()
    thread.join(timeout=10)


def fetch_config(write_config: WriteConfig, server: FileServer, interval: str = "0.2s") -> Path:
    return write_config(f"""\
        spool: {{spool}}
        queues:
          requests:
            items: requests
            settle: 0s
            retry: {{attempts: 1, delays: [0s]}}
            chain:
              - fetch:
                  into: chapters
                  keepalive: {{url: '{server.base}/keep_alive', interval: {interval}}}
                  timeout: 5s
          chapters:
            settle: 0s
            chain:
              - checksum: {{algorithms: [sha256]}}
              - ship: {{to: 'file://{{tmp}}/shipped/{{session}}/{{name}}', delete_source: true}}
        """)


def drop_request(spool: Path, name: str, request: dict[str, Any]) -> None:
    inbox = spool / "requests" / "inbox"
    temp = inbox / f".{name}.tmp"
    temp.write_text(json.dumps(request))
    temp.rename(inbox / name)


def entry(server: FileServer, name: str, data: bytes, **extra: Any) -> dict[str, Any]:
    server.files[name] = data
    return {"url": f"{server.base}/{name}", **extra}


def test_each_file_becomes_a_chapter_item_with_the_request_fields(
    write_config: WriteConfig, spool: Path, tmp_path: Path, daemon: Start, server: FileServer
) -> None:
    chapters = {"GX010042.MP4": os.urandom(300_000), "GX020042.MP4": os.urandom(50_000)}
    files = [entry(server, n, d, size=len(d), sha256=hashlib.sha256(d).hexdigest()) for n, d in chapters.items()]
    daemon(fetch_config(write_config, server))
    drop_request(spool, "session42.fetch.json", {"files": files, "fields": {"session": "s42"}})
    doc = wait_for(sidecar_state(spool, "requests", "session42", "done"), 30, "request done")
    result = doc["steps"][0]["result"]
    assert sorted(result["items"]) == sorted(chapters)
    for name, data in chapters.items():
        chapter = wait_for(sidecar_state(spool, "chapters", name, "done"), 30, f"{name} shipped")
        assert chapter["fields"]["session"] == "s42"
        assert (tmp_path / "shipped" / "s42" / name).read_bytes() == data
    assert not list((spool / "requests").glob("*/session42/*.MP4")), "the request keeps no copy of the chapters"


def test_urls_shorthand_names_files_after_the_url(write_config: WriteConfig, spool: Path, tmp_path: Path,
                                                  daemon: Start, server: FileServer) -> None:  # fmt: skip
    url = entry(server, "clip.mp4", b"c" * 1000)["url"]
    daemon(fetch_config(write_config, server))
    drop_request(spool, "s1.fetch.json", {"urls": [url], "fields": {"session": "one"}})
    wait_for(sidecar_state(spool, "chapters", "clip.mp4", "done"), 30, "chapter shipped")
    assert (tmp_path / "shipped" / "one" / "clip.mp4").read_bytes() == b"c" * 1000


def test_download_resumes_with_range_after_a_cut(write_config: WriteConfig, spool: Path, tmp_path: Path,
                                                 daemon: Start, server: FileServer) -> None:  # fmt: skip
    data = os.urandom(2_000_000)
    files = [entry(server, "long.mp4", data, sha256=hashlib.sha256(data).hexdigest())]
    server.cut_after["long.mp4"] = [700_000, 500_000]  # bytes into each response
    daemon(fetch_config(write_config, server))
    drop_request(spool, "cut.fetch.json", {"files": files, "fields": {"session": "cut"}})
    wait_for(sidecar_state(spool, "chapters", "long.mp4", "done"), 30, "chapter shipped")
    assert server.served("long.mp4") == [(None, 200), ("bytes=700000-", 206), ("bytes=1200000-", 206)]
    assert (tmp_path / "shipped" / "cut" / "long.mp4").read_bytes() == data


def test_server_ignoring_range_restarts_from_zero(write_config: WriteConfig, spool: Path, tmp_path: Path,
                                                  daemon: Start, server: FileServer) -> None:  # fmt: skip
    data = os.urandom(1_000_000)
    files = [entry(server, "whole.mp4", data, size=len(data))]
    server.cut_after["whole.mp4"] = [400_000]
    server.ignore_range = True
    daemon(fetch_config(write_config, server))
    drop_request(spool, "norange.fetch.json", {"files": files, "fields": {"session": "nr"}})
    wait_for(sidecar_state(spool, "chapters", "whole.mp4", "done"), 30, "chapter shipped")
    assert server.served("whole.mp4") == [(None, 200), ("bytes=400000-", 200)]
    assert (tmp_path / "shipped" / "nr" / "whole.mp4").read_bytes() == data


def test_sha256_mismatch_fails_the_request(write_config: WriteConfig, spool: Path, daemon: Start,
                                           server: FileServer) -> None:  # fmt: skip
    files = [entry(server, "bad.mp4", b"x" * 5000, sha256="0" * 64)]
    daemon(fetch_config(write_config, server))
    drop_request(spool, "bad.fetch.json", {"files": files, "fields": {"session": "b"}})
    doc = wait_for(sidecar_state(spool, "requests", "bad", "failed"), 30, "request failed")
    assert doc["error"]["type"] == "checksum_mismatch"
    assert "bad.mp4" in doc["error"]["message"]
    assert read_sidecar(spool, "chapters", "bad.mp4") is None, "a mismatched file never becomes an item"


def test_404_fails_only_that_file(write_config: WriteConfig, spool: Path, tmp_path: Path, daemon: Start,
                                  server: FileServer) -> None:  # fmt: skip
    first, last = os.urandom(10_000), os.urandom(20_000)
    files = [entry(server, "a.mp4", first), {"url": f"{server.base}/gone.mp4"}, entry(server, "c.mp4", last)]
    daemon(fetch_config(write_config, server))
    drop_request(spool, "partial.fetch.json", {"files": files, "fields": {"session": "p"}})
    doc = wait_for(sidecar_state(spool, "requests", "partial", "failed"), 30, "request failed")
    assert doc["error"]["retryable"] is False
    assert "gone.mp4" in doc["error"]["message"]
    assert "a.mp4" not in doc["error"]["message"]
    wait_for(sidecar_state(spool, "chapters", "c.mp4", "done"), 30, "the file after the missing one")
    assert (tmp_path / "shipped" / "p" / "a.mp4").read_bytes() == first
    assert (tmp_path / "shipped" / "p" / "c.mp4").read_bytes() == last


def test_keepalive_pings_while_downloading(write_config: WriteConfig, spool: Path, daemon: Start,
                                           server: FileServer) -> None:  # fmt: skip
    files = [entry(server, "slow.mp4", os.urandom(20 * 65536))]
    server.chunk_delay_seconds = 0.05  # about one second in all
    daemon(fetch_config(write_config, server, interval="0.2s"))
    drop_request(spool, "slow.fetch.json", {"files": files, "fields": {"session": "k"}})
    doc = wait_for(sidecar_state(spool, "requests", "slow", "done"), 30, "request done")
    assert server.pings >= 3, f"only {server.pings} keep-alive pings during a one-second download"
    assert doc["steps"][0]["result"]["keepalive_pings"] == server.pings
    pings_at_end = server.pings
    time.sleep(0.5)  # not synchronisation: checking that nothing more happens once the step is over
    assert server.pings == pings_at_end, "keep-alive pings continue after the download"


def test_restart_resumes_the_download(write_config: WriteConfig, spool: Path, tmp_path: Path, daemon: Start,
                                      server: FileServer) -> None:  # fmt: skip
    data = os.urandom(30 * 65536)
    files = [entry(server, "big.mp4", data, size=len(data))]
    server.chunk_delay_seconds = 0.05
    config = fetch_config(write_config, server)
    first = daemon(config)
    drop_request(spool, "again.fetch.json", {"files": files, "fields": {"session": "r"}})
    part = spool / "requests" / "work" / "again" / ".big.mp4.part"
    wait_for(lambda: part.exists() and part.stat().st_size >= 4 * 65536, 30, "part of the download on disk")
    first.kill()
    server.chunk_delay_seconds = 0.0
    daemon(config)
    wait_for(sidecar_state(spool, "chapters", "big.mp4", "done"), 30, "chapter shipped after the restart")
    ranges = server.served("big.mp4")
    assert len(ranges) == 2 and ranges[1][1] == 206, ranges
    assert int(str(ranges[1][0]).removeprefix("bytes=").rstrip("-")) >= 4 * 65536
    assert (tmp_path / "shipped" / "r" / "big.mp4").read_bytes() == data
