"""Hostile intake (SPEC sections 2, 3, 10): what an unprivileged producer in the spool's group can drop.

The daemon runs as root, as in every test; the producer is a real unprivileged user (`spoold-test-prod` in
group `spoold-test-grp`), so the files it makes really are its own and the kernel, not the test, decides
what it may write. Every case ends with a restart on the same spool (stop within 10 s with exit 0, start,
ready, every earlier item keeps its state) and a file through a second queue, so a crash that repeats at
every start, or a stall of the whole daemon, shows up as a failure of that case.

- Only `inbox/` is group-writable; the producer cannot create, rename or plant anything in the spool root,
  `status/`, `work/`, `done/`, `failed/`; an existing all-2770 spool is tightened at start; a claimed
  item's folder is 0700.
- Inbox entries that are neither files nor folders (FIFO, socket, symlink, device) are rejected unread.
- Ready markers and requests are bounded, never followed, never block: FIFO, symlink, 2 MiB, shadowing
  fields, 200,000 nested arrays.
- Names: 255 bytes, non-UTF-8, control characters, leading dashes.
- Bundle trees: symlinks, FIFOs, sockets anywhere inside; 1,100 levels deep; more entries than
  `limits.files`; hard links to files the producer may not read; claimed files are taken over by root.
- A full spool filesystem pauses the work it touches; the item is done, intact, once space is back.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import grp
import hashlib
import json
import os
import pwd
import shutil
import signal
import stat
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import DaemonProcess, read_sidecar, wait_for

Start = Callable[..., DaemonProcess]
WriteConfig = Callable[[str], Path]

GROUP = "spoold-test-grp"
USER = "spoold-test-prod"
ACCOUNTS_LOCK = "/tmp/spoold-test-accounts.lock"
SUBDIRS = ("inbox", "work", "done", "failed", "status")
MiB = 1024 * 1024
FINAL_STATES = ("done", "failed")

# ---- the producer: an unprivileged user in the spool's group ---------------------------------------------------

# Run as the producer: a list of [op, *args] on stdin (JSON; paths are str, surrogate-escaped for raw bytes).
# `do` mode stops at the first error (exit 1, traceback on stderr); `attempt` mode prints each op's outcome.
PRODUCER_SCRIPT = r"""
import json, os, socket, sys

def p(path):
    return os.fsencode(path)

def tmp_beside(path):
    return os.path.join(os.path.dirname(path), b".producer-%d.tmp" % os.getpid())

def write(path, data, mode=0o644):
    fd = os.open(p(path), os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    try:
        os.fchmod(fd, mode)
        view = memoryview(os.fsencode(data))
        while view:
            view = view[os.write(fd, view):]
    finally:
        os.close(fd)

def append(path, data):
    with open(p(path), "ab") as stream:
        stream.write(os.fsencode(data))

def mkdir(path, mode=0o755):
    os.mkdir(p(path))
    os.chmod(p(path), mode)

def make_socket(path):
    folder, name = os.path.split(p(path))
    here = os.open(".", os.O_RDONLY)
    os.chdir(folder)  # a socket address holds at most 107 bytes: bind the bare name
    try:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(name)
        finally:
            sock.close()
    finally:
        os.fchdir(here)
        os.close(here)

def deep(base, depth, name):
    # Relative to a descriptor per level: the whole path grows past PATH_MAX.
    fd = os.open(p(base), os.O_RDONLY | os.O_DIRECTORY)
    for _ in range(depth):
        os.mkdir(p(name), dir_fd=fd)
        child = os.open(p(name), os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        os.close(fd)
        fd = child
    leaf = os.open(b"bottom.txt", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd)
    os.write(leaf, b"bottom")
    os.close(leaf)
    os.close(fd)

def copy(source, path):
    with open(p(source), "rb") as stream:
        write(path, os.fsdecode(stream.read()))

def placed(make):
    # Made under a hidden name (ignored by the daemon), then renamed in: complete at once.
    def op(path, *args):
        tmp = tmp_beside(p(path))
        make(os.fsdecode(tmp), *args)
        os.rename(tmp, p(path))
    return op

OPS = {
    "write": write, "append": append, "mkdir": mkdir, "deep": deep,
    "fifo_at": lambda path: os.mkfifo(p(path)),
    "socket_at": make_socket,
    "symlink_at": lambda path, target: os.symlink(p(target), p(path)),
    "link_at": lambda path, target: os.link(p(target), p(path)),
    "drop": placed(write), "drop_copy": placed(lambda tmp, source: copy(source, tmp)), "folder": placed(mkdir),
    "fifo": placed(lambda tmp: os.mkfifo(p(tmp))),
    "socket": placed(make_socket),
    "symlink": placed(lambda tmp, target: os.symlink(p(target), p(tmp))),
    "link": placed(lambda tmp, target: os.link(p(target), p(tmp))),
    "rename": lambda src, dst: os.rename(p(src), p(dst)),
    "unlink": lambda path: os.unlink(p(path)),
    "chmod": lambda path, mode: os.chmod(p(path), mode),
    "listdir": lambda path: os.listdir(p(path)),
    "read": lambda path: open(p(path), "rb").close(),
}

mode, ops = sys.argv[1], json.loads(sys.stdin.buffer.read())
outcomes = []
for name, *args in ops:
    if mode == "do":
        OPS[name](*args)
        continue
    try:
        OPS[name](*args)
        outcomes.append("ok")
    except OSError as exc:
        outcomes.append(type(exc).__name__)
print(json.dumps(outcomes))
"""

Op = list[Any]


def s(path: Path | str | bytes) -> str:
    """A path as the producer script takes it (str; raw bytes surrogate-escaped)."""
    return os.fsdecode(path)


@dataclasses.dataclass(frozen=True)
class Producer:
    uid: int
    gid: int

    def _command(self, mode: str) -> list[str]:
        return ["setpriv", "--reuid", str(self.uid), "--regid", str(self.gid), "--init-groups",
                sys.executable, "-c", PRODUCER_SCRIPT, mode]  # fmt: skip

    def _run(self, mode: str, ops: list[Op]) -> subprocess.CompletedProcess[bytes]:
        payload = json.dumps(ops).encode()
        return subprocess.run(self._command(mode), input=payload, capture_output=True, timeout=120, cwd="/",
                              env={**os.environ, "HOME": "/nonexistent", "PYTHONDONTWRITEBYTECODE": "1"})  # fmt: skip

    def do(self, *ops: Op) -> None:
        """Run `ops` as the producer; every one must succeed."""
        done = self._run("do", list(ops))
        if done.returncode != 0:
            raise AssertionError(f"producer failed at {ops!r}:\n{done.stderr.decode(errors='replace')}")

    def attempt(self, *ops: Op) -> list[str]:
        """Run `ops` as the producer; `ok` or the exception's class name for each."""
        done = self._run("attempt", list(ops))
        assert done.returncode == 0, done.stderr.decode(errors="replace")
        outcomes: list[str] = json.loads(done.stdout)
        return outcomes

    def spawn(self, code: str, *args: str) -> subprocess.Popen[str]:
        """A long-lived producer process running `code`, talking over stdin/stdout lines."""
        return subprocess.Popen(["setpriv", "--reuid", str(self.uid), "--regid", str(self.gid), "--init-groups",
                                 sys.executable, "-c", code, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                text=True, cwd="/")  # fmt: skip


def _remove_account() -> None:
    subprocess.run(["userdel", USER], capture_output=True)
    subprocess.run(["groupdel", GROUP], capture_output=True)


@pytest.fixture(scope="module")
def producer() -> Iterator[Producer]:
    """Group `spoold-test-grp` and user `spoold-test-prod` in it, removed at the end even on failure."""
    if os.geteuid() != 0:
        pytest.skip("needs root: the daemon runs as root and the producer is a separate, unprivileged user")
    for tool in ("setpriv", "useradd", "groupadd", "userdel", "groupdel"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed")
    # The names are fixed, so two runs at once (two engineers, one machine) would delete each other's
    # accounts mid-test: the accounts are held under an exclusive lock for as long as they exist.
    with open(ACCOUNTS_LOCK, "a") as lock:
        deadline = time.monotonic() + 90
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    pytest.skip(f"another test run has held {ACCOUNTS_LOCK} (the producer's accounts) for 90 s")
                time.sleep(0.2)  # a poll's interval, bounded by the deadline above: not synchronisation
        _remove_account()  # left over by an interrupted run
        try:
            subprocess.run(["groupadd", GROUP], check=True, capture_output=True)
            subprocess.run(["useradd", "--no-create-home", "--shell", "/usr/sbin/nologin", "-g", GROUP, USER],
                           check=True, capture_output=True)  # fmt: skip
            user = pwd.getpwnam(USER)
            yield Producer(user.pw_uid, user.pw_gid)
        finally:
            _remove_account()
            fcntl.flock(lock, fcntl.LOCK_UN)


# ---- a test's world: spool, destination, canary, the daemon, restarts ------------------------------------------

SIDE = """\
  side:
    settle: 0s
    chain: [checksum]
"""
SHIP = "{ship: {to: 'file://{tmp}/dest/'}}"
FILES = f"""\
  q:
    settle: 0s
    chain: [checksum, {SHIP}]
"""
BUNDLES = f"""\
  b:
    items: bundles
    settle: 0s
    chain: [checksum, {SHIP}]
"""
BIG_MARKERS = f"""\
  big:
    items: bundles
    limits: {{marker_bytes: 4MiB}}
    chain: [checksum, {SHIP}]
"""
FEW_FILES = f"""\
  few:
    items: bundles
    limits: {{files: 50}}
    chain: [checksum, {SHIP}]
"""
SETTLED = f"""\
  s:
    items: bundles
    ready: settle
    settle: 1s
    chain: [checksum, {SHIP}]
"""
REQUESTS = """\
  r:
    items: requests
    settle: 0s
    chain: [{exec: {argv: ['true']}}]
"""
# Holds each item in work/ until the test creates {tmp}/gate.
GATED = """\
  q:
    settle: 0s
    chain:
      - exec: {argv: [/bin/sh, -c, 'while [ ! -e "$0" ]; do sleep 0.05; done', '{tmp}/gate'], timeout: 60s}
"""


@dataclasses.dataclass
class World:
    tmp: Path
    producer: Producer
    start_daemon: Start
    write_config: WriteConfig
    canary: Path
    canary_dir: Path
    canary_text: bytes
    config: Path | None = None
    process: DaemonProcess | None = None
    processes: list[DaemonProcess] = dataclasses.field(default_factory=list)
    probes: int = 0

    @property
    def spool(self) -> Path:
        return self.tmp / "spool"

    @property
    def dest(self) -> Path:
        return self.tmp / "dest"

    def inbox(self, queue: str) -> Path:
        return self.spool / queue / "inbox"

    def configure(self, *queues: str, rescan: str = "60s") -> Path:
        self.config = self.write_config(f"spool: {{spool}}\ngroup: {GROUP}\nmin_free: 0\nrescan: {rescan}\n"
                                        f"queues:\n{SIDE}{''.join(queues)}")  # fmt: skip
        return self.config

    def start(self, wait: bool = True) -> DaemonProcess:
        assert self.config is not None, "configure() first"
        self.process = self.start_daemon(self.config, wait=wait)
        self.processes.append(self.process)
        return self.process

    def logs(self) -> str:
        return "\n".join(f"--- {p.log_path.name} ---\n{p.log()[-6000:]}" for p in self.processes)

    def wait(self, predicate: Callable[[], Any], timeout: float, what: str) -> Any:
        try:
            return wait_for(predicate, timeout, what)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{self.logs()}") from None

    def final(self, queue: str, item: str, timeout: float = 10.0) -> dict[str, Any]:
        def check() -> dict[str, Any] | None:
            doc = read_sidecar(self.spool, queue, item)
            return doc if doc and doc.get("state") in FINAL_STATES else None

        doc: dict[str, Any] = self.wait(check, timeout, f"{queue}/{item!r} done or failed")
        return doc

    def done(self, queue: str, item: str, timeout: float = 10.0) -> dict[str, Any]:
        doc = self.final(queue, item, timeout)
        assert doc["state"] == "done", f"{queue}/{item!r}: {doc['state']}: {doc['error']}\n{self.logs()}"
        return doc

    def rejected(self, queue: str, item: str, *words: str, timeout: float = 10.0) -> dict[str, Any]:
        """The item failed at once as rejected, with each of `words` in its reason, and nothing of it shipped."""
        doc = self.final(queue, item, timeout)
        assert doc["state"] == "failed", f"{queue}/{item!r} was not rejected: {doc}"
        error = doc["error"] or {}
        assert error.get("type") == "rejected" and error.get("retryable") is False, error
        message = str(error.get("message", "")).lower()
        for word in words:
            assert word.lower() in message, f"{word!r} not in the reason {error.get('message')!r}"
        assert all(step["state"] == "pending" for step in doc["steps"]), f"a step ran: {doc['steps']}"
        # The sidecar says failed first, then the folder moves (recovery completes the move after a crash).
        self.wait(lambda: (self.spool / queue / "failed" / item).is_dir(), 5, f"{queue}/{item!r} in failed/")
        assert not os.path.lexists(self.dest / item), f"{item!r} was shipped"
        return doc

    def probe(self, timeout: float = 5.0) -> None:
        """A normal file through the other queue: the daemon still serves everything else."""
        self.probes += 1
        name = f"probe-{self.probes}.txt"
        self.producer.do(["drop", s(self.inbox("side") / name), f"probe {self.probes}"])
        self.wait(lambda: (read_sidecar(self.spool, "side", name) or {}).get("state") == "done", timeout,
                  f"side/{name} done (is the daemon still serving other queues?)")  # fmt: skip

    def states(self) -> dict[tuple[str, str], str]:
        found = {}
        for queue_dir in self.spool.iterdir():
            status = queue_dir / "status"
            if not status.is_dir():
                continue
            for entry in status.iterdir():
                if entry.name.endswith(".json") and not entry.name.startswith("."):
                    doc = json.loads(entry.read_bytes())
                    found[(queue_dir.name, doc["item"])] = doc["state"]
        return found

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM; the daemon must exit 0 within `timeout`."""
        process = self.process
        assert process is not None and process.process is not None
        assert process.process.poll() is None, f"the daemon died:\n{self.logs()}"
        process.signal(signal.SIGTERM)
        try:
            code = process.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            raise AssertionError(f"the daemon did not stop within {timeout}s of SIGTERM:\n{self.logs()}") from None
        process.stop()
        assert code == 0, f"the daemon exited with {code}:\n{self.logs()}"

    def restart(self) -> None:
        """Stop, start again on the same spool: every item keeps its state and the daemon serves on."""
        before = self.states()
        assert all(state in FINAL_STATES for state in before.values()), f"items still active: {before}"
        self.stop()
        self.start()
        self.probe()
        after = self.states()
        changed = {key: (state, after.get(key)) for key, state in before.items() if after.get(key) != state}
        assert not changed, f"items changed state over a restart: {changed}\n{self.logs()}"
        assert self.process is not None and self.process.process is not None
        assert self.process.process.poll() is None, f"the daemon died after the restart:\n{self.logs()}"
        for process in self.processes:
            assert "Traceback" not in process.log(), f"a traceback in {process.log_path.name}:\n{self.logs()}"

    def holders_of_canary(self, *roots: Path) -> list[str]:
        """Regular files under `roots` (never following a link, at most 40 levels) holding the canary."""
        found = []
        stack = [(root, 0) for root in roots if root.exists()]
        while stack:
            folder, depth = stack.pop()
            try:
                entries = list(os.scandir(folder))
            except OSError:
                continue
            for entry in entries:
                with contextlib.suppress(OSError):
                    if entry.is_dir(follow_symlinks=False) and depth < 40:
                        stack.append((Path(entry.path), depth + 1))
                    elif entry.is_file(follow_symlinks=False) and self.canary_text in Path(entry.path).read_bytes():
                        found.append(entry.path)
        return found

    def assert_canary_unread(self, *, in_spool: bool = True) -> None:
        roots = (self.spool, self.dest) if in_spool else (self.dest,)
        holders = self.holders_of_canary(*roots)
        assert not holders, f"the canary's content reached {holders}"
        info = os.lstat(self.canary)
        assert (info.st_uid, stat.S_IMODE(info.st_mode)) == (0, 0o600), "the canary itself was changed"

    def stop_all(self) -> None:
        for process in self.processes:
            if process.process is not None:
                process.stop()


def _open_path_to_producer(path: Path) -> None:
    """o+x on `path` and every parent, so the producer can reach the spool (pytest's tmp folders are 0700)."""
    for folder in [path, *path.parents]:
        mode = stat.S_IMODE(os.stat(folder).st_mode)
        if not mode & stat.S_IXOTH:
            os.chmod(folder, mode | stat.S_IXOTH)


@pytest.fixture
def world(tmp_path: Path, producer: Producer, write_config: WriteConfig, daemon: Start) -> Iterator[World]:
    _open_path_to_producer(tmp_path)
    canary_text = f"CANARY-{uuid.uuid4().hex}".encode()
    canary_dir = tmp_path / "canary"
    canary_dir.mkdir(mode=0o755)
    canary = canary_dir / "secret.txt"
    canary.write_bytes(canary_text)
    os.chmod(canary, 0o600)  # root's alone
    (tmp_path / "dest").mkdir()
    here = World(tmp_path, producer, daemon, write_config, canary, canary_dir, canary_text)
    yield here
    here.stop_all()
    # rm walks trees deeper than Python's recursion limit and PATH_MAX (pytest's own cleanup would not).
    for folder in ("spool", "dest"):
        subprocess.run(["rm", "-rf", "--one-file-system", str(tmp_path / folder)], check=False)


# ---- 1. only inbox/ is group-writable ----------------------------------------------------------------------------


def _assert_modes(world: World, queues: tuple[str, ...]) -> None:
    gid = grp.getgrnam(GROUP).gr_gid
    folders = [world.spool] + [world.spool / q for q in queues] + [world.spool / q / d for q in queues for d in SUBDIRS]
    wrong = []
    for folder in folders:
        info = os.lstat(folder)
        wanted = (0o2770, 0o770) if folder.name == "inbox" else (0o2750, 0o750)
        if stat.S_IMODE(info.st_mode) not in wanted or info.st_gid != gid:
            wrong.append(f"{folder.relative_to(world.tmp)}: {stat.S_IMODE(info.st_mode):o} gid {info.st_gid}")
    assert not wrong, f"folders with the wrong mode or group (want 2750, inbox 2770, gid {gid}): {wrong}"


def _assert_producer_locked_out(world: World, queue: str) -> None:
    spool, q = world.spool, world.spool / queue
    mine = q / "inbox" / ".mine"
    sidecar = next(p for p in (spool / "side" / "status").iterdir() if p.name.endswith(".json"))
    attempts: dict[str, Op] = {
        "create a file in inbox/": ["write", s(mine), "mine"],
        "create status/x.json": ["write", s(q / "status" / "x.json"), "{}"],
        "create work/x": ["write", s(q / "work" / "x"), "x"],
        "create done/x": ["write", s(q / "done" / "x"), "x"],
        "create failed/x": ["write", s(q / "failed" / "x"), "x"],
        "mkdir work/x.d": ["mkdir", s(q / "work" / "x.d")],
        "create <spool>/x": ["write", s(spool / "x"), "x"],
        "create <spool>/<queue>/x": ["write", s(q / "x"), "x"],
        "plant <spool>/.metrics.prom.tmp": ["symlink_at", s(spool / ".metrics.prom.tmp"), s(world.canary)],
        "plant <spool>/.health.json.tmp": ["symlink_at", s(spool / ".health.json.tmp"), s(world.canary)],
        "plant status/.x.tmp": ["symlink_at", s(q / "status" / ".x.tmp"), s(world.canary)],
        "rename inbox/.mine to status/mine.json": ["rename", s(mine), s(q / "status" / "mine.json")],
        "rename inbox/.mine to <spool>/health.json": ["rename", s(mine), s(spool / "health.json")],
        "rename inbox/.mine to work/mine": ["rename", s(mine), s(q / "work" / "mine")],
        "rename inbox/.mine to done/mine": ["rename", s(mine), s(q / "done" / "mine")],
        "rename inbox/ away": ["rename", s(q / "inbox"), s(q / "inbox.old")],
        "write <spool>/health.json": ["append", s(spool / "health.json"), "x"],
        "unlink <spool>/health.json": ["unlink", s(spool / "health.json")],
        "write a sidecar": ["append", s(sidecar), "x"],
        "unlink a sidecar": ["unlink", s(sidecar)],
        "chmod status/": ["chmod", s(q / "status"), 0o777],
        "unlink inbox/.mine": ["unlink", s(mine)],
    }
    outcomes = dict(zip(attempts, world.producer.attempt(*attempts.values()), strict=True))
    expected = {label: "ok" if label in ("create a file in inbox/", "unlink inbox/.mine") else "PermissionError"
                for label in attempts}  # fmt: skip
    assert outcomes == expected, {k: v for k, v in outcomes.items() if expected[k] != v}
    assert not os.path.lexists(spool / ".metrics.prom.tmp") and not os.path.lexists(spool / ".health.json.tmp")
    assert world.process is not None and world.process.process is not None
    assert json.loads((spool / "health.json").read_bytes())["pid"] == world.process.process.pid


@pytest.mark.parametrize("existing", [False, True], ids=["new-spool", "existing-2770-spool"])
def test_only_inbox_is_group_writable(world: World, existing: bool) -> None:
    world.configure(GATED)
    if existing:
        # A spool from before issue 11: every folder 2770 in the group, and a claimed item's folder too.
        gid = grp.getgrnam(GROUP).gr_gid
        old_item = world.spool / "q" / "work" / "old.bin"
        folders = [world.spool] + [world.spool / q / d for q in ("side", "q") for d in ("", *SUBDIRS)] + [old_item]
        for folder in folders:
            folder.mkdir(parents=True, exist_ok=True)
            os.chown(folder, 0, gid)
            os.chmod(folder, 0o2770)
        (old_item / "old.bin").write_bytes(b"claimed by an older version")
        status = world.spool / "q" / "status" / "planted.json"
        assert world.producer.attempt(["write", s(status), "{}"], ["unlink", s(status)]) == ["ok", "ok"], \
            "precondition: the producer can write the old spool's status/"
    (world.tmp / "gate").touch()  # the old item, if any, passes at once
    world.start()
    if existing:
        world.done("q", "old.bin")
        assert stat.S_IMODE(os.lstat(world.spool / "q" / "done" / "old.bin").st_mode) & 0o077 == 0, \
            "an old claimed item's folder was not tightened"
    (world.tmp / "gate").unlink()
    world.probe()
    _assert_modes(world, ("side", "q"))
    _assert_producer_locked_out(world, "q")

    # A claimed item's own folder is the daemon's alone.
    world.producer.do(["drop", s(world.inbox("q") / "held.bin"), "held"])
    world.wait(lambda: (read_sidecar(world.spool, "q", "held.bin") or {}).get("state") == "running", 10,
               "held.bin running")  # fmt: skip
    held = world.spool / "q" / "work" / "held.bin"
    # Permission bits 0700 (the setgid bit that mkdir inherits from work/ grants nothing).
    assert stat.S_IMODE(os.lstat(held).st_mode) & 0o777 == 0o700
    assert world.producer.attempt(["listdir", s(held)], ["write", s(held / "x"), "x"],
                                  ["read", s(held / "held.bin")]) == ["PermissionError"] * 3  # fmt: skip
    (world.tmp / "gate").touch()
    world.done("q", "held.bin")
    world.restart()
    _assert_modes(world, ("side", "q"))


def test_daemon_files_are_0640(world: World) -> None:
    """SPEC section 2: folders 2750 "and files 0640": sidecars, health.json, metrics.prom."""
    world.configure(FILES)
    world.start()
    world.probe()
    files = [world.spool / "health.json", world.spool / "metrics.prom",
             *(p for p in (world.spool / "side" / "status").iterdir() if not p.name.startswith("."))]
    modes = {str(f.relative_to(world.spool)): stat.S_IMODE(os.lstat(f).st_mode) for f in files}
    assert {k: f"{m:o}" for k, m in modes.items() if m != 0o640} == {}, "daemon files that are not 0640"


# ---- 2. inbox entries that are neither files nor folders ---------------------------------------------------------


def _make_device(world: World, path: Path) -> None:
    # A producer cannot mknod; root can, and the daemon must treat it like any other special file.
    tmp = path.with_name(".device.tmp")
    os.mknod(tmp, stat.S_IFCHR | 0o666, os.makedev(1, 3))
    os.rename(tmp, path)


ENTRY_KINDS: dict[str, tuple[Callable[[World, Path], None], str]] = {
    "fifo": (lambda w, path: w.producer.do(["fifo", s(path)]), "fifo"),
    "socket": (lambda w, path: w.producer.do(["socket", s(path)]), "socket"),
    "symlink-to-file": (lambda w, path: w.producer.do(["symlink", s(path), s(w.canary)]), "symlink"),
    "symlink-to-folder": (lambda w, path: w.producer.do(["symlink", s(path), s(w.canary_dir)]), "symlink"),
    "device": (_make_device, "device"),
}


@pytest.mark.parametrize("queue", ["q", "b"], ids=["files-queue", "bundles-queue"])
@pytest.mark.parametrize("kind", list(ENTRY_KINDS))
def test_inbox_entry_that_is_not_a_file_or_folder(world: World, kind: str, queue: str) -> None:
    world.configure(FILES, BUNDLES)
    world.start()
    make, word = ENTRY_KINDS[kind]
    make(world, world.inbox(queue) / "entry.bin")
    world.rejected(queue, "entry.bin", word)
    world.probe()
    world.assert_canary_unread()
    world.restart()


# ---- 3. ready markers ---------------------------------------------------------------------------------------------

BIG_MARKER = json.dumps({"operator": "ann", "pad": "x" * (2 * MiB)})
MARKER_CASES: dict[str, tuple[str, Callable[[World, Path], None], list[str] | None]] = {
    # id: (queue, make the marker at path, words of the rejection, or None when the bundle must be done)
    "fifo": ("b", lambda w, m: w.producer.do(["fifo", s(m)]), ["fifo"]),
    "symlink": ("b", lambda w, m: w.producer.do(["symlink", s(m), s(w.canary)]), ["symlink"]),
    "folder": ("b", lambda w, m: w.producer.do(["folder", s(m)]), ["folder"]),
    "2MiB": ("b", lambda w, m: w.producer.do(["drop", s(m), BIG_MARKER]), ["limit"]),
    "2MiB-under-marker_bytes-4MiB": ("big", lambda w, m: w.producer.do(["drop", s(m), BIG_MARKER]), None),
    "path-field": ("b", lambda w, m: w.producer.do(["drop", s(m), '{"path": "/etc/shadow"}']), ["shadow"]),
    "name-field": ("b", lambda w, m: w.producer.do(["drop", s(m), '{"name": "x"}']), ["shadow"]),
    "200k-nested-arrays": ("b", lambda w, m: w.producer.do(["drop", s(m), "[" * 200_000]), []),
    "not-utf8": ("b", lambda w, m: w.producer.do(["drop", s(m), os.fsdecode(b'{"a": "\xff\xfe"}')]), ["utf-8"]),
}


def _drop_bundle(world: World, queue: str, name: str, extra: tuple[Op, ...] = ()) -> Path:
    """A small bundle built under a hidden name, then renamed into the inbox (no marker yet)."""
    build = world.inbox(queue) / f".build-{name}"
    world.producer.do(["mkdir", s(build)], ["write", s(build / "a.txt"), "a" * 100], *extra,
                      ["rename", s(build), s(world.inbox(queue) / name)])  # fmt: skip
    return world.inbox(queue) / name


@pytest.mark.parametrize("case", list(MARKER_CASES))
def test_hostile_ready_marker(world: World, case: str) -> None:
    queue, make, words = MARKER_CASES[case]
    world.configure(BUNDLES, BIG_MARKERS)
    world.start()
    _drop_bundle(world, queue, "episode")
    make(world, world.inbox(queue) / "episode.ready")
    # Straight away, before looking at the bundle: a marker must never hold up another queue
    # (a FIFO marker opened for reading used to block the whole daemon).
    world.probe(timeout=5)
    if words is None:
        doc = world.done(queue, "episode")
        assert doc["fields"]["operator"] == "ann" and len(doc["fields"]["pad"]) == 2 * MiB
        assert (world.dest / "episode" / "a.txt").read_bytes() == b"a" * 100
    else:
        world.rejected(queue, "episode", *words)
    world.assert_canary_unread()
    world.restart()


# ---- 4. requests ------------------------------------------------------------------------------------------------

REQUEST_CASES: dict[str, tuple[Callable[[World, Path], None], list[str] | None]] = {
    "normal": (lambda w, r: w.producer.do(["drop", s(r), '{"session": "s1"}']), None),
    "2MiB": (lambda w, r: w.producer.do(["drop", s(r), json.dumps({"pad": "x" * (2 * MiB)})]), ["limit"]),
    "fifo": (lambda w, r: w.producer.do(["fifo", s(r)]), ["fifo"]),
    "symlink": (lambda w, r: w.producer.do(["symlink", s(r), s(w.canary)]), ["symlink"]),
    "socket": (lambda w, r: w.producer.do(["socket", s(r)]), ["socket"]),
    "folder": (lambda w, r: w.producer.do(["folder", s(r)]), ["folder"]),
    "200k-nested-arrays": (lambda w, r: w.producer.do(["drop", s(r), "[" * 200_000]), []),
}


@pytest.mark.parametrize("case", list(REQUEST_CASES))
def test_hostile_request(world: World, case: str) -> None:
    make, words = REQUEST_CASES[case]
    world.configure(REQUESTS)
    world.start()
    make(world, world.inbox("r") / "req.json")
    world.probe(timeout=5)
    # SPEC section 1: `req.json` is item `req`, and its sidecar path follows from the name, so the producer
    # knows where to poll. Whichever sidecar appears is checked; the path is asserted last.
    item = world.wait(lambda: next((i for i in ("req", "req.json") if read_sidecar(world.spool, "r", i)), None),
                      10, "the request's sidecar")  # fmt: skip
    if words is None:
        assert world.done("r", item)["fields"] == {"session": "s1"}
    else:
        world.rejected("r", item, *words)
    world.assert_canary_unread()
    world.restart()
    assert item == "req", f"the request's sidecar is status/{item}.json, not status/req.json where its producer polls"


# ---- 5. names ---------------------------------------------------------------------------------------------------

NAMES = {
    "255-bytes": b"a" * 251 + b".bin",
    "not-utf8": b"caf\xe9-\xff.bin",
    "newline": b"two\nlines.txt",
    "escape": b"\x1b[31mred\x1b[0m.txt",
    "carriage-return": b"over\rwrite.txt",
    "leading-dash": b"-rf",
    "leading-dashes": b"--help.txt",
    "spaces": b"  spaced   name .txt",
    "utf8-and-bidi": "caf\u00e9-\u202egnp.exe".encode(),
}


def _sidecar_files(world: World, queue: str) -> set[bytes]:
    status = os.fsencode(world.spool / queue / "status")
    return {n for n in os.listdir(status) if n.endswith(b".json") and not n.startswith(b".")}


@pytest.mark.parametrize("key", list(NAMES))
def test_hostile_name(world: World, key: str) -> None:
    raw = NAMES[key]
    name = os.fsdecode(raw)
    world.configure(FILES)
    world.start()
    content = f"content of {key}".encode()
    world.producer.do(["drop", s(os.path.join(os.fsencode(world.inbox("q")), raw)), os.fsdecode(content)])
    new = world.wait(lambda: _sidecar_files(world, "q"), 10, f"a sidecar for {raw!r}")
    assert len(new) == 1, f"one item, one sidecar: {new}"
    sidecar_name = new.pop()
    doc = json.loads(Path(os.fsdecode(os.path.join(os.fsencode(world.spool / "q" / "status"), sidecar_name)))
                     .read_bytes())  # fmt: skip
    item = doc["item"]
    assert os.fsencode(item) + b".json" == sidecar_name, "the sidecar's name is the item's"
    assert len(os.fsencode(item)) <= 240, f"item name of {len(os.fsencode(item))} bytes"
    assert doc["original_name"] == name
    if len(raw) <= 240:
        assert item == name, "a name that fits is kept as it is (and reversibly when not UTF-8)"
    doc = world.done("q", item)
    assert (world.dest / item).read_bytes() == content
    assert (world.spool / "q" / "done" / item / item).read_bytes() == content
    world.restart()


def test_long_names_sharing_240_bytes_are_two_items(world: World) -> None:
    world.configure(FILES)
    world.start()
    first, second = b"a" * 240 + b"x" * 11 + b".bin", b"a" * 240 + b"y" * 11 + b".bin"
    inbox = os.fsencode(world.inbox("q"))
    world.producer.do(["drop", s(os.path.join(inbox, first)), "first"], ["drop", s(os.path.join(inbox, second)),
                                                                         "second"])  # fmt: skip
    world.wait(lambda: len(_sidecar_files(world, "q")) == 2, 10, "two sidecars")
    status = world.spool / "q" / "status"
    docs = [json.loads((status / os.fsdecode(n)).read_bytes()) for n in _sidecar_files(world, "q")]
    assert {d["original_name"] for d in docs} == {os.fsdecode(first), os.fsdecode(second)}
    items = {d["item"] for d in docs}
    assert len(items) == 2 and all(len(os.fsencode(i)) <= 240 for i in items), items
    for doc in docs:
        world.done("q", doc["item"])
        expected = b"first" if doc["original_name"] == os.fsdecode(first) else b"second"
        assert (world.dest / doc["item"]).read_bytes() == expected
    world.restart()


# ---- 6. bundle trees -------------------------------------------------------------------------------------------

DEPTH = 1100


def _tree_ops(world: World, build: Path, case: str) -> list[Op]:
    """What the producer puts in the bundle (below `build`) for each case."""
    b = s(build)
    deep3 = [["mkdir", f"{b}/l1"], ["mkdir", f"{b}/l1/l2"], ["mkdir", f"{b}/l1/l2/l3"]]
    return {
        "symlink-top": [["symlink_at", f"{b}/evil", s(world.canary)]],
        "symlink-3-down": [*deep3, ["symlink_at", f"{b}/l1/l2/l3/evil", s(world.canary)]],
        "symlink-to-folder-3-down": [*deep3, ["symlink_at", f"{b}/l1/l2/l3/evil", s(world.canary_dir)]],
        "fifo": [["mkdir", f"{b}/sub"], ["fifo_at", f"{b}/sub/pipe"]],
        "socket": [["mkdir", f"{b}/sub"], ["socket_at", f"{b}/sub/sock"]],
        "too-many-files": [["write", f"{b}/f{i:03d}.txt", str(i)] for i in range(60)],
        "1100-deep": [["deep", b, DEPTH, "lvl"]],
        "1100-deep-settle": [["deep", b, DEPTH, "lvl"]],
    }[case]


TREE_CASES: dict[str, tuple[str, list[str]]] = {
    # id: (queue, words of the rejection)
    "symlink-top": ("b", ["evil", "symlink"]),
    "symlink-3-down": ("b", ["l1/l2/l3/evil", "symlink"]),
    "symlink-to-folder-3-down": ("b", ["l1/l2/l3/evil", "symlink"]),
    "fifo": ("b", ["sub/pipe", "fifo"]),
    "socket": ("b", ["sub/sock", "socket"]),
    "too-many-files": ("few", ["limits.files"]),
    "1100-deep": ("b", ["deeper"]),
    "1100-deep-settle": ("s", ["deeper"]),
}


@pytest.mark.parametrize("case", list(TREE_CASES))
def test_hostile_bundle_tree(world: World, case: str) -> None:
    queue, words = TREE_CASES[case]
    world.configure(BUNDLES, FEW_FILES, SETTLED)
    world.start()
    inbox = world.inbox(queue)
    build = inbox / ".build-episode"
    world.producer.do(["mkdir", s(build)], ["write", s(build / "a.txt"), "a"], *_tree_ops(world, build, case),
                      ["rename", s(build), s(inbox / "episode")])  # fmt: skip
    if queue != "s":
        world.producer.do(["drop", s(inbox / "episode.ready"), ""])
    # First another queue, by its inotify event (rescan is 60 s): no bundle may stop the daemon's watching.
    world.probe(timeout=5)
    world.rejected(queue, "episode", *words, timeout=15)
    world.assert_canary_unread()
    world.restart()  # includes: SIGTERM stops the daemon within 10 s with exit 0 (a FIFO inside used to hang it)


# Hard links: the kernel's protected_hardlinks forbids the producer a link to a file it may not read and write,
# so root makes those (as a careless admin or an old file would); a link to a file it may write it makes itself.
def _link_root_only(world: World, path: Path) -> None:
    os.link(world.canary, path)


def test_hard_link_in_bundle_to_root_only_file_is_rejected(world: World) -> None:
    world.configure(BUNDLES)
    world.start()
    inbox = world.inbox("b")
    build = inbox / ".build-episode"
    world.producer.do(["mkdir", s(build)], ["write", s(build / "a.txt"), "a"], ["mkdir", s(build / "sub")])
    _link_root_only(world, build / "sub" / "copy.txt")
    world.producer.do(["rename", s(build), s(inbox / "episode")], ["drop", s(inbox / "episode.ready"), ""])
    world.rejected("b", "episode", "sub/copy.txt", "not readable by the item's owner")
    world.probe()
    world.assert_canary_unread(in_spool=False)  # the link itself is in failed/; nothing of it shipped
    world.restart()


def test_top_level_hard_link_to_root_only_file_is_rejected(world: World) -> None:
    world.configure(FILES)
    world.start()
    tmp = world.inbox("q") / ".link.tmp"
    _link_root_only(world, tmp)
    os.rename(tmp, world.inbox("q") / "copy.txt")
    world.rejected("q", "copy.txt", "hard link")
    world.probe()
    world.assert_canary_unread(in_spool=False)
    world.restart()


@pytest.mark.parametrize("where", ["top-level", "inside-bundle"])
def test_hard_link_to_another_users_file_is_not_taken_over(world: World, where: str) -> None:
    """A file of another user that the producer may write (0666) can be hard-linked by the producer.

    Whatever becomes of the item, the daemon must not change that user's file: it lies outside the
    item's own files (SPEC section 10), so no chown to root and no chmod of it.
    """
    world.configure(FILES, BUNDLES)
    world.start()
    nobody = pwd.getpwnam("nobody")
    victim = world.tmp / "victim.txt"
    victim.write_bytes(b"the other user's file")
    os.chown(victim, nobody.pw_uid, nobody.pw_gid)
    os.chmod(victim, 0o666)
    if where == "top-level":
        world.producer.do(["link", s(world.inbox("q") / "linked.txt"), s(victim)])
        doc = world.final("q", "linked.txt")
    else:
        inbox = world.inbox("b")
        build = inbox / ".build-episode"
        world.producer.do(["mkdir", s(build)], ["link_at", s(build / "linked.txt"), s(victim)],
                          ["rename", s(build), s(inbox / "episode")], ["drop", s(inbox / "episode.ready"), ""])
        doc = world.final("b", "episode")
    info = os.lstat(victim)
    assert (info.st_uid, stat.S_IMODE(info.st_mode)) == (nobody.pw_uid, 0o666), (
        f"the other user's file became uid {info.st_uid} mode {stat.S_IMODE(info.st_mode):o} "
        f"(item {doc['state']}: {doc['error']})")
    world.probe()
    world.restart()


def test_claimed_bundle_is_taken_over_by_root(world: World) -> None:
    world.configure(BUNDLES)
    world.start()
    inbox = world.inbox("b")
    build = inbox / ".build-episode"
    files = {"a.txt": (b"a" * 10, 0o644), "secret.txt": (b"mine only", 0o600), "shared.txt": (b"all", 0o666),
             "sub/b.txt": (b"b" * 20, 0o664)}  # fmt: skip
    world.producer.do(["mkdir", s(build)], ["mkdir", s(build / "sub"), 0o777],
                      *(["write", s(build / rel), data.decode(), mode] for rel, (data, mode) in files.items()),
                      ["rename", s(build), s(inbox / "episode")], ["drop", s(inbox / "episode.ready"), ""])  # fmt: skip
    world.done("b", "episode")
    item = world.spool / "b" / "done" / "episode"
    assert stat.S_IMODE(os.lstat(item).st_mode) & 0o077 == 0
    loose = []
    for path in [item / "episode", item / "episode" / "sub", *(item / "episode" / rel for rel in files)]:
        info = os.lstat(path)
        if info.st_uid != 0 or info.st_mode & 0o022:
            loose.append(f"{path.relative_to(item)}: uid {info.st_uid} mode {stat.S_IMODE(info.st_mode):o}")
    assert not loose, f"claimed entries not taken over (want uid 0, no group/other write): {loose}"
    for rel, (data, _) in files.items():
        assert (world.dest / "episode" / rel).read_bytes() == data
    world.restart()


TAMPERER = r"""
import os, sys
tmp, final = sys.argv[1:]
fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
os.write(fd, b"original")
os.rename(tmp, final)  # moved in complete, while this descriptor stays open for writing
print("open", flush=True)
sys.stdin.readline()
os.pwrite(fd, b"TAMPERED", 0)
os.close(fd)
print("written", flush=True)
"""


def test_a_descriptor_held_since_before_the_claim_changes_nothing_shipped(world: World) -> None:
    """A write descriptor opened before the claim cannot be revoked (trees.py says so); what was shipped is
    what was checksummed, and writing through it afterwards reaches only the kept copy, never the destination."""
    world.configure(FILES)
    world.start()
    target = world.inbox("q") / "held-open.txt"
    tamperer = world.producer.spawn(TAMPERER, str(target.with_name(".held-open.tmp")), str(target))
    try:
        assert tamperer.stdout is not None and tamperer.stdin is not None
        assert tamperer.stdout.readline().strip() == "open"
        doc = world.final("q", "held-open.txt")
        tamperer.stdin.write("go\n")
        tamperer.stdin.flush()
        assert tamperer.stdout.readline().strip() == "written"
    finally:
        tamperer.kill()
        tamperer.wait(timeout=10)
        for stream in (tamperer.stdin, tamperer.stdout):
            if stream is not None:
                stream.close()
    assert doc["state"] == "done", doc
    shipped = (world.dest / "held-open.txt").read_bytes()
    assert shipped == b"original", f"the destination changed after the item was done: {shipped!r}"
    digest = doc["steps"][0]["result"].get("sha256") or next(iter(doc["digests"].values()))["sha256"]
    assert hashlib.sha256(shipped).hexdigest() == digest
    world.restart()


# ---- 8. a full spool filesystem ----------------------------------------------------------------------------------


@pytest.fixture
def small_spool(world: World) -> Iterator[Path]:
    """An 8 MiB tmpfs as the spool, unmounted at the end even on failure (after the daemons stop)."""
    world.spool.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m,nr_inodes=2000", "tmpfs", str(world.spool)],
                             capture_output=True, text=True)  # fmt: skip
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {mounted.stderr.strip()}")
    try:
        yield world.spool
    finally:
        world.stop_all()
        if subprocess.run(["umount", str(world.spool)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(world.spool)], capture_output=True)


def _fill(path: Path) -> int:
    """Write `path` until the filesystem is full; its size."""
    chunk = b"\0" * 65536
    with open(path, "wb", buffering=0) as stream:
        while True:
            try:
                stream.write(chunk)
            except OSError:
                break
        for size in (4096, 512, 1):
            with contextlib.suppress(OSError):
                while stream.write(b"\0" * size):
                    pass
    return path.stat().st_size


def test_full_disk_pauses_the_item_and_the_daemon_lives(world: World, small_spool: Path) -> None:
    world.configure(FILES, rescan="1s")
    world.start()
    source = world.tmp / "item.bin"
    source.write_bytes(os.urandom(MiB))
    os.chmod(source, 0o644)
    sha = hashlib.sha256(source.read_bytes()).hexdigest()
    inbox = world.inbox("q")
    # The item is written first (hidden, so not yet claimed), then the disk filled to the last byte, then the
    # item renamed in (a rename needs no space): its claim's sidecar write meets ENOSPC.
    world.producer.do(["drop_copy", s(inbox / ".item.bin.part"), s(source)])
    filler = small_spool / "filler"
    _fill(filler)
    assert os.statvfs(small_spool).f_bavail == 0
    world.producer.do(["rename", s(inbox / ".item.bin.part"), s(inbox / "item.bin")])
    process = world.process
    assert process is not None and process.process is not None
    # The daemon must not die on a full disk: it meets ENOSPC at the claim, and again at a rescan (1s) after it.
    def met_enospc_twice() -> bool:
        assert process.process is not None and process.process.poll() is None, \
            f"the daemon died on a full disk:\n{world.logs()}"  # fmt: skip
        return process.log().count("No space left on device") >= 2

    world.wait(met_enospc_twice, 10, "the daemon to meet ENOSPC twice, and live")
    filler.unlink()
    world.done("q", "item.bin", timeout=20)
    assert hashlib.sha256((world.dest / "item.bin").read_bytes()).hexdigest() == sha
    world.wait(lambda: json.loads((small_spool / "health.json").read_bytes()).get("pid") == process.process.pid, 10,
               "health.json written again")  # fmt: skip
    world.probe()
    world.restart()
