"""Progress tells the truth: a fetch request's totals come from the request or the server, else they are null.

Field note 001: a GoPro request without `size` showed `100.0% ... eta 0s` from the
first byte to the last. Here a local HTTP server answers with Content-Length (or
with chunked encoding, no length at all) and `rate:` keeps the fetch slow enough
to read its sidecar mid-transfer.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import DaemonProcess, read_sidecar, sidecar_state, wait_for

Start = Callable[..., DaemonProcess]
WriteConfig = Callable[[str], Path]
MiB = 1 << 20


class Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.files: dict[str, bytes] = {}
        self.is_chunked = False

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(BaseHTTPRequestHandler):
    server: Server
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        data = self.server.files.get(self.path.lstrip("/"))
        if data is None:
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        start = int(self.headers["Range"].removeprefix("bytes=").split("-")[0]) if self.headers["Range"] else 0
        self.send_response(206 if start else 200)
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        if self.server.is_chunked:
            self.send_header("Transfer-Encoding", "chunked")
        else:
            self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        try:
            for offset in range(start, len(data), 65536):
                block = data[offset : offset + 65536]
                if self.server.is_chunked:
                    self.wfile.write(f"{len(block):x}\r\n".encode() + block + b"\r\n")
                else:
                    self.wfile.write(block)
            if self.server.is_chunked:
                self.wfile.write(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass  # the daemon stopped mid-file


@pytest.fixture
def server() -> Iterator[Server]:
    srv = Server()
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()
    thread.join(timeout=10)


def start(write_config: WriteConfig, daemon: Start) -> None:
    daemon(write_config("""\
        spool: {spool}
        queues:
          requests:
            items: requests
            settle: 0s
            retry: {attempts: 1, delays: [0s]}
            chain:
              - fetch: {into: chapters, timeout: 5s, rate: 1MiB/s}
          chapters:
            settle: 0s
            chain:
              - ship: {to: 'file://{tmp}/shipped/', delete_source: true}
        """))


def drop_request(spool: Path, name: str, request: dict[str, Any]) -> None:
    inbox = spool / "requests" / "inbox"
    (inbox / f".{name}.tmp").write_text(json.dumps(request))
    (inbox / f".{name}.tmp").rename(inbox / name)


def watch(spool: Path, item: str) -> list[dict[str, Any]]:
    """Every distinct progress the request's sidecar shows until it is done."""
    seen: list[dict[str, Any]] = []

    def done() -> bool:
        doc = read_sidecar(spool, "requests", item)
        if doc and doc.get("steps") and (progress := doc["steps"][0].get("progress")) and progress not in seen:
            seen.append(progress)
        return bool(doc and doc["state"] in ("done", "failed"))

    wait_for(done, 60, f"{item} finished")
    assert read_sidecar(spool, "requests", item)["state"] == "done"  # type: ignore[index]
    return seen


def mid_transfer(seen: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [p for p in seen if p["bytes_done"] > 0 and p.get("files_done", 0) < p["files_total"]]


def test_a_size_the_request_leaves_out_comes_from_content_length(
    write_config: WriteConfig, spool: Path, tmp_path: Path, daemon: Start, server: Server
) -> None:
    data = os.urandom(3 * MiB)
    server.files["GX010038.MP4"] = data
    start(write_config, daemon)
    drop_request(spool, "s1.fetch.json", {"urls": [f"{server.base}/GX010038.MP4"]})
    seen = mid_transfer(watch(spool, "s1"))
    assert seen, "the sidecar showed the download under way"
    for progress in seen:
        assert progress["bytes_total"] == len(data)
        assert progress["file"] == "GX010038.MP4" and progress["files_total"] == 1
    assert any(p.get("eta_s") for p in seen), "an ETA once the rate is known"
    wait_for(sidecar_state(spool, "chapters", "GX010038.MP4", "done"), 30, "chapter shipped")
    assert (tmp_path / "shipped" / "GX010038.MP4").read_bytes() == data


def test_without_any_length_the_total_is_null(write_config: WriteConfig, spool: Path, daemon: Start,
                                              server: Server) -> None:  # fmt: skip
    server.files["live.mp4"] = os.urandom(3 * MiB)
    server.is_chunked = True
    start(write_config, daemon)
    drop_request(spool, "s2.fetch.json", {"urls": [f"{server.base}/live.mp4"]})
    seen = mid_transfer(watch(spool, "s2"))
    assert seen
    for progress in seen:
        assert progress["bytes_total"] is None and progress["eta_s"] is None
        assert progress["bytes_done"] <= 3 * MiB
    assert any(p.get("rate_bps") for p in seen), "the rate is still shown"


def test_a_request_of_three_files_says_which_file_and_counts_the_whole_request(
    write_config: WriteConfig, spool: Path, tmp_path: Path, daemon: Start, server: Server
) -> None:
    names = ["GX010040.MP4", "GX020040.MP4", "GX030040.MP4"]
    sizes = [2 * MiB, MiB, 2 * MiB]
    for name, size in zip(names, sizes, strict=True):
        server.files[name] = os.urandom(size)
    start(write_config, daemon)
    # The second file's size is in the request; the others' only in the server's headers.
    files = [{"url": f"{server.base}/{names[0]}"}, {"url": f"{server.base}/{names[1]}", "size": sizes[1]},
             {"url": f"{server.base}/{names[2]}"}]  # fmt: skip
    drop_request(spool, "s3.fetch.json", {"files": files})
    seen = mid_transfer(watch(spool, "s3"))
    by_file = {name: [p for p in seen if p["file"] == name] for name in names}
    assert all(by_file.values()), f"each file was seen under way: {seen}"
    for index, name in enumerate(names):
        for progress in by_file[name]:
            assert progress["files_total"] == 3
            assert progress["files_done"] == index
            assert sum(sizes[:index]) <= progress["bytes_done"] <= sum(sizes[: index + 1])
            # Until the last file's headers arrive, nobody knows the whole request's size.
            assert progress["bytes_total"] == (sum(sizes) if index == 2 else None)
    for name in names:
        wait_for(sidecar_state(spool, "chapters", name, "done"), 30, f"{name} shipped")
        assert (tmp_path / "shipped" / name).read_bytes() == server.files[name]
