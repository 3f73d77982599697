"""Shared fixtures: temp spools, the daemon as a real subprocess, waiting with deadlines."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.sshd import Sshd, missing_reason, start_sshd

REPO = Path(__file__).resolve().parent.parent


def wait_for(predicate: Callable[[], Any], timeout: float = 10.0, what: str = "condition", *,
             interval: float = 0.02) -> Any:  # fmt: skip
    """Poll `predicate` until it returns something truthy, or fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)  # the poll's interval, bounded by the deadline above: not synchronisation


def need_or_skip(reason: str) -> None:
    """Skip locally when an external component is missing; fail under CI, where `make test` installs it."""
    if os.environ.get("CI"):
        pytest.fail(f"required under CI: {reason}")
    pytest.skip(reason)


def read_sidecar(spool: Path, queue: str, item: str) -> dict[str, Any] | None:
    try:
        return json.loads((spool / queue / "status" / f"{item}.json").read_text())
    except (FileNotFoundError, ValueError):
        return None


def sidecar_state(spool: Path, queue: str, item: str, state: str) -> Callable[[], dict[str, Any] | None]:
    def check() -> dict[str, Any] | None:
        doc = read_sidecar(spool, queue, item)
        return doc if doc and doc.get("state") == state else None

    return check


class DaemonProcess:
    """`spoold run -c CONFIG` as a child process, with its log captured to a file."""

    def __init__(self, config: Path, log: Path, env: dict[str, str] | None = None) -> None:
        self.config = config
        self.log_path = log
        self.env = {**os.environ, **(env or {})}
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> DaemonProcess:
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "spoold", "run", "-c", str(self.config)],
            stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=self.env,
        )
        return self

    def wait_ready(self, spool: Path, timeout: float = 15.0) -> None:
        def ready() -> bool:
            assert self.process is not None
            if self.process.poll() is not None:
                raise AssertionError(f"daemon exited with {self.process.returncode}:\n{self.log()}")
            try:
                health = json.loads((spool / "health.json").read_text())
            except (FileNotFoundError, ValueError):
                return False
            return bool(health.get("ready")) and health.get("pid") == self.process.pid

        wait_for(ready, timeout, "daemon ready")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def signal(self, signum: int) -> None:
        assert self.process is not None
        self.process.send_signal(signum)

    def kill(self) -> None:
        assert self.process is not None
        self.process.kill()
        self.process.wait(timeout=10)

    def stop(self, timeout: float = 20.0) -> int:
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
        return self.process.returncode


@pytest.fixture
def write_config(tmp_path: Path) -> Callable[[str], Path]:
    """Write a YAML config (dedented; `{spool}` and `{tmp}` filled in) and return its path."""

    def write(text: str, name: str = "spoold.yaml") -> Path:
        path = tmp_path / name
        body = textwrap.dedent(text).replace("{spool}", str(tmp_path / "spool")).replace("{tmp}", str(tmp_path))
        path.write_text(body)
        return path

    return write


@pytest.fixture
def spool(tmp_path: Path) -> Path:
    return tmp_path / "spool"


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Callable[..., DaemonProcess]]:
    """Start daemons on configs; every one still running is stopped at the end of the test."""
    started: list[DaemonProcess] = []

    def start(config: Path, env: dict[str, str] | None = None, wait: bool = True) -> DaemonProcess:
        process = DaemonProcess(config, tmp_path / f"daemon{len(started)}.log", env).start()
        started.append(process)
        if wait:
            process.wait_ready(tmp_path / "spool")
        return process

    yield start
    for process in started:
        process.stop()


SCHEMAS = {"spoold.status/1": "sidecar.schema.json", "spoold.health/1": "health.schema.json"}


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "planted_sidecars: the test writes sidecars or health.json by hand; they "
                                       "are not checked against the schemas")  # fmt: skip


def written_documents(root: Path) -> Iterator[tuple[Path, dict[str, Any]]]:
    """Every `*/status/*.json` and `health.json` below `root` that says it is a sidecar or a health file."""
    for folder, _dirs, files in os.walk(root):
        is_status = os.path.basename(folder) == "status"
        for name in files:
            if not ((is_status and name.endswith(".json") and not name.startswith(".")) or name == "health.json"):
                continue
            path = Path(folder, name)
            try:
                document = json.loads(path.read_bytes())
            except (OSError, ValueError):
                continue  # planted garbage, or gone meanwhile
            if isinstance(document, dict) and document.get("schema") in SCHEMAS:
                yield path, document


@pytest.fixture(autouse=True)
def sidecars_match_the_schema(request: pytest.FixtureRequest) -> Iterator[None]:
    """At the end of each test, every sidecar and health.json spoold wrote under its tmp_path is valid."""
    yield
    tmp = request.node.funcargs.get("tmp_path") if hasattr(request.node, "funcargs") else None
    if tmp is None or request.node.get_closest_marker("planted_sidecars") or not Path(tmp).is_dir():
        return
    import jsonschema

    folder = REPO / "src" / "spoold" / "schemas"
    validators = {key: jsonschema.Draft202012Validator(json.loads((folder / file).read_text()))
                  for key, file in SCHEMAS.items()}  # fmt: skip
    problems = []
    for path, document in written_documents(Path(tmp)):
        for error in validators[document["schema"]].iter_errors(document):
            where = "/".join(str(p) for p in error.absolute_path) or "(top)"
            problems.append(f"{str(path.relative_to(tmp))!r}: {where}: {error.message[:300]!r}")
    if problems:
        pytest.fail("spoold wrote files its schema does not allow:\n  " + "\n  ".join(problems[:20]))


@pytest.fixture(autouse=True)
def no_leaked_threads() -> Iterator[None]:
    before = set(threading.enumerate())
    yield
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        leaked = [t for t in threading.enumerate() if t not in before and t.is_alive() and not t.daemon]
        if not leaked:
            return
        time.sleep(0.05)  # a poll's interval, bounded by the deadline above: not synchronisation
    pytest.fail(f"test leaked threads: {leaked}")


@pytest.fixture
def sshd(tmp_path: Path) -> Iterator[Sshd]:
    """A real OpenSSH sshd on 127.0.0.1 with its own host key and a client key (tests/sshd.py)."""
    reason = missing_reason()
    if reason:
        need_or_skip(reason)
    server = start_sshd(tmp_path / "sshd")
    yield server
    server.stop()


@pytest.fixture
def ffmpeg() -> str:
    found = shutil.which("ffmpeg")
    if found is None or shutil.which("ffprobe") is None:
        need_or_skip("ffmpeg and ffprobe are not installed (apt install ffmpeg)")
    assert found is not None
    return found


def make_frames(folder: Path, count: int = 30, size: str = "64x48", start: int = 1, noise: bool = False) -> None:
    """PNG frames made by ffmpeg; `noise` frames are slow to encode (for catching an encode mid-way)."""
    folder.mkdir(parents=True, exist_ok=True)
    source = f"nullsrc=s={size}:r=30,geq=lum='random(1)*255':cb=128:cr=128" if noise else f"testsrc=size={size}:rate=30"
    subprocess.run(["ffmpeg", "-v", "error", "-y", "-f", "lavfi", "-i", source,
                    "-frames:v", str(count), "-start_number", str(start), str(folder / "frame_%06d.png")],
                   check=True)  # fmt: skip


@pytest.fixture(scope="session")
def moto_s3_log(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where `moto_s3` logs: one werkzeug line per request (`"GET /bucket/key HTTP/1.1" 206`), for counting."""
    return tmp_path_factory.mktemp("moto") / "moto.log"


@pytest.fixture(scope="session")
def moto_s3(moto_s3_log: Path) -> Iterator[str]:
    """moto's S3 server on loopback (through tests/moto_launcher.py: conditional PUTs are atomic); its URL."""
    import importlib.util
    import socket

    if importlib.util.find_spec("moto") is None or importlib.util.find_spec("flask") is None:
        need_or_skip("moto[server] is not installed (pip install 'moto[server]')")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    log = open(moto_s3_log, "wb")  # noqa: SIM115 - closed below
    process = subprocess.Popen([sys.executable, "-m", "tests.moto_launcher", "-H", "127.0.0.1", "-p", str(port)],
                               stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                               cwd=Path(__file__).resolve().parent.parent)  # fmt: skip

    def accepts() -> bool:
        with socket.socket() as sock:
            return sock.connect_ex(("127.0.0.1", port)) == 0 or process.poll() is not None

    try:
        wait_for(accepts, 30, "moto server")
        assert process.poll() is None, "moto server exited at start"
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(timeout=10)
        log.close()

