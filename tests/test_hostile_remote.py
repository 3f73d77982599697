"""Remote servers are untrusted (SPEC section 10): lying SFTP listings for `pull` and `wait`, lying HTTP for `fetch`.

Each case runs the real daemon against a hostile server on loopback and checks that the item fails with a reason
naming the bad entry (or lands without it), that nothing outside the landing folder is created or changed (canary
files at the very paths the names point to keep their content and mtime), and that the daemon and its other
queues go on working. pull has no s3:// source today, so there is no S3 listing case.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import paramiko
import pytest

from spoold.errors import PermanentError
from spoold.transports.local import check_component, part_name
from spoold.transports.sftp_tree import Landing
from tests.conftest import DaemonProcess, read_sidecar, sidecar_state, wait_for
from tests.evil_servers import CONTENT, EvilSftpServer, EvilTree, folder, regular, symlink

Start = Callable[..., DaemonProcess]
WriteConfig = Callable[..., Path]
SKIP_TOP = {"spool", "landing", "good"}


@pytest.fixture(scope="module")
def host_key() -> paramiko.PKey:
    return paramiko.RSAKey.generate(2048)


@pytest.fixture
def evil(host_key: paramiko.PKey) -> Iterator[EvilSftpServer]:
    server = EvilSftpServer(host_key, EvilTree())
    try:
        yield server
    finally:
        server.close()


def snapshot(root: Path) -> dict[str, tuple[int, int, str]]:
    """Every path under `root` outside the spool and the landing folders: (mtime_ns, size, link target)."""
    seen = {}
    for top, dirs, files in os.walk(root):
        relative_top = Path(top).relative_to(root)
        if relative_top == Path("."):
            dirs[:] = [d for d in dirs if d not in SKIP_TOP]
        for name in dirs + files:
            path = Path(top) / name
            if path.parent == root and name.endswith(".log"):
                continue  # the daemon's own log
            info = path.lstat()
            seen[str(relative_top / name)] = (info.st_mtime_ns, info.st_size,
                                              os.readlink(path) if path.is_symlink() else "")  # fmt: skip
    return seen


def plant_canaries(tmp_path: Path) -> dict[Path, tuple[bytes, int]]:
    """Files exactly where the hostile names point, so a write through them would change one."""
    canaries = {tmp_path / "escape": b"canary 1\n", tmp_path / "abs" / "escape": b"canary 2\n",
                tmp_path / "outside" / "ok.txt": b"canary 3\n"}  # fmt: skip
    for path, data in canaries.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        os.utime(path, ns=(1_000_000_000_000_000_000, 1_000_000_000_000_000_000))
    return {p: (d, p.stat().st_mtime_ns) for p, d in canaries.items()}


def assert_canaries(canaries: dict[Path, tuple[bytes, int]]) -> None:
    for path, (data, mtime) in canaries.items():
        assert path.read_bytes() == data and path.stat().st_mtime_ns == mtime, f"{path} was changed"


def drop(spool: Path, queue: str, name: str, request: dict[str, Any]) -> None:
    inbox = spool / queue / "inbox"
    (inbox / f".{name}.tmp").write_text(json.dumps(request))
    os.rename(inbox / f".{name}.tmp", inbox / name)


def pull_config(write_config: WriteConfig, evil: EvilSftpServer, tmp_path: Path, **extra: Any) -> Path:
    connection = evil.write_client_files(tmp_path / "client")
    hostile = {"from": evil.url("/cases/{case}/"), "to": f"file://{tmp_path}/landing/", **connection, **extra}
    good = {"from": evil.url("/fine/"), "to": f"file://{tmp_path}/good/", **connection}
    waits = {"path": evil.url("/jobs/*/model"), "interval": "0.1s", "timeout": "20s", **connection}
    queue = {"items": "requests", "settle": "0s", "retry": {"attempts": 1, "delays": ["0s"]}}
    return write_config(json.dumps({"spool": "{spool}", "queues": {
        "hostile": {**queue, "chain": [{"pull": hostile}]},
        "good": {**queue, "chain": [{"pull": good}]},
        "waits": {**queue, "chain": [{"wait": waits}]},
    }}))  # fmt: skip


def nested(tree: EvilTree, root: str, levels: int) -> None:
    path = root
    for _ in range(levels):
        tree.add(path, [folder("d")])
        path += "/d"
    tree.add(path, [regular("bottom.txt")])


# case -> (listing builder, expected state, what the error message must say)
def _cases(tmp_path: Path) -> dict[str, tuple[Callable[[EvilTree], None], str, list[str]]]:
    case = "/cases/"
    return {
        "dotdot": (lambda t: t.add(case + "dotdot", [regular("ok.txt"), regular("../../escape")]),
                   "failed", ["'../../escape'", "holds a /"]),
        "absolute": (lambda t: t.add(case + "absolute", [regular(f"{tmp_path}/abs/escape")]),
                     "failed", [f"'{tmp_path}/abs/escape'"]),
        "slash": (lambda t: t.add(case + "slash", [regular("a/b")]), "failed", ["'a/b'"]),
        # paramiko (like OpenSSH's sftp) drops `.` and `..` from every listing: they are never pulled
        "dots": (lambda t: t.add(case + "dots", [folder("."), folder(".."), regular("ok.txt")]), "done", []),
        "nul": (lambda t: t.add(case + "nul", [regular("bad\x00name")]), "failed", ["bad\\x00name", "NUL"]),
        "long": (lambda t: t.add(case + "long", [regular("x" * 300)]), "failed", ["'xxxxxx", "300 bytes long"]),
        "not_utf8": (lambda t: t.add(case + "not_utf8", [regular(b"caf\xe9")]), "failed", ["not UTF-8"]),
        "symlink": (lambda t: t.add(case + "symlink", [regular("ok.txt"), symlink("passwd")]),
                    "failed", ["passwd", "is a symlink", "never followed"]),
        "deep": (lambda t: nested(t, case + "deep", 40), "failed", ["more than 32 levels"]),
        "nested_escape": (lambda t: (t.add(case + "nested_escape", [folder("sub")]),
                                     t.add(case + "nested_escape/sub", [regular("../../../escape")])),
                          "failed", ["'../../../escape'"]),
        # A size that would have paramiko plan 2**50 / 255 KiB read requests up front.
        "size_lie": (lambda t: t.add(case + "size_lie", [regular("huge.bin", size=2**50)]),
                     "failed", [f"ended at {len(CONTENT)} of {2**50} bytes"]),
    }  # fmt: skip


CASES = ["dotdot", "absolute", "slash", "dots", "nul", "long", "not_utf8", "symlink", "deep", "nested_escape",
         "size_lie"]  # fmt: skip


def check_daemon_goes_on(spool: Path, tmp_path: Path, evil: EvilSftpServer, run: DaemonProcess) -> None:
    """Another queue pulls a good tree from the same server, and the daemon is still up."""
    drop(spool, "good", "after.json", {})
    wait_for(sidecar_state(spool, "good", "after", "done"), 30, "the other queue's pull")
    assert (tmp_path / "good" / "fine" / "ok.txt").read_bytes() == CONTENT
    assert run.process.poll() is None, run.log()


@pytest.mark.parametrize("case", CASES)
def test_pull_refuses_a_hostile_listing(case: str, evil: EvilSftpServer, tmp_path: Path, spool: Path,
                                        daemon: Start, write_config: WriteConfig) -> None:  # fmt: skip
    build, state, says = _cases(tmp_path)[case]
    build(evil.tree)
    evil.tree.add("/fine", [regular("ok.txt")])
    canaries = plant_canaries(tmp_path)
    run = daemon(pull_config(write_config, evil, tmp_path))
    before = snapshot(tmp_path)
    drop(spool, "hostile", f"{case}.json", {"case": case})
    doc = wait_for(sidecar_state(spool, "hostile", case, state), 30, f"{case}: {state}")
    if state == "failed":
        assert doc["error"]["retryable"] is (case == "size_lie"), doc["error"]
        for fragment in says:
            assert fragment in doc["error"]["message"], doc["error"]["message"]
        if case != "size_lie":
            assert evil.tree.opened == [], "a file was fetched before the whole listing was checked"
            assert not any(p.is_file() for p in (tmp_path / "landing").rglob("*")), "something landed"
    else:
        landed = tmp_path / "landing" / case
        assert sorted(p.name for p in landed.iterdir()) == ["ok.txt"]
        assert (landed / "ok.txt").read_bytes() == CONTENT
    assert not any(p.endswith("passwd") for p in evil.tree.opened), "a symlink entry was fetched"
    assert snapshot(tmp_path) == before, "something outside the landing folder changed"
    assert_canaries(canaries)
    check_daemon_goes_on(spool, tmp_path, evil, run)


def test_pull_refuses_more_files_than_the_limit(evil: EvilSftpServer, tmp_path: Path, spool: Path, daemon: Start,
                                                write_config: WriteConfig) -> None:  # fmt: skip
    evil.tree.add("/cases/many", [regular(f"f{i:03d}") for i in range(30)])
    evil.tree.add("/fine", [regular("ok.txt")])
    run = daemon(pull_config(write_config, evil, tmp_path, limits={"files": 20, "depth": 4}))
    drop(spool, "hostile", "many.json", {"case": "many"})
    doc = wait_for(sidecar_state(spool, "hostile", "many", "failed"), 30, "refused")
    assert "more than 20 files and folders" in doc["error"]["message"]
    assert evil.tree.opened == []
    check_daemon_goes_on(spool, tmp_path, evil, run)


@pytest.mark.parametrize("where", ["partial", "target"])
def test_pull_never_writes_through_a_planted_symlink(where: str, evil: EvilSftpServer, tmp_path: Path, spool: Path,
                                                     daemon: Start, write_config: WriteConfig) -> None:  # fmt: skip
    """Someone who may write the landing folder points the partial download, or the target, somewhere else."""
    evil.tree.add("/cases/planted", [regular("ok.txt")])
    evil.tree.add("/fine", [regular("ok.txt")])
    canaries = plant_canaries(tmp_path)
    landing = tmp_path / "landing"
    landing.mkdir()
    name = part_name("planted", ".spoold.part") if where == "partial" else "planted"
    (landing / name).symlink_to(tmp_path / "outside", target_is_directory=True)
    run = daemon(pull_config(write_config, evil, tmp_path))
    before = snapshot(tmp_path)
    drop(spool, "hostile", "planted.json", {"case": "planted"})
    doc = wait_for(sidecar_state(spool, "hostile", "planted", "failed"), 30, "refused")
    assert "never followed" in doc["error"]["message"] and doc["error"]["retryable"] is False, doc["error"]
    assert (landing / name).is_symlink(), "the link itself is left alone"
    assert sorted(p.name for p in (tmp_path / "outside").iterdir()) == ["ok.txt"]
    assert snapshot(tmp_path) == before
    assert_canaries(canaries)
    check_daemon_goes_on(spool, tmp_path, evil, run)


def test_wait_refuses_a_hostile_match(evil: EvilSftpServer, tmp_path: Path, spool: Path, daemon: Start,
                                      write_config: WriteConfig) -> None:  # fmt: skip
    evil.tree.add("/jobs", [folder("../../etc"), folder("ok")])
    evil.tree.add("/jobs/ok", [regular("model")])
    evil.tree.add("/fine", [regular("ok.txt")])
    run = daemon(pull_config(write_config, evil, tmp_path))
    drop(spool, "waits", "w.json", {})
    doc = wait_for(sidecar_state(spool, "waits", "w", "failed"), 30, "refused")
    assert "'../../etc'" in doc["error"]["message"] and doc["error"]["retryable"] is False
    assert "found" not in doc["fields"]
    check_daemon_goes_on(spool, tmp_path, evil, run)


def test_wait_bounds_a_far_sidecar(tmp_path: Path, spool: Path, daemon: Start, write_config: WriteConfig) -> None:
    far = tmp_path / "far"
    far.mkdir()
    (far / "big.json").write_text(json.dumps({"state": "running", "pad": "x" * (2 << 20)}))
    chain = [{"wait": {"sidecar": f"file://{far}/{{name}}.json", "interval": "0.1s", "timeout": "20s"}}]
    run = daemon(write_config(json.dumps({"spool": "{spool}", "queues": {
        "follow": {"items": "requests", "settle": "0s", "chain": chain}}})))  # fmt: skip
    drop(spool, "follow", "big.json", {})
    doc = wait_for(sidecar_state(spool, "follow", "big", "failed"), 30, "refused")
    assert "larger than 1048576 bytes" in doc["error"]["message"]
    assert run.process.poll() is None


@pytest.mark.parametrize("kind", ["symlink", "deep"])
def test_pull_from_a_local_folder_is_checked_too(kind: str, tmp_path: Path, spool: Path, daemon: Start,
                                                 write_config: WriteConfig) -> None:  # fmt: skip
    canaries = plant_canaries(tmp_path)
    source = tmp_path / "source" / "run"
    source.mkdir(parents=True)
    (source / "ok.txt").write_text("ok")
    if kind == "symlink":
        (source / "secret").symlink_to(tmp_path / "escape")
    else:
        (source / "/".join(["d"] * 3)).mkdir(parents=True)
    step = {"from": f"file://{source}/", "to": f"file://{tmp_path}/landing/", "limits": {"depth": 2}}
    run = daemon(write_config(json.dumps({"spool": "{spool}", "queues": {
        "local": {"items": "requests", "settle": "0s", "chain": [{"pull": step}]}}})))  # fmt: skip
    drop(spool, "local", "l.json", {})
    doc = wait_for(sidecar_state(spool, "local", "l", "failed"), 30, "refused")
    assert ("is a symlink" if kind == "symlink" else "more than 2 levels") in doc["error"]["message"], doc["error"]
    assert not (tmp_path / "landing").exists() or not any((tmp_path / "landing").rglob("secret"))
    assert_canaries(canaries)
    assert run.process.poll() is None


def test_landing_replaces_an_earlier_pull_whole(tmp_path: Path) -> None:
    for content in (b"first", b"second"):
        with Landing(tmp_path / "landing") as landing:
            writer, offset = landing.open_file([".run.spoold.part", "sub", "f.bin"])
            with writer:
                assert offset == 0
                writer.write(content)
            landing.publish(".run.spoold.part", "run")
    assert sorted(p.name for p in (tmp_path / "landing").iterdir()) == ["run"]
    assert (tmp_path / "landing" / "run" / "sub" / "f.bin").read_bytes() == b"second"


def test_names_are_single_components() -> None:
    for good in ["a", "model.safetensors", ".hidden", "x" * 255, "é" * 127]:
        assert check_component(good, "test") == good
    for bad in ["", ".", "..", "a/b", "/abs", "a\x00b", "x" * 256, "é" * 128]:
        with pytest.raises(PermanentError):
            check_component(bad, "test")
    assert len(part_name("x" * 250, ".spoold.part").encode()) <= 255


# -- fetch against a hostile HTTP server ---------------------------------------------------------


class EvilHttp(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, host: str) -> None:
        super().__init__((host, 0), _EvilHandler)
        self.host = host
        self.paths: list[str] = []
        self.pings = 0
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.other_port = 0

    @property
    def base(self) -> str:
        return f"http://{self.host}:{self.server_address[1]}"


class _EvilHandler(BaseHTTPRequestHandler):
    server: EvilHttp

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        srv = self.server
        with srv.lock:
            srv.paths.append(self.path)
        route = self.path.split("?")[0]
        if route == "/clip.mp4":
            self._send(200, b"clip body", {"Content-Disposition": 'attachment; filename="../../escape"'})
        elif route == "/redirect-away":
            self._send(302, b"", {"Location": f"http://127.0.0.2:{srv.other_port}/away.bin"})
        elif route == "/redirect-here":
            self._send(301, b"", {"Location": "/here.bin"})
        elif route == "/redirect-file":
            self._send(302, b"", {"Location": "file:///etc/passwd"})
        elif route in ("/here.bin", "/away.bin"):
            self._send(200, f"body of {route}".encode(), {})
        elif route == "/liar.bin":
            self._send(200, b"y" * 1000, {"Content-Length": str(10**12)})
        elif route == "/too-long.bin":
            self._send(200, b"z" * 50_000, {})
        elif route == "/slow.bin":
            self._send(200, b"s" * (20 * 8192), {}, pace=True)
        elif route == "/endless":
            with srv.lock:
                srv.pings += 1
            self._endless()
        else:
            self._send(404, b"no", {})

    def _send(self, status: int, body: bytes, headers: dict[str, str], pace: bool = False) -> None:
        self.send_response(status)
        headers.setdefault("Content-Length", str(len(body)))
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        for offset in range(0, len(body), 8192):
            self.wfile.write(body[offset : offset + 8192])
            if pace:
                self.server.stopping.wait(0.05)  # pacing the body, not synchronising the test
        self.close_connection = True

    def _endless(self) -> None:
        """A JSON-ish status reply that never ends (chunked), until the client hangs up."""
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        chunk = b"[" * 65536
        try:
            while not self.server.stopping.is_set():
                self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        except OSError:
            pass
        self.close_connection = True


def serve(host: str) -> Iterator[EvilHttp]:
    srv = EvilHttp(host)
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield srv
    finally:
        srv.stopping.set()
        srv.shutdown()
        srv.server_close()
        thread.join(timeout=10)


@pytest.fixture
def http_here() -> Iterator[EvilHttp]:
    yield from serve("127.0.0.1")


@pytest.fixture
def http_away(http_here: EvilHttp) -> Iterator[EvilHttp]:
    """The other host a redirect points at: 127.0.0.2 is loopback too on Linux."""
    for srv in serve("127.0.0.2"):
        http_here.other_port = srv.server_address[1]
        yield srv


def fetch_config(write_config: WriteConfig, here: EvilHttp) -> Path:
    queue = {"items": "requests", "settle": "0s", "retry": {"attempts": 1, "delays": ["0s"]}}
    step = {"into": "chapters", "timeout": "5s", "retries": 1}
    return write_config(json.dumps({"spool": "{spool}", "queues": {
        "requests": {**queue, "chain": [{"fetch": step}]},
        "allowed": {**queue, "chain": [{"fetch": {**step, "allow_redirects_to": ["127.0.0.2"]}}]},
        "pinged": {**queue, "chain": [{"fetch": {**step, "keepalive": {"url": f"{here.base}/endless",
                                                                         "interval": "0.1s"}}}]},
        "chapters": {"settle": "0s", "chain": [{"checksum": {}}]},
    }}))  # fmt: skip


def fetched(spool: Path, name: str) -> bytes:
    wait_for(sidecar_state(spool, "chapters", name, "done"), 30, f"{name} fetched")
    done = spool / "chapters" / "done" / name
    return (done / name if done.is_dir() else done).read_bytes()


def check_fetch_goes_on(spool: Path, here: EvilHttp, run: DaemonProcess) -> None:
    drop(spool, "requests", "after.fetch.json", {"urls": [f"{here.base}/here.bin"]})
    assert fetched(spool, "here.bin") == b"body of /here.bin"
    assert run.process.poll() is None, run.log()


def test_fetch_ignores_content_disposition(http_here: EvilHttp, tmp_path: Path, spool: Path, daemon: Start,
                                           write_config: WriteConfig) -> None:  # fmt: skip
    canaries = plant_canaries(tmp_path)
    run = daemon(fetch_config(write_config, http_here))
    before = snapshot(tmp_path)
    drop(spool, "requests", "cd.fetch.json", {"urls": [f"{http_here.base}/clip.mp4"]})
    assert fetched(spool, "clip.mp4") == b"clip body"
    assert wait_for(sidecar_state(spool, "requests", "cd", "done"), 30, "request done")
    assert not list(spool.rglob("escape"))
    assert snapshot(tmp_path) == before
    assert_canaries(canaries)
    assert run.process.poll() is None


@pytest.mark.parametrize("segment", ["..%2F..%2Fescape", "%2E%2E", "bad%00name", "x" * 300])
def test_fetch_refuses_a_hostile_url_name(segment: str, http_here: EvilHttp, tmp_path: Path, spool: Path,
                                          daemon: Start, write_config: WriteConfig) -> None:  # fmt: skip
    canaries = plant_canaries(tmp_path)
    run = daemon(fetch_config(write_config, http_here))
    drop(spool, "requests", "bad.fetch.json", {"urls": [f"{http_here.base}/{segment}"]})
    doc = wait_for(sidecar_state(spool, "requests", "bad", "failed"), 30, "refused")
    assert doc["error"]["retryable"] is False and "files[0]" in doc["error"]["message"], doc["error"]
    assert http_here.paths == [], "nothing is requested for a request that names a bad file"
    assert_canaries(canaries)
    check_fetch_goes_on(spool, http_here, run)


def test_redirect_to_another_host_needs_allowing(http_here: EvilHttp, http_away: EvilHttp, spool: Path,
                                                 daemon: Start, write_config: WriteConfig) -> None:  # fmt: skip
    run = daemon(fetch_config(write_config, http_here))
    drop(spool, "requests", "away.fetch.json", {"files": [{"url": f"{http_here.base}/redirect-away",
                                                           "name": "away.bin"}]})  # fmt: skip
    doc = wait_for(sidecar_state(spool, "requests", "away", "failed"), 30, "refused")
    message = doc["error"]["message"]
    assert "127.0.0.2" in message and "allow_redirects_to" in message and doc["error"]["retryable"] is False
    assert http_away.paths == [], "the other host was contacted"
    drop(spool, "requests", "file.fetch.json", {"files": [{"url": f"{http_here.base}/redirect-file",
                                                           "name": "passwd"}]})  # fmt: skip
    doc = wait_for(sidecar_state(spool, "requests", "file", "failed"), 30, "refused")
    assert "only http:// and https:// redirects" in doc["error"]["message"]
    drop(spool, "requests", "same.fetch.json", {"urls": [f"{http_here.base}/redirect-here"]})
    assert fetched(spool, "redirect-here") == b"body of /here.bin"
    drop(spool, "allowed", "ok.fetch.json", {"files": [{"url": f"{http_here.base}/redirect-away",
                                                        "name": "away.bin"}]})  # fmt: skip
    assert fetched(spool, "away.bin") == b"body of /away.bin"
    assert http_away.paths == ["/away.bin"]
    assert run.process.poll() is None


def test_fetch_does_not_trust_lengths(http_here: EvilHttp, spool: Path, daemon: Start,
                                      write_config: WriteConfig) -> None:  # fmt: skip
    run = daemon(fetch_config(write_config, http_here))
    drop(spool, "requests", "liar.fetch.json", {"urls": [f"{http_here.base}/liar.bin"]})
    doc = wait_for(sidecar_state(spool, "requests", "liar", "failed"), 30, "gave up")
    assert "closed early" in doc["error"]["message"], doc["error"]
    assert read_sidecar(spool, "chapters", "liar.bin") is None
    body = b"z" * 50_000
    drop(spool, "requests", "long.fetch.json", {"files": [{"url": f"{http_here.base}/too-long.bin", "size": 100,
                                                           "sha256": hashlib.sha256(body).hexdigest()}]})  # fmt: skip
    doc = wait_for(sidecar_state(spool, "requests", "long", "failed"), 30, "mismatch")
    assert "more than the 100 bytes" in doc["error"]["message"], doc["error"]
    part = spool / "requests" / "failed" / "long" / ".too-long.bin.part"
    assert not part.exists() or part.stat().st_size <= 101
    check_fetch_goes_on(spool, http_here, run)


def test_an_endless_keepalive_reply_is_bounded(http_here: EvilHttp, spool: Path, daemon: Start,
                                               write_config: WriteConfig) -> None:  # fmt: skip
    run = daemon(fetch_config(write_config, http_here))
    drop(spool, "pinged", "slow.fetch.json", {"urls": [f"{http_here.base}/slow.bin"]})
    assert fetched(spool, "slow.bin") == b"s" * (20 * 8192)
    doc = wait_for(sidecar_state(spool, "pinged", "slow", "done"), 30, "request done")
    assert http_here.pings >= 3, f"the keep-alive thread hung on its first endless reply ({http_here.pings} pings)"
    assert doc["steps"][0]["result"]["keepalive_pings"] >= 2
    check_fetch_goes_on(spool, http_here, run)
